# sweep.sh - write-failure sweeps, sourced by tests/faults_*.test (imgbox
# fault injection, issue 12). Every writing
# applet on small images of every format it supports is run once to count
# its writes (IMGBOX_FAULT_COUNT), then again with write N failing with
# EIO and with ENOSPC, for every N up to that count (sampled evenly when
# there are more than SW_MAX). Each failed run must:
#   - exit non-zero, with the error text (and the file's name where the
#     message has one) on stderr, and no sanitizer report;
#   - leave the source files byte-identical;
#   - leave no output it created (convert, create, dd into a new file);
#   - leave images changed in place passing the real qemu-img check, clean
#     or with leaks only (exit 0 or 3), and, where the command must not
#     change guest data, reading as before.
# qemu-img itself has no fault injection, so these files are imgbox only.
#
#   SW_MAX      most values of N per case (default 12)
#   SWEEP_LOG   if set, a file that gets each case's write count and the
#               known-bad results

skip_unless_imgbox
_tl_have_fault || skip_rest "no fault injection in this build"

SW_MAX=${SW_MAX:-12}

# Per case (set before calling sweep, reset by it):
#   SW_SETUP  commands that make the starting files (run in an empty dir)
#   SW_SRC    files that must not change
#   SW_NEW    files the command creates: gone after a failure
#   SW_IMG    FILE:FMT changed in place: check 0 or 3 after a failure
#   SW_SAME   FILE:FMT whose guest data must read as before
#   SW_NAME   text the error message must contain (default: none)
#   SW_OPS    the calls that fail (default "write"; "trunc", "flush" too)
#   SW_KNOWN  non-empty: a bad check of SW_IMG is a known problem (the
#             reason), reported in $SWEEP_LOG if set but not a failure
sw_reset()
{
  SW_SETUP= SW_SRC= SW_NEW= SW_IMG= SW_SAME= SW_NAME= SW_KNOWN=
  SW_OPS=write
}
sw_reset

# the values of N to try for a command that makes $1 writes
_sw_points()
{
  local w=$1 i

  if [ "$w" -le "$SW_MAX" ]; then
    seq 1 "$w"
  else
    for ((i = 0; i < SW_MAX; i++)); do
      echo $((1 + i * (w - 1) / (SW_MAX - 1)))
    done | uniq
  fi
}

# _sw_after TAG DIR ERR RC: what is wrong after one failed run
_sw_after()
{
  local tag=$1 dir=$2 err=$3 rc=$4 text=$5 f fmt crc

  [ "$rc" != 0 ] || echo "$tag: exit 0"
  [ "$rc" -lt 128 ] || echo "$tag: killed by signal $((rc - 128))"
  grep -qE 'Sanitizer|runtime error:' "$err" &&
    echo "$tag: $(grep -m1 -E 'Sanitizer|runtime error:' "$err")"
  grep -qF -- "$text" "$err" || echo "$tag: no '$text' in: $(head -c 200 "$err")"
  [ -z "$SW_NAME" ] || grep -qF -- "$SW_NAME" "$err" ||
    echo "$tag: message does not name $SW_NAME: $(head -c 200 "$err")"
  (cd "$dir" && sha256sum --quiet -c "$T_SCRATCH/sw.sums" 2>&1) |
    sed "s/^/$tag: source changed: /"
  for f in $SW_NEW; do
    [ ! -e "$dir/$f" ] || echo "$tag: output $f left behind"
  done
  for f in $SW_IMG; do
    fmt=${f#*:} f=${f%%:*}
    $ORACLE_IMG check -q -f "$fmt" "$dir/$f" > /dev/null 2>&1
    crc=$?
    case $crc in
    0|3) ;;
    63)	# the format has no check: it must open at least
      $ORACLE_IMG info -f "$fmt" "$dir/$f" > /dev/null 2>&1 ||
        echo "$tag: qemu-img cannot open $f"
      ;;
    *)
      if [ -n "$SW_KNOWN" ]; then
        [ -z "${SWEEP_LOG:-}" ] ||
          echo "$TEST_FILE: $SW_CASE: $tag: check $crc (known: $SW_KNOWN)" \
            >> "$SWEEP_LOG"
        return
      fi
      echo "$tag: qemu-img check of $f: exit $crc"
      ;;
    esac
  done
  for f in $SW_SAME; do
    fmt=${f#*:} f=${f%%:*}
    $ORACLE_IMG compare -q -f "$fmt" -F "$fmt" "$T_SCRATCH/sw.base/$f" \
      "$dir/$f" > /dev/null 2>&1 || echo "$tag: guest data of $f changed"
  done
}

# _sweep CMD: the sweep of one case; prints what is wrong, nothing if all
# is well
_sweep()
{
  local cmd=$1 base=$T_SCRATCH/sw.base run=$T_SCRATCH/sw.run
  local err=$T_SCRATCH/sw.err cnt=$T_SCRATCH/sw.count w n e rc text op

  rm -rf "$base" "$cnt"
  mkdir "$base"
  (cd "$base" && eval "$SW_SETUP") > /dev/null 2>&1 ||
    { echo "setup failed"; return; }
  (cd "$base" && sha256sum $SW_SRC) > "$T_SCRATCH/sw.sums"
  rm -rf "$run"
  cp -a "$base" "$run"
  (cd "$run" && export IMGBOX_FAULT_COUNT=$cnt && eval "$cmd") \
    > /dev/null 2> "$err" ||
    { echo "fails without a fault: $(head -c 300 "$err")"; return; }
  for op in $SW_OPS; do
    w=$(sed -n "s/^$op //p" "$cnt")
    [ "${w:-0}" -gt 0 ] || { echo "no $op calls counted"; return; }
    [ -z "${SWEEP_LOG:-}" ] ||
      echo "$TEST_FILE: $SW_CASE: $w ${op}s" >> "$SWEEP_LOG"
    for n in $(_sw_points "$w"); do
      for e in 5 28; do
        text="Input/output error"
        # qemu-img says "No space left in the file header" for an
        # ENOSPC from a backing file change
        [ $e = 5 ] || text="No space left"
        rm -rf "$run"
        cp -a "$base" "$run"
        (cd "$run" && export IMGBOX_FAULT=$op:$e:$n && eval "$cmd") \
          > /dev/null 2> "$err"
        rc=$?
        _sw_after "$op $n errno $e" "$run" "$err" "$rc" "$text"
      done
    done
  done
  rm -rf "$run" "$base"
}

# sweep NAME CMD: one test, with the SW_ variables set before it
sweep()
{
  SW_CASE=$1
  testing "$1" "_sweep '$2' 2>&1 | head -n 20" ""
  sw_reset
}

# ---- sources made by the oracle: data in several places, some zeroes ----
mk_src()	# mk_src FILE FMT [CREATE OPTIONS...]
{
  local f=$1 fmt=$2
  shift 2
  $ORACLE_IMG create -q -f "$fmt" "$@" "$f" 256k &&
  $QEMU_IO -f "$fmt" -c "write -P 0x11 0 8k" -c "write -P 0x22 64k 4k" \
    -c "write -z 96k 8k" -c "write -P 0x33 200k 12k" "$f" > /dev/null
}
export -f mk_src

FORMATS="raw qcow2 qcow qed vmdk vdi vpc vhdx"
opts_of()	# small tables, many writes
{
  case $1 in
  qcow2) echo "-o cluster_size=4k" ;;
  qed) echo "-o cluster_size=4k,table_size=2" ;;
  vhdx) echo "-o block_size=1M,log_size=1M" ;;
  esac
}

