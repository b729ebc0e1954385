/* convert.c - img-convert: copy one or more images (concatenated) into a
 * new or existing image of any writable format. The work is done by the
 * engine in block/convert.c; this file is qemu-img convert's command
 * line, checks and messages. */
//config:config APPLET_CONVERT
//config:	bool "img-convert"
//config:	default y
//config:	help
//config:	  usage: img-convert [--object objectdef] [--target-is-zero] [--salvage] [-U] [-C] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] [-B backing_file [-F backing_fmt]] [-o options] [-l snapshot_param] [-S sparse_size] [-r rate_limit] [-m num_coroutines] [-W] filename [filename2 [...]] output_filename
//config:
//config:	  Convert FILENAME (several are concatenated) to OUTPUT_FILENAME in
//config:	  format OUTPUT_FMT (default raw). Unallocated and zero areas cost
//config:	  no read and, on a fresh target, no write.
//config:
//config:	  -f FMT      source format (default: probe)
//config:	  -O FMT      output format (default raw)
//config:	  -o OPTS     output format options; -o help lists them
//config:	  -B FILE     output is an overlay of FILE; only what differs is written
//config:	  -F FMT      format of the -B file
//config:	  -c          compress (qcow2); compression runs in the workers
//config:	  -n          do not create the target (it must exist)
//config:	  -S SIZE     zero runs of SIZE bytes become holes (default 4k,
//config:	              multiple of 512, 0 = fully allocated output)
//config:	  -m N        worker threads, 1..16 (default 8)
//config:	  -W          write out of order
//config:	  -t CACHE    target cache mode (default unsafe; none = O_DIRECT)
//config:	  -T CACHE    source cache mode (default writeback)
//config:	  -C          copy_file_range where both ends allow
//config:	  -r RATE     limit to RATE bytes per second
//config:	  -l SNAP     snapshot to convert (snapshot.id=ID,snapshot.name=N)
//config:	  -s ID       snapshot to convert (old spelling of -l)
//config:	  -p          progress; SIGUSR1 prints it once without -p
//config:	  -q          quiet
//config:	  -U          force share (no locking)
//config:	  --target-is-zero  the existing target (-n) reads as zeroes
//config:	  --salvage   read around bad areas, fill them with zeroes, warn
//applet:APPLET(convert, "img-convert", "f:O:o:*cpqnt:T:l:s:m:WS:B:F:CUr:", "target-is-zero,salvage,object:*,force-share=U,image-opts,target-image-opts,bitmaps")

#define FOR_convert
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>
#include "imgbox.h"

static volatile sig_atomic_t usr1;
static struct blk **src;	/* static: still reachable when we die */
static double last_pct = -100;

static void on_usr1(int sig)
{
	(void)sig;
	usr1 = 1;
}

/* qemu's progress line: "    (12.34/100%)" redrawn with \r when it
 * moved by at least 1%. */
static void progress(void *opaque, uint64_t done, uint64_t total)
{
	double pct = total ? (double)done * 100.0 / (double)total : 100.0;

	(void)opaque;
	if (usr1) {
		usr1 = 0;
		progress_line(pct, true);
	}
	if (!progress_shown())
		return;
	if (pct - last_pct >= 1.0 || (done == total && last_pct < 100.0)) {
		last_pct = pct;
		progress_print(pct);
	}
}

static void warn(void *opaque, const char *m)
{
	(void)opaque;
	msg("warning: %s", m);
}

static int parse_workers(const char *s)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || end == s || *end || v < 1 || v > CONVERT_MAX_WORKERS)
		die("Invalid number of coroutines. Allowed number of "
		    "coroutines is between 1 and %d", CONVERT_MAX_WORKERS);
	return (int)v;
}

static uint64_t parse_sparse(const char *s)
{
	uint64_t v;

	if (parse_size(s, &v) < 0)
		die("Invalid buffer size for sparse output specified. You may "
		    "use k, M, G, T, P or E suffixes for\n%s: kilobytes, "
		    "megabytes, gigabytes, terabytes, petabytes and exabytes.",
		    progname);
	if (v % 512 || v > (16u << 20))
		die("Invalid buffer size for sparse output specified. Valid "
		    "sizes are multiples of 512 up to 16777216. Select 0 to "
		    "disable sparse detection (fully allocates output).");
	return v;
}

/* --object: only secrets are meaningful here; anything else is refused
 * the way qemu refuses an unknown type. */
static void check_objects(const char *s)
{
	struct optlist l = { 0 };
	struct err e = { "" };

	if (optlist_parse(&l, s, &e) < 0)
		die("%s", e.msg);
	for (int i = 0; i < l.n; i++) {
		const char *n = l.v[i].name, *v = l.v[i].value;
		const char *type = NULL;

		if (!strcmp(n, "qom-type"))
			type = v;
		else if (v == NULL || !strcmp(v, "on") || !v[0])
			type = n;	/* the leading implied qom-type */
		if (type && strcmp(type, "secret") &&
		    strcmp(type, "secret_keyring"))
			die("Parameter 'qom-type' does not accept value '%s'",
			    type);
		if (type)
			break;
	}
	optlist_free(&l);
}

int convert_main(int argc, char **argv)
{
	const char *out_fmt, *src_fmt, *out_name, *base, *base_fmt;
	struct convert_opts co = { 0 };
	struct optlist ol = { 0 };
	struct err e = { "" };
	struct blk *tgt;
	uint64_t total = 0, sparse = CONVERT_DEFAULT_SPARSE, rate = 0;
	int i = opts_parse(argc, argv), nsrc, src_cache, tgt_cache, ret;
	unsigned sflags;
	bool skip_create = HAS(n), created = false, is_new = false;
	char num[32];

	signal(SIGUSR1, on_usr1);	/* never the default: it kills */
	src_fmt = HAS(f) ? ARG(f) : NULL;
	out_fmt = HAS(O) ? ARG(O) : "raw";
	base = HAS(B) ? ARG(B) : NULL;
	base_fmt = HAS(F) ? ARG(F) : NULL;
	co.workers = HAS(m) ? parse_workers(ARG(m)) : CONVERT_DEFAULT_WORKERS;
	if (HAS(S))
		sparse = parse_sparse(ARG(S));
	if (HAS(r) && parse_size(ARG(r), &rate) < 0)
		die("Invalid rate limit specified. You may use k, M, G, T, P "
		    "or E suffixes for\n%s: kilobytes, megabytes, gigabytes, "
		    "terabytes, petabytes and exabytes.", progname);
	if (HAS(object))
		check_objects(ARG(object));
	if (HAS(image_opts) || HAS(target_image_opts) || HAS(bitmaps))
		die("%s is not supported by imgbox", HAS(image_opts) ?
		    "--image-opts" : HAS(bitmaps) ? "--bitmaps" :
		    "--target-image-opts");

	if (HAS(c) && HAS(C))
		die("Cannot enable copy offloading when -c is used");
	if (HAS(S) && HAS(C))
		die("Cannot enable copy offloading when -S is used");
	if (HAS(C) && HAS(salvage))
		die("Cannot use copy offloading in salvaging mode");
	if (skip_create && HAS(o))
		die("-o has no effect when skipping image creation");
	if (HAS(target_is_zero) && !skip_create)
		die("--target-is-zero requires use of -n flag");

	nsrc = argc - i - 1;
	out_name = nsrc >= 1 ? argv[argc - 1] : NULL;
	if (HAS(o) && opts_want_help(ARG(o))) {
		if (!blk_format_can(out_fmt, BLK_CAP_CREATE))
			die("Unknown file format '%s'", out_fmt);
		print_create_help(out_fmt, out_name != NULL);
		return 0;
	}
	if (nsrc < 1)
		die("Must specify image file name");

	src_cache = parse_cache_or_die(HAS(T) ? ARG(T) : NULL,
				       CACHE_WRITEBACK, true);
	tgt_cache = parse_cache_or_die(HAS(t) ? ARG(t) : NULL, CACHE_UNSAFE,
				       false);

	/* Sources are only ever opened read-only. */
	sflags = HAS(U) ? BLK_O_SHARE : BLK_O_NO_SHARE;
	src = calloc((size_t)nsrc, sizeof(*src));
	if (!src)
		die("out of memory");
	for (int k = 0; k < nsrc; k++) {
		src[k] = open_image(argv[i + k], src_fmt, sflags, src_cache);
		total += src[k]->size;
	}
	if (HAS(l) || HAS(s)) {
		if (nsrc > 1)
			die("No support for concatenating multiple snapshot");
		load_snapshot(src[0], HAS(l) ? ARG(l) : ARG(s));
	}

	if (!skip_create) {
		const char *bf;

		if (!blk_format_exists(out_fmt))
			die("Unknown file format '%s'", out_fmt);
		if (!blk_format_can(out_fmt, BLK_CAP_CREATE))
			die("Format driver '%s' does not support image "
			    "creation", out_fmt);
		if (HAS(o) && optlist_parse(&ol, ARG(o), &e) < 0)
			die("%s", e.msg);
		if (optlist_validate(&ol, blk_format_create_opts(out_fmt), out_fmt, &e) < 0)
			die("%s", e.msg);
		snprintf(num, sizeof(num), "%llu", (unsigned long long)total);
		optlist_set(&ol, "size", num);
		if (base) {
			if (!blk_format_can(out_fmt, BLK_CAP_BACKING))
				die("Backing file not supported for file "
				    "format '%s'", out_fmt);
			optlist_set(&ol, "backing_file", base);
		}
		if (base_fmt) {
			if (!blk_format_can(out_fmt, BLK_CAP_BACKING))
				die("Backing file format not supported for "
				    "file format '%s'", out_fmt);
			optlist_set(&ol, "backing_fmt", base_fmt);
		}
		if (HAS(c) && !blk_format_can(out_fmt, BLK_CAP_COMPRESS))
			die("Compression not supported for this file format");
		bf = optlist_get(&ol, "backing_file");
		if (bf && bf[0] && !optlist_get(&ol, "backing_fmt"))
			die("Use of backing file requires explicit backing "
			    "format");
		base = bf && bf[0] ? bf : NULL;

		/* From here on a failure removes the output if this run
		 * created it; one that existed is left, as qemu-img does. */
		is_new = cleanup_new_file(out_name);
		ret = blk_create(out_fmt, out_name, &ol, &e);
		if (ret < 0) {
			struct stat st;
			/* do not unlink a file create never got to make */
			if (stat(out_name, &st) < 0)
				cleanup_cancel();
			die("%s: error while converting %s: %s", out_name,
			    out_fmt, e.msg[0] ? e.msg : strerror(-ret));
		}
		created = true;
	}

	tgt = open_image(out_name, out_fmt, BLK_O_RDWR, tgt_cache);
	if (skip_create) {
		if (tgt->size < total)
			die("output file is smaller than input file");
		if (HAS(c) && !(blk_can(tgt, BLK_CAP_COMPRESS)))
			die("Compression not supported for this file format");
		/* The target's own backing file does not make this a -B
		 * conversion: what the source reads is written everywhere,
		 * zeroes included, so nothing of that backing file shows
		 * through. */
	}

	if (base && tgt->backing) {
		/* Is the new backing file one of the images of a source's
		 * chain? Then everything below it is skipped. */
		co.src_base = calloc((size_t)nsrc, sizeof(*co.src_base));
		if (!co.src_base)
			die("out of memory");
		for (int k = 0; k < nsrc; k++)
			for (struct blk *b = src[k]->backing; b; b = b->backing)
				if (blk_same_file(b, tgt->backing)) {
					co.src_base[k] = b;
					break;
				}
	}
	co.src = src;
	co.nsrc = nsrc;
	co.target = tgt;
	co.out_of_order = HAS(W);
	co.compress = HAS(c);
	if (!co.compress) {
		/* vmdk streamOptimized takes compressed clusters only */
		struct blk_info bi;
		if (blk_get_info(tgt, &bi) == 0) {
			co.compress = bi.needs_compressed_writes;
			val_free(bi.specific);
		}
	}
	co.min_sparse = sparse;
	co.target_has_backing = base != NULL;
	co.target_is_new = created;
	co.target_is_zero = HAS(target_is_zero) ||
		(created && !base && blk_format_can(out_fmt, BLK_CAP_ZERO_INIT));
	co.copy_range = HAS(C);
	co.salvage = HAS(salvage);
	co.rate_limit = rate;
	progress_start(HAS(p) && !HAS(q));
	co.progress = progress;
	co.warn = HAS(q) ? NULL : warn;

	ret = convert_run(&co, &e);
	if (ret < 0) {
		progress_end();
		blk_close(tgt);
		if (is_new)
			die("%s\n%s: removed the incomplete output '%s'",
			    e.msg, progname, out_name);
		if (created)
			die("%s", e.msg);
		die("%s\n%s: the target '%s' (-n) was left as it is",
		    e.msg, progname, out_name);
	}
	blk_close(tgt);
	cleanup_cancel();
	for (int k = 0; k < nsrc; k++)
		blk_close(src[k]);
	free(src);
	optlist_free(&ol);
	free(co.src_base);
	if (last_pct < 100.0)
		progress_print(100);
	progress_end();
	return 0;
}
