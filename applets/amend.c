/* amend.c - img-amend: change format options of an existing image. */
//config:config APPLET_AMEND
//config:	bool "img-amend"
//config:	default y
//config:	help
//config:	  usage: img-amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename
//config:
//config:	  Change the format options of FILENAME in place: for qcow2
//config:	  compat (0.10 or 1.1), lazy_refcounts, refcount_bits, size.
//config:	  '-o help' lists what the format can change.
//config:
//config:	  -o OPTS   options to change (repeatable, comma separated)
//config:	  -f FMT    image format (default: probe)
//config:	  -t CACHE  cache mode (default writeback)
//config:	  --force   allow changes that are considered unsafe
//config:	  -p        show progress
//config:	  -q        quiet
//applet:APPLET(amend, "img-amend", "o:*f:t:pq", "object:*,image-opts,force")

#define FOR_amend
#include "imgbox.h"

static int amend_help(const char *fmt)
{
	if (!blk_format_amend_opts(fmt)) {
		msg("Format driver '%s' does not support option amendment",
		    fmt);
		return 1;
	}
	printf("Amend options for '%s':\n", fmt);
	print_opt_help(blk_format_amend_opts(fmt), false);
	return 0;
}

static const struct optdesc *find_opt(const struct optdesc *d,
				      const char *name)
{
	for (; d && d->name; d++)
		if (!strcmp(d->name, name))
			return d;
	return NULL;
}

int amend_main(int argc, char **argv)
{
	const char *fmt, *filename;
	struct optlist ol = { 0 };
	struct err e = { "" };
	struct blk *bs;
	int i, cache, ret;

	if (argc == 2 && (!strcmp(argv[1], "--help") ||
			  !strcmp(argv[1], "-h"))) {
		print_usage(cur_applet, stdout);
		return 0;
	}
	i = opts_parse(argc, argv);
	if (!HAS(o))
		die_usage("Must specify options (-o)");
	progress_start(HAS(p) && !HAS(q));
	fmt = HAS(f) ? ARG(f) : NULL;
	if (fmt && opts_want_help(ARG(o))) {
		if (!blk_format_exists(fmt))
			die("Unknown file format '%s'", fmt);
		return amend_help(fmt);
	}
	if (i != argc - 1)
		die("Expecting one image file name");
	filename = argv[i];
	if (HAS(image_opts))
		die("--image-opts is not supported");
	cache = parse_cache_or_die(HAS(t) ? ARG(t) : NULL, CACHE_WRITEBACK,
				   false);
	bs = open_image(filename, fmt, BLK_O_RDWR | BLK_O_NO_BACKING, cache);
	ret = 1;
	if (opts_want_help(ARG(o))) {
		ret = amend_help(blk_format(bs));
		goto out;
	}
	if (!blk_format_amend_opts(blk_format(bs))) {
		msg("Format driver '%s' does not support option amendment",
		    blk_format(bs));
		goto out;
	}
	if (optlist_parse(&ol, ARG(o), &e) < 0) {
		msg("%s", e.msg);
		goto out;
	}
	for (int k = 0; k < ol.n; k++) {
		const char *name = ol.v[k].name;
		const struct optdesc *d;

		if (find_opt(blk_format_amend_opts(blk_format(bs)), name))
			continue;
		d = find_opt(blk_format_create_opts(blk_format(bs)), name);
		if (d && !d->hidden)
			msg("Invalid parameter '%s'\nThis option is only "
			    "supported for image creation", name);
		else
			msg("Invalid parameter '%s'", name);
		goto out;
	}
	/* validated before the progress line starts (blk_amend checks
	 * again) */
	if (optlist_validate(&ol, blk_format_amend_opts(blk_format(bs)),
			     blk_format(bs), &e) < 0) {
		msg("%s", e.msg);
		goto out;
	}
	progress_print(0);
	ret = blk_amend(bs, &ol, HAS(force), &e);
	progress_print(100);
	progress_end();
	if (ret < 0) {
		msg("%s", e.msg[0] ? e.msg : strerror(-ret));
		ret = 1;
	} else {
		ret = blk_flush(bs);
		if (ret < 0)
			msg("Error while amending options: %s",
			    strerror(-ret));
		ret = ret < 0;
	}
out:
	optlist_free(&ol);
	blk_close(bs);
	return ret;
}
