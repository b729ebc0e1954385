#!/bin/bash
# check.sh - what `make check` runs: C unit tests (sanitizer build), then the
# applet tests twice, against the ASan/UBSan build and the static release
# binary, each installed as a link named qemu-img; with TSAN_BIN, the
# ThreadSanitizer stress (tests/tsan.sh) too; with FUZZ_GEN (the generated
# headers of the build), every libFuzzer target for FUZZ_TIME s (20; 0
# leaves it out) from the committed and generated seeds, each a test that
# a crash or leak fails. Prints one total line.
set -u
cd "$(dirname "$0")/.."
root=$PWD
pass=0 fail=0 skip=0
links=$(mktemp -d)
trap 'rm -rf "$links"' EXIT
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export TZ=UTC LC_ALL=C

count() {	# count LOGFILE: add the runner's "N passed, M failed" line
	local line
	line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$1" | tail -1)
	if [ -z "$line" ]; then
		echo "check.sh: no result line in $1" >&2
		fail=$((fail + 1))
		return
	fi
	set -- $line
	pass=$((pass + $1))
	fail=$((fail + $3))
	case "$line" in *skipped*) skip=$((skip + $5)) ;; esac
}

for u in "${UNIT_DIR:-build/san/unit}"/*; do
	[ -x "$u" ] || continue
	echo "== unit: ${u##*/}"
	"$u" > "$links/unit.log" 2>&1
	rc=$?
	cat "$links/unit.log"
	count "$links/unit.log"
	[ $rc -eq 0 ] || grep -qE '^[0-9]+ passed, [1-9]' "$links/unit.log" ||
		{ echo "unit ${u##*/} exited $rc"; fail=$((fail + 1)); }
done

# the ThreadSanitizer stress, when make built the TSan binary
if [ -n "${TSAN_BIN:-}" ]; then
	echo "== tsan stress ($TSAN_BIN)"
	TSAN_BIN=$TSAN_BIN bash tests/tsan.sh > "$links/tsan.log" 2>&1
	cat "$links/tsan.log"
	count "$links/tsan.log"
fi

# The two builds run their applet tests side by side (one core each); the
# logs are printed one after the other when both are done.
variants=()
for variant in "san:${SAN_BIN:-build/san/imgbox}" "release:${REL_BIN:-imgbox}"; do
	name=${variant%%:*} bin=${variant#*:}; case $bin in /*) ;; *) bin=$root/$bin ;; esac
	[ -x "$bin" ] || { echo "check.sh: $bin missing" >&2; fail=$((fail + 1)); continue; }
	mkdir -p "$links/$name"
	"$bin" --install -s "$links/$name" >/dev/null
	{
		echo "== applet tests: $name ($bin)"
		QEMU_IMG=$links/$name/qemu-img IMGBOX=$bin \
			IMGBOX_LINKS=$links/$name bash tests/run.sh "$@" 2>&1
	} > "$links/$name.log" &
	variants+=("$name")
done
wait
for name in "${variants[@]}"; do
	cat "$links/$name.log"
	count "$links/$name.log"
done

# the fuzz targets after the applet tests, so that they do not slow
# those down (each .test file has a time limit)
if [ -n "${FUZZ_GEN:-}" ] && [ "${FUZZ_TIME:-20}" != 0 ]; then
	echo "== fuzz targets (${FUZZ_TIME:-20} s each)"
	GEN=$FUZZ_GEN FUZZ_TIME=${FUZZ_TIME:-20} bash fuzz/build.sh ci \
		> "$links/fuzz.log" 2>&1
	grep -v '^  FUZZ' "$links/fuzz.log"
	count "$links/fuzz.log"
fi

echo
if [ $skip -gt 0 ]; then
	echo "$pass passed, $fail failed, $skip skipped"
else
	echo "$pass passed, $fail failed"
fi
[ $fail -eq 0 ]
