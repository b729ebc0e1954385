#!/usr/bin/env bash
# setup.sh - install what building and testing imgbox needs on Debian 12.
# Installs only missing packages; run as root (or with sudo available).
set -euo pipefail

PKGS=(build-essential musl-tools kconfig-frontends qemu-utils clang llvm
      dpkg-dev zlib1g-dev libaio-dev ca-certificates debian-archive-keyring
      file libclang-rt-14-dev
      # tests/install.test: the man page, the initramfs builders (dracut-core
      # installs beside initramfs-tools-core; the dracut package would not)
      groff-base man-db mandoc bsdextrautils cpio initramfs-tools-core
      dracut-core
      # tests/callers.test: programs that run qemu-img
      python3-oslo.utils cloud-image-utils genisoimage libvirt-daemon
      libvirt-clients)

missing=()
for p in "${PKGS[@]}"; do
	st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
	[ "$st" = installed ] || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
	echo "setup: installing ${missing[*]}"
	SUDO=
	[ "$(id -u)" = 0 ] || SUDO=sudo
	$SUDO apt-get update -q
	$SUDO env DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
else
	echo "setup: all packages already installed"
fi
