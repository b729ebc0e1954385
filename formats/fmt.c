/* fmt.c - plumbing the format drivers share (see fmt.h). */

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "fmt.h"

int fmt_err(struct err *e, int ret, const char *fmt, ...)
{
	va_list ap;

	if (e) {
		va_start(ap, fmt);
		vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
		va_end(ap);
	}
	return ret;
}

bool fmt_range_ok(uint64_t off, uint64_t len)
{
	return off <= (uint64_t)INT64_MAX && len <= (uint64_t)INT64_MAX - off;
}

int64_t fmt_file_size(struct blk *bs, struct err *e)
{
	int64_t size = bfile_size(bs->file);

	if (size < 0)
		return fmt_err(e, (int)size, "Could not get the size of '%s': "
			       "%s", bs->filename, strerror((int)-size));
	return size;
}

int64_t fmt_read_header(struct blk *bs, void *h, size_t len,
			const char *what, struct err *e)
{
	int64_t size = fmt_file_size(bs, e);
	int ret;

	if (size < 0)
		return size;
	ret = bfile_pread(bs->file, 0, h, len);
	if (ret < 0)
		return fmt_err(e, ret, "Could not read %s: %s", what,
			       strerror(-ret));
	return size;
}

int fmt_read_backing_name(struct blk *bs, uint64_t off, size_t len,
			  const char *msg, struct err *e)
{
	char *name = calloc(1, len + 1);
	int ret;

	if (!name)
		return -ENOMEM;
	ret = bfile_pread(bs->file, off, name, len);
	if (ret < 0) {
		free(name);
		return fmt_err(e, ret, "%s", msg);
	}
	/* the name stops at a NUL, as C reads it */
	bs->backing_file = name;
	return 0;
}

int fmt_open(struct blk *bs, struct err *e,
	     int (*do_open)(struct blk *, struct err *),
	     void (*close)(struct blk *))
{
	int ret = do_open(bs, e);

	if (ret < 0)
		close(bs);
	return ret;
}

int fmt_flush(struct blk *bs)
{
	return bfile_flush(bs->file);
}

int fmt_file_status(struct bfile *f, uint64_t host, uint64_t *pnum,
		    uint64_t *map, struct bfile **mfile)
{
	uint64_t fnum;
	int st = bfile_block_status(f, host, *pnum, &fnum);

	if (st < 0)
		return st;
	if (fnum && fnum < *pnum)
		*pnum = fnum;
	*map = host;
	*mfile = f;
	return BLK_STAT_DATA | BLK_STAT_ALLOCATED | BLK_STAT_OFFSET |
	       (st & BLK_STAT_ZERO);
}

/* ---- table-mapped I/O ---- */

static const struct fmt_map *map_of(const struct blk *bs)
{
	return *(const struct fmt_map *const *)bs->opaque;
}

static bool is_data(const struct fmt_run *r)
{
	return r->kind == FMT_DATA || r->kind == FMT_DATA_FILE;
}

/* One loop for both directions: the runs of a read and of a write differ
 * only in what is done to a run that has no data yet. */
static int map_rw(struct blk *bs, uint64_t off, uint8_t *p, size_t len,
		  enum fmt_op op)
{
	const struct fmt_map *m = map_of(bs);

	while (len) {
		struct fmt_run r;
		int ret = m->lookup(bs, off, len, op, &r);

		if (ret < 0)
			return ret;
		if (is_data(&r) && !fmt_range_ok(r.host, r.len))
			ret = -EIO;
		else if (is_data(&r) && op == FMT_WRITE)
			ret = bfile_pwrite(bs->file, r.host, p, (size_t)r.len);
		else if (is_data(&r))
			ret = bfile_pread(bs->file, r.host, p, (size_t)r.len);
		else if (op == FMT_WRITE)
			ret = m->alloc_write(bs, off, p, &r);
		else if (r.kind == FMT_UNALLOC)
			ret = blk_read_backing(bs, off, p, (size_t)r.len);
		else if (r.kind == FMT_ZERO)
			memset(p, 0, (size_t)r.len);
		else
			ret = m->read_other(bs, off, p, &r);
		if (ret < 0)
			return ret;
		off += r.len;
		p += r.len;
		len -= (size_t)r.len;
	}
	return 0;
}

int fmt_map_pread(struct blk *bs, uint64_t off, void *buf, size_t len)
{
	return map_rw(bs, off, buf, len, FMT_READ);
}

int fmt_map_pwrite(struct blk *bs, uint64_t off, const void *buf,
		   size_t len)
{
	/* map_rw only reads from p when op is FMT_WRITE */
	return map_rw(bs, off, (uint8_t *)(uintptr_t)buf, len, FMT_WRITE);
}

int fmt_map_status(struct blk *bs, uint64_t off, uint64_t len,
		   uint64_t *pnum, uint64_t *map, struct bfile **mfile)
{
	struct fmt_run r;
	int ret = map_of(bs)->lookup(bs, off, len, FMT_STATUS, &r);

	if (ret < 0)
		return ret;
	*pnum = r.len;
	switch (r.kind) {
	case FMT_UNALLOC:
		return 0;
	case FMT_ZERO:
		return BLK_STAT_ZERO | BLK_STAT_ALLOCATED;
	case FMT_OTHER:
		return BLK_STAT_DATA | BLK_STAT_ALLOCATED |
		       BLK_STAT_COMPRESSED;
	case FMT_DATA_FILE:
		return fmt_file_status(bs->file, r.host, pnum, map, mfile);
	default:
		*map = r.host;
		*mfile = bs->file;
		return BLK_STAT_DATA | BLK_STAT_ALLOCATED | BLK_STAT_OFFSET;
	}
}

/* ---- create ---- */

int fmt_create_file(struct bfile **f, const char *filename, struct err *e)
{
	/* from here on a message in e is this create's (fmt_create_end) */
	if (e)
		e->msg[0] = 0;
	return bfile_open(f, filename, BFILE_CREATE | BFILE_RDWR,
			  CACHE_WRITEBACK, e);
}

int fmt_opt_prealloc(const struct optlist *opts, int *prealloc,
		     struct err *e)
{
	const char *p = optlist_get(opts, "preallocation");

	*prealloc = PREALLOC_OFF;
	if (p && blk_parse_prealloc(p, prealloc) < 0)
		return fmt_err(e, -EINVAL, "invalid parameter value: %s", p);
	return 0;
}

int fmt_no_backing(const struct optlist *opts, const char *format,
		   struct err *e)
{
	if (optlist_get(opts, "backing_file"))
		return fmt_err(e, -ENOTSUP, "Backing file not supported for "
			       "file format '%s'", format);
	return 0;
}

int fmt_create_end(struct bfile *f, int ret, const char *msg,
		   struct err *e)
{
	if (!ret)
		ret = bfile_flush(f);
	/* refusals have said why already; failed writes have not */
	if (ret < 0 && e && !e->msg[0])
		fmt_err(e, ret, "%s: %s", msg, strerror(-ret));
	bfile_close(f);
	return ret;
}

int fmt_write_zeroes(struct bfile *f, uint64_t off, uint64_t len)
{
	size_t chunk = (size_t)MIN(len, 1 << 20);
	uint8_t *z = calloc(1, chunk ? chunk : 1);
	int ret = 0;

	if (!z)
		return -ENOMEM;
	for (uint64_t done = 0; !ret && done < len; done += chunk) {
		size_t n = (size_t)MIN(len - done, chunk);
		ret = bfile_pwrite(f, off + done, z, n);
	}
	free(z);
	return ret;
}
