/* convert.c - the copy engine of img-convert.
 *
 * The virtual space of the concatenated sources is cut into chunks at a
 * shared cursor. A worker claims the next chunk (its block status decided
 * under the cursor lock, so claims are cheap and ordered), reads it if it
 * holds data, finds zero runs, compresses if asked, and then commits: in
 * claim order unless out_of_order (a ticket and a condition variable), so
 * everything but the writes themselves runs on all workers at once.
 *
 * Memory: each worker owns one chunk buffer (and one for compressed output
 * or the backing comparison), so the engine uses workers x chunk bytes
 * whatever the image size. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "blk_driver.h"
#include <generated/config.h>

#define CHUNK_MAX	(1u << 20)	/* bytes per chunk, before alignment */

enum chunk_kind { CK_DATA, CK_ZERO, CK_SKIP };

struct chunk {
	uint64_t off, len;		/* in the virtual (target) space */
	uint64_t seq;			/* claim order */
	enum chunk_kind kind;
	/* For copy offload: the whole chunk is at map in mfile. */
	struct bfile *mfile;
	uint64_t map;
};

/* One piece of a processed chunk, ready to commit. */
enum seg_kind { SEG_DATA, SEG_ZERO, SEG_COMP, SEG_SKIP };
struct seg {
	enum seg_kind kind;
	uint64_t off, len;		/* virtual */
	size_t boff;			/* data: offset in buf; comp: in cbuf */
	size_t clen;			/* compressed length */
};

struct conv {
	const struct convert_opts *o;
	uint64_t *src_start;		/* virtual offset of each source */
	uint64_t total;
	uint64_t align;			/* chunk ends fall on multiples */
	uint64_t cluster;		/* target cluster (compression unit) */
	size_t chunk_max;
	bool precompress;		/* driver compresses outside its lock */
	bool use_copy_range;
	/* -t none into raw: data writes stay in flight through libaio */
	struct blk_aio *aio;
	unsigned aio_align;
	pthread_mutex_t aio_lock;

	pthread_mutex_t lock;
	pthread_cond_t turn;
	uint64_t cursor, next_seq, commit_seq;
	uint64_t done;
	int ret;			/* first error */
	uint64_t fail_key;		/* its offset (fail_at) */
	struct err *e;
	bool stop;

	/* statistics and rate limiting (under lock) */
	struct convert_stats st;
	struct timespec t0;
	uint64_t limited;		/* bytes counted for -r */
};

struct worker {
	struct conv *c;
	pthread_t tid;
	uint8_t *buf, *cbuf, *bbuf;
	struct seg *segs;
	size_t nseg, maxseg;
	int pending;			/* libaio writes from buf in flight */
	char msg[512];
};

struct aioreq {
	struct worker *w;
	uint64_t off;
};

/* The first error is kept, except that a read error replaces any error
 * reported for a later offset: workers finish the chunks they claimed, so
 * the message names the lowest failing offset, as a sequential copy would,
 * whatever the order in which the threads ran. */
static void fail_at(struct conv *c, uint64_t key, int ret, const char *fmt,
		    ...) PRINTF(4, 5);
static void fail_at(struct conv *c, uint64_t key, int ret, const char *fmt,
		    ...)
{
	va_list ap;

	pthread_mutex_lock(&c->lock);
	if (!c->ret || key < c->fail_key) {
		c->ret = ret;
		c->fail_key = key;
		va_start(ap, fmt);
		vsnprintf(c->e->msg, sizeof(c->e->msg), fmt, ap);
		va_end(ap);
	}
	c->stop = true;
	pthread_cond_broadcast(&c->turn);
	pthread_mutex_unlock(&c->lock);
}
#define fail(c, ...) fail_at(c, UINT64_MAX, __VA_ARGS__)

/* ---- zero scanning ---- */

static uint64_t gran_end(uint64_t off, uint64_t gran)
{
	return (off / gran + 1) * gran;	/* gran need not be a power of 2 */
}

/* Bytes from the start of buf while its granules are zero (zero true) or
 * hold data (zero false). */
static size_t gran_run(const uint8_t *buf, size_t len, uint64_t off,
		       uint64_t gran, bool zero)
{
	size_t pos = 0;

	while (pos < len) {
		size_t n = (size_t)MIN(gran_end(off + pos, gran) - (off + pos),
				       (uint64_t)(len - pos));
		if ((bool)buffer_is_zero(buf + pos, n) != zero)
			return pos;
		pos += n;
	}
	return len;
}

size_t convert_zero_run(const uint8_t *buf, size_t len, uint64_t off,
			uint64_t gran)
{
	return gran_run(buf, len, off, gran, true);
}

size_t convert_data_run(const uint8_t *buf, size_t len, uint64_t off,
			uint64_t gran)
{
	return gran_run(buf, len, off, gran, false);
}

/* ---- sources ---- */

static int src_index(const struct conv *c, uint64_t off)
{
	int i = c->o->nsrc - 1;

	while (i > 0 && c->src_start[i] > off)
		i--;
	return i;
}

static uint64_t src_end(const struct conv *c, int i)
{
	return c->src_start[i] + c->o->src[i]->size;
}

/* Read with --salvage: sector by sector, zeroes where reading fails; one
 * warning per unreadable run. */
static void salvage_warn(struct worker *w, struct blk *bs, uint64_t off,
			 uint64_t len, int err)
{
	struct conv *c = w->c;

	if (!c->o->warn)
		return;
	snprintf(w->msg, sizeof(w->msg), "error while reading offset %llu of "
		 "'%s': %s (%llu bytes filled with zeroes)",
		 (unsigned long long)off, bs->filename, strerror(-err),
		 (unsigned long long)len);
	pthread_mutex_lock(&c->lock);
	c->o->warn(c->o->opaque, w->msg);
	pthread_mutex_unlock(&c->lock);
}

static int salvage_read(struct worker *w, struct blk *bs, uint64_t off,
			uint8_t *buf, size_t len)
{
	uint64_t bad_off = 0, bad_len = 0;
	int bad_err = 0;

	for (size_t pos = 0; pos < len; pos += 512) {
		size_t n = MIN((size_t)512, len - pos);
		int ret = blk_pread(bs, off + pos, buf + pos, n);

		if (ret >= 0) {
			if (bad_len)
				salvage_warn(w, bs, bad_off, bad_len, bad_err);
			bad_len = 0;
			continue;
		}
		memset(buf + pos, 0, n);
		if (!bad_len) {
			bad_off = off + pos;
			bad_err = ret;
		}
		bad_len += n;
	}
	if (bad_len)
		salvage_warn(w, bs, bad_off, bad_len, bad_err);
	return 0;
}

/* Reads [off, off+len) of the virtual space, across sources. */
static int read_virtual(struct worker *w, uint64_t off, uint8_t *buf,
			size_t len)
{
	struct conv *c = w->c;

	while (len) {
		int i = src_index(c, off);
		struct blk *bs = c->o->src[i];
		uint64_t soff = off - c->src_start[i];
		size_t n = (size_t)MIN((uint64_t)len, src_end(c, i) - off);
		int ret = 0;

		if (soff < bs->size && n)
			ret = blk_pread(bs, soff, buf, n);
		else {	/* past the last source: the target's tail */
			n = len;
			memset(buf, 0, n);
		}
		if (ret < 0 && c->o->salvage)
			ret = salvage_read(w, bs, soff, buf, n);
		if (ret < 0) {
			fail_at(c, off, ret, "error while reading at byte "
				"%llu of '%s': %s", (unsigned long long)soff,
				bs->filename, strerror(-ret));
			return ret;
		}
		buf += n;
		off += n;
		len -= n;
	}
	return 0;
}

/* ---- claiming chunks (under c->lock) ---- */

static int claim(struct conv *c, struct chunk *ch)
{
	const struct convert_opts *o = c->o;
	uint64_t off = c->cursor, n = 0, map = 0, end, limit;
	struct bfile *mf = NULL;
	struct blk *bs;
	int i, st, depth;

	if (c->stop || off >= c->total)
		return 0;
	memset(ch, 0, sizeof(*ch));
	i = src_index(c, off);
	bs = o->src[i];
	limit = MIN(src_end(c, i), c->total) - off;
	limit = MIN(limit, (uint64_t)c->chunk_max);
	if (off >= src_end(c, i)) {
		/* only when the target is larger than all sources */
		st = BLK_STAT_ZERO;
		n = MIN(c->total - off, (uint64_t)c->chunk_max);
	} else if (o->target_has_backing && o->src_base && o->src_base[i]) {
		st = blk_block_status_above(bs, o->src_base[i],
					    off - c->src_start[i], limit, &n,
					    &map, &mf, &depth);
		if (st >= 0 && !(st & BLK_STAT_ALLOCATED))
			st = -1000;	/* the new backing file provides it */
	} else if (o->target_has_backing && bs->backing) {
		st = blk_block_status(bs, off - c->src_start[i], limit, &n,
				      &map, &mf);
		if (st >= 0 && !(st & BLK_STAT_ALLOCATED))
			st = -1000;	/* the new backing file provides it */
	} else {
		/* without a backing file of its own the source reads zeroes
		 * where it allocates nothing: they are written even over a
		 * backing file of the target */
		st = blk_block_status_above(bs, NULL, off - c->src_start[i],
					    limit, &n, &map, &mf, &depth);
	}
	if (st < 0 && st != -1000) {
		if (!o->salvage) {
			c->ret = st;
			snprintf(c->e->msg, sizeof(c->e->msg),
				 "error while reading block status at offset "
				 "%llu of '%s': %s", (unsigned long long)
				 (off - c->src_start[i]), bs->filename,
				 strerror(-st));
			c->stop = true;
			return st;
		}
		st = BLK_STAT_DATA;	/* read what can be read */
		n = MIN(limit, (uint64_t)c->align);
	}
	if (st == -1000)
		ch->kind = CK_SKIP;
	else if (st & BLK_STAT_ZERO)
		ch->kind = CK_ZERO;
	else
		ch->kind = CK_DATA;
	if (ch->kind == CK_DATA && (st & BLK_STAT_OFFSET) && mf &&
	    !(st & BLK_STAT_COMPRESSED)) {
		ch->mfile = mf;
		ch->map = map;
	}
	end = off + n;
	/* Chunk ends on target clusters, so that no two workers write into
	 * one cluster and compression sees whole clusters. A status run
	 * shorter than a cluster becomes data: reading it gives the right
	 * bytes whatever its status. */
	if (end < c->total && !IS_ALIGNED(end, c->align)) {
		uint64_t down = ALIGN_DOWN(end, c->align);
		if (down > off) {
			end = down;
		} else {
			end = MIN(ALIGN_UP(end, c->align), c->total);
			ch->mfile = NULL;
			ch->kind = CK_DATA;
		}
	}
	ch->off = off;
	ch->len = end - off;
	ch->seq = c->next_seq++;
	c->cursor = end;
	return 1;
}

/* ---- processing (no lock held) ---- */

static int add_seg(struct worker *w, enum seg_kind kind, uint64_t off,
		   uint64_t len, size_t boff, size_t clen)
{
	struct seg *s;

	if (w->nseg && kind != SEG_COMP) {
		s = &w->segs[w->nseg - 1];
		if (s->kind == kind && s->off + s->len == off &&
		    (kind != SEG_DATA || s->boff + s->len == boff)) {
			s->len += len;
			return 0;
		}
	}
	if (w->nseg == w->maxseg) {
		size_t m = w->maxseg ? w->maxseg * 2 : 64;
		s = realloc(w->segs, m * sizeof(*s));
		if (!s)
			return -ENOMEM;
		w->segs = s;
		w->maxseg = m;
	}
	s = &w->segs[w->nseg++];
	s->kind = kind;
	s->off = off;
	s->len = len;
	s->boff = boff;
	s->clen = clen;
	return 0;
}

/* With -B: is [off, off+len) of the new backing file equal to buf? */
static int same_as_backing(struct worker *w, uint64_t off, const uint8_t *buf,
			   size_t len, bool *same)
{
	struct blk *t = w->c->o->target;
	int ret;

	*same = false;
	if (!t->backing || !w->c->o->target_is_new)
		return 0;
	ret = blk_read_backing(t, off, w->bbuf, len);
	if (ret < 0) {
		fail(w->c, ret, "error while reading the backing file of '%s' "
		     "at byte %llu: %s", t->filename,
		     (unsigned long long)off, strerror(-ret));
		return ret;
	}
	*same = !memcmp(w->bbuf, buf, len);
	return 0;
}

/* With -B: does the new backing file read as zero over the range? */
static bool backing_is_zero(struct blk *t, uint64_t off, uint64_t len)
{
	struct blk *b = t->backing;

	while (b && len && off < b->size) {
		uint64_t n, map;
		struct bfile *mf;
		int depth, st;

		st = blk_block_status_above(b, NULL, off,
					    MIN(len, b->size - off), &n, &map,
					    &mf, &depth);
		if (st < 0 || !(st & BLK_STAT_ZERO))
			return false;
		off += n;
		len -= n;
	}
	return true;
}

static int process_data(struct worker *w, const struct chunk *ch)
{
	struct conv *c = w->c;
	const struct convert_opts *o = c->o;
	struct blk *t = o->target;
	size_t len = (size_t)ch->len, pos = 0, cpos = 0;
	int ret;

	ret = read_virtual(w, ch->off, w->buf, len);
	if (ret < 0)
		return ret;
	pthread_mutex_lock(&c->lock);
	c->st.bytes_read += len;
	pthread_mutex_unlock(&c->lock);

	if (o->compress) {
		/* whole clusters; the last one may be short (end of image) */
		for (pos = 0; pos < len; pos += (size_t)c->cluster) {
			size_t n = (size_t)MIN(c->cluster, (uint64_t)(len - pos));
			uint64_t off = ch->off + pos;
			bool same;
			long cl;

			if (buffer_is_zero(w->buf + pos, n)) {
				ret = add_seg(w, o->target_is_zero ? SEG_SKIP :
					      SEG_ZERO, off, n, 0, 0);
				if (ret < 0)
					return ret;
				continue;
			}
			if (o->target_has_backing) {
				ret = same_as_backing(w, off, w->buf + pos, n,
						      &same);
				if (ret < 0)
					return ret;
				if (same) {
					ret = add_seg(w, SEG_SKIP, off, n, 0, 0);
					if (ret < 0)
						return ret;
					continue;
				}
			}
			if (!c->precompress) {
				ret = add_seg(w, SEG_COMP, off, n, pos, 0);
				if (ret < 0)
					return ret;
				continue;
			}
			if (n < c->cluster)
				memset(w->buf + pos + n, 0,
				       (size_t)c->cluster - n);
			cl = t->drv->compress(t, w->cbuf + cpos,
					      (size_t)c->cluster - 1,
					      w->buf + pos,
					      (size_t)c->cluster);
			if (cl == -ENOSPC) {	/* does not shrink */
				ret = add_seg(w, SEG_DATA, off, n, pos, 0);
			} else if (cl == -ENOTSUP || cl == 0) {
				/* the driver compresses it itself */
				ret = add_seg(w, SEG_COMP, off, n, pos, 0);
			} else if (cl < 0) {
				fail(c, (int)cl, "error while compressing at "
				     "byte %llu: %s", (unsigned long long)off,
				     strerror((int)-cl));
				return (int)cl;
			} else {
				ret = add_seg(w, SEG_COMP, off, n, cpos,
					      (size_t)cl);
				cpos += (size_t)cl;
			}
			if (ret < 0)
				return ret;
		}
		return 0;
	}

	if (!o->min_sparse)
		return add_seg(w, SEG_DATA, ch->off, len, 0, 0);

	while (pos < len) {
		uint64_t off = ch->off + pos;
		size_t z = convert_zero_run(w->buf + pos, len - pos, off,
					    o->min_sparse);
		if (z) {
			ret = add_seg(w, o->target_is_zero ? SEG_SKIP : SEG_ZERO,
				      off, z, 0, 0);
			if (ret < 0)
				return ret;
			pos += z;
			continue;
		}
		z = convert_data_run(w->buf + pos, len - pos, off,
				     o->min_sparse);
		if (!o->target_has_backing) {
			ret = add_seg(w, SEG_DATA, off, z, pos, 0);
			if (ret < 0)
				return ret;
			pos += z;
			continue;
		}
		/* -B: compare with the backing file a cluster at a time */
		for (size_t end = pos + z; pos < end;) {
			uint64_t o2 = ch->off + pos;
			size_t n = (size_t)MIN(gran_end(o2, c->cluster) - o2,
					       (uint64_t)(end - pos));
			bool same;

			ret = same_as_backing(w, o2, w->buf + pos, n, &same);
			if (ret < 0)
				return ret;
			ret = add_seg(w, same ? SEG_SKIP : SEG_DATA, o2, n,
				      pos, 0);
			if (ret < 0)
				return ret;
			pos += n;
		}
	}
	return 0;
}

static int process(struct worker *w, const struct chunk *ch)
{
	struct conv *c = w->c;
	const struct convert_opts *o = c->o;

	w->nseg = 0;
	switch (ch->kind) {
	case CK_SKIP:
		return 0;
	case CK_ZERO:
		if (!o->min_sparse) {
			/* -S 0: zeroes are written as data */
			memset(w->buf, 0, (size_t)ch->len);
			return add_seg(w, SEG_DATA, ch->off, ch->len, 0, 0);
		}
		if (o->target_is_zero)
			return 0;
		if (o->target_has_backing && o->target_is_new &&
		    o->target->backing &&
		    backing_is_zero(o->target, ch->off, ch->len))
			return 0;
		return add_seg(w, SEG_ZERO, ch->off, ch->len, 0, 0);
	case CK_DATA:
		if (c->use_copy_range && ch->mfile)
			return 0;	/* copied at commit time */
		return process_data(w, ch);
	}
	return 0;
}

/* ---- libaio writes (raw target opened with O_DIRECT) ---- */

static int write_err(struct conv *c, int ret, uint64_t off);

/* Collects at least one completion; with aio_lock held. */
static void aio_reap_locked(struct conv *c)
{
	void *tags[64];
	long res[64];
	int n = blk_aio_reap(c->aio, 1, tags, res, 64);

	if (n < 0) {	/* cannot happen with a valid context */
		fail(c, n, "error while waiting for writes to '%s': %s",
		     c->o->target->filename, strerror(-n));
		return;
	}
	for (int i = 0; i < n; i++) {
		struct aioreq *r = tags[i];
		r->w->pending--;
		if (res[i] < 0)
			write_err(c, (int)res[i], r->off);
		free(r);
	}
}

/* Until every write from this worker's buffer has completed. */
static void aio_wait(struct worker *w)
{
	struct conv *c = w->c;

	if (!c->aio)
		return;
	pthread_mutex_lock(&c->aio_lock);
	while (w->pending > 0)
		aio_reap_locked(c);
	pthread_mutex_unlock(&c->aio_lock);
}

static int aio_write(struct worker *w, uint64_t off, uint8_t *buf,
		     size_t len)
{
	struct conv *c = w->c;
	struct aioreq *r = malloc(sizeof(*r));
	int ret;

	if (!r)
		return -ENOMEM;
	r->w = w;
	r->off = off;
	pthread_mutex_lock(&c->aio_lock);
	while ((ret = blk_aio_submit(c->aio, true, off, buf, len, r)) ==
	       -EAGAIN)
		aio_reap_locked(c);
	if (!ret)
		w->pending++;
	pthread_mutex_unlock(&c->aio_lock);
	if (ret < 0)
		free(r);
	return ret;
}

static bool aio_ok(const struct conv *c, uint64_t off, const void *buf,
		   uint64_t len)
{
	unsigned a = c->aio_align;

	if (!c->aio)
		return false;
	return IS_ALIGNED(off, a) && IS_ALIGNED(len, a) &&
	       IS_ALIGNED((uintptr_t)buf, a);
}

/* ---- committing ---- */

static void rate_wait(struct conv *c, uint64_t bytes)
{
	uint64_t rate = c->o->rate_limit, due_ns, now_ns;
	struct timespec now;

	if (!rate)
		return;
	pthread_mutex_lock(&c->lock);
	c->limited += bytes;
	due_ns = (uint64_t)((double)c->limited / (double)rate * 1e9);
	pthread_mutex_unlock(&c->lock);
	clock_gettime(CLOCK_MONOTONIC, &now);
	now_ns = (uint64_t)(now.tv_sec - c->t0.tv_sec) * 1000000000ull +
		 (uint64_t)now.tv_nsec - (uint64_t)c->t0.tv_nsec;
	if (due_ns > now_ns) {
		struct timespec d = {
			.tv_sec = (time_t)((due_ns - now_ns) / 1000000000ull),
			.tv_nsec = (long)((due_ns - now_ns) % 1000000000ull),
		};
		while (nanosleep(&d, &d) < 0 && errno == EINTR)
			;
	}
}

static int write_err(struct conv *c, int ret, uint64_t off)
{
	fail(c, ret, "error while writing at byte %llu of '%s': %s",
	     (unsigned long long)off, c->o->target->filename, strerror(-ret));
	return ret;
}

static int commit(struct worker *w, const struct chunk *ch)
{
	struct conv *c = w->c;
	struct blk *t = c->o->target;
	uint64_t wr = 0, zr = 0, comp = 0;
	int ret;

	if (ch->kind == CK_DATA && c->use_copy_range && ch->mfile) {
		rate_wait(c, ch->len);
		ret = bfile_copy_range(ch->mfile, ch->map, t->file, ch->off,
				       ch->len);
		if (ret == 0) {
			wr = ch->len;
			goto out;
		}
		/* Not possible between these files: fall back for good. */
		if (ret == -EXDEV || ret == -EINVAL || ret == -ENOSYS ||
		    ret == -EOPNOTSUPP || ret == -EBADF || ret == -ENOTSUP) {
			c->use_copy_range = false;
			ret = process_data(w, ch);
			if (ret < 0)
				return ret;
		} else {
			return write_err(c, ret, ch->off);
		}
	}
	for (size_t i = 0; i < w->nseg; i++) {
		const struct seg *s = &w->segs[i];

		if (c->stop)
			return -ECANCELED;
		switch (s->kind) {
		case SEG_SKIP:
			continue;
		case SEG_DATA:
			rate_wait(c, s->len);
			if (aio_ok(c, s->off, w->buf + s->boff, s->len))
				ret = aio_write(w, s->off, w->buf + s->boff,
						(size_t)s->len);
			else
				ret = blk_pwrite(t, s->off, w->buf + s->boff,
						 (size_t)s->len);
			wr += s->len;
			break;
		case SEG_ZERO:
			ret = blk_pwrite_zeroes(t, s->off, s->len,
						BLK_ZERO_MAY_UNMAP);
			zr += s->len;
			break;
		case SEG_COMP:
			rate_wait(c, s->len);
			if (s->clen) {
				ret = blk_write_precompressed(t, s->off,
						w->cbuf + s->boff, s->clen);
			} else {
				ret = blk_write_compressed(t, s->off,
							   w->buf + s->boff,
							   (size_t)s->len);
			}
			comp++;
			wr += s->len;
			break;
		default:
			ret = 0;
		}
		if (ret < 0)
			return write_err(c, ret, s->off);
	}
out:
	pthread_mutex_lock(&c->lock);
	c->st.bytes_written += wr;
	c->st.bytes_zeroed += zr;
	c->st.compressed_clusters += comp;
	pthread_mutex_unlock(&c->lock);
	return 0;
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct conv *c = w->c;
	const struct convert_opts *o = c->o;
	struct chunk ch;

	for (;;) {
		int r;

		pthread_mutex_lock(&c->lock);
		r = claim(c, &ch);
		pthread_mutex_unlock(&c->lock);
		if (r <= 0)
			break;
		aio_wait(w);	/* buf is free again */
		if (process(w, &ch) < 0)
			break;
		if (!o->out_of_order) {
			pthread_mutex_lock(&c->lock);
			while (c->commit_seq != ch.seq && !c->stop)
				pthread_cond_wait(&c->turn, &c->lock);
			pthread_mutex_unlock(&c->lock);
			if (c->stop)
				break;
		}
		if (commit(w, &ch) < 0)
			break;
		pthread_mutex_lock(&c->lock);
		c->done += ch.len;
		if (!o->out_of_order) {
			c->commit_seq++;
			pthread_cond_broadcast(&c->turn);
		}
		if (o->progress)
			o->progress(o->opaque, c->done, c->total);
		pthread_mutex_unlock(&c->lock);
	}
	aio_wait(w);
	return NULL;
}

int convert_run_stats(const struct convert_opts *o, struct convert_stats *st,
		      struct err *e)
{
	struct blk *t = o->target;
	struct worker w[CONVERT_MAX_WORKERS];
	struct blk_info bi;
	struct conv c;
	int nw = o->workers, started = 0, ret;
	size_t bsz;

	memset(&c, 0, sizeof(c));
	memset(w, 0, sizeof(w));
	c.o = o;
	c.e = e;
	if (nw < 1)
		nw = 1;
	if (nw > CONVERT_MAX_WORKERS)
		nw = CONVERT_MAX_WORKERS;
	c.src_start = calloc((size_t)(o->nsrc > 0 ? o->nsrc : 1),
			     sizeof(uint64_t));
	if (!c.src_start) {
		err_set(e, "%s", strerror(ENOMEM));
		return -ENOMEM;
	}
	for (int i = 0; i < o->nsrc; i++) {
		c.src_start[i] = c.total;
		c.total += o->src[i]->size;
	}
	if (c.total > t->size) {
		free(c.src_start);
		err_set(e, "output file is smaller than input file");
		return -EINVAL;
	}

	c.cluster = 0;
	if (blk_get_info(t, &bi) == 0) {
		c.cluster = bi.cluster_size;
		val_free(bi.specific);
	}
	if (!c.cluster || c.cluster > (8u << 20) ||
	    (c.cluster & (c.cluster - 1)))
		c.cluster = 65536;
	/* Chunks end on clusters of the target and on -S granules when they
	 * are powers of two; the scan handles any multiple of 512. */
	c.align = MAX(c.cluster, 4096);
	if (!o->compress && !(t->drv->caps & BLK_CAP_COMPRESS) &&
	    !bi.cluster_size)
		c.align = 4096;	/* raw and friends: no cluster to respect */
	c.chunk_max = (size_t)ALIGN_UP(CHUNK_MAX, c.align);
	/* compressing workers hold the compressed copy too: smaller chunks
	 * keep the memory bound (workers x 2 x chunk) near QEMU's */
	if (o->compress)
		c.chunk_max = (size_t)ALIGN_UP(MIN((uint64_t)c.chunk_max,
						   4 * c.cluster), c.align);
	c.precompress = o->compress && t->drv->compress &&
			t->drv->write_precompressed;
	/* the target's bytes are its file's: copy inside the kernel, or
	 * keep writes in flight when it is opened with O_DIRECT */
	c.use_copy_range = o->copy_range && !o->compress &&
			   (t->drv->caps & BLK_CAP_FILE_MAP) &&
			   !t->file->direct;
	c.aio_align = blk_aio_align(t);
	if (c.aio_align && !o->compress && blk_aio_init(&c.aio, t, 256) < 0)
		c.aio = NULL;
	bsz = c.chunk_max + (size_t)c.cluster;
	pthread_mutex_init(&c.aio_lock, NULL);
	pthread_mutex_init(&c.lock, NULL);
	pthread_cond_init(&c.turn, NULL);
	clock_gettime(CLOCK_MONOTONIC, &c.t0);

	for (int i = 0; i < nw; i++) {
		w[i].c = &c;
		w[i].buf = blk_alloc_buf(bsz);
		if (o->compress)
			w[i].cbuf = blk_alloc_buf(bsz);
		if (o->target_has_backing)
			w[i].bbuf = blk_alloc_buf((size_t)c.cluster);
		if (!w[i].buf || (o->compress && !w[i].cbuf) ||
		    (o->target_has_backing && !w[i].bbuf)) {
			fail(&c, -ENOMEM, "%s", strerror(ENOMEM));
			break;
		}
	}
	if (o->progress)
		o->progress(o->opaque, 0, c.total);
	if (!c.stop) {
		if (nw == 1) {
			worker_main(&w[0]);
		} else {
			for (int i = 0; i < nw; i++) {
				if (pthread_create(&w[i].tid, NULL, worker_main,
						   &w[i])) {
					fail(&c, -EAGAIN, "Could not start a "
					     "worker thread");
					break;
				}
				started++;
			}
			for (int i = 0; i < started; i++)
				pthread_join(w[i].tid, NULL);
		}
	}
	ret = c.ret;
	if (!ret) {
		ret = blk_flush(t);
		if (ret < 0)
			err_set(e, "error while flushing '%s': %s",
				t->filename, strerror(-ret));
	}
	for (int i = 0; i < nw; i++) {
		free(w[i].buf);
		free(w[i].cbuf);
		free(w[i].bbuf);
		free(w[i].segs);
	}
	if (st)
		*st = c.st;
	blk_aio_free(c.aio);
	pthread_mutex_destroy(&c.aio_lock);
	pthread_cond_destroy(&c.turn);
	pthread_mutex_destroy(&c.lock);
	free(c.src_start);
	return ret;
}

int convert_run(const struct convert_opts *o, struct err *e)
{
	return convert_run_stats(o, NULL, e);
}
