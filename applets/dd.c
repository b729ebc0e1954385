/* dd.c - img-dd: copy part of an image into a new image, dd style. */
//config:config APPLET_DD
//config:	bool "img-dd"
//config:	default y
//config:	help
//config:	  usage: img-dd [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output
//config:
//config:	  Create OUTPUT in format OUTPUT_FMT (default raw) and copy INPUT
//config:	  into it, starting SKIP blocks in and stopping after COUNT blocks
//config:	  of the input (skipped blocks included), BLOCK_SIZE bytes each
//config:	  (default 512, suffixes k, M, G, T, P, E).
//config:
//config:	  -f FMT   input format (default: probe)
//config:	  -O FMT   output format (default raw)
//config:	  -U       force share (no locking)
//applet:APPLET(dd, "img-dd", "f:O:U", "object:*,image-opts,force-share=U")

#define FOR_dd
#include <inttypes.h>
#include <limits.h>
#include "imgbox.h"

#define DD_CHUNK	(1u << 20)	/* bytes copied per read */
#define DD_ZERO_GRAIN	4096u		/* zero runs this big stay holes */


/* Writes buf to out at off; on a target that reads as zeroes, aligned
 * all-zero grains are left unwritten so that the output stays sparse. */
static int write_chunk(struct blk *out, uint64_t off, const uint8_t *buf,
		       size_t len, bool zero_init)
{
	size_t pos = 0;

	if (!zero_init)
		return blk_pwrite(out, off, buf, len);
	while (pos < len) {
		size_t start, n;
		int ret;

		/* skip zero grains, then collect the run of data grains */
		for (;;) {
			n = DD_ZERO_GRAIN - (size_t)((off + pos) %
						     DD_ZERO_GRAIN);
			n = MIN(n, len - pos);
			if (!buffer_is_zero(buf + pos, n))
				break;
			pos += n;
			if (pos >= len)
				return 0;
		}
		start = pos;
		while (pos < len) {
			n = DD_ZERO_GRAIN - (size_t)((off + pos) %
						     DD_ZERO_GRAIN);
			n = MIN(n, len - pos);
			if (pos > start && buffer_is_zero(buf + pos, n))
				break;
			pos += n;
		}
		ret = blk_pwrite(out, off + start, buf + start, pos - start);
		if (ret < 0)
			return ret;
	}
	return 0;
}

int dd_main(int argc, char **argv)
{
	int i = opts_parse(argc, argv), ret;
	const char *fmt = HAS(f) ? ARG(f) : NULL;
	const char *out_fmt = HAS(O) ? ARG(O) : "raw";
	const char *in_name = NULL, *out_name = NULL;
	int64_t bs = 512, count = 0, skip = 0, size, in_pos, out_pos;
	bool has_count = false, has_skip = false, skip_too_far;
	struct blk *in, *out;
	struct optlist ol = { 0 };
	struct err e = { "" };
	uint8_t *buf;
	char num[32];

	/* Operands are name=value, evaluated left to right; the last one of
	 * each name wins. */
	for (; i < argc; i++) {
		char *arg = argv[i], *eq = strchr(arg, '=');
		const char *val = eq ? eq + 1 : NULL;
		size_t nlen = eq ? (size_t)(eq - arg) : 0;

		if (!eq)
			die("unrecognized operand %s", arg);
		if (nlen == 2 && !strncmp(arg, "bs", 2))
			bs = cli_number(val, "bs", 1, INT_MAX);
		else if (nlen == 5 && !strncmp(arg, "count", 5)) {
			count = cli_number(val, "count", 0, INT64_MAX);
			has_count = true;
		} else if (nlen == 2 && !strncmp(arg, "if", 2))
			in_name = val;
		else if (nlen == 2 && !strncmp(arg, "of", 2))
			out_name = val;
		else if (nlen == 4 && !strncmp(arg, "skip", 4)) {
			skip = cli_number(val, "skip", 0, INT64_MAX);
			has_skip = true;
		} else
			die("unrecognized operand %.*s", (int)nlen, arg);
	}
	if (!in_name || !out_name)
		die("Must specify both input and output files");
	if (HAS(image_opts))
		die("--image-opts is not supported");
	if (!in_name[0])
		die("Could not open '': The 'file' block driver requires a "
		    "file name");
	in = open_image(in_name, fmt, HAS(U) ? BLK_O_SHARE : 0,
			CACHE_WRITEBACK);

	if (!blk_format_exists(out_fmt))
		die("Unknown file format");
	if (!blk_format_can(out_fmt, BLK_CAP_CREATE))
		die("Format driver '%s' does not support image creation",
		    out_fmt);

	/* count counts input blocks from the start of the input, skipped
	 * ones included (qemu-img 7.2). */
	size = (int64_t)in->size;
	if (has_count && count <= INT64_MAX / bs && count * bs < size)
		size = count * bs;
	skip_too_far = has_skip && (skip > INT64_MAX / bs || size < skip * bs);

	/* The new image is as big as what is copied, rounded up to whole
	 * sectors as qemu's drivers do. */
	snprintf(num, sizeof(num), "%" PRIu64,
		 ALIGN_UP((uint64_t)(skip_too_far ? 0 : size - skip * bs),
			  512));
	optlist_set(&ol, "size", num);
	cleanup_new_file(out_name);
	ret = blk_create(out_fmt, out_name, &ol, &e);
	optlist_free(&ol);
	if (ret < 0 && !create_failed_writing(ret))
		cleanup_cancel();
	if (ret < 0)
		die("%s: error while creating output image: %s", out_name,
		    e.msg[0] ? e.msg : strerror(-ret));
	ret = blk_open(&out, out_name, out_fmt, BLK_O_RDWR, CACHE_WRITEBACK,
		       &e);
	if (ret < 0)
		die("Could not open '%s': %s", out_name, e.msg);

	if (skip_too_far) {
		msg("%s: cannot skip to specified offset", in_name);
		in_pos = size;
	} else
		in_pos = skip * bs;

	buf = blk_alloc_buf(DD_CHUNK);
	if (!buf)
		die("out of memory");
	ret = 0;
	for (out_pos = 0; in_pos < size;) {
		size_t n = (size_t)MIN((int64_t)DD_CHUNK, size - in_pos);

		ret = blk_pread(in, (uint64_t)in_pos, buf, n);
		if (ret < 0) {
			msg("error while reading from input image file: %s",
			    strerror(-ret));
			break;
		}
		ret = write_chunk(out, (uint64_t)out_pos, buf, n,
				  blk_can(out, BLK_CAP_ZERO_INIT));
		if (ret < 0) {
			msg("error while writing to output image file: %s",
			    strerror(-ret));
			break;
		}
		in_pos += (int64_t)n;
		out_pos += (int64_t)n;
	}
	/* cached metadata goes out now, where a failure can be told */
	if (ret >= 0 && (ret = blk_flush(out)) < 0)
		msg("error while writing to output image file: %s",
		    strerror(-ret));
	free(buf);
	blk_close(in);
	blk_close(out);
	if (ret < 0)
		die_exit(1);	/* removes the output if this run made it */
	cleanup_cancel();
	return 0;
}
