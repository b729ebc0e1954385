#!/bin/bash
# Test runner for imgbox.  Usage: tests/run.sh [FILTER...]
#
# Runs every tests/*.test, or only those whose name (without ".test") matches
# one of the FILTERs: a name or shell pattern ("create", "qcow2_*"); a FILTER
# "!PATTERN" excludes instead ("!qcow2_*" alone runs everything else).
#
# Environment:
#   QEMU_IMG    program under test, called like qemu-img.  Default: a symlink
#               named qemu-img to $IMGBOX (or /usr/bin/qemu-img with ORACLE=1)
#   IMGBOX      the imgbox binary (default ./imgbox at the top of the tree);
#               always empty with ORACLE=1, which skips imgbox-only tests
#   ORACLE=1    test the real qemu-img instead of imgbox
#   ORACLE_IMG  the real qemu-img (default /usr/bin/qemu-img)
#   QEMU_IO     the real qemu-io (default /usr/bin/qemu-io)
#   VERBOSE=1   print everything about a failure, not just a short diff
#   KEEP=1      keep the temporary directories (their path is printed)
#   FILE_TIMEOUT  seconds one .test file may take (default 300: the suites of two builds
#               share the cores; a hang still ends)
#
# Prints one line per test and, as its very last line,
# "N passed, M failed" (", K skipped" when some were skipped).  Exits 1 if
# any test failed or no test ran.

set -u

TESTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TOP=$(dirname "$TESTS_DIR")

# Tests change directory, so every program path must be absolute.
abs_path()
{
  case $1 in
    '') ;;
    /*) printf '%s\n' "$1" ;;
    */*) printf '%s\n' "$PWD/$1" ;;
    *) command -v -- "$1" || printf '%s\n' "$1" ;;
  esac
}

ORACLE_IMG=$(abs_path "${ORACLE_IMG:-/usr/bin/qemu-img}")
QEMU_IO=$(abs_path "${QEMU_IO:-/usr/bin/qemu-io}")

RUN_TMP=$(mktemp -d "${TMPDIR:-/tmp}/imgbox-test.XXXXXX") || exit 2
if [ "${KEEP:-0}" = 1 ]; then
  echo "keeping temporary files in $RUN_TMP"
else
  trap 'rm -rf "$RUN_TMP"' EXIT
fi
RESULTS=$RUN_TMP/results
: > "$RESULTS"

summary()
{
  local pass fail skip

  pass=$(grep -c '^PASS ' "$RESULTS")
  fail=$(grep -c '^FAIL ' "$RESULTS")
  skip=$(grep -c '^SKIP ' "$RESULTS")
  if [ "$fail" -gt 0 ]; then
    echo
    echo "Failed:"
    sed -n 's/^FAIL /  /p' "$RESULTS"
  fi
  if [ "$skip" -gt 0 ]; then
    echo "$pass passed, $fail failed, $skip skipped"
  else
    echo "$pass passed, $fail failed"
  fi
  [ "$fail" -eq 0 ] && [ $((pass + skip)) -gt 0 ]
}

# A setup problem counts as a failed test so that the summary line says so.
setup_error()
{
  echo "run.sh: $1" >&2
  echo "FAIL run.sh: $1" >> "$RESULTS"
  summary
  exit 1
}

if [ "${ORACLE:-0}" = 1 ]; then
  QEMU_IMG=$(abs_path "${QEMU_IMG:-$ORACLE_IMG}")
  IMGBOX=
else
  IMGBOX=${IMGBOX-}
  if [ -z "$IMGBOX" ] && [ -x "$TOP/imgbox" ]; then
    IMGBOX=$TOP/imgbox
  fi
  IMGBOX=$(abs_path "$IMGBOX")
  if [ -z "${QEMU_IMG:-}" ]; then
    [ -n "$IMGBOX" ] && [ -x "$IMGBOX" ] ||
      setup_error "no imgbox binary (build it, set IMGBOX, or use ORACLE=1)"
    mkdir "$RUN_TMP/bin"
    ln -s "$IMGBOX" "$RUN_TMP/bin/qemu-img"
    QEMU_IMG=$RUN_TMP/bin/qemu-img
  fi
  QEMU_IMG=$(abs_path "$QEMU_IMG")
fi
[ -x "$QEMU_IMG" ] || setup_error "QEMU_IMG '$QEMU_IMG' is not executable"
[ -x "$ORACLE_IMG" ] || setup_error "ORACLE_IMG '$ORACLE_IMG' is not executable"
[ -x "$QEMU_IO" ] || setup_error "QEMU_IO '$QEMU_IO' is not executable"

export QEMU_IMG ORACLE_IMG QEMU_IO IMGBOX RESULTS TESTS_DIR
export VERBOSE=${VERBOSE:-0}
export LC_ALL=C TZ=UTC
umask 022

# selected NAME: does NAME pass the filters given on the command line?
selected()
{
  local name=$1 f pat include=0 any_include=0

  for f in "${FILTERS[@]}"; do
    case $f in
      '!'*)
        pat=${f#!}
        # shellcheck disable=SC2254
        case $name in $pat) return 1 ;; esac
        ;;
      *)
        any_include=1
        # shellcheck disable=SC2254
        case $name in $f) include=1 ;; esac
        ;;
    esac
  done
  [ "$any_include" = 0 ] || [ "$include" = 1 ]
}

FILTERS=()
for arg in "$@"; do
  arg=${arg##*/}
  FILTERS+=("${arg%.test}")
done

ran=0
for file in "$TESTS_DIR"/*.test; do
  [ -e "$file" ] || continue
  name=$(basename "$file" .test)
  selected "$name" || continue
  ran=$((ran + 1))
  dir=$RUN_TMP/$name
  mkdir -p "$dir/work" "$dir/scratch"
  before=$(wc -l < "$RESULTS")
  (
    cd "$dir/work" &&
    TEST_FILE=$name T_SCRATCH=$dir/scratch \
      timeout -k 5 "${FILE_TIMEOUT:-300}" \
      bash -c 'source "$1" && source "$2"' run.sh \
        "$TESTS_DIR/testlib.sh" "$file"
  ) < /dev/null
  rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "FAIL: $name: timed out after ${FILE_TIMEOUT:-300} s"
    echo "FAIL $name: timed out" >> "$RESULTS"
  elif [ "$(wc -l < "$RESULTS")" = "$before" ]; then
    echo "FAIL: $name: ran no test (exit code $rc)"
    echo "FAIL $name: ran no test" >> "$RESULTS"
  fi
  [ "${KEEP:-0}" = 1 ] || rm -rf "$dir"
done

if [ "$ran" = 0 ]; then
  echo "run.sh: no test file matches: $*" >&2
fi
summary
