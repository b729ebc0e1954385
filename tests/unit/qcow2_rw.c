/* qcow2_rw.c - the qcow2 driver against QEMU: images made by qemu-img (and
 * by imgbox) get random writes, zero writes, discards and compressed writes
 * through the block layer, mirrored in a plain buffer; then imgbox reads
 * everything back, and QEMU's check must find no errors or leaks and QEMU's
 * compare must find the image equal to the buffer. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>
#include "blk.h"
#include "unit.h"

static char dir[256];

static uint64_t rng = 88172645463325252ULL;
static uint64_t rnd(uint64_t n)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return n ? rng % n : 0;
}

static int write_file(const char *name, const void *buf, size_t len)
{
	FILE *f = fopen(name, "wb");
	size_t n;

	if (!f)
		return -1;
	n = fwrite(buf, 1, len, f);
	fclose(f);
	return n == len ? 0 : -1;
}

struct cfg {
	const char *opts;	/* -o for qemu-img create */
	bool backing;		/* over a raw backing file */
	bool by_imgbox;		/* created by blk_create */
	uint64_t cluster;
	bool v2;
};

static void run(const struct cfg *c, int nops)
{
	const uint64_t size = 4 << 20;
	char img[300], raw[300], base[300];
	uint8_t *model = malloc(size), *rd = malloc(size), *buf;
	struct blk *bs;
	struct err e = { "" };
	int ret, errs = 0;

	snprintf(img, sizeof(img), "%s/t.qcow2", dir);
	snprintf(raw, sizeof(raw), "%s/t.raw", dir);
	snprintf(base, sizeof(base), "%s/b.raw", dir);
	buf = malloc(1 << 20);
	memset(model, 0, size);
	unlink(img);
	if (c->backing) {
		for (uint64_t i = 0; i < size - 65536; i++)
			model[i] = (uint8_t)(i * 7 + i / 4096);
		write_file(base, model, size - 65536);
	}
	if (c->by_imgbox) {
		struct optlist ol = { 0 };
		char sz[32];

		if (c->opts[0])
			optlist_parse(&ol, c->opts, &e);
		snprintf(sz, sizeof(sz), "%llu", (unsigned long long)size);
		optlist_set(&ol, "size", sz);
		if (c->backing) {
			optlist_set(&ol, "backing_file", "b.raw");
			optlist_set(&ol, "backing_fmt", "raw");
		}
		ret = blk_create("qcow2", img, &ol, &e);
		optlist_free(&ol);
		CHECK(ret == 0, "create %s: %s", c->opts, e.msg);
	} else {
		ret = sh("qemu-img create -q -f qcow2 %s%s %s %s %s %llu",
			 c->opts[0] ? "-o " : "", c->opts,
			 c->backing ? "-b b.raw -F raw" : "", img, "",
			 (unsigned long long)size);
		CHECK(ret == 0, "qemu-img create %s", c->opts);
	}
	ret = blk_open(&bs, img, "qcow2", BLK_O_RDWR, CACHE_WRITEBACK, &e);
	CHECK(ret == 0, "open %s: %s", c->opts, e.msg);
	if (ret < 0)
		goto out;
	for (int op = 0; op < nops; op++) {
		int kind = (int)rnd(10);
		uint64_t off, len;

		if (kind < 5) {		/* write anywhere, any length */
			off = rnd(size);
			len = 1 + rnd(MIN(size - off, kind < 2 ? 300000 :
					  9000) - 1 + 1);
			if (len > size - off)
				len = size - off;
			for (uint64_t i = 0; i < len; i++)
				buf[i] = (uint8_t)rnd(256) | 1;
			ret = blk_pwrite(bs, off, buf, len);
			CHECK(ret == 0, "pwrite %llu+%llu: %d %s",
			      (unsigned long long)off,
			      (unsigned long long)len, ret, bs->errmsg);
			memcpy(model + off, buf, len);
		} else if (kind < 7) {	/* zeroes */
			off = rnd(size);
			len = 1 + rnd(MIN(size - off, 200000));
			if (len > size - off)
				len = size - off;
			ret = blk_pwrite_zeroes(bs, off, len,
						rnd(2) ? BLK_ZERO_MAY_UNMAP : 0);
			CHECK(ret == 0, "zeroes %llu+%llu: %d",
			      (unsigned long long)off,
			      (unsigned long long)len, ret);
			memset(model + off, 0, len);
		} else if (kind < 8 && !(c->v2 && c->backing)) {
			/* discard whole clusters: zero, or the backing file
			 * shows through where v2 has no zero flag */
			off = rnd(size / c->cluster) * c->cluster;
			len = c->cluster * (1 + rnd(4));
			if (len > size - off)
				len = size - off;
			ret = blk_discard(bs, off, len);
			CHECK(ret == 0, "discard: %d", ret);
			memset(model + off, 0, len);
		} else if (kind < 9 && c->cluster <= (1 << 20)) {
			/* compressed cluster, compressible data */
			off = rnd(size / c->cluster) * c->cluster;
			len = c->cluster;
			for (uint64_t i = 0; i < len; i++)
				buf[i] = (uint8_t)(i / 100 + op);
			ret = blk_write_compressed(bs, off, buf, len);
			CHECK(ret == 0, "compressed: %d", ret);
			memcpy(model + off, buf, len);
		} else {		/* read back a range */
			off = rnd(size);
			len = 1 + rnd(MIN(size - off, 500000));
			if (len > size - off)
				len = size - off;
			ret = blk_pread(bs, off, rd, len);
			CHECK(ret == 0 && !memcmp(rd, model + off, len),
			      "read %llu+%llu", (unsigned long long)off,
			      (unsigned long long)len);
		}
	}
	ret = blk_pread(bs, 0, rd, size);
	for (uint64_t i = 0; i < size && errs < 3; i++)
		if (rd[i] != model[i]) {
			printf("  byte %llu: %02x != %02x\n",
			       (unsigned long long)i, rd[i], model[i]);
			errs++;
		}
	CHECK(ret == 0 && !errs, "whole image read back (%s)", c->opts);
	blk_close(bs);
	write_file(raw, model, size);
	ret = sh("qemu-img check -q %s", img);
	CHECK(ret == 0, "qemu-img check (%s%s) = %d", c->opts,
	      c->backing ? ", backing" : "", ret);
	ret = sh("qemu-img compare -q -f raw -F qcow2 %s %s", raw, img);
	CHECK(ret == 0, "qemu-img compare (%s%s) = %d", c->opts,
	      c->backing ? ", backing" : "", ret);
	if (ret)
		sh("cp %s /tmp/qcow2_rw_fail.qcow2", img);
	/* reopen: metadata written back correctly */
	ret = blk_open(&bs, img, "qcow2", 0, CACHE_WRITEBACK, &e);
	CHECK(ret == 0, "reopen: %s", e.msg);
	if (ret == 0) {
		ret = blk_pread(bs, 0, rd, size);
		CHECK(ret == 0 && !memcmp(rd, model, size), "reread (%s)",
		      c->opts);
		blk_close(bs);
	}
out:
	free(model);
	free(rd);
	free(buf);
}

/* Grow (with an L1 table that must move) and shrink; QEMU checks both. */
static void resize(const char *opts)
{
	char img[300];
	struct blk *bs;
	struct err e = { "" };
	uint8_t b[4096];
	int ret;

	snprintf(img, sizeof(img), "%s/r.qcow2", dir);
	unlink(img);
	sh("qemu-img create -q -f qcow2 -o %s %s 1M", opts, img);
	ret = blk_open(&bs, img, "qcow2", BLK_O_RDWR, CACHE_WRITEBACK, &e);
	CHECK(ret == 0, "open: %s", e.msg);
	if (ret)
		return;
	memset(b, 0x5a, sizeof(b));
	blk_pwrite(bs, 4096, b, sizeof(b));
	ret = blk_truncate(bs, 5ULL << 30, PREALLOC_OFF, false, &e);
	CHECK(ret == 0, "grow: %s", e.msg);
	ret = blk_pwrite(bs, (5ULL << 30) - 4096, b, sizeof(b));
	CHECK(ret == 0, "write at the new end");
	blk_close(bs);
	CHECK(sh("qemu-img check -q %s", img) == 0, "check after grow (%s)",
	      opts);
	ret = blk_open(&bs, img, "qcow2", BLK_O_RDWR, CACHE_WRITEBACK, &e);
	if (ret)
		return;
	ret = blk_truncate(bs, 1 << 20, PREALLOC_OFF, true, &e);
	CHECK(ret == 0, "shrink: %s", e.msg);
	blk_close(bs);
	CHECK(sh("qemu-img check -q %s", img) == 0, "check after shrink (%s)",
	      opts);
	CHECK(sh("qemu-io -c 'read -P 0x5a 4k 4k' %s >/dev/null", img) == 0,
	      "data kept after shrink");
}

int main(void)
{
	static const struct cfg cfgs[] = {
		{ "", false, false, 65536, false },
		{ "", true, false, 65536, false },
		{ "", false, true, 65536, false },
		{ "", true, true, 65536, false },
		{ "compat=0.10", false, false, 65536, true },
		{ "compat=0.10", true, false, 65536, true },
		{ "cluster_size=512", false, false, 512, false },
		{ "cluster_size=512", false, true, 512, false },
		{ "cluster_size=512,refcount_bits=64", false, true, 512, false },
		{ "cluster_size=1k,refcount_bits=1", true, true, 1024, false },
		{ "cluster_size=4k,refcount_bits=2", false, false, 4096, false },
		{ "cluster_size=2M", false, false, 2 << 20, false },
		{ "refcount_bits=4", true, false, 65536, false },
		{ "extended_l2=on", false, false, 65536, false },
		{ "extended_l2=on", true, false, 65536, false },
		{ "extended_l2=on,cluster_size=16k", true, true, 16384,
		  false },
		{ "lazy_refcounts=on", false, false, 65536, false },
		{ "preallocation=metadata", false, false, 65536, false },
		{ "preallocation=metadata,cluster_size=4k", false, true, 4096,
		  false },
	};
	int rc = unit_scratch(dir, sizeof(dir), "qcow2_rw");

	if (rc >= 0)
		return rc;
	for (size_t i = 0; i < ARRAY_SIZE(cfgs); i++) {
		const char *only = getenv("QCOW2_RW_ONLY");
		int before = fail;
		if (only && atoi(only) != (int)i)
			continue;
		rng = 88172645463325252ULL + i * 8003;
		run(&cfgs[i], getenv("QCOW2_RW_OPS") ?
		    atoi(getenv("QCOW2_RW_OPS")) : 200);
		if (fail != before)
			printf("config %zu (%s%s%s) failed\n", i, cfgs[i].opts,
			       cfgs[i].backing ? ", backing" : "",
			       cfgs[i].by_imgbox ? ", made by imgbox" : "");
	}
	resize("cluster_size=512");
	resize("cluster_size=64k");
	resize("compat=0.10,cluster_size=4k");
	sh("rm -rf %s", dir);
	return unit_done();
}
