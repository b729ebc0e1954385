#!/bin/bash
# tsan.sh - short stress of the thread-safe paths under ThreadSanitizer
# (make tsan-check, and part of make check): parallel converts from qcow2
# sources (compressed, plain, small clusters, extended L2, a backing chain)
# into raw and qcow2, and a parallel compare. A run passes when it exits 0,
# ThreadSanitizer reports nothing and the real qemu-img finds the output
# equal to the source. Prints "N passed, M failed" as its last line.
#
# Environment: TSAN_BIN (default build/tsan/imgbox), ORACLE_IMG
# (/usr/bin/qemu-img), QEMU_IO (/usr/bin/qemu-io), KEEP=1 keeps the files.
set -u
cd "$(dirname "$0")/.."
BIN=$(realpath "${TSAN_BIN:-build/tsan/imgbox}")
ORACLE_IMG=${ORACLE_IMG:-/usr/bin/qemu-img}
QEMU_IO=${QEMU_IO:-/usr/bin/qemu-io}
pass=0 fail=0

if [ ! -x "$BIN" ]; then
	echo "tsan.sh: $BIN missing"
	echo "0 passed, 1 failed"
	exit 1
fi
if [ ! -x "$ORACLE_IMG" ] || [ ! -x "$QEMU_IO" ]; then
	echo "tsan.sh: no qemu-img/qemu-io: skipped"
	echo "0 passed, 0 failed"
	exit 0
fi
T=$(mktemp -d "${TMPDIR:-/tmp}/imgbox-tsan.XXXXXX") || exit 2
if [ "${KEEP:-0}" = 1 ]; then
	echo "keeping $T"
else
	trap 'rm -rf "$T"' EXIT
fi
cd "$T" || exit 2
# exitcode: a report fails the run even when the program would exit 0
export TSAN_OPTIONS="halt_on_error=0 exitcode=66 ${TSAN_OPTIONS:-}"

# 8 MiB of real data (binaries, compressible about 3:1), written zeroes
# and holes, so that every cluster type turns up.
ls /usr/bin/* 2>/dev/null | head -200 | xargs cat 2>/dev/null |
	head -c 6M > data
truncate -s 8M src.raw
dd if=data of=src.raw bs=1M count=3 conv=notrunc status=none
dd if=/dev/zero of=src.raw bs=1M seek=3 count=1 conv=notrunc status=none
dd if=data of=src.raw bs=1M skip=3 seek=5 count=2 conv=notrunc status=none

q() { "$ORACLE_IMG" "$@" > /dev/null; }
q convert -c -O qcow2 src.raw c.qcow2
q convert -O qcow2 src.raw u.qcow2
q convert -c -O qcow2 -o cluster_size=4k src.raw c4k.qcow2
q convert -c -O qcow2 -o extended_l2=on,cluster_size=32k src.raw xl2.qcow2
q create -f qcow2 -b c.qcow2 -F qcow2 mid.qcow2
q create -f qcow2 -o extended_l2=on -b mid.qcow2 -F qcow2 top.qcow2
"$QEMU_IO" -c "write -P 0x11 1M 256k" -c "write -z 2M 64k" \
	-c "write -P 0x22 5M 100k" mid.qcow2 > /dev/null
"$QEMU_IO" -c "write -P 0x33 1100k 4k" -c "write -P 0x44 6M 12k" \
	-c "write -z 40k 8k" top.qcow2 > /dev/null

run()	# run NAME SRC OUT ARGS...: one imgbox run, then the oracle's verdict
{
	local name=$1 src=$2 out=$3 ok=1
	shift 3
	rm -f "$out"
	"$BIN" qemu-img "$@" > run.out 2> run.err
	local rc=$?
	if [ $rc -ne 0 ] || grep -q ThreadSanitizer run.err; then
		ok=0
	elif [ -n "$out" ]; then
		"$ORACLE_IMG" compare -q "$src" "$out" || ok=0
		case $out in *.qcow2) "$ORACLE_IMG" check -q "$out" || ok=0 ;;
		esac
	fi
	if [ $ok = 1 ]; then
		pass=$((pass + 1))
		echo "PASS: tsan: $name"
	else
		fail=$((fail + 1))
		echo "FAIL: tsan: $name (exit $rc)"
		head -n 40 run.err | sed 's/^/    /'
	fi
}

for s in c u c4k xl2 top; do
	run "convert -m 16 $s.qcow2 -> raw" $s.qcow2 o.raw \
		convert -m 16 -O raw $s.qcow2 o.raw
	run "convert -m 16 -W $s.qcow2 -> qcow2" $s.qcow2 o.qcow2 \
		convert -m 16 -W -O qcow2 $s.qcow2 o.qcow2
done
run "convert -m 16 -W -c c.qcow2 -> qcow2" c.qcow2 o.qcow2 \
	convert -m 16 -W -c -O qcow2 c.qcow2 o.qcow2
run "convert -m 16 top.qcow2 -> qcow2 over a backing file" top.qcow2 \
	o.qcow2 convert -m 16 -O qcow2 -B mid.qcow2 -F qcow2 top.qcow2 \
	o.qcow2
run "compare c4k.qcow2 xl2.qcow2" "" "" \
	compare c4k.qcow2 xl2.qcow2

echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
