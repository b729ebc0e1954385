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
#include "blk_driver.h"

static const char *type_name(enum opt_type t)
{
	switch (t) {
	case OPT_SIZE: return "size";
	case OPT_BOOL: return "bool (on/off)";
	case OPT_NUMBER: return "num";
	default: return "str";
	}
}

static int amend_help(const struct blk_driver *drv)
{
	const struct optdesc *d, *list[64];
	int n = 0;

	if (!drv->amend || !drv->amend_opts) {
		msg("Format driver '%s' does not support option amendment",
		    drv->name);
		return 1;
	}
	for (d = drv->amend_opts; d->name && n < 64; d++)
		if (!d->hidden)
			list[n++] = d;
	for (int i = 1; i < n; i++)
		for (int j = i; j > 0 && strcmp(list[j - 1]->name,
						list[j]->name) > 0; j--) {
			const struct optdesc *t = list[j];
			list[j] = list[j - 1];
			list[j - 1] = t;
		}
	printf("Amend options for '%s':\n", drv->name);
	for (int i = 0; i < n; i++) {
		char head[128];
		int len = snprintf(head, sizeof(head), "  %s=<%s>",
				   list[i]->name, type_name(list[i]->type));
		printf("%s%*s - %s\n", head, len < 24 ? 24 - len : 0, "",
		       list[i]->help);
	}
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

static bool progress;

static void progress_print(const char *pct)
{
	if (!progress)
		return;
	printf("    (%s/100%%)\r", pct);
	fflush(stdout);
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
	progress = HAS(p) && !HAS(q);
	fmt = HAS(f) ? ARG(f) : NULL;
	if (fmt && opts_want_help(ARG(o))) {
		const struct blk_driver *drv = blk_find_driver(fmt);
		if (!drv)
			die("Unknown file format '%s'", fmt);
		return amend_help(drv);
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
		ret = amend_help(bs->drv);
		goto out;
	}
	if (!bs->drv->amend || !(bs->drv->caps & BLK_CAP_AMEND)) {
		msg("Format driver '%s' does not support option amendment",
		    bs->drv->name);
		goto out;
	}
	if (optlist_parse(&ol, ARG(o), &e) < 0) {
		msg("%s", e.msg);
		goto out;
	}
	for (int k = 0; k < ol.n; k++) {
		const char *name = ol.v[k].name;
		const struct optdesc *d;

		if (find_opt(bs->drv->amend_opts, name))
			continue;
		d = find_opt(bs->drv->create_opts, name);
		if (d && !d->hidden)
			msg("Invalid parameter '%s'\nThis option is only "
			    "supported for image creation", name);
		else
			msg("Invalid parameter '%s'", name);
		goto out;
	}
	if (optlist_validate(&ol, bs->drv->amend_opts, bs->drv->name,
			     &e) < 0) {
		msg("%s", e.msg);
		goto out;
	}
	progress_print("0.00");
	ret = bs->drv->amend(bs, &ol, HAS(force), &e);
	progress_print("100.00");
	if (progress)
		printf("\n");
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
