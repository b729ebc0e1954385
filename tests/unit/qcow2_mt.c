/* qcow2_mt.c - the qcow2 driver is thread-safe: it says so
 * (BLK_CAP_PARALLEL_READ: the block layer does not serialise its reads), and
 * threads that read random ranges (parts of clusters, whole runs, across
 * L2 tables) and ask for block status of one image at the same time all
 * get the bytes QEMU's own conversion gives. Images made by qemu-img:
 * compressed with 64k and 512-byte clusters, extended L2, and a chain
 * over a compressed base with writes in the top layer. */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>
#include "blk_driver.h"
#include "unit.h"

#define NTHREADS	8
#define SIZE		(3u << 20)

static char dir[256];

static uint8_t *load(const char *name, size_t len)
{
	uint8_t *b = calloc(1, len);
	FILE *f = fopen(name, "rb");

	if (!b || !f || fread(b, 1, len, f) != len) {
		if (f)
			fclose(f);
		free(b);
		return NULL;
	}
	fclose(f);
	return b;
}

struct job {
	struct blk *bs;
	const uint8_t *want;
	uint64_t seed;
	int bad_reads, bad_status;
};

static uint64_t next(uint64_t *x)
{
	*x ^= *x << 13;
	*x ^= *x >> 7;
	*x ^= *x << 17;
	return *x;
}

static void *reader(void *arg)
{
	struct job *j = arg;
	uint8_t *buf = malloc(256 << 10);

	if (!buf) {
		j->bad_reads++;
		return NULL;
	}
	for (int i = 0; i < 300; i++) {
		uint64_t r = next(&j->seed), off, len;

		/* a third sector-sized, a third up to 4 clusters, a third
		 * up to 256k */
		switch (r % 3) {
		case 0: len = 512; break;
		case 1: len = 1 + (r >> 8) % (256 << 10); break;
		default: len = 1 + (r >> 8) % (4 << 16); break;
		}
		if (len > 256 << 10)
			len = 256 << 10;
		off = (r >> 24) % (SIZE - len + 1);
		if (blk_pread(j->bs, off, buf, len) < 0 ||
		    memcmp(buf, j->want + off, len))
			j->bad_reads++;
		if (i % 4 == 0) {
			uint64_t pnum, map;
			struct bfile *mf;
			int st = blk_block_status(j->bs, off, SIZE - off,
						  &pnum, &map, &mf);
			if (st < 0 || !pnum || pnum > SIZE - off)
				j->bad_status++;
		}
	}
	free(buf);
	return NULL;
}

static void run(const char *img)
{
	struct job jobs[NTHREADS];
	pthread_t tid[NTHREADS];
	struct err e = { "" };
	struct blk *bs = NULL;
	uint8_t *want;
	int ret;

	ret = sh("qemu-img convert -O raw %s want.raw", img);
	CHECK(ret == 0, "qemu-img convert %s", img);
	want = load("want.raw", SIZE);
	CHECK(want != NULL, "%s: want.raw", img);
	ret = blk_open(&bs, img, "qcow2", 0, CACHE_WRITEBACK, &e);
	CHECK(ret == 0, "open %s: %s", img, e.msg);
	if (ret < 0 || !want) {
		free(want);
		return;
	}
	CHECK(bs->drv->caps & BLK_CAP_PARALLEL_READ);
	for (int i = 0; i < NTHREADS; i++) {
		jobs[i] = (struct job){ bs, want,
					0x9e3779b97f4a7c15ULL * (i + 1), 0,
					0 };
		CHECK(pthread_create(&tid[i], NULL, reader, &jobs[i]) == 0);
	}
	for (int i = 0; i < NTHREADS; i++) {
		pthread_join(tid[i], NULL);
		CHECK(jobs[i].bad_reads == 0, "%s: thread %d: %d bad reads",
		      img, i, jobs[i].bad_reads);
		CHECK(jobs[i].bad_status == 0, "%s: thread %d: %d bad block "
		      "status", img, i, jobs[i].bad_status);
	}
	blk_close(bs);
	free(want);
}

int main(void)
{
	int rc = unit_scratch(dir, sizeof(dir), "qcow2_mt");

	if (rc >= 0)
		return rc;
	/* real data: binaries, holes and written zeroes */
	sh("ls /usr/bin/* | head -100 | xargs cat 2>/dev/null | head -c 2M "
	   "> data; truncate -s 3M src.raw; "
	   "dd if=data of=src.raw bs=64k count=20 conv=notrunc status=none; "
	   "dd if=/dev/zero of=src.raw bs=64k seek=20 count=4 conv=notrunc "
	   "status=none; dd if=data of=src.raw bs=4k skip=20 seek=400 "
	   "count=300 conv=notrunc status=none");
	sh("qemu-img convert -c -O qcow2 src.raw c.qcow2");
	sh("qemu-img convert -c -O qcow2 -o cluster_size=512 src.raw "
	   "c512.qcow2");
	sh("qemu-img convert -c -O qcow2 -o extended_l2=on,cluster_size=32k "
	   "src.raw xl2.qcow2");
	sh("qemu-img create -q -f qcow2 -o extended_l2=on -b c.qcow2 "
	   "-F qcow2 top.qcow2 && qemu-io -c 'write -P 0x5a 100k 8k' "
	   "-c 'write -z 1M 64k' -c 'write -P 0xa5 2047k 3k' top.qcow2 "
	   ">/dev/null");
	run("c.qcow2");
	run("c512.qcow2");
	run("xl2.qcow2");
	run("top.qcow2");
	sh("rm -rf %s", dir);
	return unit_done();
}
