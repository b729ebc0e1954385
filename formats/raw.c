/* raw.c - the raw format: the file is the disk, byte for byte. */
//config:config FORMAT_RAW
//config:	bool "raw"
//config:	default y
//config:	help
//config:	  Plain disk images: the file holds the guest's bytes. Sparse
//config:	  files are kept sparse (SEEK_DATA/SEEK_HOLE, punched holes).
//format:FORMAT(raw)

#include <errno.h>
#include <string.h>
#include "fmt.h"

static const struct optdesc raw_create_opts[] = {
	FMT_OPT_SIZE,
	FMT_OPT_FILE
};

static int raw_probe(const uint8_t *buf, size_t len, const char *filename)
{
	(void)buf;
	(void)len;
	(void)filename;
	return 1;	/* anything is a raw image, as a last resort */
}

static int raw_open(struct blk *bs, struct err *e)
{
	int64_t size = fmt_file_size(bs, e);

	if (size < 0)
		return (int)size;
	/* QEMU sees a raw file in whole 512-byte sectors; the tail past
	 * the end of the file reads as zeroes. */
	bs->size = ALIGN_UP((uint64_t)size, 512);
	return 0;
}

static int raw_pread(struct blk *bs, uint64_t off, void *buf, size_t len)
{
	return bfile_pread(bs->file, off, buf, len);
}

static int raw_pwrite(struct blk *bs, uint64_t off, const void *buf,
		      size_t len)
{
	return bfile_pwrite(bs->file, off, buf, len);
}

static int raw_pwrite_zeroes(struct blk *bs, uint64_t off, uint64_t len,
			     unsigned flags)
{
	return bfile_zero(bs->file, off, len, flags & BLK_ZERO_MAY_UNMAP);
}

static int raw_discard(struct blk *bs, uint64_t off, uint64_t len)
{
	int ret = bfile_discard(bs->file, off, len);

	return ret == -EOPNOTSUPP ? 0 : ret;
}

static int raw_block_status(struct blk *bs, uint64_t off, uint64_t len,
			    uint64_t *pnum, uint64_t *map,
			    struct bfile **mfile)
{
	int st = bfile_block_status(bs->file, off, len, pnum);

	*map = off;
	*mfile = bs->file;
	return st | BLK_STAT_ALLOCATED | BLK_STAT_OFFSET;
}

static int raw_truncate(struct blk *bs, uint64_t size, int prealloc,
			bool shrink, struct err *e)
{
	(void)shrink;
	return bfile_truncate(bs->file, size, prealloc, e);
}

static int raw_create(const char *filename, const struct optlist *opts,
		      struct err *e)
{
	struct bfile *f;
	uint64_t size = 0;
	int prealloc, ret;

	if (optlist_get_size(opts, "size", &size, e) < 0)
		return -EINVAL;
	ret = fmt_opt_prealloc(opts, &prealloc, e);
	if (ret < 0)
		return ret;
	if (prealloc == PREALLOC_METADATA)
		return fmt_err(e, -ENOTSUP, "Unsupported preallocation mode: "
			       "metadata");
	ret = fmt_no_backing(opts, "raw", e);
	if (ret == 0)
		ret = fmt_create_file(&f, filename, e);
	if (ret < 0)
		return ret;
	if (size > INT64_MAX - 511) {
		bfile_close(f);
		err_set(e, "Could not resize file: %s", strerror(EINVAL));
		return -EINVAL;
	}
	size = ALIGN_UP(size, 512);
	ret = bfile_truncate(f, size, prealloc, e);
	if (ret == -EFBIG)
		err_set(e, "The image size is too large for file format 'raw'");
	/* Like QEMU, allocate the first block of a sparse image so that
	 * later O_DIRECT alignment probing finds real blocks; this also
	 * makes map and disk size agree with QEMU. */
	if (!ret && prealloc == PREALLOC_OFF && size && !f->is_blockdev) {
		static const char zero[4096];
		ret = bfile_pwrite(f, 0, zero, size < 4096 ? 512 : 4096);
		if (ret < 0)
			err_set(e, "Could not write to the new file: %s",
				strerror(-ret));
	}
	bfile_close(f);
	return ret;
}

static int raw_measure(const struct optlist *opts, struct blk *in,
		       uint64_t size, struct measure_info *mi, struct err *e)
{
	(void)opts;
	(void)e;
	if (in)
		size = in->size;
	else
		size = ALIGN_UP(size, 512);	/* whole sectors, as create */
	mi->required = size;
	mi->fully_allocated = size;
	return 0;
}

const struct blk_driver raw_driver = {
	.name = "raw",
	.caps = BLK_CAP_CREATE | BLK_CAP_WRITE | BLK_CAP_ZERO_INIT |
		BLK_CAP_THREADSAFE | BLK_CAP_RESIZE | BLK_CAP_SHRINK |
		BLK_CAP_MEASURE | BLK_CAP_ZERO_WRITES | BLK_CAP_FILE_MAP,
	.create_opts = raw_create_opts,
	.probe = raw_probe,
	.open = raw_open,
	.pread = raw_pread,
	.pwrite = raw_pwrite,
	.pwrite_zeroes = raw_pwrite_zeroes,
	.discard = raw_discard,
	.block_status = raw_block_status,
	.flush = fmt_flush,
	.truncate = raw_truncate,
	.create = raw_create,
	.measure = raw_measure,
};
