#!/bin/sh
# size-map.sh MAPFILE - bytes each object file and each library puts into
# the binary (file-backed sections: code, read-only data, data; not .bss),
# from the GNU ld map that `make size` asks the linker for. Prints one line
# per object, then one per group (applets, block, formats/NAME, each
# library), largest first.
set -eu
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
awk '
function hex(s,   i, v, c) {
	v = 0; s = tolower(substr(s, 3))
	for (i = 1; i <= length(s); i++) {
		c = index("0123456789abcdef", substr(s, i, 1)) - 1
		v = v * 16 + c
	}
	return v
}
/^Linker script and memory map/ { on = 1; next }
!on { next }
/^[^ ]/ { split($1, o, " "); out = o[1]; next }	# output section
{
	if (out == ".bss" || out == ".tbss" || out ~ /^\.(comment|debug|note\.GNU)/)
		next
	n = NF
	if (n >= 3 && $(n-1) ~ /^0x/ && $(n-2) ~ /^0x/) {
		# "[.sect] 0xADDR 0xSIZE FILE"
		size = hex($(n-1)); file = $n
	} else if (n == 2 && $1 ~ /^\*fill\*/) {
		next
	} else if (n == 3 && $1 == "*fill*") {
		next
	} else next
	if (size == 0) next
	unit[file] += size
}
END {
	for (f in unit) {
		g = f
		if (g ~ /\.a\(/) { sub(/\(.*/, "", g); sub(/.*\//, "", g) }
		else if (g ~ /\/(crt[^\/]*|[SM]?crt1)\.o$/) g = "crt"
		else if (g ~ /^build\/[^\/]*\//) {
			sub(/^build\/[^\/]*\//, "", g)
			if (g ~ /^formats\/[^\/]*\//) { sub(/\/[^\/]*$/, "", g) }
			else if (g ~ /^formats\//) { sub(/\.o$/, "", g) }
			else sub(/\/.*/, "", g)
		}
		grp[g] += unit[f]
		name = f
		if (name ~ /\.a\(/) { sub(/^.*\//, "", name) }
		else sub(/^build\/[^\/]*\//, "", name)
		printf "obj %8d %s\n", unit[f], name
		total += unit[f]
	}
	for (g in grp) printf "grp %8d %s\n", grp[g], g
	printf "tot %8d\n", total
}' "$1" > "$tmp"
echo "  bytes  object file or library member (largest 40)"
grep '^obj' "$tmp" | sort -k2,2nr | head -40 | awk '{ printf "%7d  %s\n", $2, $3 }'
echo
echo "  bytes  group"
grep '^grp' "$tmp" | sort -k2,2nr | awk '{ printf "%7d  %s\n", $2, $3 }'
awk '$1 == "tot" { printf "%7d  all file-backed sections\n", $2 }' "$tmp"
