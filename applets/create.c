/* create.c - img-create: make a new image of any creatable format. */
//config:config APPLET_CREATE
//config:	bool "img-create"
//config:	default y
//config:	help
//config:	  usage: img-create [--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]
//config:
//config:	  Create a new disk image FILENAME of SIZE bytes (suffixes k, M,
//config:	  G, T, P, E) in format FMT (default raw).
//config:
//config:	  -b FILE  backing file (the new image is an overlay of it)
//config:	  -F FMT   format of the backing file
//config:	  -u       do not open the backing file (size must be given)
//config:	  -o OPTS  format options, name=value,...; -o help lists them
//config:	  -q       quiet
//applet:APPLET(create, "img-create", "f:b:F:uo:*q", "object:*")

#define FOR_create
#include "imgbox.h"

int create_main(int argc, char **argv)
{
	const char *fmt, *filename, *bfile, *bfmt;
	struct optlist ol = { 0 };
	struct err e = { "" };
	char num[32];
	int i = opts_parse(argc, argv), ret;

	fmt = HAS(f) ? ARG(f) : "raw";
	bfile = HAS(b) ? ARG(b) : NULL;
	bfmt = HAS(F) ? ARG(F) : NULL;

	if (HAS(o) && opts_want_help(ARG(o))) {
		if (!blk_format_can(fmt, BLK_CAP_CREATE))
			die("Unknown file format '%s'", fmt);
		print_create_help(fmt, i < argc);
		return 0;
	}
	if (i >= argc)
		die_usage("Expecting image file name");
	filename = argv[i++];
	if (i < argc) {
		uint64_t sz = cli_size(argv[i++], "size");
		snprintf(num, sizeof(num), "%llu", (unsigned long long)sz);
	} else
		num[0] = 0;
	if (i < argc)
		die_usage("Unexpected argument: %s", argv[i]);

	if (!blk_format_exists(fmt))
		die("%s: Unknown file format '%s'", filename, fmt);
	if (!blk_format_can(fmt, BLK_CAP_CREATE))
		die("%s: Format driver '%s' does not support image creation",
		    filename, fmt);
	if (HAS(o) && optlist_parse(&ol, ARG(o), &e) < 0)
		die("%s", e.msg);
	if (optlist_validate(&ol, blk_format_create_opts(fmt), fmt, &e) < 0)
		die("%s: %s", filename, e.msg);
	if (num[0]) {
		if (optlist_get(&ol, "size"))
			die("%s: The image size must be specified only once",
			    filename);
		optlist_set(&ol, "size", num);
	}
	if (bfile) {
		if (!blk_format_can(fmt, BLK_CAP_BACKING))
			die("%s: Backing file not supported for file format "
			    "'%s'", filename, fmt);
		optlist_set(&ol, "backing_file", bfile);
	}
	if (bfmt)
		optlist_set(&ol, "backing_fmt", bfmt);
	bfile = optlist_get(&ol, "backing_file");
	bfmt = optlist_get(&ol, "backing_fmt");
	if (bfile && bfile[0] && !HAS(u)) {
		struct blk *bb;
		struct err be = { "" };
		char *path;
		const char *slash = strrchr(filename, '/');

		/* the backing name is relative to the new image */
		if (bfile[0] != '/' && slash) {
			path = malloc((size_t)(slash - filename) + 2 +
				      strlen(bfile));
			if (!path)
				die("out of memory");
			sprintf(path, "%.*s/%s", (int)(slash - filename),
				filename, bfile);
		} else
			path = strdup(bfile);
		ret = blk_open(&bb, path, bfmt, BLK_O_SHARE | BLK_O_NO_IO,
			       CACHE_WRITEBACK, &be);
		if (ret < 0)
			die("%s: %s\nCould not open backing image.", filename,
			    be.msg);
		if (!bfmt)
			die("%s: Backing file specified without backing "
			    "format\nDetected format of %s.", filename,
			    blk_format(bb));
		if (!optlist_get(&ol, "size")) {
			snprintf(num, sizeof(num), "%llu",
				 (unsigned long long)bb->size);
			optlist_set(&ol, "size", num);
		}
		blk_close(bb);
		free(path);
	} else if (bfile && bfile[0] && !bfmt) {
		die("%s: Backing file specified without backing format",
		    filename);
	}
	if (!optlist_get(&ol, "size"))
		die("%s: Image creation needs a size parameter", filename);
	{
		uint64_t sz;
		if (optlist_get_size(&ol, "size", &sz, &e) < 0)
			die("%s: %s", filename, e.msg);
		if (sz > INT64_MAX)
			die("%s: Image size must be less than 8 EiB!",
			    filename);
	}
	if (!HAS(q))
		print_formatting(filename, fmt, &ol);
	cleanup_new_file(filename);
	ret = blk_create(fmt, filename, &ol, &e);
	optlist_free(&ol);
	if (ret < 0 && !create_failed_writing(ret))
		cleanup_cancel();
	if (ret < 0)
		die("%s: %s", filename, e.msg[0] ? e.msg : strerror(-ret));
	cleanup_cancel();
	return 0;
}
