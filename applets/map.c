/* map.c - img-map: show where the virtual disk's data lives. */
//config:config APPLET_MAP
//config:	bool "img-map"
//config:	default y
//config:	help
//config:	  usage: img-map [--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename
//config:
//config:	  Print the allocation map of FILENAME through its backing chain:
//config:	  which ranges hold data, read as zeroes or come from a backing
//config:	  image, and where they are stored.
//config:
//config:	  -f FMT              image format (default: probe)
//config:	  -s, --start-offset  first byte to map (default 0)
//config:	  -l, --max-length    bytes to map (default: to the end)
//config:	  --output=FMT        human (default: data ranges only) or json
//config:	  -U                  force share (no locking)
//applet:APPLET(map, "img-map", "f:s:l:U", "output:,start-offset:=s,max-length:=l,format:=f,force-share=U,image-opts,object:*")

#define FOR_map
#include <inttypes.h>
#include "imgbox.h"

/* One run of the map, as qemu-img reports it. */
struct map_entry {
	uint64_t start, length, offset;
	int depth;
	bool present, zero, data, has_offset;
	const char *file;	/* the file holding the run, if offset */
};


/* Status of the run at off, walking down the chain while a layer leaves
 * the range unallocated. Like qemu-img, a range that is unallocated in a
 * layer without a backing image, or past the end of the backing image,
 * reads as zero at that layer's depth and is not "present" (but keeps an
 * offset if the layer gave one). */
static int get_status(struct blk *bs, uint64_t off, uint64_t len,
		      struct map_entry *e)
{
	struct blk *cur = bs;
	struct bfile *mfile;
	uint64_t n, map;
	int depth = 0, ret;

	for (;;) {
		ret = blk_block_status(cur, off, len, &n, &map, &mfile);
		if (ret < 0)
			return ret;
		len = n;
		if (ret & BLK_STAT_ALLOCATED)
			break;
		if (!cur->backing || off >= cur->backing->size) {
			/* keeps the host offset of an allocated cluster
			 * whose subcluster is not (extended L2) */
			ret = (ret & BLK_STAT_OFFSET) | BLK_STAT_ZERO;
			break;
		}
		cur = cur->backing;
		depth++;
	}
	memset(e, 0, sizeof(*e));
	e->start = off;
	e->length = len;
	e->depth = depth;
	e->present = ret & BLK_STAT_ALLOCATED;
	e->zero = ret & BLK_STAT_ZERO;
	e->data = ret & BLK_STAT_DATA;
	e->has_offset = ret & BLK_STAT_OFFSET;
	if (e->has_offset) {
		e->offset = map;
		e->file = mfile ? mfile->name : NULL;
	}
	return 0;
}

static bool mergeable(const struct map_entry *a, const struct map_entry *b)
{
	if (!a->length)
		return false;
	if (a->zero != b->zero || a->data != b->data ||
	    a->depth != b->depth || a->present != b->present ||
	    !a->file != !b->file || a->has_offset != b->has_offset)
		return false;
	if (a->file && strcmp(a->file, b->file))
		return false;
	if (a->has_offset && a->offset + a->length != b->offset)
		return false;
	return true;
}

/* Prints e; next (the entry that follows, NULL at the end) may be
 * changed. Returns -1 when the human format cannot describe e. */
static int dump(int json, const struct map_entry *e, struct map_entry *next)
{
	if (json) {
		printf("{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", "
		       "\"depth\": %d, \"present\": %s, \"zero\": %s, "
		       "\"data\": %s", e->start, e->length, e->depth,
		       e->present ? "true" : "false",
		       e->zero ? "true" : "false",
		       e->data ? "true" : "false");
		if (e->has_offset)
			printf(", \"offset\": %" PRIu64, e->offset);
		printf(next ? "},\n" : "}");
		return 0;
	}
	if (e->data && !e->has_offset) {
		msg("File contains external, encrypted or compressed "
		    "clusters.");
		return -1;
	}
	if (e->data && !e->zero)
		printf("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n",
		       e->start, e->length, e->has_offset ? e->offset : 0,
		       e->file ? e->file : "");
	/* The table only shows data, so anything else may merge with
	 * whatever else is not data. */
	if (next && (!next->data || next->zero)) {
		next->data = false;
		next->zero = true;
	}
	return 0;
}

int map_main(int argc, char **argv)
{
	int i = opts_parse(argc, argv), json, ret = 0;
	const char *fmt = HAS(f) ? ARG(f) : NULL;
	int64_t start = 0, maxlen = -1;
	uint64_t end;
	struct map_entry curr, next;
	struct err e = { "" };
	struct blk *bs;

	if (HAS(s))
		start = cli_number(ARG(s), "start offset", 0, INT64_MAX);
	if (HAS(l))
		maxlen = cli_number(ARG(l), "max length", 0, INT64_MAX);
	if (argc - i != 1)
		die_usage("Expecting one image file name");
	json = parse_output_format(HAS(output) ? ARG(output) : NULL);
	if (HAS(image_opts))
		die("--image-opts is not supported");
	ret = blk_open(&bs, argv[i], fmt, HAS(U) ? BLK_O_SHARE : 0,
		       CACHE_WRITEBACK, &e);
	if (ret < 0)
		die("Could not open '%s': %s", argv[i], e.msg);

	if (json)
		putchar('[');
	else
		printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to",
		       "File");
	end = bs->size;
	if (maxlen >= 0 && (uint64_t)start + (uint64_t)maxlen < end)
		end = (uint64_t)start + (uint64_t)maxlen;

	memset(&curr, 0, sizeof(curr));
	curr.start = (uint64_t)start;
	ret = 0;
	while (curr.start + curr.length < end) {
		uint64_t off = curr.start + curr.length;

		ret = get_status(bs, off, end - off, &next);
		if (ret < 0) {
			msg("Could not read file metadata: %s",
			    strerror(-ret));
			goto out;
		}
		if (mergeable(&curr, &next)) {
			curr.length += next.length;
			continue;
		}
		if (curr.length && (ret = dump(json, &curr, &next)) < 0)
			goto out;
		curr = next;
	}
	ret = dump(json, &curr, NULL);
	if (json && ret == 0)
		puts("]");
out:
	blk_close(bs);
	return ret < 0;
}
