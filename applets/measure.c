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
#include "blk_driver.h"

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
static void validate_opts(const struct optlist *ol,
			  const struct blk_driver *drv)
{
	struct optlist own = { 0 };
	struct err e = { "" };
	int ret;

	for (int i = 0; i < ol->n; i++) {
		const struct optdesc *d = drv->create_opts;
		while (d->name && strcmp(d->name, ol->v[i].name))
			d++;
		if (!d->name && is_file_opt(ol->v[i].name))
			continue;
		optlist_set(&own, ol->v[i].name, ol->v[i].value);
	}
	ret = optlist_validate(&own, drv->create_opts, drv->name, &e);
	optlist_free(&own);
	if (ret < 0) {
		msg("%s", e.msg);
		die("Invalid options for file format '%s'", drv->name);
	}
}

/* -l: "snapshot.id=ID,snapshot.name=NAME" or an ID or NAME. */
static void parse_snapshot_arg(const char *arg, struct optlist *sn)
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

static void load_snapshot(struct blk *in, const char *arg)
{
	struct optlist sn = { 0 };
	struct err e = { "" };
	const char *id, *name;
	int ret;

	parse_snapshot_arg(arg, &sn);
	id = sn.n ? optlist_get(&sn, "snapshot.id") : arg;
	name = sn.n ? optlist_get(&sn, "snapshot.name") : NULL;
	if (!in->drv->snapshot_load_tmp)
		die("Failed to load snapshot: Block format '%s' used by device "
		    "'' does not support temporarily loading internal "
		    "snapshots", in->drv->name);
	if (!id && !name)
		die("Failed to load snapshot: snapshot_id and snapshot_name "
		    "are both NULL");
	ret = in->drv->snapshot_load_tmp(in, id, name, &e);
	if (!sn.n && (ret == -ENOENT || ret == -EINVAL)) {
		/* a plain argument is tried as an ID, then as a name */
		e.msg[0] = 0;
		ret = in->drv->snapshot_load_tmp(in, NULL, arg, &e);
	}
	if (ret < 0)
		die("Failed to load snapshot: %s",
		    e.msg[0] ? e.msg : strerror(-ret));
	optlist_free(&sn);
}

int measure_main(int argc, char **argv)
{
	int i = opts_parse(argc, argv), json, ret;
	const char *out_fmt = HAS(O) ? ARG(O) : "raw", *filename = NULL;
	const struct blk_driver *drv;
	struct optlist ol = { 0 };
	struct measure_info mi = { 0 };
	struct err e = { "" };
	struct blk *in = NULL;
	uint64_t size = 0;

	json = parse_output_format(HAS(output) ? ARG(output) : NULL);
	if (HAS(l)) {
		struct optlist sn = { 0 };
		parse_snapshot_arg(ARG(l), &sn);
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
	drv = blk_find_driver(out_fmt);
	if (!drv)
		die("Unknown file format '%s'", out_fmt);
	if (!(drv->caps & BLK_CAP_CREATE) || !drv->create_opts)
		die("Format driver '%s' does not support image creation",
		    drv->name);
	if (HAS(o)) {
		if (optlist_parse(&ol, ARG(o), &e) < 0) {
			msg("%s", e.msg);
			die("Invalid options for file format '%s'", out_fmt);
		}
		validate_opts(&ol, drv);
	}
	/* --size wins over -o size=; with a file its size is used */
	optlist_del(&ol, "size");
	if (!(drv->caps & BLK_CAP_MEASURE) || !drv->measure)
		die("Block driver '%s' does not support size measurement",
		    drv->name);
	ret = drv->measure(&ol, in, size, &mi, &e);
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
