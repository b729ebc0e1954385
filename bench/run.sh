#!/bin/bash
# run.sh - the convert benchmark: imgbox against QEMU's qemu-img on the same
# files in the same run (make bench).
#
# For every case: one warm-up run of each tool, then BENCH_PAIRS (default 3)
# alternating pairs; the table shows medians of wall time and user+sys CPU,
# the peak RSS, the output's allocated size and the imgbox/qemu-img wall
# time ratio. "cp --sparse=always" of the raw disk, timed the same way, is
# the physical-limit reference.
#
# Environment: IMGBOX (default ./imgbox), ORACLE_IMG (/usr/bin/qemu-img),
# BENCH_DIR (build/bench), BENCH_SIZE_MB (1024), BENCH_PAIRS (3),
# BENCH_CASES (space-separated case names to run; default all).
set -eu
TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMGBOX=$(realpath "${IMGBOX:-$TOP/imgbox}")
QEMU_IMG=${ORACLE_IMG:-/usr/bin/qemu-img}
DIR=$(realpath -m "${BENCH_DIR:-$TOP/build/bench}")
PAIRS=${BENCH_PAIRS:-3}

bash "$TOP/bench/corpus.sh" "$DIR"
cd "$DIR"
mkdir -p links out
ln -sf "$IMGBOX" links/qemu-img	# the drop-in: same command lines

# case name | arguments after "convert" (OUT = the output file)
CASES=(
	"raw->qcow2|-f raw -O qcow2 disk.raw OUT.qcow2"
	"qcow2->raw|-f qcow2 -O raw disk.qcow2 OUT.raw"
	"raw->raw|-f raw -O raw disk.raw OUT.raw"
	"qcow2->qcow2 -c|-c -f qcow2 -O qcow2 disk.qcow2 OUT.qcow2"
	"qcow2->qcow2 -c -W|-c -W -f qcow2 -O qcow2 disk.qcow2 OUT.qcow2"
	"qcow2(c)->raw|-f qcow2 -O raw disk-c.qcow2 OUT.raw"
	"chain->raw|-f qcow2 -O raw top.qcow2 OUT.raw"
	"raw->qcow2 -m 1|-m 1 -f raw -O qcow2 disk.raw OUT.qcow2"
	"raw->qcow2 -m 16|-m 16 -f raw -O qcow2 disk.raw OUT.qcow2"
	"raw->qcow2 -W|-W -f raw -O qcow2 disk.raw OUT.qcow2"
	"raw->raw -t none|-t none -T none -f raw -O raw disk.raw OUT.raw"
)

# run TOOL ARGS...: prints "wall cpu rss_kib alloc_bytes" of one run
run1()
{
	local tool=$1 args=$2 out t
	out=$(echo "$args" | grep -o 'OUT\.[a-z0-9]*')
	args=${args//OUT/out\/o}
	rm -f "out/o.${out#OUT.}"
	sync
	/usr/bin/time -o time.log -f '%e %U %S %M' "$tool" convert $args \
		> /dev/null 2> err.log ||
		{ echo "run failed: $tool convert $args" >&2; cat err.log >&2
		  exit 1; }
	read -r wall user sys rss < <(tail -1 time.log)
	echo "$wall $(echo "$user + $sys" | bc) $rss \
$(( $(stat -c %b "out/o.${out#OUT.}") * 512 ))"
}

median()	# median of the arguments
{
	printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 }
		END { if (NR % 2) print v[(NR + 1) / 2];
		      else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
kib_to_mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# physical-limit reference
ref=()
for ((i = 0; i <= PAIRS; i++)); do
	rm -f out/ref.raw
	sync
	/usr/bin/time -o time.log -f '%e' cp --sparse=always disk.raw \
		out/ref.raw
	t=$(tail -1 time.log)
	[ $i -eq 0 ] || ref+=("$t")
done
rm -f out/ref.raw

printf 'imgbox: %s\nqemu-img: %s\ncorpus: %s (%s MiB virtual, %s MiB allocated), %d pairs after a warm-up, %d CPUs\n' \
	"$IMGBOX" "$("$QEMU_IMG" --version | head -1)" "$DIR/disk.raw" \
	"$(( $(stat -c %s disk.raw) >> 20 ))" \
	"$(( $(stat -c %b disk.raw) * 512 >> 20 ))" "$PAIRS" "$(nproc)"
printf 'physical limit (cp --sparse=always disk.raw): %ss median\n' \
	"$(median "${ref[@]}")"
printf 'load average at start: %s (other work on the machine skews wall times;\n' \
	"$(cut -d' ' -f1-3 /proc/loadavg)"
printf 'the CPU column is the steadier comparison)\n\n'

printf '%-20s %8s %8s %6s | %8s %8s %9s | %9s %9s | %9s %9s\n' \
	case imgbox qemu-img ratio "cpu ib" "cpu qi" "" "rss ib" "rss qi" \
	"alloc ib" "alloc qi"
printf '%-20s %8s %8s %6s | %8s %8s %9s | %9s %9s | %9s %9s\n' \
	"" "wall s" "wall s" "" "s" "s" "" "MiB" "MiB" "MiB" "MiB"

for c in "${CASES[@]}"; do
	name=${c%%|*}
	args=${c#*|}
	if [ -n "${BENCH_CASES:-}" ] && ! [[ " $BENCH_CASES " == *" $name "* ]]
	then
		continue
	fi
	iw=() ic=() ir=() qw=() qc=() qr=()
	for ((i = 0; i <= PAIRS; i++)); do
		read -r w cpu rss alloc <<< "$(run1 links/qemu-img "$args")"
		ia=$alloc
		if [ $i -gt 0 ]; then iw+=("$w"); ic+=("$cpu"); ir+=("$rss"); fi
		read -r w cpu rss alloc <<< "$(run1 "$QEMU_IMG" "$args")"
		qa=$alloc
		if [ $i -gt 0 ]; then qw+=("$w"); qc+=("$cpu"); qr+=("$rss"); fi
	done
	mi=$(median "${iw[@]}")
	mq=$(median "${qw[@]}")
	printf '%-20s %8s %8s %6s | %8s %8s %9s | %9s %9s | %9s %9s\n' \
		"$name" "$mi" "$mq" \
		"$(awk -v a="$mi" -v b="$mq" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')" \
		"$(median "${ic[@]}")" "$(median "${qc[@]}")" "" \
		"$(kib_to_mib "$(median "${ir[@]}")")" \
		"$(kib_to_mib "$(median "${qr[@]}")")" \
		"$(mib "$ia")" "$(mib "$qa")"
done
rm -f out/o.*
printf '\nload average at end: %s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
