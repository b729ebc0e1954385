/* info.c - img-info: describe an image (and its backing chain). */
//config:config APPLET_INFO
//config:	bool "img-info"
//config:	default y
//config:	help
//config:	  usage: img-info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename
//config:
//config:	  Print the format, virtual and allocated size, backing file,
//config:	  snapshots and format-specific details of FILENAME.
//config:
//config:	  -f FMT            image format (default: probe)
//config:	  --output=FMT      human (default) or json
//config:	  --backing-chain   describe every image of the backing chain
//config:	  -U                force share (no locking)
//applet:APPLET(info, "img-info", "f:U", "output:,backing-chain,force-share=U,image-opts,object:*")

#define FOR_info
#include "imgbox.h"

/* One ImageInfo object, as qemu-img builds it. */
static struct val *image_info(struct blk *bs)
{
	struct val *o = val_obj();
	struct blk_info bi;
	int64_t alloc = blk_allocated_size(bs);
	char *full;

	if (!o)
		die("out of memory");
	val_add_uint(o, "virtual-size", bs->size);
	val_add_str(o, "filename", bs->filename);
	val_add_str(o, "format", blk_format(bs));
	if (alloc >= 0)
		val_add_int(o, "actual-size", alloc);
	if (blk_get_info(bs, &bi) < 0)
		memset(&bi, 0, sizeof(bi));
	if (bi.cluster_size)
		val_add_uint(o, "cluster-size", bi.cluster_size);
	if (bi.encrypted)
		val_add_bool(o, "encrypted", true);
	val_add_bool(o, "dirty-flag", bi.dirty);
	if (bs->backing_file && bs->backing_file[0]) {
		val_add_str(o, "backing-filename", bs->backing_file);
		full = blk_backing_path(bs);
		if (full)
			val_add_str(o, "full-backing-filename", full);
		free(full);
		if (bs->backing_fmt && bs->backing_fmt[0])
			val_add_str(o, "backing-filename-format",
				    bs->backing_fmt);
	}
	{
		struct snapshot_info *sn = NULL;
		int n = 0;
		if (blk_snapshot_list(bs, &sn, &n) == 0 && n > 0) {
			struct val *arr = val_add_arr(o, "snapshots");
			for (int i = 0; i < n; i++)
				snapshot_to_val(arr, &sn[i]);
		}
		free(sn);
	}
	if (bi.specific) {
		/* attach the driver's object as format-specific */
		bi.specific->key = strdup("format-specific");
		if (o->last)
			o->last->next = bi.specific;
		else
			o->first = bi.specific;
		o->last = bi.specific;
	}
	return o;
}

static void print_human(const struct val *o)
{
	const struct val *v;
	char buf[64];

	printf("image: %s\n", val_get(o, "filename")->s);
	printf("file format: %s\n", val_get(o, "format")->s);
	size_to_str(buf, sizeof(buf), val_get(o, "virtual-size")->u);
	printf("virtual size: %s (%llu bytes)\n", buf,
	       (unsigned long long)val_get(o, "virtual-size")->u);
	if ((v = val_get(o, "actual-size"))) {
		size_to_str(buf, sizeof(buf), (uint64_t)v->i);
		printf("disk size: %s\n", buf);
	}
	if ((v = val_get(o, "encrypted")) && v->b)
		printf("encrypted: yes\n");
	if ((v = val_get(o, "cluster-size")))
		printf("cluster_size: %llu\n", (unsigned long long)v->u);
	if ((v = val_get(o, "dirty-flag")) && v->b)
		printf("cleanly shut down: no\n");
	if ((v = val_get(o, "backing-filename"))) {
		const struct val *full = val_get(o, "full-backing-filename");
		printf("backing file: %s", v->s);
		if (!full)
			printf(" (cannot determine actual path)");
		else if (strcmp(v->s, full->s))
			printf(" (actual path: %s)", full->s);
		printf("\n");
	}
	if ((v = val_get(o, "backing-filename-format")))
		printf("backing file format: %s\n", v->s);
	if ((v = val_get(o, "snapshots"))) {
		struct snapshot_info sn[1];
		printf("Snapshot list:\n");
		print_snapshot_table(NULL, 0);
		for (const struct val *s = v->first; s; s = s->next) {
			const struct val *ic = val_get(s, "icount");
			memset(sn, 0, sizeof(sn));
			snprintf(sn->id, sizeof(sn->id), "%s",
				 val_get(s, "id")->s);
			snprintf(sn->name, sizeof(sn->name), "%s",
				 val_get(s, "name")->s);
			sn->vm_state_size = val_get(s, "vm-state-size")->u;
			sn->date_sec = (uint32_t)val_get(s, "date-sec")->u;
			sn->vm_clock_nsec =
				val_get(s, "vm-clock-sec")->u * 1000000000ULL +
				val_get(s, "vm-clock-nsec")->u;
			sn->icount_valid = ic != NULL;
			sn->icount = ic ? ic->u : 0;
			print_snapshot_row(sn);
		}
	}
	if ((v = val_get(o, "format-specific"))) {
		const struct val *data = val_get(v, "data");
		printf("Format specific information:\n");
		if (data)
			val_print_human(stdout, data, 1);
	}
}

int info_main(int argc, char **argv)
{
	int i = opts_parse(argc, argv), json, ret, first = 1;
	const char *fmt = HAS(f) ? ARG(f) : NULL;
	char *fmt_owned = NULL;
	char *filename, *names[BLK_MAX_CHAIN];
	int nnames = 0;
	struct val *list = NULL;

	json = parse_output_format(HAS(output) ? ARG(output) : NULL);
	if (HAS(image_opts))
		die("--image-opts is not supported");
	if (i >= argc)
		die_usage("Expecting one image file name");
	if (argc - i > 1)
		die_usage("Expecting one image file name");
	filename = strdup(argv[i]);
	if (HAS(backing_chain) && json)
		list = val_arr();

	while (filename) {
		struct blk *bs;
		struct err e = { "" };
		struct val *o;
		char *next = NULL;

		for (int k = 0; k < nnames; k++)
			if (!strcmp(names[k], filename))
				die("Backing file '%s' creates an infinite "
				    "loop.", filename);
		if (nnames >= BLK_MAX_CHAIN)
			die("Backing chain of '%s' is too deep", argv[i]);
		names[nnames++] = filename;
		ret = blk_open(&bs, filename, fmt,
			       BLK_O_NO_BACKING | BLK_O_NO_IO |
			       (HAS(U) ? BLK_O_SHARE : 0),
			       CACHE_WRITEBACK, &e);
		if (ret < 0)
			die("Could not open '%s': %s", filename, e.msg);
		o = image_info(bs);
		if (HAS(backing_chain)) {
			if (blk_backing_allowed(bs, &e) < 0)
				die("Could not open '%s': %s", filename,
				    e.msg);
			next = blk_backing_path(bs);
			free(fmt_owned);
			fmt = fmt_owned = bs->backing_fmt &&
					  bs->backing_fmt[0] ?
					  strdup(bs->backing_fmt) : NULL;
		}
		blk_close(bs);
		if (json && list) {
			o->key = NULL;
			if (list->last)
				list->last->next = o;
			else
				list->first = o;
			list->last = o;
		} else if (json) {
			val_print_json(stdout, o, 0);
			printf("\n");
			val_free(o);
		} else {
			if (!first)
				printf("\n");
			print_human(o);
			val_free(o);
		}
		first = 0;
		filename = next;
	}
	if (list) {
		val_print_json(stdout, list, 0);
		printf("\n");
		val_free(list);
	}
	for (int k = 0; k < nnames; k++)
		free(names[k]);
	free(fmt_owned);
	return 0;
}
