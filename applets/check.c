/* check.c - img-check: consistency check (and repair) of an image. */
//config:config APPLET_CHECK
//config:	bool "img-check"
//config:	default y
//config:	help
//config:	  usage: img-check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename
//config:
//config:	  Check the metadata of FILENAME for consistency and, with -r,
//config:	  repair what can be repaired.
//config:
//config:	  -f FMT          image format (default: probe)
//config:	  --output=FMT    human (default) or json
//config:	  -r leaks        free clusters nothing refers to
//config:	  -r all          also fix refcounts and bad references
//config:	  -T CACHE        cache mode (default writeback)
//config:	  -q              quiet
//config:	  -U              force share (no locking)
//config:
//config:	  Exit status: 0 no errors (or all repaired), 1 the check
//config:	  could not complete, 2 corruptions, 3 leaked clusters only,
//config:	  63 the format has no check.
//applet:APPLET(check, "img-check", "f:r:T:qU", "output:,repair:=r,format:=f,cache:=T,force-share=U,image-opts,object:*")

#define FOR_check
#include <inttypes.h>
#include <stddef.h>
#include "imgbox.h"

/* The ImageCheck object qemu-img prints: counters that are zero are left
 * out, except check-errors. */
#define COUNT(key, field) { key, offsetof(struct check_result, field), \
	sizeof(((struct check_result *)0)->field) == 8 }
static const struct {
	const char *key;
	size_t off;
	bool wide;		/* uint64_t, else int */
} counts[] = {
	COUNT("image-end-offset", image_end_offset),
	COUNT("corruptions", corruptions), COUNT("leaks", leaks),
	COUNT("corruptions-fixed", corruptions_fixed),
	COUNT("leaks-fixed", leaks_fixed),
	COUNT("total-clusters", total_clusters),
	COUNT("allocated-clusters", allocated_clusters),
	COUNT("fragmented-clusters", fragmented_clusters),
	COUNT("compressed-clusters", compressed_clusters),
};

static struct val *check_val(const struct check_result *r,
			     const char *filename, const char *fmt)
{
	struct val *o = val_obj();

	if (!o)
		die("out of memory");
	val_add_str(o, "filename", filename);
	val_add_str(o, "format", fmt);
	val_add_int(o, "check-errors", r->check_errors);
	/* the others only when not zero, in qemu-img's order */
	for (size_t i = 0; i < ARRAY_SIZE(counts); i++) {
		const char *p = (const char *)r + counts[i].off;
		int64_t v = counts[i].wide ? (int64_t)*(const uint64_t *)p
					   : *(const int *)p;

		if (!v)
			continue;
		if (counts[i].wide)
			val_add_uint(o, counts[i].key, (uint64_t)v);
		else
			val_add_int(o, counts[i].key, v);
	}
	return o;
}

static void print_human(const struct check_result *r)
{
	if (!r->corruptions && !r->leaks && !r->check_errors) {
		printf("No errors were found on the image.\n");
	} else {
		if (r->corruptions)
			printf("\n%d errors were found on the image.\n"
			       "Data may be corrupted, or further writes to "
			       "the image may corrupt it.\n", r->corruptions);
		if (r->leaks)
			printf("\n%d leaked clusters were found on the image.\n"
			       "This means waste of disk space, but no harm "
			       "to data.\n", r->leaks);
		if (r->check_errors)
			printf("\n%d internal errors have occurred during the "
			       "check.\n", r->check_errors);
	}
	if (r->total_clusters && r->allocated_clusters)
		printf("%" PRIu64 "/%" PRIu64 " = %0.2f%% allocated, %0.2f%% "
		       "fragmented, %0.2f%% compressed clusters\n",
		       r->allocated_clusters, r->total_clusters,
		       r->allocated_clusters * 100.0 / r->total_clusters,
		       r->fragmented_clusters * 100.0 / r->allocated_clusters,
		       r->compressed_clusters * 100.0 / r->allocated_clusters);
	if (r->image_end_offset)
		printf("Image end offset: %" PRIu64 "\n", r->image_end_offset);
}

/* One run of the driver's check; -ENOTSUP when the format has none. */
static int run_check(struct blk *bs, struct check_result *r, int fix)
{
	memset(r, 0, sizeof(*r));
	r->report = check_print_line;
	bs->errmsg[0] = 0;
	return blk_check(bs, r, fix);
}

int check_main(int argc, char **argv)
{
	int i = opts_parse(argc, argv), json, fix = 0, cache, ret;
	const char *fmt = HAS(f) ? ARG(f) : NULL, *filename;
	struct check_result r;
	struct blk *bs;
	bool quiet = HAS(q);

	if (HAS(r)) {
		if (!strcmp(ARG(r), "leaks"))
			fix = CHECK_FIX_LEAKS;
		else if (!strcmp(ARG(r), "all"))
			fix = CHECK_FIX_LEAKS | CHECK_FIX_ERRORS;
		else
			die_usage("Unknown option value for -r (expecting "
				  "'leaks' or 'all'): %s", ARG(r));
	}
	if (argc - i != 1)
		die_usage("Expecting one image file name");
	filename = argv[i];
	json = parse_output_format(HAS(output) ? ARG(output) : NULL);
	cache = parse_cache_or_die(HAS(T) ? ARG(T) : NULL, CACHE_WRITEBACK,
				   true);
	if (HAS(image_opts))
		die("--image-opts is not supported");

	/* A plain check never opens the image for writing. */
	bs = open_image(filename, fmt, BLK_O_CHECK |
			(fix ? BLK_O_RDWR : 0) | (HAS(U) ? BLK_O_SHARE : 0),
			cache);
	ret = run_check(bs, &r, fix);
	if (ret == -ENOTSUP) {
		blk_close(bs);
		msg("This image format does not support checks");
		die_exit(63);
	}
	if (!ret && (r.corruptions_fixed || r.leaks_fixed)) {
		int cfixed = r.corruptions_fixed, lfixed = r.leaks_fixed;

		if (!json && !quiet)
			printf("The following inconsistencies were found and "
			       "repaired:\n\n    %d leaked clusters\n    %d "
			       "corruptions\n\nDouble checking the fixed "
			       "image now...\n", lfixed, cfixed);
		ret = run_check(bs, &r, 0);
		r.corruptions_fixed = cfixed;
		r.leaks_fixed = lfixed;
	}
	if (!ret && !quiet) {
		if (json) {
			struct val *o = check_val(&r, filename, blk_format(bs));
			val_print_json(stdout, o, 0);
			printf("\n");
			val_free(o);
		} else {
			print_human(&r);
		}
	}
	if (ret < 0 && bs->errmsg[0])
		msg("%s", bs->errmsg);
	blk_close(bs);
	if (ret < 0)
		die("Check failed: %s", strerror(-ret));
	if (r.check_errors)
		die("Check failed");
	if (r.corruptions)
		return 2;
	return r.leaks ? 3 : 0;
}
