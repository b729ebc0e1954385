#!/usr/bin/env bash
# demo.sh - the main job on a small generated image: create a raw disk, put
# data in it, convert it to qcow2 (compressed too), and look at the results
# with imgbox and with QEMU's qemu-img as a cross-check.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$PWD/imgbox
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
"$bin" --install -s "$d/bin" >/dev/null
export PATH=$d/bin:$PATH
cd "$d"

echo "== img-create: a 64 MiB raw disk"
img-create -f raw disk.raw 64M
# some data: a text "partition", random blocks, and a long zero gap
printf 'imgbox demo\n' | dd of=disk.raw conv=notrunc status=none
head -c 4M /dev/urandom | dd of=disk.raw bs=1M seek=8 conv=notrunc status=none
{ yes imgbox || true; } | head -c 8M | dd of=disk.raw bs=1M seek=40 conv=notrunc status=none

if [ -x "$d/bin/img-convert" ]; then
	echo "== img-convert: raw -> qcow2, and compressed"
	img-convert -p -f raw -O qcow2 disk.raw disk.qcow2
	img-convert -c -f raw -O qcow2 disk.raw disk-c.qcow2
	echo "== img-info"
	img-info disk.qcow2
	if command -v /usr/bin/qemu-img >/dev/null; then
		echo "== QEMU's qemu-img check and compare of imgbox's output"
		/usr/bin/qemu-img check disk.qcow2
		/usr/bin/qemu-img compare disk.raw disk.qcow2
		/usr/bin/qemu-img compare disk.raw disk-c.qcow2
	fi
	ls -ls disk.raw disk.qcow2 disk-c.qcow2
else
	echo "== img-info"
	img-info disk.raw
fi
echo "demo: ok"
