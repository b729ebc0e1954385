/* fuzz_open.c - libFuzzer target: open the input as an image of one format
 * (FUZZ_FORMAT, fixed at compile time; NULL: whatever probing guesses),
 * read its virtual disk, walk its block status, ask for its info, close it.
 * Then, on a private copy: the format's check without and with repair, and
 * (formats that write) a few writes, zero writes and a discard at offsets
 * derived from the input, a flush, a close, and a reopen that reads back.
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
#include <stdarg.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include "blk_driver.h"

#ifndef FUZZ_FORMAT
#error "build with -DFUZZ_FORMAT=\"name\" (or =NULL to probe)"
#endif

#define CHUNK		(64 * 1024)
#define READ_BUDGET	(4u << 20)	/* bytes read per input */
#define STATUS_STEPS	2048		/* block-status calls per input */

#define WRITE_SPAN	(4u << 20)	/* writes land in the first/last 4 MiB */
#define WRITE_MAX	(64 * 1024)	/* bytes per write */
#define ZERO_MAX	(1u << 20)	/* bytes per zero write / discard */

/* The input read-only (fd, path), and a private copy that the check and
 * write stages may change (wfd, wpath). */
static int fd = -1, wfd = -1;
static char path[64], wpath[64];
static bool is_temp;

static void remove_temp(void)
{
	if (is_temp) {
		unlink(path);
		unlink(wpath);
	}
}

/* One image file: a memfd (no disk traffic), reopened by name through
 * /proc since blk_open takes a file name; a temporary file otherwise. */
static int make_file(int *pfd, char *name, size_t size)
{
	*pfd = memfd_create("fuzz-image", 0);
	if (*pfd >= 0) {
		snprintf(name, size, "/proc/self/fd/%d", *pfd);
		if (access(name, R_OK) == 0)
			return 0;
		close(*pfd);
	}
	snprintf(name, size, "/tmp/imgbox-fuzz-XXXXXX");
	*pfd = mkstemp(name);
	if (*pfd < 0)
		return -1;
	if (!is_temp)
		atexit(remove_temp);
	is_temp = true;
	return 0;
}

static int setup(void)
{
	if (make_file(&fd, path, sizeof(path)) < 0 ||
	    make_file(&wfd, wpath, sizeof(wpath)) < 0)
		return -1;
	return 0;
}

/* Every file the drivers open goes through here (fuzz/build.sh links with
 * -Wl,--wrap=open): an input may name other files (VMDK extents), and
 * those must not be host files opened for writing, nor FIFOs or devices
 * that block or are huge. Only the private copy may be written; other
 * names open read-only, and only when they are regular files. */
int __real_open(const char *name, int flags, ...);
int __wrap_open(const char *name, int flags, ...);

int __wrap_open(const char *name, int flags, ...)
{
	struct stat st;
	mode_t mode = 0;

	if (flags & O_CREAT) {
		va_list ap;

		va_start(ap, flags);
		mode = (mode_t)va_arg(ap, int);
		va_end(ap);
	}
	if (strcmp(name, wpath) != 0) {
		if ((flags & (O_ACCMODE | O_CREAT | O_TRUNC)) != O_RDONLY) {
			errno = EACCES;
			return -1;
		}
		if (stat(name, &st) < 0)
			return -1;
		if (!S_ISREG(st.st_mode)) {
			errno = EACCES;
			return -1;
		}
	}
	return __real_open(name, flags, mode);
}

static int put_file(int f, const uint8_t *data, size_t size)
{
	size_t done = 0;

	if (ftruncate(f, 0) < 0)
		return -1;
	while (done < size) {
		ssize_t n = pwrite(f, data + done, size - done, (off_t)done);
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

/* A small deterministic generator seeded from the input, so that a crash
 * reproduces from the input alone. */
static uint64_t rng;

static uint64_t next_rand(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static void seed_rand(const uint8_t *data, size_t size)
{
	rng = 0xcbf29ce484222325ull;
	for (size_t i = 0; i < size; i++)
		rng = (rng ^ data[i]) * 0x100000001b3ull;
	rng |= 1;
}

/* An offset in the first or the last WRITE_SPAN bytes of the disk, or
 * anywhere in it; sometimes sector-aligned, sometimes not. */
static uint64_t pick_offset(uint64_t size)
{
	uint64_t r = next_rand(), off;

	if (!size)
		return 0;
	switch (r % 3) {
	case 0:
		off = (r >> 8) % MIN(size, (uint64_t)WRITE_SPAN);
		break;
	case 1:
		off = size - 1 - (r >> 8) % MIN(size, (uint64_t)WRITE_SPAN);
		break;
	default:
		off = (r >> 8) % size;
		break;
	}
	if (r & 0x10000)
		off = ALIGN_DOWN(off, 512);
	return off;
}

/* Reopen the private copy and read a little of it: what the writes or the
 * repair left must open, or fail cleanly. */
static void reopen_and_read(const char *fmt)
{
	struct blk *bs;
	struct err e = { "" };
	uint8_t *buf;
	uint64_t budget = READ_BUDGET / 4;

	if (blk_open(&bs, wpath, fmt, BLK_O_NO_BACKING | BLK_O_SHARE,
		     CACHE_WRITEBACK, &e) < 0)
		return;
	buf = blk_alloc_buf(CHUNK);
	if (buf) {
		read_range(bs, buf, 0, MIN(bs->size, (uint64_t)WRITE_SPAN / 4),
			   &budget);
		if (bs->size > CHUNK)
			read_range(bs, buf, bs->size - CHUNK, CHUNK, &budget);
		free(buf);
	}
	blk_close(bs);
}

/* check, then check -r all, then check again, as qemu-img check does. */
static void check_stage(const uint8_t *data, size_t size, const char *fmt)
{
	struct check_result r;
	struct blk *bs;
	struct err e = { "" };

	if (put_file(wfd, data, size) < 0)
		return;
	if (blk_open(&bs, wpath, fmt, BLK_O_CHECK | BLK_O_NO_BACKING |
		     BLK_O_SHARE, CACHE_WRITEBACK, &e) == 0) {
		memset(&r, 0, sizeof(r));
		bs->drv->check(bs, &r, 0);
		blk_close(bs);
	}
	if (!(blk_find_driver(fmt)->caps & BLK_CAP_WRITE))
		return;
	if (blk_open(&bs, wpath, fmt, BLK_O_CHECK | BLK_O_RDWR |
		     BLK_O_NO_BACKING | BLK_O_SHARE, CACHE_WRITEBACK, &e) < 0)
		return;
	memset(&r, 0, sizeof(r));
	if (bs->drv->check(bs, &r, CHECK_FIX_LEAKS | CHECK_FIX_ERRORS) == 0 &&
	    (r.corruptions_fixed || r.leaks_fixed)) {
		memset(&r, 0, sizeof(r));
		bs->drv->check(bs, &r, 0);
	}
	blk_close(bs);
	reopen_and_read(fmt);
}

/* A few writes, zero writes and a discard on the private copy. */
static void write_stage(const uint8_t *data, size_t size, const char *fmt)
{
	struct blk *bs;
	struct err e = { "" };
	uint8_t *buf;

	if (put_file(wfd, data, size) < 0)
		return;
	if (blk_open(&bs, wpath, fmt, BLK_O_RDWR | BLK_O_NO_BACKING |
		     BLK_O_SHARE, CACHE_WRITEBACK, &e) < 0)
		return;
	buf = blk_alloc_buf(WRITE_MAX);
	if (!buf)
		goto out;
	seed_rand(data, size);
	memset(buf, 0x5a, WRITE_MAX);
	for (int i = 0; i < 6 && bs->size; i++) {
		uint64_t r = next_rand(), off = pick_offset(bs->size), len;

		switch (i) {
		case 2:
		case 4:
			len = 1 + (r >> 4) % ZERO_MAX;
			len = MIN(len, bs->size - off);
			blk_pwrite_zeroes(bs, off, len,
					  (r & 1) ? BLK_ZERO_MAY_UNMAP : 0);
			break;
		case 5:
			len = 1 + (r >> 4) % ZERO_MAX;
			blk_discard(bs, off, MIN(len, bs->size - off));
			break;
		default:
			len = 1 + (r >> 4) % WRITE_MAX;
			len = MIN(len, bs->size - off);
			buf[0] = (uint8_t)i;
			blk_pwrite(bs, off, buf, (size_t)len);
			break;
		}
	}
	blk_flush(bs);
	free(buf);
out:
	blk_close(bs);
	reopen_and_read(fmt);
}

/* VHDX headers and region tables carry a CRC-32C that random mutations
 * never match: the vhdx target recomputes them (where the signature is
 * there), so that the fuzzer reaches the fields behind them. Weak: the
 * other targets link without the vhdx driver when it is configured out. */
uint32_t vhdx_checksum(const uint8_t *buf, size_t len, size_t csum_off)
	__attribute__((weak));

static const uint8_t *fix_checksums(const uint8_t *data, size_t size,
				    uint8_t **copy)
{
	static const struct { size_t off, len; const char *sig; } area[] = {
		{ 64 << 10, 4096, "head" }, { 128 << 10, 4096, "head" },
		{ 192 << 10, 64 << 10, "regi" }, { 256 << 10, 64 << 10, "regi" },
	};
	uint8_t *p;

	*copy = NULL;
	if (!FUZZ_FORMAT || strcmp(FUZZ_FORMAT, "vhdx") || !vhdx_checksum)
		return data;
	p = malloc(size ? size : 1);
	if (!p)
		return data;
	memcpy(p, data, size);
	for (size_t i = 0; i < sizeof(area) / sizeof(area[0]); i++) {
		uint8_t *a;
		uint32_t c;

		if (area[i].off + area[i].len > size)
			continue;
		a = p + area[i].off;
		if (memcmp(a, area[i].sig, 4))
			continue;
		c = vhdx_checksum(a, area[i].len, 4);
		a[4] = (uint8_t)c;
		a[5] = (uint8_t)(c >> 8);
		a[6] = (uint8_t)(c >> 16);
		a[7] = (uint8_t)(c >> 24);
	}
	*copy = p;
	return p;
}

/* FUZZ_DUMP=FILE: write the image as the target sees it (after the
 * checksum fix-up) to FILE, to reproduce a finding with qemu-img. */
static void dump_input(const uint8_t *data, size_t size)
{
	const char *name = getenv("FUZZ_DUMP");
	FILE *f;

	if (!name || !(f = fopen(name, "wb")))
		return;
	fwrite(data, 1, size, f);
	fclose(f);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const struct blk_driver *drv = NULL;
	const char *fmt = FUZZ_FORMAT;
	struct blk *bs;
	struct err e = { "" };

	uint8_t *copy;

	if (fd < 0 && setup() < 0)
		abort();
	data = fix_checksums(data, size, &copy);
	dump_input(data, size);
	if (put_file(fd, data, size) < 0)
		goto out;
	/* Backing files are left closed: an input must not make the target
	 * open files named in it. */
	if (blk_open(&bs, path, fmt, BLK_O_NO_BACKING | BLK_O_SHARE,
		     CACHE_WRITEBACK, &e) == 0) {
		exercise(bs);
		drv = bs->drv;
		blk_close(bs);
	}

	/* The later stages use the format given, or the one probing found
	 * (check opens images that a plain open refuses). */
	if (fmt)
		drv = blk_find_driver(fmt);
	if (!drv)
		goto out;
	if (drv->check && (drv->caps & BLK_CAP_CHECK))
		check_stage(data, size, drv->name);
	if (drv->caps & BLK_CAP_WRITE)
		write_stage(data, size, drv->name);
out:
	free(copy);
	return 0;
}
