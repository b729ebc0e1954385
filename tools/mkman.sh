#!/bin/sh
# mkman.sh BINARY - print the imgbox(1) man page (troff, man macros) made
# from BINARY's own texts: `--version`, `--help` and `--help APPLET` for
# every applet `--list` names. The usage texts stay the single source; the
# page only wraps them, each as a preformatted block.
set -eu
bin=$1
case $bin in */*) ;; *) bin=./$bin ;; esac

# troff reads a backslash as an escape and a line starting with . or ' as
# a request: double the backslashes, shield such lines with \&.
quote() {
	sed -e 's/\\/\\e/g' -e "s/^\\([.']\\)/\\\\\\&\\1/"
}

ver=$("$bin" --version | sed -n '1s/^imgbox \([^ ]*\).*/\1/p')
[ -n "$ver" ] || { echo "mkman.sh: $bin --version: no version" >&2; exit 1; }
list=$("$bin" --list)
# the page's date: SOURCE_DATE_EPOCH for reproducible builds, else the
# binary's time
date=$(date -u -d "@${SOURCE_DATE_EPOCH:-$(stat -c %Y "$bin")}" +%Y-%m-%d)
[ -n "$list" ] || { echo "mkman.sh: $bin --list is empty" >&2; exit 1; }

cat <<HEAD
.TH IMGBOX 1 "$date" "imgbox $ver" "User Commands"
.SH NAME
imgbox \\- qemu-img as a multi-call binary
.SH SYNOPSIS
.B imgbox
.I APPLET
.RI [ ARGS ...]
.br
.I APPLET
.RI [ ARGS ...]
.br
.B imgbox
.BR --list " | " --install " [" -s ]
.I DIR
.RB "| " --help
.RI [ APPLET ]
.RB "| " --version
.SH DESCRIPTION
.B imgbox
creates, converts, inspects, checks and repairs virtual disk images with
the command line, output and exit codes of qemu-img. It runs the applet
named by the name it is called by (a link such as
.BR qemu-img " or " img-info ),
or by its first argument.
.B --install
makes a link for every applet in DIR (symbolic with
.BR -s ).
.PP
.nf
HEAD
"$bin" --version | quote
echo .fi
echo .SH APPLETS
for a in $list; do
	printf '.SS %s\n.nf\n' "$a"
	"$bin" --help "$a" | quote
	echo .fi
done
cat <<TAIL
.SH EXIT STATUS
As qemu-img: 0 on success, 1 on failure, and the documented codes of
.BR check " and " compare ;
127 for an unknown applet name.
.SH SEE ALSO
.BR qemu-img (1)
TAIL
