/* convert.c - the convert engine against in-memory drivers: the source
 * reports data, zero and unallocated runs; the target records every
 * write. Checks content, in-order commit without -W, no reads of zero
 * ranges, no writes of zeroes into a zero target, compression fallback,
 * and the zero-run scanner. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "blk_driver.h"
#include "unit.h"

#define SIZE	(12u << 20)
#define RUN	(3u << 19)	/* 1.5 MiB status runs: not chunk-aligned */

/* source: runs cycle data, zero, unallocated; data bytes depend on offset */
static uint64_t reads_in_zero;
static int src_status(uint64_t off)
{
	switch (off / RUN % 3) {
	case 0: return BLK_STAT_DATA | BLK_STAT_ALLOCATED;
	case 1: return BLK_STAT_ZERO | BLK_STAT_ALLOCATED;
	default: return 0;
	}
}

static uint8_t src_byte(uint64_t off)
{
	if (src_status(off) & BLK_STAT_DATA) {
		/* a zero 64 KiB hole in every data run */
		if (off % RUN >= 131072 && off % RUN < 196608)
			return 0;
		return (uint8_t)(off * 7 / 4096 + 1) | 1;
	}
	return 0;
}

static int s_pread(struct blk *bs, uint64_t off, void *buf, size_t len)
{
	uint8_t *p = buf;

	(void)bs;
	for (size_t i = 0; i < len; i++) {
		if (!(src_status(off + i) & BLK_STAT_DATA))
			__atomic_add_fetch(&reads_in_zero, 1, __ATOMIC_RELAXED);
		p[i] = src_byte(off + i);
	}
	return 0;
}

static int s_status(struct blk *bs, uint64_t off, uint64_t len,
		    uint64_t *pnum, uint64_t *map, struct bfile **mfile)
{
	(void)bs;
	*map = 0;
	*mfile = NULL;
	*pnum = MIN(len, RUN - off % RUN);
	return src_status(off);
}

static const struct blk_driver src_drv = {
	.name = "usrc", .caps = BLK_CAP_THREADSAFE,
	.pread = s_pread, .block_status = s_status,
};

/* target: memory, with a log of write offsets */
static uint8_t *tmem;
static uint64_t wlog[8192];
static int nw, out_of_order, zero_writes;
static uint64_t last_end;

static void note(uint64_t off, uint64_t len)
{
	if (off < last_end)
		out_of_order++;
	last_end = off + len;
	if (nw < (int)ARRAY_SIZE(wlog))
		wlog[nw++] = off;
}

static int t_pwrite(struct blk *bs, uint64_t off, const void *buf,
		    size_t len)
{
	(void)bs;
	note(off, len);
	memcpy(tmem + off, buf, len);
	return 0;
}

static int t_zero(struct blk *bs, uint64_t off, uint64_t len, unsigned f)
{
	(void)bs;
	(void)f;
	note(off, len);
	zero_writes++;
	memset(tmem + off, 0, len);
	return 0;
}

static int t_flush(struct blk *bs)
{
	(void)bs;
	return 0;
}

static int fail_at_write = -1;
static int t_pwrite_failing(struct blk *bs, uint64_t off, const void *buf,
			    size_t len)
{
	if (nw == fail_at_write)
		return -ENOSPC;
	return t_pwrite(bs, off, buf, len);
}

static const struct blk_driver tgt_drv = {
	.name = "utgt", .caps = BLK_CAP_WRITE,	/* not threadsafe: locked */
	.pwrite = t_pwrite, .pwrite_zeroes = t_zero, .flush = t_flush,
};
static const struct blk_driver tgt_fail_drv = {
	.name = "utgtf", .caps = BLK_CAP_WRITE,
	.pwrite = t_pwrite_failing, .pwrite_zeroes = t_zero,
	.flush = t_flush,
};

static void init_blk(struct blk *bs, const struct blk_driver *d,
		     unsigned flags, char *name)
{
	memset(bs, 0, sizeof(*bs));
	bs->drv = d;
	bs->size = SIZE;
	bs->flags = flags;
	bs->filename = name;
	pthread_mutex_init(&bs->lock, NULL);
}

static int content_ok(void)
{
	for (uint64_t i = 0; i < SIZE; i++)
		if (tmem[i] != src_byte(i))
			return 0;
	return 1;
}

/* One convert of the source into a target of driver tdrv (tmem starts
 * as zeroes or 0xee); the counters start at zero. */
static int convert_once(const struct blk_driver *tdrv, char *tname,
			int workers, bool ooo, bool zero_target,
			struct err *e)
{
	struct blk src, tgt, *srcs[1] = { &src };
	struct convert_opts o = { 0 };
	int ret;

	init_blk(&src, &src_drv, 0, "src");
	init_blk(&tgt, tdrv, BLK_O_RDWR, tname);
	memset(tmem, zero_target ? 0 : 0xee, SIZE);
	nw = out_of_order = zero_writes = 0;
	last_end = 0;
	reads_in_zero = 0;
	o.src = srcs;
	o.nsrc = 1;
	o.target = &tgt;
	o.workers = workers;
	o.out_of_order = ooo;
	o.min_sparse = 4096;
	o.target_is_zero = zero_target;
	ret = convert_run(&o, e);
	pthread_mutex_destroy(&src.lock);
	pthread_mutex_destroy(&tgt.lock);
	return ret;
}

static void run(int workers, bool ooo, bool zero_target)
{
	struct err e = { "" };
	int ret = convert_once(&tgt_drv, "tgt", workers, ooo, zero_target, &e);

	CHECK(ret == 0, "-m %d%s: %d %s", workers, ooo ? " -W" : "", ret,
	      e.msg);
	CHECK(content_ok(), "-m %d%s: content", workers, ooo ? " -W" : "");
	if (!ooo)
		CHECK(out_of_order == 0, "-m %d: %d writes out of order",
		      workers, out_of_order);
	CHECK(reads_in_zero == 0, "-m %d: %llu bytes of zero runs read",
	      workers, (unsigned long long)reads_in_zero);
	if (zero_target)
		CHECK(zero_writes == 0, "-m %d: %d zero writes into a zero "
		      "target", workers, zero_writes);
	else
		CHECK(zero_writes > 0, "-m %d: zero ranges not zeroed",
		      workers);
}

static void run_failing(int workers)
{
	struct err e = { "" };
	int ret;

	fail_at_write = 3;
	ret = convert_once(&tgt_fail_drv, "tgt.img", workers, false, true, &e);
	CHECK(ret == -ENOSPC, "failing target: %d", ret);
	CHECK(strstr(e.msg, "error while writing at byte ") &&
	      strstr(e.msg, "'tgt.img'") &&
	      strstr(e.msg, "No space left on device"), "message: %s",
	      e.msg);
	fail_at_write = -1;
}

static void test_scan(void)
{
	static uint8_t b[65536];

	memset(b, 0, sizeof(b));
	CHECK(convert_zero_run(b, sizeof(b), 0, 4096) == sizeof(b), "all zero");
	b[5000] = 1;
	CHECK(convert_zero_run(b, sizeof(b), 0, 4096) == 4096, "first granule");
	CHECK(convert_data_run(b + 4096, sizeof(b) - 4096, 4096, 4096) == 4096,
	      "one data granule");
	/* granules are aligned to absolute offsets */
	CHECK(convert_zero_run(b + 1024, sizeof(b) - 1024, 1024, 4096) == 3072,
	      "aligned to the absolute offset");
	/* a granule that is not a power of two */
	CHECK(convert_zero_run(b, sizeof(b), 0, 1536) == 4608, "1536: %zu",
	      convert_zero_run(b, sizeof(b), 0, 1536));
	b[5000] = 0;
	b[sizeof(b) - 1] = 9;
	CHECK(convert_zero_run(b, sizeof(b), 0, 512) == sizeof(b) - 512,
	      "last sector");
}

int main(void)
{
	tmem = malloc(SIZE);
	if (!tmem)
		return 2;
	test_scan();
	run(1, false, true);
	run(8, false, true);
	run(16, false, true);
	run(16, true, true);
	run(8, false, false);
	run(3, true, false);
	run_failing(1);
	run_failing(16);
	free(tmem);
	return unit_done();
}
