/* imgbox.h - what applets see: messages and dying, option parsing with
 * generated FLAG_x bits, size parsing, output helpers.
 *
 * An applet file does "#define FOR_name" before including this header to
 * get its FLAG_x / OPT_x definitions (generated from its option string). */
#ifndef IMGBOX_H
#define IMGBOX_H

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "platform.h"
#include "blk.h"
#include <generated/config.h>

#define IMGBOX_VERSION "0.1"
#define QEMU_COMPAT_VERSION "7.2.0"

struct applet {
	const char *name;		/* img-create, qemu-img, ... */
	int (*main)(int argc, char **argv);
	const char *shortopts;		/* getopt string; '*' after ':' = list */
	const char *longopts;		/* "name[:][*][=c],..." */
	const char *usage;
};
extern const struct applet applets[];
extern const int applet_count;
const struct applet *applet_find(const char *name);

/* Parsed options of the running applet. */
struct opts {
	uint64_t flags;
	char *arg[64];
};
extern struct opts opts;
extern const char *progname;		/* prefix of every message */
extern const struct applet *cur_applet;

/* Parses argv by cur_applet's option strings into opts; returns optind.
 * Unknown options and missing arguments die with qemu-img's messages. */
int opts_parse(int argc, char **argv);
/* Sets blk_set_untrusted() from the build default and IMGBOX_UNTRUSTED
 * (opts_parse does, before it sees --untrusted). */
void untrusted_from_env(void);

void msg(const char *fmt, ...) PRINTF(1, 2);		/* "prog: ...\n" */
void vmsg(const char *fmt, va_list ap);
/* qemu-img's progress line "    (12.34/100%)", redrawn with \r. Each
 * applet decides when it moved enough to redraw; progress_print draws
 * only after progress_start(true) (-p without -q), progress_end ends the
 * line if one is shown. progress_line draws whatever the setting (convert
 * answers SIGUSR1 with a whole line). */
void progress_start(bool on);
void progress_print(double pct);
void progress_line(double pct, bool newline);
void progress_end(void);
bool progress_shown(void);
/* A check's report sink (struct check_result): the line on stderr, an
 * error line with the program's prefix. */
void check_print_line(void *opaque, int kind, const char *line);
NORETURN void die(const char *fmt, ...) PRINTF(1, 2);	/* msg + exit 1 */
/* msg + "Try 'prog --help' for more information" + exit 1 */
NORETURN void die_usage(const char *fmt, ...) PRINTF(1, 2);
NORETURN void die_exit(int code);	/* runs the cleanup hook, exits */
/* A file this command created, removed if the command dies. */
void cleanup_file(const char *path);
/* The same for a file that does not exist yet (lstat: ENOENT): one that
 * existed before the command is never removed. True if registered. */
bool cleanup_new_file(const char *path);
/* A failed create: a failed write (true) removes the new file, a refused
 * option leaves it empty, as qemu-img does. */
static inline bool create_failed_writing(int ret)
{
	return ret == -EIO || ret == -ENOSPC || ret == -EDQUOT;
}
void cleanup_cancel(void);
void print_usage(const struct applet *a, FILE *f);
void qemu_img_help(void);

/* "1 MiB", "4 KiB", "1.5 GiB" as qemu prints sizes. */
void size_to_str(char *buf, size_t len, uint64_t size);
/* A number with qemu-img's size suffixes in [min, max], or die with
 * qemu-img's message naming what. */
int64_t cli_number(const char *s, const char *what, int64_t min,
		   int64_t max);
/* Parses a size the way qemu-img's command line does; dies on error. */
uint64_t cli_size(const char *s, const char *what);

/* Snapshot table as qemu-img prints it, and one JSON SnapshotInfo. */
void print_snapshot_table(const struct snapshot_info *sn, int n);
void print_snapshot_row(const struct snapshot_info *sn);
struct val *snapshot_to_val(struct val *arr, const struct snapshot_info *s);
/* -l / -s of convert and measure: "snapshot.id=ID,snapshot.name=NAME"
 * (parsed into sn, dies on other keys) or an ID or NAME; load_snapshot
 * makes the read-only source read as that internal snapshot or dies. */
void snapshot_arg_parse(const char *arg, struct optlist *sn);
void load_snapshot(struct blk *in, const char *arg);
/* True if an -o string asks for help ("help" or "?"). */
int opts_want_help(const char *o);
/* -o help text and the "Formatting ..." line of create/convert. */
/* rows "  name=<type>   - help", sorted by name */
void print_opt_help(const struct optdesc *d, bool hidden_too);
void print_create_help(const char *fmt, int with_protocol);
void print_formatting(const char *filename, const char *fmt,
		      const struct optlist *ol);

/* qemu's WARNING for a probed raw image opened read-write. */
void warn_probed_raw(const struct blk *bs);
/* blk_open or die with qemu-img's "Could not open 'X': ..." message; warns
 * about probed raw images opened for writing. */
struct blk *open_image(const char *filename, const char *fmt, unsigned flags,
		       int cache);
/* -t (source false) / -T (source true) value, or def when s is NULL; dies
 * with qemu-img's message on an unknown mode. */
int parse_cache_or_die(const char *s, int def, bool source);

/* --output=human|json -> 0 / 1; dies on anything else. */
int parse_output_format(const char *s);

#define HAS(x) (opts.flags & FLAG_##x)
#define ARG(x) (opts.arg[OPT_##x])

#endif

#ifdef FOR_APPLET_DONE
#else
#include <generated/flags.h>
#endif
