/* blk.c - images: open by name with a given or probed format, backing
 * chains (lazy, depth-capped, loop-checked), and the generic entry points
 * that wrap the driver callbacks with range checks, locking and fallbacks. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "blk_driver.h"
#include <generated/config.h>
#include <generated/formats.h>

const struct blk_driver *const blk_drivers[] = { FORMAT_TABLE NULL };

const struct blk_driver *blk_find_driver(const char *name)
{
	for (int i = 0; blk_drivers[i]; i++)
		if (!strcmp(blk_drivers[i]->name, name))
			return blk_drivers[i];
	return NULL;
}

const struct blk_driver *blk_probe(const uint8_t *buf, size_t len,
				   const char *filename)
{
	const struct blk_driver *best = NULL;
	int best_score = 0;

	for (int i = 0; blk_drivers[i]; i++) {
		int s;
		if (!blk_drivers[i]->probe)
			continue;
		s = blk_drivers[i]->probe(buf, len, filename);
		if (s > best_score) {
			best_score = s;
			best = blk_drivers[i];
		}
	}
	return best;
}

/* Whether a callback runs under bs->lock: always, unless the driver
 * says it may run concurrently (reads: BLK_CAP_PARALLEL_READ). */
static bool serialised(const struct blk *bs, bool read)
{
	unsigned caps = bs->drv->caps;

	return !(caps & BLK_CAP_THREADSAFE) &&
	       !(read && (caps & BLK_CAP_PARALLEL_READ));
}

#define SERIAL(bs, read, expr) ({					\
	bool l_ = serialised(bs, read);					\
	int r_;								\
	if (l_)								\
		pthread_mutex_lock(&(bs)->lock);			\
	r_ = (expr);							\
	if (l_)								\
		pthread_mutex_unlock(&(bs)->lock);			\
	r_; })
#define LOCKED(bs, expr) SERIAL(bs, false, expr)

char *blk_relative_path(const char *image, const char *backing)
{
	const char *slash;
	char *out;
	size_t dlen;

	if (backing[0] == '/' || !(slash = strrchr(image, '/')))
		return strdup(backing);
	dlen = (size_t)(slash - image) + 1;
	out = malloc(dlen + strlen(backing) + 1);
	if (!out)
		return NULL;
	memcpy(out, image, dlen);
	strcpy(out + dlen, backing);
	return out;
}

/* "file:NAME" names a plain file; any other "WORD:" prefix (before the
 * first '/') names a protocol we do not have. */
int blk_strip_protocol(const char *name, const char **out, struct err *e)
{
	const char *colon = strchr(name, ':');
	const char *slash = strchr(name, '/');

	*out = name;
	if (!colon || (slash && slash < colon))
		return 0;
	if (colon - name == 4 && !strncmp(name, "file", 4)) {
		*out = colon + 1;
		return 0;
	}
	err_set(e, "Unknown protocol '%.*s'", (int)(colon - name), name);
	return -EINVAL;
}

char *blk_backing_path(const struct blk *bs)
{
	if (!bs->backing_file || !bs->backing_file[0])
		return NULL;
	return blk_relative_path(bs->filename, bs->backing_file);
}

static int blk_open_depth(struct blk **pbs, const char *filename,
			  const char *fmt, unsigned flags, int cache,
			  int depth, uint64_t *devs, uint64_t *inos,
			  struct err *e);

static int open_backing(struct blk *bs, int depth, uint64_t *devs,
			uint64_t *inos, struct err *e)
{
	struct blk_ref ref;
	struct err be;
	int ret;

	if (!bs->backing_file || !bs->backing_file[0] || bs->backing)
		return 0;
	if (depth + 1 >= BLK_MAX_CHAIN) {
		err_set(e, "Backing chain of '%s' is deeper than %d images",
			bs->filename, BLK_MAX_CHAIN);
		return -ELOOP;
	}
	free(bs->backing_path);
	bs->backing_path = blk_relative_path(bs->filename, bs->backing_file);
	if (!bs->backing_path)
		return -ENOMEM;
	be.msg[0] = 0;
	ret = blk_ref_check(bs, "backing file", bs->backing_file, &ref, &be);
	if (!ret)
		ret = blk_open_depth(&bs->backing, bs->backing_path,
				     bs->backing_fmt && bs->backing_fmt[0] ?
				     bs->backing_fmt : NULL,
				     bs->flags & (BLK_O_SHARE | BLK_O_NO_SHARE |
						  BLK_O_NO_IO |
						  BLK_O_UNTRUSTED), bs->cache,
				     depth + 1, devs, inos, &be);
	if (!ret) {
		ret = blk_ref_opened(bs, "backing file", bs->backing_file,
				     &ref, bs->backing->file, &be);
		if (ret < 0) {
			blk_close(bs->backing);
			bs->backing = NULL;
		}
	}
	if (ret == -ELOOP ||
	    (ret == -EPERM && (bs->flags & BLK_O_UNTRUSTED)))
		err_set(e, "%s", be.msg);
	else if (ret < 0)
		err_set(e, "Could not open backing file: %s", be.msg);
	return ret;
}

int blk_open_backing(struct blk *bs, struct err *e)
{
	uint64_t devs[BLK_MAX_CHAIN];
	uint64_t inos[BLK_MAX_CHAIN];

	devs[0] = bs->file->dev;
	inos[0] = bs->file->ino;
	return open_backing(bs, 0, devs, inos, e);
}

/* The permissions QEMU 7.2's tools hold on an image file and those they
 * share (bfile_lock). A file of raw guest data (raw) shares everything;
 * a data file of another format (a flat vmdk extent) is not resized by
 * others; a file with metadata is not written by others either. A
 * backing file is read for its parent: it gets the parent's read, never
 * its write, and the same -U / convert-source sharing, so the flags that
 * decide it are passed down unchanged. */
enum { LOCK_RAW, LOCK_DATA, LOCK_META };

static int lock_file(struct bfile *f, unsigned flags, int kind,
		     struct err *e)
{
	unsigned perm, shared;

	perm = flags & BLK_O_NO_IO ? 0 : BLK_PERM_CONSISTENT_READ;
	if (flags & BLK_O_RDWR)
		perm |= BLK_PERM_WRITE | (kind != LOCK_RAW ||
					  (flags & BLK_O_RESIZE) ?
					  BLK_PERM_RESIZE : 0);
	shared = flags & BLK_O_NO_SHARE ?
		 BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE_UNCHANGED :
		 BLK_PERM_ALL;
	if (kind != LOCK_RAW)
		shared &= ~BLK_PERM_RESIZE;
	if (kind == LOCK_META)
		shared &= ~BLK_PERM_WRITE;
	if (flags & BLK_O_SHARE)
		shared = BLK_PERM_ALL;
	return bfile_lock(f, perm, shared, e);
}

int blk_lock_file(struct blk *bs, struct bfile *f, bool metadata,
		  struct err *e)
{
	return lock_file(f, bs->flags, metadata ? LOCK_META : LOCK_DATA, e);
}

static int blk_open_depth(struct blk **pbs, const char *filename,
			  const char *fmt, unsigned flags, int cache,
			  int depth, uint64_t *devs, uint64_t *inos,
			  struct err *e)
{
	const struct blk_driver *drv = NULL;
	struct blk *bs;
	int ret;

	*pbs = NULL;
	ret = blk_strip_protocol(filename, &filename, e);
	if (ret < 0)
		return ret;
	if ((flags & BLK_O_SHARE) && (flags & BLK_O_RDWR)) {
		err_set(e, "force-share=on can only be used with read-only "
			"images");
		return -EINVAL;
	}
	if (fmt) {
		drv = blk_find_driver(fmt);
		if (!drv) {
			err_set(e, "Unknown driver '%s'", fmt);
			return -EINVAL;
		}
	}
	bs = calloc(1, sizeof(*bs));
	if (!bs || !(bs->filename = strdup(filename))) {
		free(bs);
		err_set(e, "%s", strerror(ENOMEM));
		return -ENOMEM;
	}
	{
		/* recursive: an operation that holds the lock (check, amend,
		 * snapshots) may call blk_* on the same image */
		pthread_mutexattr_t a;

		pthread_mutexattr_init(&a);
		pthread_mutexattr_settype(&a, PTHREAD_MUTEX_RECURSIVE);
		pthread_mutex_init(&bs->lock, &a);
		pthread_mutexattr_destroy(&a);
	}
	bs->flags = flags;
	bs->cache = cache;
	bs->depth = depth;
	ret = bfile_open(&bs->file, filename,
			 (flags & BLK_O_RDWR) ? BFILE_RDWR : 0, cache, e);
	if (ret < 0)
		goto fail;
	for (int i = 0; i < depth; i++)
		if (devs[i] == bs->file->dev && inos[i] == bs->file->ino) {
			err_set(e, "Backing file loop detected: '%s' is its "
				"own backing file", filename);
			ret = -ELOOP;
			goto fail;
		}
	devs[depth] = bs->file->dev;
	inos[depth] = bs->file->ino;
	if (!drv) {
		uint8_t *buf = calloc(1, 4096);
		int64_t fsz = bfile_size(bs->file);
		size_t n = fsz < 0 ? 0 : (size_t)MIN((uint64_t)fsz, 4096);

		if (!buf) {
			ret = -ENOMEM;
			goto fail;
		}
		ret = bfile_pread(bs->file, 0, buf, 4096);
		if (ret < 0) {
			free(buf);
			err_set(e, "Could not read image for determining its "
				"format: %s", strerror(-ret));
			goto fail;
		}
		drv = blk_probe(buf, n, filename);
		free(buf);
		if (!drv) {
			err_set(e, "Could not determine image format");
			ret = -EINVAL;
			goto fail;
		}
		bs->flags |= BLK_O_PROBED;
	}
	bs->drv = drv;
	if ((flags & BLK_O_RDWR) && !(drv->caps & BLK_CAP_WRITE)) {
		err_set(e, "Driver '%s' does not support writing", drv->name);
		ret = -ENOTSUP;
		goto fail;
	}
	/* raw keeps no metadata in its file */
	ret = lock_file(bs->file, flags, drv->caps & BLK_CAP_FILE_MAP ?
			LOCK_RAW : LOCK_META, e);
	if (ret < 0) {
		bs->drv = NULL;	/* not opened: nothing to flush or close */
		goto fail;
	}
	if (drv->state_size) {
		bs->opaque = calloc(1, drv->state_size);
		if (!bs->opaque) {
			ret = -ENOMEM;
			goto fail;
		}
	}
	ret = drv->open(bs, e);
	if (ret < 0) {
		free(bs->opaque);
		bs->opaque = NULL;
		bs->drv = NULL;
		goto fail;
	}
	if (!(flags & BLK_O_NO_BACKING)) {
		ret = open_backing(bs, depth, devs, inos, e);
		if (ret < 0)
			goto fail;
	}
	*pbs = bs;
	return 0;
fail:
	blk_close(bs);
	return ret;
}

int blk_open(struct blk **pbs, const char *filename, const char *fmt,
	     unsigned flags, int cache, struct err *e)
{
	uint64_t devs[BLK_MAX_CHAIN];
	uint64_t inos[BLK_MAX_CHAIN];

	return blk_open_depth(pbs, filename, fmt, flags | blk_default_flags(),
			      cache, 0, devs, inos, e);
}

void blk_close(struct blk *bs)
{
	if (!bs)
		return;
	if (bs->drv) {
		if ((bs->flags & BLK_O_RDWR) &&
		    !(bs->flags & BLK_O_NO_FLUSH_ON_CLOSE))
			blk_flush(bs);
		if (bs->drv->close)
			bs->drv->close(bs);
	}
	blk_close(bs->backing);
	bfile_close(bs->file);
	free(bs->opaque);
	free(bs->filename);
	free(bs->backing_file);
	free(bs->backing_fmt);
	free(bs->backing_path);
	pthread_mutex_destroy(&bs->lock);
	free(bs);
}

static int check_range(struct blk *bs, uint64_t off, uint64_t len)
{
	uint64_t end;

	if (add_overflow_u64(off, len, &end) || end > bs->size)
		return -EINVAL;
	return 0;
}

int blk_pread(struct blk *bs, uint64_t off, void *buf, size_t len)
{
	int ret = check_range(bs, off, len);

	if (ret < 0)
		return ret;
	if (!len)
		return 0;
	return SERIAL(bs, true, bs->drv->pread(bs, off, buf, len));
}

/* A format guessed by probing must not be turned into another one by a
 * guest write to its first sector (DESIGN.md). */
static int probed_guard(struct blk *bs, uint64_t off, const void *buf,
			size_t len)
{
	const struct blk_driver *d;

	if (!(bs->flags & BLK_O_PROBED) || off >= 512 || !buf)
		return 0;
	/* Only a format whose guest bytes are its file's bytes (raw)
	 * exposes the sector a probe reads. */
	if (!(bs->drv->caps & BLK_CAP_FILE_MAP))
		return 0;
	if (off != 0 || len < 512)
		return 0;
	d = blk_probe(buf, len < 4096 ? len : 4096, NULL);
	if (d && d != bs->drv)
		return -EPERM;
	return 0;
}

/* What every writing entry point checks first: < 0 refused, 1 nothing to
 * do (empty range), 0 go on. */
static int write_prologue(struct blk *bs, uint64_t off, uint64_t len)
{
	int ret = check_range(bs, off, len);

	if (ret < 0)
		return ret;
	if (!(bs->flags & BLK_O_RDWR))
		return -EBADF;
	return len == 0;
}

int blk_pwrite(struct blk *bs, uint64_t off, const void *buf, size_t len)
{
	int ret = write_prologue(bs, off, len);

	if (ret)
		return ret < 0 ? ret : 0;
	ret = probed_guard(bs, off, buf, len);
	if (ret < 0)
		return ret;
	return LOCKED(bs, bs->drv->pwrite(bs, off, buf, len));
}

int blk_pwrite_zeroes(struct blk *bs, uint64_t off, uint64_t len,
		      unsigned flags)
{
	int ret = write_prologue(bs, off, len);
	size_t chunk = 1 << 20;
	char *z;

	if (ret)
		return ret < 0 ? ret : 0;
	if (bs->drv->pwrite_zeroes) {
		ret = LOCKED(bs, bs->drv->pwrite_zeroes(bs, off, len, flags));
		if (ret != -ENOTSUP)
			return ret;
	}
	z = blk_alloc_buf(chunk);
	if (!z)
		return -ENOMEM;
	memset(z, 0, chunk);
	ret = 0;
	while (len && !ret) {
		size_t n = len < chunk ? (size_t)len : chunk;
		ret = LOCKED(bs, bs->drv->pwrite(bs, off, z, n));
		off += n;
		len -= n;
	}
	free(z);
	return ret;
}

int blk_write_compressed(struct blk *bs, uint64_t off, const void *buf,
			 size_t len)
{
	int ret = check_range(bs, off, len);

	if (ret < 0)
		return ret;
	if (!(bs->drv->caps & BLK_CAP_COMPRESS) || !bs->drv->write_compressed)
		return -ENOTSUP;
	if (!(bs->flags & BLK_O_RDWR))
		return -EBADF;
	return LOCKED(bs, bs->drv->write_compressed(bs, off, buf, len));
}

int blk_write_precompressed(struct blk *bs, uint64_t off, const void *cbuf,
			    size_t clen)
{
	return LOCKED(bs, bs->drv->write_precompressed(bs, off, cbuf, clen));
}

int blk_discard(struct blk *bs, uint64_t off, uint64_t len)
{
	int ret = write_prologue(bs, off, len);

	if (ret)
		return ret < 0 ? ret : 0;
	if (!bs->drv->discard)
		return 0;	/* discard is advisory */
	return LOCKED(bs, bs->drv->discard(bs, off, len));
}

unsigned blk_aio_align(struct blk *bs)
{
	if (!ENABLE_LIBAIO || !(bs->drv->caps & BLK_CAP_FILE_MAP) ||
	    !bs->file->direct)
		return 0;
	return bs->file->align;
}

int blk_aio_init(struct blk_aio **pq, struct blk *bs, int depth)
{
	*pq = NULL;
	if (!blk_aio_align(bs))
		return -ENOTSUP;
	return bfile_aio_init(pq, bs->file, depth);
}

int blk_file_status(struct bfile *f, uint64_t off, uint64_t len,
		    uint64_t *pnum, bool *to_end)
{
	int64_t size = bfile_size(f);
	int ret = bfile_block_status(f, off, len, pnum);

	*to_end = ret >= 0 && size >= 0 && off + *pnum >= (uint64_t)size;
	return ret;
}

bool blk_same_file(const struct blk *a, const struct blk *b)
{
	return a->file->dev == b->file->dev && a->file->ino == b->file->ino;
}

int blk_flush(struct blk *bs)
{
	int ret = 0;

	if (!(bs->flags & BLK_O_RDWR))
		return 0;
	if (bs->drv->flush)
		ret = LOCKED(bs, bs->drv->flush(bs));
	else
		ret = bfile_flush(bs->file);
	return ret;
}

int blk_truncate(struct blk *bs, uint64_t size, int prealloc, bool shrink,
		 struct err *e)
{
	uint64_t old = bs->size;
	int ret;

	if (!(bs->drv->caps & BLK_CAP_RESIZE) || !bs->drv->truncate) {
		err_set(e, "Image format driver does not support resize");
		return -ENOTSUP;
	}
	if (!(bs->flags & BLK_O_RDWR)) {
		err_set(e, "Image is read-only");
		return -EBADF;
	}
	if (pthread_mutex_lock(&bs->lock))
		return -EINVAL;
	ret = bs->drv->truncate(bs, size, prealloc, shrink, e);
	pthread_mutex_unlock(&bs->lock);
	if (ret == 0)
		bs->size = size;
	/* As QEMU: a backing file longer than the old size would show
	 * through the new area, which must read as zero. */
	if (ret == 0 && size > old && bs->backing && bs->backing->size > old) {
		ret = blk_pwrite_zeroes(bs, old, size - old, 0);
		if (ret < 0)
			err_set(e, "Could not zero the new area: %s",
				strerror(-ret));
	}
	return ret;
}

int blk_block_status(struct blk *bs, uint64_t off, uint64_t len,
		     uint64_t *pnum, uint64_t *map, struct bfile **mfile)
{
	int ret;

	*pnum = 0;
	*map = 0;
	*mfile = NULL;
	if (off >= bs->size)
		return -EINVAL;
	if (len > bs->size - off)
		len = bs->size - off;
	if (!len)
		return -EINVAL;
	if (!bs->drv->block_status) {
		*pnum = len;
		return BLK_STAT_DATA | BLK_STAT_ALLOCATED;
	}
	ret = SERIAL(bs, true, bs->drv->block_status(bs, off, len, pnum, map,
						     mfile));
	if (ret >= 0 && (*pnum == 0 || *pnum > len))
		return -EIO;	/* a driver bug must not loop callers */
	return ret;
}

int blk_block_status_above(struct blk *bs, struct blk *base, uint64_t off,
			   uint64_t len, uint64_t *pnum, uint64_t *map,
			   struct bfile **mfile, int *depth)
{
	struct blk *cur = bs;
	int d = 0, ret;

	*pnum = 0;
	for (;;) {
		uint64_t n;
		ret = blk_block_status(cur, off, len, &n, map, mfile);
		if (ret < 0)
			return ret;
		len = n;
		if (ret & BLK_STAT_ALLOCATED)
			break;
		if (!cur->backing || cur->backing == base) {
			ret = BLK_STAT_ZERO;
			*map = 0;
			*mfile = NULL;
			break;
		}
		if (off >= cur->backing->size) {
			/* beyond the backing image: reads as zero */
			ret = BLK_STAT_ZERO;
			*map = 0;
			*mfile = NULL;
			d++;
			break;
		}
		cur = cur->backing;
		d++;
	}
	*pnum = len;
	*depth = d;
	return ret;
}

int blk_read_backing(struct blk *bs, uint64_t off, void *buf, size_t len)
{
	struct blk *b = bs->backing;
	size_t n = 0;

	if (b && off < b->size) {
		n = (size_t)MIN((uint64_t)len, b->size - off);
		int ret = blk_pread(b, off, buf, n);
		if (ret < 0)
			return ret;
	}
	if (n < len)
		memset((char *)buf + n, 0, len - n);
	return 0;
}

int blk_create(const char *fmt, const char *filename, struct optlist *opts,
	       struct err *e)
{
	const struct blk_driver *drv = blk_find_driver(fmt);
	int ret;

	ret = blk_strip_protocol(filename, &filename, e);
	if (ret < 0)
		return ret;
	if (!drv) {
		err_set(e, "Unknown file format '%s'", fmt);
		return -EINVAL;
	}
	if (!(drv->caps & BLK_CAP_CREATE) || !drv->create) {
		err_set(e, "Format driver '%s' does not support image creation",
			fmt);
		return -ENOTSUP;
	}
	ret = optlist_validate(opts, drv->create_opts, fmt, e);
	if (ret < 0)
		return ret;
	return drv->create(filename, opts, e);
}

int blk_get_info(struct blk *bs, struct blk_info *bi)
{
	memset(bi, 0, sizeof(*bi));
	if (!bs->drv->get_info)
		return 0;
	return LOCKED(bs, bs->drv->get_info(bs, bi));
}
