#!/bin/bash
# dracut module of imgbox: puts the binary and its applet links (qemu-img,
# img-*) into /usr/bin of the initramfs. make install writes the binary's
# installed path for @BINDIR@.

check() {
	require_binaries @BINDIR@/imgbox || return 1
	# included when asked for (--add imgbox) or by a module that depends
	# on it, not into every host's initramfs
	return 255
}

depends() {
	return 0
}

install() {
	local applet
	inst_binary @BINDIR@/imgbox /usr/bin/imgbox || return 1
	for applet in $(@BINDIR@/imgbox --list); do
		[[ -e ${initdir}/usr/bin/$applet ]] && continue
		ln -s imgbox "${initdir}/usr/bin/$applet" || return 1
	done
}
