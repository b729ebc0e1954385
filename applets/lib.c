/* lib.c - what every applet shares: messages, dying with cleanup, option
 * parsing from the applet's generated option strings, sizes. */
#include <errno.h>
#include <getopt.h>
#include <stdarg.h>
#include <sys/stat.h>
#include <unistd.h>
#include <time.h>
#include "imgbox.h"

struct opts opts;
const char *progname = "imgbox";
const struct applet *cur_applet;
static char *cleanup_path;

/* Every message of every applet goes out here: stdout first, so the two
 * streams keep their order in a shared log. */
void vmsg(const char *fmt, va_list ap)
{
	fflush(stdout);
	fprintf(stderr, "%s: ", progname);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
}

void msg(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vmsg(fmt, ap);
	va_end(ap);
}

static bool progress_on;

void progress_start(bool on)
{
	progress_on = on;
}

void progress_line(double pct, bool newline)
{
	printf("    (%3.2f/100%%)%c", pct, newline ? '\n' : '\r');
	fflush(stdout);
}

void progress_print(double pct)
{
	if (progress_on)
		progress_line(pct, false);
}

void progress_end(void)
{
	if (progress_on)
		printf("\n");
	progress_on = false;
}

bool progress_shown(void)
{
	return progress_on;
}

void check_print_line(void *opaque, int kind, const char *line)
{
	(void)opaque;
	if (kind == CHECK_ERROR) {
		msg("%s", line);
		return;
	}
	fprintf(stderr, "%s\n", line);
}

void cleanup_file(const char *path)
{
	free(cleanup_path);
	cleanup_path = path ? strdup(path) : NULL;
}

bool cleanup_new_file(const char *path)
{
	struct stat st;

	if (lstat(path, &st) == 0 || errno != ENOENT)
		return false;
	cleanup_file(path);
	return true;
}

void cleanup_cancel(void)
{
	cleanup_file(NULL);
}

void die_exit(int code)
{
	if (cleanup_path)
		unlink(cleanup_path);
	fflush(stdout);
	exit(code);
}

void die(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vmsg(fmt, ap);
	va_end(ap);
	die_exit(1);
}

void die_usage(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vmsg(fmt, ap);
	va_end(ap);
	fprintf(stderr, "Try '%s --help' for more information\n", progname);
	die_exit(1);
}

void print_usage(const struct applet *a, FILE *f)
{
	fputs(a->usage, f);
	if (strncmp(a->name, "img-", 4))
		return;
	fputs("\nEvery command also takes:\n"
	      "  --untrusted   the image may be hostile: the files it names "
	      "must be regular\n"
	      "                files in its directory, its tables are capped "
	      "(also\n"
	      "                IMGBOX_UNTRUSTED=1; IMGBOX_UNTRUSTED=0 turns it "
	      "off)\n", f);
}

/* The untrusted-image default of this process: the build's, then
 * IMGBOX_UNTRUSTED (1 on, 0 off); --untrusted turns it on. Once: the
 * qemu-img applet may have seen --untrusted before the command's. */
void untrusted_from_env(void)
{
	static bool done;
	const char *v = getenv("IMGBOX_UNTRUSTED");
	bool on = ENABLE_UNTRUSTED_DEFAULT;

	if (done)
		return;
	done = true;
	if (v && v[0])
		on = strcmp(v, "0") != 0;
	blk_set_untrusted(on);
}

/* Builds getopt_long tables from the applet's strings. Bits: short
 * options in string order, then long-only options (kconfig/gen.sh counts
 * the same way). */
int opts_parse(int argc, char **argv)
{
	const struct applet *a = cur_applet;
	char shortopts[128];
	struct option lo[66];
	int bit_of_char[256], list_bit[64] = { 0 };
	int nlo = 0, bit = 0, si = 0, c;
	const char *p;

	memset(&opts, 0, sizeof(opts));
	for (int i = 0; i < 256; i++)
		bit_of_char[i] = -1;
	shortopts[si++] = ':';
	for (p = a->shortopts; *p; p++) {
		if (*p == '*') {
			list_bit[bit - 1] = 1;
			continue;
		}
		if (*p == ':') {
			shortopts[si++] = ':';
			continue;
		}
		shortopts[si++] = *p;
		bit_of_char[(unsigned char)*p] = bit++;
	}
	if (bit_of_char['h'] < 0)
		shortopts[si++] = 'h';
	shortopts[si] = 0;

	for (p = a->longopts; p && *p && nlo < 62;) {
		char name[64];
		size_t n = strcspn(p, ",");
		const char *end = p + n, *q;
		int has = no_argument, islist = 0, alias = 0;

		memcpy(name, p, n < 63 ? n : 63);
		name[n < 63 ? n : 63] = 0;
		for (q = name; *q && *q != ':' && *q != '*' && *q != '='; q++)
			;
		for (const char *r = q; *r; r++) {
			if (*r == ':')
				has = required_argument;
			else if (*r == '*')
				islist = 1;
			else if (*r == '=') {
				alias = (unsigned char)r[1];
				break;
			}
		}
		name[q - name] = 0;
		lo[nlo].name = strdup(name);
		lo[nlo].has_arg = has;
		lo[nlo].flag = NULL;
		if (alias)
			lo[nlo].val = alias;
		else {
			list_bit[bit] = islist;
			lo[nlo].val = 0x1000 + bit++;
		}
		nlo++;
		p = *end ? end + 1 : end;
	}
	lo[nlo].name = "help";
	lo[nlo].has_arg = no_argument;
	lo[nlo].flag = NULL;
	lo[nlo].val = 0x2000;
	nlo++;
	lo[nlo].name = "untrusted";
	lo[nlo].has_arg = no_argument;
	lo[nlo].flag = NULL;
	lo[nlo].val = 0x2001;
	nlo++;
	memset(&lo[nlo], 0, sizeof(lo[nlo]));
	untrusted_from_env();

	optind = 0;
	opterr = 0;
	while ((c = getopt_long(argc, argv, shortopts, lo, NULL)) != -1) {
		int b;

		if (c == '?') {
			if (optopt && optopt < 0x1000 && argv[optind - 1] &&
			    argv[optind - 1][0] == '-' &&
			    argv[optind - 1][1] != '-')
				die_usage("unrecognized option '-%c'", optopt);
			die_usage("unrecognized option '%s'", argv[optind - 1]);
		}
		if (c == ':') {
			if (optopt && optopt < 0x1000)
				die_usage("missing argument for option '-%c'",
					  optopt);
			die_usage("missing argument for option '%s'",
				  argv[optind - 1]);
		}
		if (c == 0x2000 || (c == 'h' && bit_of_char['h'] < 0)) {
			print_usage(a, stdout);
			exit(0);
		}
		if (c == 0x2001) {
			blk_set_untrusted(true);
			continue;
		}
		b = c >= 0x1000 ? c - 0x1000 : bit_of_char[c & 255];
		if (b < 0)
			continue;
		opts.flags |= 1ULL << b;
		if (optarg) {
			if (list_bit[b] && opts.arg[b]) {
				size_t l = strlen(opts.arg[b]);
				char *n = malloc(l + strlen(optarg) + 2);
				if (!n)
					die("out of memory");
				sprintf(n, "%s,%s", opts.arg[b], optarg);
				opts.arg[b] = n;
			} else
				opts.arg[b] = optarg;
		}
	}
	for (int i = 0; i < nlo - 2; i++)
		free((char *)lo[i].name);
	return optind;
}

void size_to_str(char *buf, size_t len, uint64_t size)
{
	static const char *const units[] = { "B", "KiB", "MiB", "GiB",
					     "TiB", "PiB", "EiB" };
	/* Switch to the next unit once the number would reach 1000. */
	double x = (double)size * 1.024;
	int i = 0;

	while (i < 6 && x >= (double)(1ULL << (10 * (i + 1))))
		i++;
	snprintf(buf, len, "%0.3g %s", (double)size / (double)(1ULL << (10 * i)),
		 units[i]);
}

int64_t cli_number(const char *s, const char *what, int64_t min,
		   int64_t max)
{
	uint64_t v;
	int ret = parse_size(s, &v);

	if (ret < 0 && ret != -ERANGE)
		die("Invalid %s specified. You may use k, M, G, T, P or E "
		    "suffixes for\n%s: kilobytes, megabytes, gigabytes, "
		    "terabytes, petabytes and exabytes.", what, progname);
	if (ret == -ERANGE || v > (uint64_t)max || (int64_t)v < min)
		die("Invalid %s specified. Must be between %lld and %lld.",
		    what, (long long)min, (long long)max);
	return (int64_t)v;
}

uint64_t cli_size(const char *s, const char *what)
{
	(void)what;
	return (uint64_t)cli_number(s, "image size", 0, INT64_MAX);
}

int parse_output_format(const char *s)
{
	if (!s || !strcmp(s, "human"))
		return 0;
	if (!strcmp(s, "json"))
		return 1;
	die("--output must be used with human or json as argument.");
}

const struct applet *applet_find(const char *name)
{
	int lo = 0, hi = applet_count - 1;

	while (lo <= hi) {
		int mid = (lo + hi) / 2;
		int c = strcmp(name, applets[mid].name);
		if (!c)
			return &applets[mid];
		if (c < 0)
			hi = mid - 1;
		else
			lo = mid + 1;
	}
	return NULL;
}

/* qemu-img's snapshot table (info and snapshot -l). */
void print_snapshot_table(const struct snapshot_info *sn, int n)
{
	printf("%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE",
	       "VM CLOCK", "ICOUNT");
	for (int i = 0; i < n; i++)
		print_snapshot_row(&sn[i]);
}

void print_snapshot_row(const struct snapshot_info *sn)
{
	char size[32], date[64], clk[64], icount[32] = "";
	time_t t = (time_t)sn->date_sec;
	struct tm tm;
	uint64_t ms = sn->vm_clock_nsec / 1000000;

	size_to_str(size, sizeof(size), sn->vm_state_size);
	localtime_r(&t, &tm);
	strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
	snprintf(clk, sizeof(clk), "%02llu:%02llu:%02llu.%03llu",
		 (unsigned long long)(ms / 3600000),
		 (unsigned long long)(ms / 60000 % 60),
		 (unsigned long long)(ms / 1000 % 60),
		 (unsigned long long)(ms % 1000));
	if (sn->icount_valid)
		snprintf(icount, sizeof(icount), "%llu",
			 (unsigned long long)sn->icount);
	printf("%-9s %-16s %8s%20s%13s%11s\n", sn->id, sn->name, size, date,
	       clk, icount);
}

struct val *snapshot_to_val(struct val *arr, const struct snapshot_info *s)
{
	struct val *o = val_add_obj(arr, NULL);

	if (!o)
		return NULL;
	if (s->icount_valid)
		val_add_uint(o, "icount", s->icount);
	val_add_uint(o, "vm-clock-nsec", s->vm_clock_nsec % 1000000000ULL);
	val_add_str(o, "name", s->name);
	val_add_uint(o, "date-sec", s->date_sec);
	val_add_uint(o, "date-nsec", s->date_nsec);
	val_add_uint(o, "vm-clock-sec", s->vm_clock_nsec / 1000000000ULL);
	val_add_str(o, "id", s->id);
	val_add_uint(o, "vm-state-size", s->vm_state_size);
	return o;
}

static const char *opt_type_name(enum opt_type t)
{
	switch (t) {
	case OPT_SIZE: return "size";
	case OPT_BOOL: return "bool (on/off)";
	case OPT_NUMBER: return "num";
	default: return "str";
	}
}

void print_opt_help(const struct optdesc *d, bool hidden_too)
{
	const struct optdesc *list[64];
	int n = 0;

	for (; d && d->name && n < 64; d++)
		if (hidden_too || !d->hidden)
			list[n++] = d;
	for (int i = 1; i < n; i++)
		for (int j = i; j > 0 && strcmp(list[j - 1]->name,
						list[j]->name) > 0; j--) {
			const struct optdesc *t = list[j];
			list[j] = list[j - 1];
			list[j - 1] = t;
		}
	for (int i = 0; i < n; i++) {
		char head[128];
		int len = snprintf(head, sizeof(head), "  %s=<%s>",
				   list[i]->name, opt_type_name(list[i]->type));
		printf("%s%*s - %s\n", head, len < 24 ? 24 - len : 0, "",
		       list[i]->help);
	}
}

/* -o help: protocol options only when a file is named. */
void print_create_help(const char *fmt, int with_protocol)
{
	if (with_protocol)
		printf("Supported options:\n");
	else
		printf("Supported %s options:\n", fmt);
	print_opt_help(blk_format_create_opts(fmt), with_protocol);
	if (!with_protocol)
		printf("\nThe protocol level may support further options.\n"
		       "Specify the target filename to include those "
		       "options.\n");
}

int opts_want_help(const char *o)
{
	struct optlist l = { 0 };
	int r;

	if (!o)
		return 0;
	if (optlist_parse(&l, o, NULL) < 0)
		return 0;
	r = optlist_get(&l, "help") || optlist_get(&l, "?");
	optlist_free(&l);
	return r;
}

/* The Formatting line lists create options in the driver's order: given
 * values, else printed defaults. */
void print_formatting(const char *filename, const char *fmt,
		      const struct optlist *ol)
{
	printf("Formatting '%s', fmt=%s", filename, fmt);
	for (const struct optdesc *d = blk_format_create_opts(fmt);
	     d && d->name; d++) {
		const char *v = optlist_get(ol, d->name);
		uint64_t sz;

		if (!v)
			v = d->def;
		if (!v)
			continue;
		if (d->type == OPT_SIZE && parse_size(v, &sz) == 0)
			printf(" %s=%llu", d->name, (unsigned long long)sz);
		else
			printf(" %s=%s", d->name, v);
	}
	printf("\n");
	fflush(stdout);
}


/* qemu's warning whenever a probed raw image is opened for writing. */
void warn_probed_raw(const struct blk *bs)
{
	if (!(bs->flags & BLK_O_PROBED) || !(bs->flags & BLK_O_RDWR) ||
	    !blk_can(bs, BLK_CAP_FILE_MAP))
		return;
	fflush(stdout);
	fprintf(stderr, "WARNING: Image format was not specified for '%s' and "
		"probing guessed raw.\n         Automatically detecting the "
		"format is dangerous for raw images, write operations on "
		"block 0 will be restricted.\n         Specify the 'raw' format "
		"explicitly to remove the restrictions.\n", bs->filename);
}

struct blk *open_image(const char *filename, const char *fmt, unsigned flags,
		       int cache)
{
	struct blk *bs;
	struct err e = { "" };
	int ret = blk_open(&bs, filename, fmt, flags, cache, &e);

	if (ret < 0)
		die("Could not open '%s': %s", filename,
		    e.msg[0] ? e.msg : strerror(-ret));
	warn_probed_raw(bs);
	return bs;
}

int parse_cache_or_die(const char *s, int def, bool source)
{
	int mode = def;

	if (s && blk_parse_cache(s, &mode) < 0)
		die("Invalid %scache option: %s", source ? "source " : "", s);
	return mode;
}

void snapshot_arg_parse(const char *arg, struct optlist *sn)
{
	struct err e = { "" };

	if (strncmp(arg, "snapshot.", 9))
		return;
	if (optlist_parse(sn, arg, &e) < 0) {
		msg("%s", e.msg);
		die("Failed in parsing snapshot param '%s'", arg);
	}
	for (int i = 0; i < sn->n; i++)
		if (strcmp(sn->v[i].name, "snapshot.id") &&
		    strcmp(sn->v[i].name, "snapshot.name")) {
			msg("Invalid parameter '%s'", sn->v[i].name);
			die("Failed in parsing snapshot param '%s'", arg);
		}
}

void load_snapshot(struct blk *in, const char *arg)
{
	struct optlist sn = { 0 };
	struct err e = { "" };
	const char *id, *name;
	int ret;

	snapshot_arg_parse(arg, &sn);
	id = sn.n ? optlist_get(&sn, "snapshot.id") : arg;
	name = sn.n ? optlist_get(&sn, "snapshot.name") : NULL;
	if (!blk_can_load_snapshot(in))
		die("Failed to load snapshot: Block format '%s' used by device "
		    "'' does not support temporarily loading internal "
		    "snapshots", blk_format(in));
	if (!id && !name)
		die("Failed to load snapshot: snapshot_id and snapshot_name "
		    "are both NULL");
	ret = blk_snapshot_load_tmp(in, id, name, &e);
	if (!sn.n && (ret == -ENOENT || ret == -EINVAL)) {
		/* a plain argument is tried as an ID, then as a name */
		e.msg[0] = 0;
		ret = blk_snapshot_load_tmp(in, NULL, arg, &e);
	}
	if (ret < 0)
		die("Failed to load snapshot: %s",
		    e.msg[0] ? e.msg : strerror(-ret));
	optlist_free(&sn);
}
