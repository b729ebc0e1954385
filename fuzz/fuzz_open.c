/* fuzz_open.c - libFuzzer target: open the input as an image of one format
 * (FUZZ_FORMAT, fixed at compile time; NULL: whatever probing guesses),
 * read its virtual disk, walk its block status, ask for its info, close it.
 *
 * The rule it checks (DESIGN.md): a hostile image gives an error, never a
 * crash, hang, leak or huge allocation. The work per input is bounded so
 * that a header announcing an exabyte disk costs no more than a small one.
 *
 * Built by fuzz/build.sh:
 *   clang -fsanitize=fuzzer,address,undefined -DFUZZ_FORMAT=\"qcow2\" ... */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "blk_driver.h"

#ifndef FUZZ_FORMAT
#error "build with -DFUZZ_FORMAT=\"name\" (or =NULL to probe)"
#endif

#define CHUNK		(64 * 1024)
#define READ_BUDGET	(4u << 20)	/* bytes read per input */
#define STATUS_STEPS	2048		/* block-status calls per input */

static int fd = -1;
static char path[64];
static bool is_temp;

static void remove_temp(void)
{
	if (is_temp)
		unlink(path);
}

/* The image lives in a memfd (no disk traffic), reopened by name through
 * /proc since blk_open takes a file name; a temporary file otherwise. */
static int setup(void)
{
	fd = memfd_create("fuzz-image", 0);
	if (fd >= 0) {
		snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
		if (access(path, R_OK) == 0)
			return 0;
		close(fd);
	}
	snprintf(path, sizeof(path), "/tmp/imgbox-fuzz-XXXXXX");
	fd = mkstemp(path);
	if (fd < 0)
		return -1;
	is_temp = true;
	atexit(remove_temp);
	return 0;
}

static int put_input(const uint8_t *data, size_t size)
{
	size_t done = 0;

	if (ftruncate(fd, 0) < 0)
		return -1;
	while (done < size) {
		ssize_t n = pwrite(fd, data + done, size - done, (off_t)done);
		if (n <= 0)
			return -1;
		done += (size_t)n;
	}
	return 0;
}

/* Reads [off, off+len) in chunks, within the budget. */
static void read_range(struct blk *bs, uint8_t *buf, uint64_t off,
		       uint64_t len, uint64_t *budget)
{
	while (len && *budget) {
		size_t n = (size_t)MIN(MIN(len, (uint64_t)CHUNK), *budget);

		if (blk_pread(bs, off, buf, n) < 0)
			return;
		off += n;
		len -= n;
		*budget -= n;
	}
}

static void exercise(struct blk *bs)
{
	uint8_t *buf = blk_alloc_buf(CHUNK);
	uint64_t budget = READ_BUDGET, off = 0;
	struct blk_info bi;

	if (!buf)
		return;
	/* Small disks are read whole; big ones at the start, the end and
	 * spread in between. */
	if (bs->size <= READ_BUDGET) {
		read_range(bs, buf, 0, bs->size, &budget);
	} else {
		uint64_t step = bs->size / 32;

		read_range(bs, buf, 0, READ_BUDGET / 4, &budget);
		read_range(bs, buf, bs->size - CHUNK, CHUNK, &budget);
		for (int i = 1; i < 32 && budget; i++)
			read_range(bs, buf, ALIGN_DOWN(step * (uint64_t)i, 512),
				   CHUNK, &budget);
	}

	for (int steps = 0; off < bs->size && steps < STATUS_STEPS; steps++) {
		uint64_t pnum, map;
		struct bfile *mfile;
		int depth, ret;

		ret = blk_block_status_above(bs, NULL, off, bs->size - off,
					     &pnum, &map, &mfile, &depth);
		if (ret < 0 || !pnum)
			break;
		/* a little data from each run, where the map points */
		if ((ret & BLK_STAT_DATA) && budget)
			read_range(bs, buf, off, MIN(pnum, (uint64_t)4096),
				   &budget);
		off += pnum;
	}

	if (blk_get_info(bs, &bi) == 0 && bi.specific)
		val_free(bi.specific);
	if (bs->drv->snapshot_list) {
		struct snapshot_info *sn = NULL;
		int n = 0;

		bs->drv->snapshot_list(bs, &sn, &n);
		free(sn);
	}
	free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct blk *bs;
	struct err e = { "" };

	if (fd < 0 && setup() < 0)
		abort();
	if (put_input(data, size) < 0)
		return 0;
	/* Backing files are left closed: an input must not make the target
	 * open files named in it. */
	if (blk_open(&bs, path, FUZZ_FORMAT, BLK_O_NO_BACKING | BLK_O_SHARE,
		     CACHE_WRITEBACK, &e) < 0)
		return 0;
	exercise(bs);
	blk_close(bs);
	return 0;
}
