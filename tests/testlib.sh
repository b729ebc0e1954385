# Helpers for tests/*.test.  run.sh starts one bash per .test file, sources
# this file and then the .test file, with a fresh empty directory as cwd.
#
# Set by run.sh (exported):
#   QEMU_IMG    program under test, called exactly like qemu-img
#   ORACLE_IMG  the real qemu-img (oracle)       QEMU_IO  the real qemu-io
#   IMGBOX      the imgbox binary, empty when running against the oracle
#   TEST_FILE   name of the running .test file, without ".test"
#   T_SCRATCH   private scratch directory of this .test file (not the cwd)
#   RESULTS     file that collects one "PASS|FAIL|SKIP name" line per test
#   VERBOSE     1 = print everything about a failure
#
# Test helpers (every COMMAND is a bash string evaluated in a subshell in the
# cwd with stdin from /dev/null; quote it with '' so that $QEMU_IMG and $?
# are expanded when the test runs):
#   testing NAME COMMAND STDOUT          stdout must be STDOUT; exit code ignored
#   testing_rc NAME RC COMMAND           exit code must be RC; output ignored
#   testing_stderr NAME RC COMMAND ERR   exit code RC and stderr exactly ERR
#   testing_stderr_has NAME RC COMMAND TEXT
#                                        exit code RC, stderr contains TEXT
#   testing_full NAME RC COMMAND STDOUT STDERR
#                                        exit code, stdout and stderr exact
#   same_as_oracle [OPTIONS] NAME ARG...
#       runs "$QEMU_IMG ARG..." and "$ORACLE_IMG ARG..." each in its own copy
#       of the cwd and compares exit code and stdout.  The absolute path of
#       the copy is replaced by @DIR@ in the output.  OPTIONS:
#         --stderr       compare stderr too
#         --files "F.."  compare these files afterwards (existence, size,
#                        content)
#         --alloc        with --files, compare allocated blocks as well
#         --sed EXPR     apply this sed expression to stdout/stderr of both
#       The cwd itself is not changed.
#
# Expected texts are literal: no backslash escapes are interpreted.  A
# non-empty expected text gets a final newline appended, so write it without
# one; an empty expected text means "no output at all".  Use $'...' for
# special characters.
#
# Skipping:
#   skip_next REASON        the next test is recorded as SKIP
#   skip_rest REASON        every later test of this file is recorded as SKIP
#   skip_unless_imgbox      skip_rest when IMGBOX is empty (oracle mode)
#   require_applet NAME...  skip_rest unless img-NAME is in the build
#   require_format FMT...   skip_rest unless qemu-img --help lists FMT
#
# Utilities for commands and expected texts:
#   fsize FILE              size in bytes
#   alloc_bytes FILE        allocated bytes (st_blocks * 512), what qemu-img
#                           calls "disk size" / "actual-size"
#   human_size BYTES        the size as qemu-img prints it: "4 KiB", "1.5 MiB",
#                           "0.977 MiB", "1e+03 KiB" (three significant digits)
#   put_bytes FILE OFFSET LENGTH BYTE
#                           write LENGTH bytes of value BYTE (0-255) at OFFSET
#                           without truncating the file
#   show_files              ls the cwd; returns the exit code of the command
#                           before it ('$QEMU_IMG create ...; show_files'
#                           checks both the status and what was created)
#   keep_rc CMD [ARG...]    runs CMD, then returns the exit code of the command
#                           before it: '$QEMU_IMG resize x 1M; keep_rc fsize x'
#   nonzero_bytes FILE      number of bytes in FILE that are not zero
#   seq_data LENGTH         LENGTH bytes of position-dependent text, for
#                           source files whose every block is different
#   kill_sweep IMG CMD...   crash safety: copies IMG to t.EXT (EXT: IMG's
#                           extension) and runs CMD (which names t.EXT)
#                           killed at its write 1, 2, ... (IMGBOX_FAULT=
#                           write:kill:n) until it completes; past the 8th
#                           the stops spread out (n grows by n/8 + 1). After
#                           each stop the real qemu-img check must find the
#                           copy clean or with leaks only (or not check its
#                           format), and every 512-byte block of its disk
#                           must be the one from before or after CMD. OTHER
#                           names a second image CMD changes (a commit's
#                           base), restored from $OTHER.orig each time and
#                           checked too; READ the image whose disk is
#                           compared (default t.EXT); ALLOW a pattern
#                           that every ERROR line of a failed check may
#                           match (a window the format cannot close).
#                           Prints a line per bad stop, then
#                           "swept" after at least MIN (3) stops.

_tl_skip_rest=
_tl_skip_next=

_tl_record()
{
  printf '%s %s\n' "$1" "$2" >> "$RESULTS"
}

# Write the expected text $2 to file $1 (final newline added unless empty).
_tl_expect()
{
  if [ -z "$2" ]; then
    : > "$1"
  else
    printf '%s\n' "$2" > "$1"
  fi
}

# The applets of the binary under test, once (empty list: oracle mode).
_tl_applets=
_tl_have_applet()
{
  [ -n "$IMGBOX" ] || return 0
  [ -n "$_tl_applets" ] || _tl_applets=" $("$IMGBOX" --list 2>/dev/null | tr '\n' ' ') "
  case $_tl_applets in *" img-$1 "*) return 0 ;; esac
  # No list at all is no reason to skip: the test runs and shows what is
  # wrong with the binary (a loaded machine once made three tests skip).
  case $_tl_applets in *img-*) return 1 ;; esac
  _tl_applets=
  return 0
}

# True if the binary under test has fault injection (IMGBOX_FAULT); a
# configuration without CONFIG_FAULT_INJECTION ignores the variable.
_tl_fault=
_tl_have_fault()
{
  local f
  [ -n "$IMGBOX" ] || return 1
  if [ -z "$_tl_fault" ]; then
    f=$T_SCRATCH/fault-probe.img
    head -c 512 /dev/zero > "$f"
    if IMGBOX_FAULT=read:5:1 "$IMGBOX" info "$f" > /dev/null 2>&1; then
      _tl_fault=no
    else
      _tl_fault=yes
    fi
    rm -f "$f"
  fi
  [ "$_tl_fault" = yes ]
}

# Prints the first qemu-img command the command string $1 runs through
# $QEMU_IMG that this build leaves out, if any.
_tl_missing_applet()
{
  local rest=$1 cmd
  [ -n "$IMGBOX" ] || return 0
  while [[ $rest =~ \$QEMU_IMG[\"]?[[:space:]]+([a-z]+)(.*) ]]; do
    cmd=${BASH_REMATCH[1]}
    rest=${BASH_REMATCH[2]}
    # only qemu-img's own commands: tests of unknown ones must still run
    case " amend bench check commit compare convert create dd info map measure rebase resize snapshot " in
      *" $cmd "*) ;;
      *) continue ;;
    esac
    _tl_have_applet "$cmd" || { echo "$cmd"; return 0; }
  done
}

# Returns 0 (and records SKIP) if this test is to be skipped. $2 is the
# command string: a test of an applet the build leaves out is skipped.
_tl_skipping()
{
  local why=$_tl_skip_rest miss

  if [ -n "$_tl_skip_next" ]; then
    why=$_tl_skip_next
    _tl_skip_next=
  fi
  if [ -z "$why" ] && [ -n "${2:-}" ]; then
    miss=$(_tl_missing_applet "$2")
    [ -z "$miss" ] || why="img-$miss is not in this build"
    case $2 in
      *IMGBOX_FAULT=*) _tl_have_fault || why="no fault injection in this build" ;;
    esac
  fi
  [ -n "$why" ] || return 1
  _tl_record SKIP "$TEST_FILE: $1"
  echo "SKIP: $TEST_FILE: $1 ($why)"
  return 0
}

# Run the command string $1; stdout/stderr go to $_tl_out/$_tl_err, exit code
# to $_tl_rc.
_tl_run()
{
  _tl_out=$T_SCRATCH/stdout
  _tl_err=$T_SCRATCH/stderr
  ( eval "$1" ) < /dev/null > "$_tl_out" 2> "$_tl_err"
  _tl_rc=$?
}

# Show a diff between two files; short unless VERBOSE.
_tl_diff()
{
  local label=$1 exp=$2 got=$3

  echo "  $label differs (-expected +actual):"
  if [ "${VERBOSE:-0}" = 1 ]; then
    diff -u --label expected --label actual "$exp" "$got" | tail -n +3 |
      sed 's/^/    /'
  else
    diff -u --label expected --label actual "$exp" "$got" | tail -n +3 |
      head -n 12 | sed 's/^/    /'
  fi
}

_tl_show()
{
  local label=$1 file=$2

  [ -s "$file" ] || return 0
  echo "  $label:"
  if [ "${VERBOSE:-0}" = 1 ]; then
    sed 's/^/    /' "$file"
  else
    head -n 5 "$file" | sed 's/^/    /'
  fi
}

# _tl_verdict NAME COMMAND FAILURE_TEXT_FILE: print PASS or FAIL.
_tl_verdict()
{
  local name=$1 cmd=$2 why=$3

  if [ ! -s "$why" ]; then
    _tl_record PASS "$TEST_FILE: $name"
    echo "PASS: $TEST_FILE: $name"
    return 0
  fi
  _tl_record FAIL "$TEST_FILE: $name"
  echo "FAIL: $TEST_FILE: $name"
  if [ "${VERBOSE:-0}" = 1 ]; then
    echo "  ran: $cmd"
    echo "  (exit code $_tl_rc)"
  fi
  cat "$why"
  return 1
}

# _tl_check NAME COMMAND RC STDOUT STDERR STDERR_HAS; "-" means "don't check".
_tl_check()
{
  local name=$1 cmd=$2 rc=$3 out=$4 err=$5 has=$6
  local why=$T_SCRATCH/why exp=$T_SCRATCH/expected

  _tl_run "$cmd"
  : > "$why"
  if [ "$rc" != - ] && [ "$rc" != "$_tl_rc" ]; then
    echo "  exit code: expected $rc, got $_tl_rc" >> "$why"
  fi
  if [ "$out" != - ]; then
    _tl_expect "$exp" "$out"
    cmp -s "$exp" "$_tl_out" || _tl_diff stdout "$exp" "$_tl_out" >> "$why"
  elif [ -s "$why" ]; then
    _tl_show stdout "$_tl_out" >> "$why"
  fi
  if [ "$err" != - ]; then
    _tl_expect "$exp" "$err"
    cmp -s "$exp" "$_tl_err" || _tl_diff stderr "$exp" "$_tl_err" >> "$why"
  elif [ "$has" != - ]; then
    if ! grep -qF -- "$has" "$_tl_err"; then
      echo "  stderr does not contain: $has" >> "$why"
      _tl_show stderr "$_tl_err" >> "$why"
    fi
  fi
  # Unchecked stderr is shown only to explain a failure.
  if [ -s "$why" ] && [ "$err" = - ] && [ "$has" = - ]; then
    _tl_show stderr "$_tl_err" >> "$why"
  fi
  _tl_verdict "$name" "$cmd" "$why"
}

testing()
{
  _tl_skipping "$1" "$2" && return 0
  _tl_check "$1" "$2" - "$3" - -
}

testing_rc()
{
  _tl_skipping "$1" "$3" && return 0
  _tl_check "$1" "$3" "$2" - - -
}

testing_stderr()
{
  _tl_skipping "$1" "$3" && return 0
  _tl_check "$1" "$3" "$2" - "$4" -
}

testing_stderr_has()
{
  _tl_skipping "$1" "$3" && return 0
  _tl_check "$1" "$3" "$2" - - "$4"
}

testing_full()
{
  _tl_skipping "$1" "$3" && return 0
  _tl_check "$1" "$3" "$2" "$4" "$5" -
}

# Run PROGRAM ARG... in a fresh copy of the cwd under DIR and write a report
# (exit code, stdout, optionally stderr and files) to REPORT.
_tl_oracle_side()
{
  local dir=$1 report=$2 prog=$3
  shift 3
  local f rc

  rm -rf "$dir"
  mkdir -p "$dir"
  cp -a . "$dir"/
  (cd "$dir" && "$prog" "$@") < /dev/null > "$dir.out" 2> "$dir.err"
  rc=$?
  {
    echo "exit code: $rc"
    echo "--- stdout"
    sed -e "s|$dir|@DIR@|g" ${_tl_sed:+-e "$_tl_sed"} "$dir.out"
    if [ -n "$_tl_cmp_err" ]; then
      echo "--- stderr"
      sed -e "s|$dir|@DIR@|g" ${_tl_sed:+-e "$_tl_sed"} "$dir.err"
    fi
    for f in $_tl_files; do
      echo "--- file $f"
      if [ -e "$dir/$f" ]; then
        echo "size $(stat -c %s "$dir/$f")"
        [ -z "$_tl_alloc" ] || echo "blocks $(stat -c %b "$dir/$f")"
        echo "md5 $(md5sum < "$dir/$f" | cut -d' ' -f1)"
      else
        echo "missing"
      fi
    done
  } > "$report"
}

same_as_oracle()
{
  local _tl_cmp_err= _tl_files= _tl_alloc= _tl_sed= name
  local why=$T_SCRATCH/why

  while :; do
    case $1 in
      --stderr) _tl_cmp_err=1; shift ;;
      --files) _tl_files=$2; shift 2 ;;
      --alloc) _tl_alloc=1; shift ;;
      --sed) _tl_sed=$2; shift 2 ;;
      *) break ;;
    esac
  done
  name=$1
  shift
  _tl_skipping "$name" "\$QEMU_IMG $1" && return 0
  # Both copies get paths of the same length so that nothing else moves.
  _tl_oracle_side "$T_SCRATCH/cmp/tested" "$T_SCRATCH/rep.tested" \
    "$QEMU_IMG" "$@"
  _tl_rc=$(sed -n '1s/^exit code: //p' "$T_SCRATCH/rep.tested")
  _tl_oracle_side "$T_SCRATCH/cmp/oracle" "$T_SCRATCH/rep.oracle" \
    "$ORACLE_IMG" "$@"
  : > "$why"
  if ! cmp -s "$T_SCRATCH/rep.oracle" "$T_SCRATCH/rep.tested"; then
    echo "  differs from the oracle (-oracle +tested):" >> "$why"
    diff -u "$T_SCRATCH/rep.oracle" "$T_SCRATCH/rep.tested" | tail -n +3 |
      if [ "${VERBOSE:-0}" = 1 ]; then cat; else head -n 12; fi |
      sed 's/^/    /' >> "$why"
  fi
  _tl_verdict "$name" "qemu-img $*" "$why"
}

skip_next()
{
  _tl_skip_next=${1:-skipped}
}

skip_rest()
{
  _tl_skip_rest=${1:-skipped}
}

# require_applet NAME...: skip_rest unless every img-NAME is compiled into
# the binary under test (a configuration may leave applets out). The real
# qemu-img has them all.
require_applet()
{
  local a
  [ -n "$IMGBOX" ] || return 0
  for a in "$@"; do
    "$IMGBOX" --list 2>/dev/null | grep -qx "img-$a" ||
      { skip_rest "img-$a is not in this build"; return 0; }
  done
}

# require_format FMT...: skip_rest unless qemu-img --help lists every FMT.
require_format()
{
  local f
  for f in "$@"; do
    "$QEMU_IMG" --help 2>/dev/null | grep '^Supported formats:' |
      grep -qw -- "$f" || { skip_rest "format $f is not in this build"; return 0; }
  done
}

skip_unless_imgbox()
{
  [ -n "$IMGBOX" ] || skip_rest "imgbox only; IMGBOX is empty"
}

show_files()
{
  local rc=$?

  ls
  return $rc
}

keep_rc()
{
  local rc=$?

  "$@"
  return $rc
}

fsize()
{
  stat -c %s "$1"
}

alloc_bytes()
{
  echo $(( $(stat -c %b "$1") * 512 ))
}

# qemu-img prints sizes with three significant digits ("%.3g") and moves to
# the next binary unit once the number would reach 1000 of the current one.
human_size()
{
  awk -v n="$1" 'BEGIN {
    split("B KiB MiB GiB TiB PiB EiB", unit, " ")
    i = 1; div = 1
    while (i < 7 && n >= 1000 * div) { i++; div *= 1024 }
    printf "%.3g %s\n", n / div, unit[i]
  }'
}

put_bytes()
{
  local file=$1 off=$2 len=$3 byte=$4

  head -c "$len" /dev/zero | tr '\0' "\\$(printf '%03o' "$byte")" |
    dd of="$file" bs=4096 seek="$off" oflag=seek_bytes conv=notrunc \
      status=none
}

nonzero_bytes()
{
  tr -d '\0' < "$1" | wc -c
}

seq_data()
{
  seq -f '%015g' 1 $(( $1 / 16 + 1 )) | head -c "$1"
}

# ---- crash sweeps ----

# _tl_blocks RAW: the 512-byte blocks of a raw file, a line each
_tl_blocks() { od -An -v -tx8 -w512 "$1"; }

# _tl_mixed OLD NEW NOW: how many blocks (lines of _tl_blocks) of NOW are
# neither those of OLD nor those of NEW (a block past the end of NEW,
# which a shrink drops, may read as anything)
_tl_mixed()
{
  paste -d '|' "$1" "$2" "$3" |
    awk -F '|' '$2 != "" && $3 != $1 && $3 != $2 { n++ } END { print n + 0 }'
}

# _tl_checked IMG: nothing if the real qemu-img check finds IMG clean or
# with leaks only, or cannot check its format at all; else what it says
_tl_checked()
{
  $ORACLE_IMG check -q "$1" > /dev/null 2>&1
  case $? in
  0|3) ;;
  63) $ORACLE_IMG check "$1" 2>&1 | grep -q "does not support checks" ||
        echo "check 63" ;;
  2) # ALLOW: the one error a format cannot avoid (every ERROR line of
     # the check matches it)
     [ -n "$ALLOW" ] && ! $ORACLE_IMG check "$1" 2>&1 | grep "^ERROR" |
       grep -qv "$ALLOW" || echo "check 2" ;;
  *) echo "check $?" ;;
  esac
}

kill_sweep()
{
  local img=$1 t=t.${1##*.} n=1 rc f stops=0 bad r
  shift
  r=${READ:-$t}
  cp "$img" $t
  [ -z "$OTHER" ] || cp "$OTHER.orig" "$OTHER"
  $ORACLE_IMG convert -U -O raw $r old.raw
  "$@" > /dev/null 2>&1 || { echo "the command fails"; return; }
  $ORACLE_IMG convert -U -O raw $r new.raw || { echo "unreadable after"; return; }
  _tl_blocks old.raw > before
  _tl_blocks new.raw > after
  while :; do
    cp "$img" $t
    [ -z "$OTHER" ] || cp "$OTHER.orig" "$OTHER"
    IMGBOX_FAULT=write:kill:$n "$@" > /dev/null 2>&1 &
    wait $! 2> /dev/null
    rc=$?
    for f in $t $OTHER; do
      bad=$(_tl_checked $f)
      [ -z "$bad" ] || echo "stop $n: $f: $bad"
    done
    if $ORACLE_IMG convert -U -O raw $r t.raw 2> /dev/null; then
      if ! cmp -s t.raw old.raw && ! cmp -s t.raw new.raw; then
        _tl_blocks t.raw > now
        [ "$(_tl_mixed before after now)" = 0 ] ||
          echo "stop $n: blocks neither old nor new"
      fi
    else
      echo "stop $n: unreadable"
    fi
    [ $rc = 137 ] || break
    n=$((n + 1 + n / 8))
    stops=$((stops + 1))
    [ $stops -le 500 ] || { echo "no end"; break; }
  done
  [ $stops -ge "${MIN:-3}" ] && echo swept || echo "only $stops stops"
}
