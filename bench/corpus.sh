#!/bin/bash
# corpus.sh DIR - build the deterministic convert benchmark corpus in DIR
# (default build/bench), reusing what is already there.
#
#   disk.raw      a VM-like sparse disk of BENCH_SIZE_MB (default 1024) MiB:
#                 every 16 MiB region holds 3 MiB of random data, 4 MiB of
#                 compressible text, 1 MiB of written zeroes and holes
#   disk.qcow2    the same as qcow2; disk-c.qcow2 compressed
#   top.qcow2     a two-deep backing chain top -> mid -> base.qcow2 with
#                 writes in every layer
#
# The bytes depend only on the size: random data comes from AES-CTR with a
# fixed key, text from an awk generator with a fixed seed. The images are
# made by QEMU's qemu-img, so both tools read the same files.
set -eu
DIR=${1:-build/bench}
SIZE_MB=${BENCH_SIZE_MB:-1024}
QEMU_IMG=${ORACLE_IMG:-/usr/bin/qemu-img}
QEMU_IO=${QEMU_IO:-/usr/bin/qemu-io}
REGION_MB=16
mkdir -p "$DIR"
cd "$DIR"

stamp="size=$SIZE_MB v1"
if [ -f corpus.done ] && [ "$(cat corpus.done)" = "$stamp" ]; then
	exit 0
fi
rm -f corpus.done disk.raw disk.qcow2 disk-c.qcow2 base.qcow2 mid.qcow2 \
	top.qcow2
echo "corpus: building a $SIZE_MB MiB disk in $DIR (once)" >&2

random_mb()	# random_mb N SEED: N MiB of reproducible random bytes
{
	openssl enc -aes-128-ctr -nosalt -pbkdf2 -iter 1 \
		-pass "pass:imgbox-bench-$2" < /dev/zero 2>/dev/null |
		head -c $(($1 << 20))
}

text_mb()	# text_mb N SEED: N MiB of log-like text (compresses ~4:1)
{
	local n=$(($1 << 20))

	awk -v seed="$2" -v n="$n" 'BEGIN {
		split("kernel sshd systemd cron nginx postgres dhclient", prog, " ")
		split("started stopped accepted connection from failed retry ok", w, " ")
		x = seed * 7919 + 17; out = 0
		while (out < n) {
			x = (x * 1103515245 + 12345) % 2147483648
			line = sprintf("2024-%02d-%02d %02d:%02d:%02d host%d %s[%d]: %s %s %d.%d.%d.%d port %d\n",
				x % 12 + 1, x % 28 + 1, x % 24, x % 60, int(x / 7) % 60,
				x % 9, prog[x % 7 + 1], x % 30000, w[x % 7 + 1],
				w[int(x / 3) % 7 + 1], x % 256, int(x / 5) % 256,
				int(x / 11) % 256, int(x / 13) % 256, x % 65536)
			printf "%s", line
			out += length(line)
		}
	}' | head -c "$n"
}

truncate -s "${SIZE_MB}M" disk.raw.tmp
for ((r = 0; r < SIZE_MB / REGION_MB; r++)); do
	base=$((r * REGION_MB))
	random_mb 3 "$r" | dd of=disk.raw.tmp bs=1M seek=$base conv=notrunc \
		status=none iflag=fullblock
	text_mb 4 "$r" | dd of=disk.raw.tmp bs=1M seek=$((base + 4)) \
		conv=notrunc status=none iflag=fullblock
	dd if=/dev/zero of=disk.raw.tmp bs=1M seek=$((base + 9)) count=1 \
		conv=notrunc status=none
done
mv disk.raw.tmp disk.raw

"$QEMU_IMG" convert -f raw -O qcow2 disk.raw disk.qcow2
"$QEMU_IMG" convert -c -f raw -O qcow2 disk.raw disk-c.qcow2

# chain: base = the disk; mid and top overwrite 1 MiB here and there
cp --sparse=always disk.qcow2 base.qcow2
"$QEMU_IMG" create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
"$QEMU_IMG" create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
cmds_mid=() cmds_top=()
for ((m = 0; m < SIZE_MB; m += 32)); do
	cmds_mid+=(-c "write -P 0x5a $((m + 2))M 1M")
	cmds_top+=(-c "write -P 0xa5 $((m + 12))M 512k")
	cmds_top+=(-c "write -z $((m + 4))M 1M")
done
"$QEMU_IO" -f qcow2 "${cmds_mid[@]}" mid.qcow2 > /dev/null
"$QEMU_IO" -f qcow2 "${cmds_top[@]}" top.qcow2 > /dev/null
echo "$stamp" > corpus.done
