/* rebase.c - img-rebase: put an image on another backing file, keeping
 * what the guest sees (safe mode) or only rewriting the name (-u). */
//config:config APPLET_REBASE
//config:	bool "img-rebase"
//config:	default y
//config:	help
//config:	  usage: img-rebase [--object objectdef] [--image-opts] [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] filename
//config:
//config:	  Change the backing file of FILENAME to BACKING_FILE (format
//config:	  BACKING_FMT); -b "" removes it. Safe mode first copies into
//config:	  FILENAME every range where the old and the new backing file
//config:	  differ, so FILENAME reads the same afterwards.
//config:
//config:	  -f FMT    format of FILENAME (default: probe)
//config:	  -F FMT    format of the new backing file
//config:	  -t CACHE  cache mode of FILENAME (default writeback)
//config:	  -T CACHE  cache mode of the backing files (default writeback)
//config:	  -u        unsafe: only rewrite the backing file name and format
//config:	  -p        show progress
//config:	  -q        quiet
//config:	  -U        force share (no locking)
//applet:APPLET(rebase, "img-rebase", "f:F:b:upt:T:qU", "object:*,image-opts,force-share=U")

#define FOR_rebase
#include <limits.h>
#include <stdarg.h>
#include "imgbox.h"

/* qemu-img compares the backing files in pieces of this size. */
#define PIECE		(2u << 20)
#define SECTOR		512u

static float progress_cur, progress_last;

/* redrawn after each 2% */
static void progress_step(float delta, int max)
{
	float cur = max ? progress_cur + delta / 100.0f * (float)max : delta;

	progress_cur = cur;
	if (cur > progress_last + 2.0f || cur < progress_last - 2.0f ||
	    cur == 0 || cur == 100) {
		progress_last = cur;
		progress_print(cur);
	}
}

NORETURN static void fail(struct blk *bs, const char *fmt, ...) PRINTF(2, 3);
static void fail(struct blk *bs, const char *fmt, ...)
{
	va_list ap;

	progress_end();
	va_start(ap, fmt);
	vmsg(fmt, ap);
	va_end(ap);
	blk_close(bs);
	die_exit(1);
}

/* Word-at-a-time equality (musl's memcmp goes byte by byte); buffers are
 * aligned and compared from 512-byte multiples. */
typedef uint64_t __attribute__((may_alias)) word_t;

static bool equal(const uint8_t *a, const uint8_t *b, uint64_t n)
{
	const word_t *x = (const word_t *)a, *y = (const word_t *)b;
	uint64_t acc = 0, nw = n / 8;

	for (uint64_t i = 0; i < nw; i++)
		acc |= x[i] ^ y[i];
	for (uint64_t i = nw * 8; i < n; i++)
		acc |= (uint64_t)(a[i] ^ b[i]);
	return !acc;
}

/* Reads [off, off+len) of img, zeroes past its end (or without img).
 * Returns 1 if everything read is zero because of that, 0, or -errno. */
static int read_view(struct blk *img, uint64_t off, uint8_t *buf,
		     uint64_t len)
{
	uint64_t n = 0;
	int ret;

	if (img && off < img->size) {
		n = MIN(len, img->size - off);
		ret = blk_pread(img, off, buf, n);
		if (ret < 0)
			return ret;
	}
	if (n < len)
		memset(buf + n, 0, len - n);
	return n == 0;
}

/* Does img (NULL: none) read as zero over all of [off, off+len)? Asks
 * the block status only, so zero ranges cost no reads. */
static bool reads_zero(struct blk *img, uint64_t off, uint64_t len)
{
	while (img && len && off < img->size) {
		struct bfile *mf;
		uint64_t n, map;
		int depth, st;

		st = blk_block_status_above(img, NULL, off,
					    MIN(len, img->size - off), &n,
					    &map, &mf, &depth);
		if (st < 0 || !(st & BLK_STAT_ZERO))
			return false;
		off += n;
		len -= n;
	}
	return true;
}

/* Makes the top itself hold [off, off+len) wherever the old and the new
 * backing file differ there, in whole 512-byte sectors as qemu-img. */
static void merge_piece(struct blk *bs, struct blk *old, struct blk *new,
			uint64_t off, uint64_t len, uint8_t *bo, uint8_t *bn)
{
	int old_zero, ret;
	uint64_t i = 0;

	if (reads_zero(old, off, len) && reads_zero(new, off, len))
		return;
	old_zero = read_view(old, off, bo, len);
	if (old_zero < 0)
		fail(bs, "error while reading from old backing file");
	ret = read_view(new, off, bn, len);
	if (ret < 0)
		fail(bs, "error while reading from new backing file");
	if (equal(bo, bn, len))
		return;
	while (i < len) {
		uint64_t j = i;
		bool diff = !equal(bo + i, bn + i, MIN(SECTOR, len - i));

		/* a run of sectors that all differ, or all match */
		do
			j += MIN(SECTOR, len - j);
		while (j < len &&
		       !equal(bo + j, bn + j, MIN(SECTOR, len - j)) == diff);
		if (diff) {
			if (old_zero)
				ret = blk_pwrite_zeroes(bs, off + i, j - i, 0);
			else
				ret = blk_pwrite(bs, off + i, bo + i, j - i);
			if (ret < 0)
				fail(bs, "Error while writing to COW image: %s",
				     bs->errmsg[0] ? bs->errmsg :
				     strerror(-ret));
		}
		i = j;
	}
}

/* Safe mode: every range the top does not allocate itself reads from the
 * old backing file now and will read from the new one; where the two
 * differ, the old content is written into the top. Until the backing
 * file is switched at the very end the top reads the same all along. */
/* Does a layer from `from` down to (not including) `stop` decide the
 * content of [off, off+len)? *pnum: length of the answer's run. */
static int allocated_between(struct blk *from, struct blk *stop,
			     uint64_t off, uint64_t len, uint64_t *pnum)
{
	*pnum = len;
	for (struct blk *cur = from; cur && cur != stop; cur = cur->backing) {
		struct bfile *mf;
		uint64_t map;
		int st;

		if (off >= cur->size)
			return 1;	/* reads zero past a short layer */
		st = blk_block_status(cur, off, *pnum, pnum, &map, &mf);
		if (st < 0)
			return st;
		if (st & BLK_STAT_ALLOCATED)
			return 1;
	}
	return 0;
}

static void merge(struct blk *bs, struct blk *old, struct blk *new,
		  bool in_chain)
{
	uint8_t *bo = blk_alloc_buf(PIECE), *bn = blk_alloc_buf(PIECE);
	float step = bs->size ? 100.0f / (float)(bs->size /
				MIN(bs->size, (uint64_t)PIECE)) : 0;
	uint64_t off, n;

	if (!bo || !bn)
		fail(bs, "out of memory");
	for (off = 0; off < bs->size; off += n) {
		struct bfile *mf;
		uint64_t map;
		int st;

		n = MIN((uint64_t)PIECE, bs->size - off);
		st = blk_block_status(bs, off, n, &n, &map, &mf);
		if (st < 0)
			fail(bs, "error while reading image metadata: %s",
			     strerror(-st));
		if (st & BLK_STAT_ALLOCATED)
			continue;
		if (in_chain) {
			/* the new backing file is below the old one: where
			 * nothing between them allocates, both read alike */
			st = allocated_between(old, new, off, n, &n);
			if (st < 0)
				fail(bs, "error while reading image metadata: "
				     "%s", strerror(-st));
			if (!st)
				continue;
		}
		merge_piece(bs, old, new, off, n, bo, bn);
		progress_step(step, 100);
	}
	free(bo);
	free(bn);
}

/* The image of the old backing chain that path names, if any. */
static struct blk *find_in_chain(struct blk *old, const char *path)
{
	char a[PATH_MAX], b[PATH_MAX];

	if (!realpath(path, a))
		return NULL;
	for (struct blk *l = old; l; l = l->backing)
		if (realpath(l->filename, b) && !strcmp(a, b))
			return l;
	return NULL;
}

/* The backing name is relative to the directory of the image. */
static char *relative_to(const char *image, const char *name)
{
	const char *slash = strrchr(image, '/');
	char *out;
	size_t d;

	if (name[0] == '/' || !slash)
		return strdup(name);
	d = (size_t)(slash - image) + 1;
	out = malloc(d + strlen(name) + 1);
	if (out) {
		memcpy(out, image, d);
		strcpy(out + d, name);
	}
	return out;
}

int rebase_main(int argc, char **argv)
{
	int i = opts_parse(argc, argv), cache = CACHE_WRITEBACK;
	int src_cache = CACHE_WRITEBACK, ret;
	const char *filename, *base = HAS(b) ? ARG(b) : NULL;
	const char *bfmt = HAS(F) ? ARG(F) : NULL;
	struct blk *bs, *new = NULL, *chain = NULL;
	struct err e = { "" };
	bool unsafe = HAS(u);

	progress_start(HAS(p) && !HAS(q));
	if (argc - i != 1)
		die_usage("Expecting one image file name");
	if (!unsafe && !base)
		die_usage("Must specify backing file (-b) or use unsafe mode "
			  "(-u)");
	if (HAS(image_opts))
		die("--image-opts is not supported");
	filename = argv[i];
	progress_step(0, 100);
	if (HAS(t) && blk_parse_cache(ARG(t), &cache) < 0)
		fail(NULL, "Invalid cache option: %s", ARG(t));
	if (HAS(T) && blk_parse_cache(ARG(T), &src_cache) < 0)
		fail(NULL, "Invalid source cache option: %s", ARG(T));

	ret = blk_open(&bs, filename, HAS(f) ? ARG(f) : NULL,
		       BLK_O_RDWR | (unsafe ? BLK_O_NO_BACKING : 0), cache,
		       &e);
	if (ret < 0)
		fail(NULL, "Could not open '%s': %s", filename,
		     e.msg[0] ? e.msg : strerror(-ret));
	warn_probed_raw(bs);
	if (bfmt && !blk_format_exists(bfmt))
		fail(bs, "Invalid format name: '%s'", bfmt);

	if (!unsafe) {
		if (base[0]) {
			char *path = relative_to(bs->filename, base);

			if (!path)
				fail(bs, "out of memory");
			/* as qemu-img, an image of the old chain is used as
			 * it is open there */
			chain = find_in_chain(bs->backing, path);
			if (!chain) {
				ret = blk_open(&new, path, bfmt,
					       HAS(U) ? BLK_O_SHARE : 0,
					       src_cache, &e);
			}
			free(path);
			if (!chain && ret < 0)
				fail(bs, "Could not open new backing file "
				     "'%s': %s", base, e.msg);
		}
		merge(bs, bs->backing, chain ? chain : new, chain != NULL);
		blk_close(new);
		ret = blk_flush(bs);
		if (ret < 0)
			fail(bs, "Error while writing to COW image: %s",
			     strerror(-ret));
	}

	/* Everything that differs is in the top now: switch. */
	if (base && base[0] && !bfmt)
		ret = -EINVAL;
	else
		ret = blk_change_backing(bs, base && base[0] ? base : NULL,
					 base && base[0] ? bfmt : NULL, &e);
	if (ret == -ENOSPC)
		msg("Could not change the backing file to '%s': No space left "
		    "in the file header", base ? base : "(null)");
	else if (ret == -EINVAL && base && base[0] && !bfmt)
		msg("Could not change the backing file to '%s': backing "
		    "format must be specified", base);
	else if (ret < 0)
		msg("Could not change the backing file to '%s': %s",
		    base ? base : "(null)", strerror(-ret));
	progress_step(100, 0);
	progress_end();
	blk_close(bs);
	return ret < 0 ? 1 : 0;
}
