/* measure.c - img-measure: how large would an image of this size, or
 * converted from this image, be in a given format? */
//config:config APPLET_MEASURE
//config:	bool "img-measure"
//config:	default y
//config:	help
//config:	  usage: img-measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [--object objectdef] [--image-opts] [-f fmt] [-l snapshot_param] filename]
//config:
//config:	  Print the file size a new image of format OUTPUT_FMT (default
//config:	  raw) needs: "required size" for the data FILENAME holds (or
//config:	  for an empty image of N bytes), "fully allocated size" when
//config:	  every cluster is written, and for qcow2 the bitmaps' size.
//config:
//config:	  -O FMT        target format (default raw)
//config:	  -o OPTS       target format options (cluster_size=...)
//config:	  --size N      measure a new image of N bytes
//config:	  -f FMT        format of FILENAME (default: probe)
//config:	  -l SNAPSHOT   measure the snapshot ID or NAME of FILENAME
//config:	  --output=FMT  human (default) or json
//config:	  -U            force share (no locking)
//applet:APPLET(measure, "img-measure", "f:o:*O:l:U", "output:,size:,object:*,image-opts,force-share=U")

#define FOR_measure
#include "imgbox.h"

/* Options of the file protocol that every format accepts in -o. */
static const char *const file_opts[] = { "preallocation", "nocow",
					 "extent_size_hint", NULL };

static bool is_file_opt(const char *name)
{
	for (int i = 0; file_opts[i]; i++)
		if (!strcmp(file_opts[i], name))
			return true;
	return false;
}

/* Checks -o against the format's options (and the file protocol's) the
 * way qemu-img parses them: unknown names and malformed values fail. */
static void validate_opts(const struct optlist *ol, const char *fmt)
{
	struct optlist own = { 0 };
	struct err e = { "" };
	int ret;

	for (int i = 0; i < ol->n; i++) {
		const struct optdesc *d = blk_format_create_opts(fmt);
		while (d->name && strcmp(d->name, ol->v[i].name))
			d++;
		if (!d->name && is_file_opt(ol->v[i].name))
			continue;
		optlist_set(&own, ol->v[i].name, ol->v[i].value);
	}
	ret = optlist_validate(&own, blk_format_create_opts(fmt), fmt, &e);
	optlist_free(&own);
	if (ret < 0) {
		msg("%s", e.msg);
		die("Invalid options for file format '%s'", fmt);
	}
}

int measure_main(int argc, char **argv)
{
	int i = opts_parse(argc, argv), json, ret;
	const char *out_fmt = HAS(O) ? ARG(O) : "raw", *filename = NULL;
	struct optlist ol = { 0 };
	struct measure_info mi = { 0 };
	struct err e = { "" };
	struct blk *in = NULL;
	uint64_t size = 0;

	json = parse_output_format(HAS(output) ? ARG(output) : NULL);
	if (HAS(l)) {
		struct optlist sn = { 0 };
		snapshot_arg_parse(ARG(l), &sn);
		optlist_free(&sn);
	}
	if (HAS(size))
		size = cli_size(ARG(size), "image size");
	if (argc - i > 1)
		die("At most one filename argument is allowed.");
	if (i < argc)
		filename = argv[i];
	if (!filename && (HAS(f) || HAS(l) || HAS(image_opts)))
		die("--image-opts, -f, and -l require a filename argument.");
	if (filename && HAS(size))
		die("--size N cannot be used together with a filename.");
	if (!filename && !HAS(size))
		die("Either --size N or one filename must be specified.");
	if (HAS(image_opts))
		die("--image-opts is not supported");
	if (filename) {
		in = open_image(filename, HAS(f) ? ARG(f) : NULL,
				HAS(U) ? BLK_O_SHARE : 0, CACHE_WRITEBACK);
		if (HAS(l))
			load_snapshot(in, ARG(l));
	}
	if (!blk_format_exists(out_fmt))
		die("Unknown file format '%s'", out_fmt);
	if (!blk_format_can(out_fmt, BLK_CAP_CREATE) ||
	    !blk_format_create_opts(out_fmt))
		die("Format driver '%s' does not support image creation",
		    out_fmt);
	if (HAS(o)) {
		if (optlist_parse(&ol, ARG(o), &e) < 0) {
			msg("%s", e.msg);
			die("Invalid options for file format '%s'", out_fmt);
		}
		validate_opts(&ol, out_fmt);
	}
	/* --size wins over -o size=; with a file its size is used */
	optlist_del(&ol, "size");
	ret = blk_measure(out_fmt, &ol, in, size, &mi, &e);
	if (ret < 0)
		die("%s", e.msg[0] ? e.msg : strerror(-ret));
	if (json) {
		struct val *o = val_obj();
		if (!o)
			die("out of memory");
		if (mi.has_bitmaps)
			val_add_uint(o, "bitmaps", mi.bitmaps);
		val_add_uint(o, "required", mi.required);
		val_add_uint(o, "fully-allocated", mi.fully_allocated);
		val_print_json(stdout, o, 0);
		printf("\n");
		val_free(o);
	} else {
		printf("required size: %llu\n",
		       (unsigned long long)mi.required);
		printf("fully allocated size: %llu\n",
		       (unsigned long long)mi.fully_allocated);
		if (mi.has_bitmaps)
			printf("bitmaps size: %llu\n",
			       (unsigned long long)mi.bitmaps);
	}
	optlist_free(&ol);
	blk_close(in);
	return 0;
}
