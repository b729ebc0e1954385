#!/bin/bash
# fuzz/build.sh - libFuzzer targets, one per format of the build.
#
#   bash fuzz/build.sh            build $OUT/fuzz_FMT for every format in
#                                 $GEN/formats.h, plus $OUT/fuzz_probe (format
#                                 guessed by probing), and seed $OUT/corpus/*
#   bash fuzz/build.sh smoke      build, then run each target briefly
#   bash fuzz/build.sh ci         build, then run each target for
#                                 FUZZ_TIME s (20) from the seeds alone; one
#                                 PASS/FAIL line per target and a total
#                                 line (tests/check.sh counts it)
#   bash fuzz/build.sh run FMT [LIBFUZZER ARGS...]
#                                 build, then fuzz one format until stopped
#
# Environment: GEN (include/generated), FUZZ_OUT (build/fuzz), FUZZ_CC
# (clang), QEMU_IMG / QEMU_IO (seed makers; seeds from fuzz/corpus/FMT are
# used too), SMOKE_RUNS (2000) and SMOKE_TIME (20 s) per target.
#
# The targets are fuzz/fuzz_open.c linked with the block/ and formats/
# sources the configuration selects (from $GEN/objs.mk), compiled with
# -fsanitize=fuzzer,address,undefined. Crashes land in $OUT/artifacts/.
set -eu

GEN=${GEN:-include/generated}
OUT=${FUZZ_OUT:-build/fuzz}
CC=${FUZZ_CC:-clang}
QEMU_IMG=${QEMU_IMG:-qemu-img}
QEMU_IO=${QEMU_IO:-qemu-io}
SMOKE_RUNS=${SMOKE_RUNS:-2000}
SMOKE_TIME=${SMOKE_TIME:-20}
FUZZ_TIME=${FUZZ_TIME:-20}
SEED_MAX=$((4 << 20))
MODE=${1:-build}

cd "$(dirname "$0")/.."
die() { echo "fuzz/build.sh: $*" >&2; exit 1; }

[ -f "$GEN/objs.mk" ] && [ -f "$GEN/formats.h" ] ||
	die "no $GEN/objs.mk (run make first)"
command -v "$CC" >/dev/null || die "$CC not found (apt-get install clang)"

CFLAGS="-std=gnu11 -D_GNU_SOURCE -pthread -I$(dirname "$GEN") -Iinclude
	-g -O1 -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
SAN=address,undefined
LIBS="-lz -laio -lpthread"
# fuzz_open.c vets every open() of the drivers (only its private copy may be
# opened for writing), see __wrap_open there.
LDWRAP="-Wl,--wrap=open"
mkdir -p "$OUT/obj" "$OUT/corpus" "$OUT/work" "$OUT/artifacts"

# libFuzzer ships with clang's runtime (Debian: libclang-rt-14-dev).
echo 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n)
{ (void)d; (void)n; return 0; }' > "$OUT/probe.c"
# shellcheck disable=SC2086
"$CC" -fsanitize=fuzzer "$OUT/probe.c" -o "$OUT/probe" 2>/dev/null ||
	die "$CC cannot link -fsanitize=fuzzer (install the clang runtime: libclang-rt-14-dev)"
rm -f "$OUT/probe" "$OUT/probe.c"

SRCS=$(sed -n 's,^SRCS += \(\(block\|formats\)/.*\.c\)$,\1,p' "$GEN/objs.mk")
FORMATS=$(sed -n 's/^extern const struct blk_driver \([a-z0-9_]*\)_driver;$/\1/p' \
	"$GEN/formats.h")
[ -n "$FORMATS" ] || die "no formats in $GEN/formats.h"

# ---- library objects, rebuilt when the source or any header is newer ----
OBJS=
newest_hdr=$(ls -t include/*.h "$GEN"/*.h formats/*.h formats/*/*.h 2>/dev/null | head -1)
for src in $SRCS; do
	obj=$OUT/obj/${src%.c}.o
	OBJS="$OBJS $obj"
	if [ -f "$obj" ] && [ "$obj" -nt "$src" ] &&
	   [ "$obj" -nt "$newest_hdr" ]; then
		continue
	fi
	mkdir -p "$(dirname "$obj")"
	echo "  FUZZCC  $obj"
	# shellcheck disable=SC2086
	"$CC" $CFLAGS -fsanitize=fuzzer-no-link,$SAN -c "$src" -o "$obj"
done

# ---- one target per format, and one that probes ----
for fmt in $FORMATS probe; do
	def="\"$fmt\""
	[ "$fmt" != probe ] || def=NULL
	echo "  FUZZLD  $OUT/fuzz_$fmt"
	# shellcheck disable=SC2086
	"$CC" $CFLAGS -fsanitize=fuzzer,$SAN -DFUZZ_FORMAT="$def" \
		fuzz/fuzz_open.c $OBJS $LIBS $LDWRAP -o "$OUT/fuzz_$fmt"
done

# ---- seeds: committed ones, plus images made by qemu-img ----
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

keep()	# keep FMT FILE NAME: add FILE to FMT's corpus if small enough
{
	[ -f "$2" ] || return 0
	[ "$(stat -c %s "$2")" -le "$SEED_MAX" ] || return 0
	cp "$2" "$OUT/corpus/$1/$3"
}

# mk FMT NAME "CREATE OPTIONS" "QEMU-IO COMMANDS;..." [SNAPSHOT]
mk()
{
	local fmt=$1 name=$2 copts=$3 cmds=$4 f=$TMP/$2 c
	local -a io=()

	rm -f "$f"
	# shellcheck disable=SC2086
	"$QEMU_IMG" create -q -f "$fmt" $copts "$f" 64k >/dev/null 2>&1 ||
		return 0
	IFS=';' read -ra parts <<< "$cmds"
	for c in "${parts[@]}"; do
		[ -n "$c" ] && io+=(-c "$c")
	done
	[ ${#io[@]} -eq 0 ] ||
		"$QEMU_IO" -f "$fmt" "${io[@]}" "$f" >/dev/null 2>&1 || true
	[ -z "${5:-}" ] ||
		"$QEMU_IMG" snapshot -c "$5" "$f" >/dev/null 2>&1 || true
	keep "$fmt" "$f" "$name"
}

DATA="write -P 0x5a 0 4k;write -z 8k 4k;write -P 0xa5 40k 6k"

mk_vhdx_seeds()
{
	local f=$TMP/vhdx-seed cut=$(((3 << 20) + (68 << 10))) name
	local c

	for name in empty bs8m data; do
		rm -f "$f"
		c="-o block_size=1M,log_size=1M"
		[ "$name" != bs8m ] || c="-o block_size=8M,log_size=1M"
		"$QEMU_IMG" create -q -f vhdx $c "$f" 64k >/dev/null 2>&1 ||
			return 0
		[ "$name" != data ] ||
			"$QEMU_IO" -f vhdx -c "write -P 0x5a 0 4k" "$f" \
				>/dev/null 2>&1 || true
		truncate -s "$cut" "$f"
		keep vhdx "$f" "$name"
	done
}
have_qemu=0
command -v "$QEMU_IMG" >/dev/null && command -v "$QEMU_IO" >/dev/null &&
	have_qemu=1
for fmt in $FORMATS; do
	mkdir -p "$OUT/corpus/$fmt" "$OUT/work/$fmt"
	if [ -d "fuzz/corpus/$fmt" ]; then
		cp fuzz/corpus/"$fmt"/* "$OUT/corpus/$fmt/" 2>/dev/null || true
	fi
	[ "$have_qemu" = 1 ] || continue
	mk "$fmt" empty "" ""
	mk "$fmt" data "" "$DATA"
	case $fmt in
	qcow2)
		mk qcow2 c512 "-o cluster_size=512" "$DATA"
		mk qcow2 v2-snap "-o cluster_size=512,compat=0.10" "$DATA" s1
		mk qcow2 v3-snap "-o cluster_size=512" "$DATA" s1
		mk qcow2 compressed "-o cluster_size=4k" \
			"write -c -P 7 0 4k;write -c -P 8 12k 4k;$DATA"
		mk qcow2 extl2 "-o cluster_size=16k,extended_l2=on" "$DATA"
		mk qcow2 refcount1 \
			"-o cluster_size=512,refcount_bits=1,lazy_refcounts=on" \
			"$DATA"
		mk qcow2 refcount64 "-o cluster_size=512,refcount_bits=64" \
			"$DATA"
		printf 'base' > "$TMP/base.raw"
		mk qcow2 backing \
			"-o cluster_size=512 -b base.raw -F raw -u" "$DATA"
		if mk qcow2 bitmap "-o cluster_size=512" "$DATA" &&
		   [ -f "$OUT/corpus/qcow2/bitmap" ]; then
			"$QEMU_IMG" bitmap --add "$OUT/corpus/qcow2/bitmap" \
				b0 >/dev/null 2>&1 || true
		fi
		;;
	qcow) mk qcow backing "-b base.raw -F raw -u" "$DATA" ;;
	vmdk)
		mk vmdk stream "-o subformat=streamOptimized" "$DATA"
		mk vmdk split "-o subformat=twoGbMaxExtentSparse" "$DATA"
		;;
	qed) mk qed small "-o cluster_size=4k,table_size=2" "$DATA" ;;
	vdi) mk vdi static "-o static=on" "$DATA" ;;
	vpc) mk vpc fixed "-o subformat=fixed" "$DATA" ;;
	vhdx)
		# qemu-img's smallest VHDX is 8 MiB, mostly zeroes: the seeds
		# are the first 3 MiB + 68 KiB (headers, log, BAT, metadata),
		# one with the BAT mapping a block past the end.
		mk_vhdx_seeds
		;;
	raw) printf 'x' > "$TMP/one"; keep raw "$TMP/one" one ;;
	esac
	# libFuzzer needs at least one input; an empty one will do.
	[ -n "$(ls -A "$OUT/corpus/$fmt")" ] || : > "$OUT/corpus/$fmt/empty"
done

# The probing target starts from every format's seeds.
mkdir -p "$OUT/corpus/probe" "$OUT/work/probe"
for fmt in $FORMATS; do
	for f in "$OUT/corpus/$fmt"/*; do
		[ -f "$f" ] && cp "$f" "$OUT/corpus/probe/$fmt-$(basename "$f")"
	done
done
FORMATS="$FORMATS probe"

run_one()	# run_one FMT ARGS...: fuzz FMT, new inputs into work/FMT
{
	local fmt=$1
	shift
	# -max_len: libFuzzer cuts inputs to 1 MiB unless told, and the
	# vhdx seeds are 3 MiB
	"$OUT/fuzz_$fmt" -timeout=10 -rss_limit_mb=2048 -max_len=$SEED_MAX \
		-artifact_prefix="$OUT/artifacts/$fmt-" "$@" \
		"$OUT/work/$fmt" "$OUT/corpus/$fmt"
}

case $MODE in
build) ;;
smoke)
	failed=
	for fmt in $FORMATS; do
		echo "  FUZZ    $fmt: $SMOKE_RUNS runs or $SMOKE_TIME s"
		if ! run_one "$fmt" -runs="$SMOKE_RUNS" \
			-max_total_time="$SMOKE_TIME" \
			> "$OUT/smoke-$fmt.log" 2>&1; then
			failed="$failed $fmt"
			tail -n 40 "$OUT/smoke-$fmt.log" >&2
		fi
	done
	[ -z "$failed" ] || die "crashes in:$failed (see $OUT/artifacts)"
	echo "fuzz smoke: all targets ran clean ($FORMATS)" | tr '\n' ' '
	echo
	;;
ci)
	# a crash, a sanitizer report, a leak or a timeout fails the target;
	# inputs found earlier (work/) are left out, so every run starts alike
	pass=0 fail=0
	for fmt in $FORMATS; do
		rm -rf "$OUT/work/$fmt"
		mkdir -p "$OUT/work/$fmt"
		if run_one "$fmt" -max_total_time="$FUZZ_TIME" \
			> "$OUT/ci-$fmt.log" 2>&1; then
			echo "PASS: fuzz: $fmt ($FUZZ_TIME s)"
			pass=$((pass + 1))
		else
			echo "FAIL: fuzz: $fmt (see $OUT/ci-$fmt.log, $OUT/artifacts)"
			grep -m1 -A12 'ERROR: \|runtime error' "$OUT/ci-$fmt.log" |
				sed 's/^/  /'
			fail=$((fail + 1))
		fi
	done
	echo "$pass passed, $fail failed"
	[ "$fail" -eq 0 ]
	;;
run)
	[ $# -ge 2 ] || die "usage: fuzz/build.sh run FMT [ARGS...]"
	fmt=$2
	shift 2
	[ -x "$OUT/fuzz_$fmt" ] || die "no target for format '$fmt'"
	run_one "$fmt" "$@"
	;;
*) die "unknown mode '$MODE' (build, smoke or run)" ;;
esac
