/* commit.c - img-commit: write the changes of an overlay into its backing
 * file (or a base further down the chain) and empty the overlay. */
//config:config APPLET_COMMIT
//config:	bool "img-commit"
//config:	default y
//config:	help
//config:	  usage: img-commit [--object objectdef] [--image-opts] [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename
//config:
//config:	  Copy every range FILENAME (or an image between it and BASE)
//config:	  allocates into its backing file, or into BASE, an image
//config:	  further down its backing chain. The base grows if FILENAME is
//config:	  larger. FILENAME is emptied afterwards unless -d or -b.
//config:
//config:	  -f FMT    format of FILENAME (default: probe)
//config:	  -t CACHE  cache mode (default writeback)
//config:	  -b BASE   commit into BASE (implies -d)
//config:	  -d        leave FILENAME as it is
//config:	  -r RATE   write at most RATE bytes per second
//config:	  -p        show progress
//config:	  -q        quiet
//applet:APPLET(commit, "img-commit", "f:t:b:dpqr:", "object:*,image-opts")

#define FOR_commit
#include <limits.h>
#include <stdarg.h>
#include <time.h>
#include "imgbox.h"

#define BUF_SIZE	(4u << 20)

static float progress_last;

/* redrawn after each 1% */
static void progress_at(float cur)
{
	if (cur > progress_last + 1.0f || cur == 0 || cur == 100) {
		progress_last = cur;
		progress_print(cur);
	}
}

NORETURN static void fail(const char *fmt, ...) PRINTF(1, 2);
static void fail(const char *fmt, ...)
{
	va_list ap;

	progress_end();
	va_start(ap, fmt);
	vmsg(fmt, ap);
	va_end(ap);
	die_exit(1);
}

/* name as given with -b, resolved like a backing file name of `img`,
 * names the same file as `path`? */
static bool same_file(const struct blk *img, const char *name,
		      const char *path)
{
	char a[PATH_MAX], b[PATH_MAX], *cand;
	const char *slash = strrchr(img->filename, '/');
	bool same;

	if (name[0] != '/' && slash) {
		size_t d = (size_t)(slash - img->filename) + 1;
		cand = malloc(d + strlen(name) + 1);
		if (!cand)
			return false;
		memcpy(cand, img->filename, d);
		strcpy(cand + d, name);
	} else
		cand = strdup(name);
	same = cand && path && realpath(cand, a) && realpath(path, b) &&
	       !strcmp(a, b);
	free(cand);
	return same;
}

/* Status of [off, off+len) above base: allocated somewhere between top
 * and base (BLK_STAT_ALLOCATED), or 0 when reads would reach base. A
 * layer shorter than the one above it reads as zero past its end, which
 * decides the content as much as an allocated zero range does. */
static int status_above(struct blk *top, struct blk *base, uint64_t off,
			uint64_t len, uint64_t *pnum)
{
	struct blk *cur = top;
	struct bfile *mf;
	uint64_t map;
	int st;

	*pnum = len;
	for (;;) {
		if (off >= cur->size)
			return BLK_STAT_ZERO | BLK_STAT_ALLOCATED;
		st = blk_block_status(cur, off, len, pnum, &map, &mf);
		if (st < 0 || (st & BLK_STAT_ALLOCATED))
			return st;
		len = *pnum;
		if (!cur->backing || cur->backing == base)
			return 0;
		cur = cur->backing;
	}
}

static void rate_wait(uint64_t rate, uint64_t done,
		      const struct timespec *start)
{
	struct timespec now, ts;
	double want, spent;

	if (!rate)
		return;
	clock_gettime(CLOCK_MONOTONIC, &now);
	want = (double)done / (double)rate;
	spent = (double)(now.tv_sec - start->tv_sec) +
		(double)(now.tv_nsec - start->tv_nsec) / 1e9;
	if (want <= spent)
		return;
	ts.tv_sec = (time_t)(want - spent);
	ts.tv_nsec = (long)((want - spent - (double)ts.tv_sec) * 1e9);
	nanosleep(&ts, NULL);
}


int commit_main(int argc, char **argv)
{
	int i = opts_parse(argc, argv), cache = CACHE_WRITEBACK, ret = 0;
	const char *filename, *what = "";
	struct blk *top, *base, *parent, *nb;
	struct err e = { "" };
	uint64_t rate = HAS(r) ? (uint64_t)cli_number(ARG(r), "rate limit", 0,
						   INT64_MAX) : 0, off, n, done = 0;
	bool drop = HAS(d) || HAS(b);
	struct timespec start;
	uint8_t *buf = NULL;
	char *path;

	if (argc - i != 1)
		die_usage("Expecting one image file name");
	if (HAS(image_opts))
		die("--image-opts is not supported");
	filename = argv[i];
	if (HAS(t) && blk_parse_cache(ARG(t), &cache) < 0)
		die("Invalid cache option: %s", ARG(t));
	top = open_image(filename, HAS(f) ? ARG(f) : NULL, BLK_O_RDWR, cache);
	progress_start(HAS(p) && !HAS(q));
	progress_at(0);

	parent = NULL;
	if (HAS(b)) {
		for (struct blk *l = top; l->backing; l = l->backing)
			if (same_file(l, ARG(b), l->backing->filename)) {
				parent = l;
				break;
			}
		if (!parent)
			fail("Did not find '%s' in the backing chain of '%s'",
			     ARG(b), filename);
	} else {
		if (!top->backing)
			fail("Image does not have a backing file");
		parent = top;
	}

	/* The chain was opened read-only below the top: open the base
	 * again for writing, with its format known. */
	base = parent->backing;
	path = strdup(base->filename);
	{
		char *fmt = strdup(blk_format(base));
		unsigned probed = base->flags & BLK_O_PROBED;

		if (!path || !fmt)
			fail("out of memory");
		parent->backing = NULL;
		blk_close(base);
		ret = blk_open(&nb, path, fmt, BLK_O_RDWR, cache, &e);
		free(fmt);
		/* qemu-img reopens the base: a lock it cannot get is
		 * reported alone */
		if (ret == -EAGAIN)
			fail("%s", e.msg);
		if (ret < 0)
			fail("Could not open '%s' for writing: %s", path,
			     e.msg);
		/* a guessed format keeps its guard on sector 0 */
		nb->flags |= probed;
		parent->backing = base = nb;
	}

	/* A larger top grows the base so that all of it fits. */
	if (top->size > base->size) {
		ret = blk_truncate(base, top->size, PREALLOC_OFF, false, &e);
		if (ret < 0)
			fail("Block job failed: %s; '%s' is unchanged",
			     e.msg[0] ? e.msg : strerror(-ret), filename);
	}
	buf = blk_alloc_buf(BUF_SIZE);
	if (!buf)
		fail("out of memory");
	clock_gettime(CLOCK_MONOTONIC, &start);
	for (off = 0; off < top->size; off += n) {
		int st = status_above(top, base, off, top->size - off, &n);

		/* data moves through the buffer; other runs go whole */
		if ((st & (BLK_STAT_ALLOCATED | BLK_STAT_ZERO)) ==
		    BLK_STAT_ALLOCATED)
			n = MIN(n, BUF_SIZE);
		if (st < 0) {
			ret = st;
			what = "reading the block status";
			break;
		}
		if (st & BLK_STAT_ALLOCATED) {
			if (st & BLK_STAT_ZERO) {
				ret = blk_pwrite_zeroes(base, off, n,
							BLK_ZERO_MAY_UNMAP);
				what = "writing";
			} else {
				ret = blk_pread(top, off, buf, n);
				what = "reading";
				if (ret >= 0) {
					ret = blk_pwrite(base, off, buf, n);
					what = "writing";
				}
				done += n;
			}
			if (ret < 0)
				break;
			rate_wait(rate, done, &start);
		}
		progress_at((float)(off + n) / (float)top->size * 100.0f);
	}
	free(buf);
	if (ret >= 0) {
		ret = blk_flush(base);
		what = "flushing";
	}
	if (ret < 0) {
		const char *m = base->errmsg[0] ? base->errmsg :
				top->errmsg[0] ? top->errmsg : strerror(-ret);
		progress_end();
		msg("Block job failed: %s", m);
		msg("(failed while %s) '%s' is unchanged and reads as before; "
		    "'%s' may hold part of its data", what, filename,
		    base->filename);
		blk_close(top);
		free(path);
		die_exit(1);
	}
	progress_at(100);
	/* Only now that the base holds everything may the top forget it. */
	if (!drop) {
		ret = blk_make_empty(top);
		if (ret < 0 && ret != -ENOTSUP) {
			progress_end();
			msg("Could not empty %s: %s", filename,
			    top->errmsg[0] ? top->errmsg : strerror(-ret));
			msg("'%s' holds all the committed data; '%s' still "
			    "reads as before", base->filename, filename);
			blk_close(top);
			free(path);
			die_exit(1);
		}
	}
	progress_end();
	blk_close(top);
	free(path);
	if (!HAS(q))
		printf("Image committed.\n");
	return 0;
}
