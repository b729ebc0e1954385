#!/bin/sh
# deps.sh BUILDDIR - build static zlib and libaio for musl from Debian sources.
#
# Result:  BUILDDIR/musl/include/{zlib.h,zconf.h,libaio.h}
#          BUILDDIR/musl/lib/{libz.a,libaio.a}
# If all of those exist already, built by this recipe (RECIPE below, kept in
# BUILDDIR/musl/recipe), exit 0 at once.
#
# The sources are fetched at build time with `apt-get source` through a
# private apt configuration under BUILDDIR/apt (the machine's own apt lists
# and caches are left alone) and unpacked with dpkg-source into BUILDDIR/src.
# Needs: musl-gcc (musl-tools), dpkg-source (dpkg-dev), apt-get, make,
# /usr/share/keyrings/debian-archive-keyring.gpg (debian-archive-keyring).
# Works as root or as an ordinary user.
set -eu

die() { echo "deps: error: $*" >&2; exit 1; }
say() { echo "deps: $*"; }

[ $# -eq 1 ] && [ -n "$1" ] || die "usage: sh kconfig/deps.sh BUILDDIR"

mkdir -p "$1" || die "cannot create $1"
B=$(cd "$1" && pwd)
OUT=$B/musl

# Change RECIPE whenever the way the libraries are built changes, so that
# existing build trees rebuild them.
RECIPE="zlib -Os, NO_GZIP, deflate/trees/inffast -O3; libaio -Os"
have_all() {
	for f in include/zlib.h include/zconf.h include/libaio.h lib/libz.a lib/libaio.a; do
		[ -s "$OUT/$f" ] || return 1
	done
	return 0
}
if have_all && [ "$(cat "$OUT/recipe" 2>/dev/null)" = "$RECIPE" ]; then
	touch "$OUT/lib/libz.a"	# newer than deps.sh: make stops asking
	exit 0
fi

# ---- tools -----------------------------------------------------------------
CC=${MUSL_CC:-musl-gcc}
command -v "$CC" >/dev/null 2>&1 ||
	die "$CC not found: install musl-tools (apt-get install musl-tools)"
command -v dpkg-source >/dev/null 2>&1 ||
	die "dpkg-source not found: install dpkg-dev (apt-get install dpkg-dev)"
command -v apt-get >/dev/null 2>&1 || die "apt-get not found (Debian host needed)"
command -v make >/dev/null 2>&1 || die "make not found: install build-essential"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
[ -r "$KEYRING" ] ||
	die "$KEYRING missing: install debian-archive-keyring"

JOBS=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)
CFLAGS_DEPS="-Os -ffunction-sections -fdata-sections"

# ---- private apt configuration ---------------------------------------------
CODENAME=
if [ -r /etc/os-release ]; then
	CODENAME=$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release | tr -d '"' | head -n 1)
fi
[ -n "$CODENAME" ] || CODENAME=bookworm

# The mirror URI this machine already uses for $CODENAME: deb822 files first,
# then one-line sources.list entries.
find_mirror() {
	for f in /etc/apt/sources.list.d/*.sources; do
		[ -r "$f" ] || continue
		awk -v suite="$CODENAME" '
			function flush() {
				if (uri != "" && hassuite && !disabled) { print uri; found = 1; exit }
				uri = ""; hassuite = 0; disabled = 0
			}
			/^[ \t]*#/ { next }
			/^[ \t]*$/ { flush(); next }
			tolower($1) == "uris:" { uri = $2 }
			tolower($1) == "suites:" {
				for (i = 2; i <= NF; i++) if ($i == suite) hassuite = 1
			}
			tolower($1) == "enabled:" && tolower($2) == "no" { disabled = 1 }
			END { if (!found) flush() }
		' "$f"
	done
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[ -r "$f" ] || continue
		awk -v suite="$CODENAME" '
			$1 != "deb" && $1 != "deb-src" { next }
			{
				i = 2
				if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
				if ($(i + 1) == suite) { print $i; exit }
			}
		' "$f"
	done
}
MIRROR=$(find_mirror | head -n 1)
case $MIRROR in
http://* | https://* | file:/* | mirror*) ;;
*) MIRROR=http://deb.debian.org/debian ;;
esac

PRIV=$B/apt
rm -rf "$PRIV"
mkdir -p "$PRIV/sources.list.d" "$PRIV/lists/partial" "$PRIV/cache/archives/partial"
cat >"$PRIV/sources.list.d/imgbox-src.sources" <<EOF
Types: deb-src
URIs: $MIRROR
Suites: $CODENAME
Components: main
Signed-By: $KEYRING
EOF

set -- -q \
	-o Dir::Etc::SourceList=/dev/null \
	-o Dir::Etc::SourceParts="$PRIV/sources.list.d" \
	-o Dir::State::Lists="$PRIV/lists" \
	-o Dir::Cache="$PRIV/cache"
if [ "$(id -u)" != 0 ]; then
	# An ordinary user cannot switch to _apt; download as ourselves.
	set -- "$@" -o APT::Sandbox::User="$(id -un)"
else
	# root drops to _apt for downloads: the private dirs must be its.
	if id _apt >/dev/null 2>&1; then
		chown -R _apt "$PRIV/lists/partial" "$PRIV/cache/archives/partial" 2>/dev/null || true
	fi
fi

LOG=$B/deps.log
: >"$LOG"
run() {
	# run CMD...: output to the log, shown only on failure
	if ! "$@" >>"$LOG" 2>&1; then
		tail -n 30 "$LOG" >&2
		die "failed: $* (full log: $LOG)"
	fi
}

say "updating source index for $CODENAME from $MIRROR ..."
run apt-get "$@" update

DL=$B/dl
rm -rf "$DL"
mkdir -p "$DL"
# apt drops to _apt when root; let it write into the download dir.
if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then
	chown _apt "$DL" 2>/dev/null || true
fi
say "fetching zlib libaio sources ..."
(cd "$DL" && run apt-get "$@" source --download-only zlib libaio)

SRC=$B/src
rm -rf "$SRC"
mkdir -p "$SRC"
unpack() { # unpack NAME -> prints nothing, unpacks into $SRC/NAME
	dsc=
	for d in "$DL/$1"_*.dsc; do [ -e "$d" ] && dsc=$d; done
	[ -n "$dsc" ] || die "no $1 .dsc downloaded into $DL"
	say "unpacking $(basename "$dsc") ..."
	# apt-get already checked the files against the signed Sources index.
	run dpkg-source --no-check -x "$dsc" "$SRC/$1"
}
unpack zlib
unpack libaio

STAGE=$B/stage
rm -rf "$STAGE"
mkdir -p "$STAGE/include" "$STAGE/lib"

# ---- zlib ------------------------------------------------------------------
say "building zlib with $CC ..."
(
	cd "$SRC/zlib"
	# NO_GZIP: imgbox uses raw and zlib-wrapped streams only; without the
	# gzip wrapper the CRC-32 tables (12 KiB) are not linked in.
	# -Os except the three files where compression and decompression spend
	# their time: deflate's hash sliding only vectorises at -O3 (about 20%
	# faster convert -c), and trees.c/inffast.c are the inner loops.
	zcf="-ffunction-sections -fdata-sections -DNO_GZIP"
	run env CC="$CC" CFLAGS="-Os $zcf" \
		./configure --static --prefix="$STAGE"
	run make -j"$JOBS" libz.a
	for f in deflate trees inffast; do
		run "$CC" -O3 $zcf -D_LARGEFILE64_SOURCE=1 -DHAVE_HIDDEN -I. \
			-c $f.c -o $f.o
	done
	run ar rcs libz.a deflate.o trees.o inffast.o
)
cp "$SRC/zlib/libz.a" "$STAGE/lib/"
cp "$SRC/zlib/zlib.h" "$SRC/zlib/zconf.h" "$STAGE/include/"

# ---- libaio ----------------------------------------------------------------
# src/Makefile builds both libaio.a and libaio.so; ask only for the archive.
# musl quirk: musl-gcc searches only musl's headers, not the kernel's, so
# compat-0_1.c's <asm/errno.h> is not found; musl's <errno.h> has the same
# values.  The edit is made in the unpacked copy under BUILDDIR/src only.
say "building libaio with $CC ..."
(
	cd "$SRC/libaio/src"
	sed 's|<asm/errno.h>|<errno.h>|' compat-0_1.c >compat-0_1.c.new
	mv compat-0_1.c.new compat-0_1.c
	run make -j"$JOBS" CC="$CC" AR=ar RANLIB=ranlib ENABLE_SHARED=0 \
		CFLAGS="$CFLAGS_DEPS -Wall -fomit-frame-pointer" \
		libaio.a
)
cp "$SRC/libaio/src/libaio.a" "$STAGE/lib/"
cp "$SRC/libaio/src/libaio.h" "$STAGE/include/"

# ---- install ---------------------------------------------------------------
mkdir -p "$OUT/include" "$OUT/lib"
for f in include/zlib.h include/zconf.h include/libaio.h lib/libz.a lib/libaio.a; do
	cp "$STAGE/$f" "$OUT/$f.tmp"
	mv "$OUT/$f.tmp" "$OUT/$f"
done
printf '%s\n' "$RECIPE" > "$OUT/recipe"
rm -rf "$STAGE"
have_all || die "install incomplete in $OUT"
say "done: $OUT/lib/libz.a $OUT/lib/libaio.a"
