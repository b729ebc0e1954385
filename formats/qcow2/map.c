/* map.c - guest offsets to host clusters: the L1/L2 walk, reads,
 * writes with cluster allocation and copy-on-write, zero clusters,
 * discard, compressed clusters and block status (qcow2.txt, "Cluster
 * mapping" and "Extended L2 Entries").
 *
 * Writes keep qcow2's ordering rules: guest data is written before the L2
 * entry that points to it, a new L2 table is on disk before the L1 entry,
 * and the references to a cluster are gone before its refcount drops. */
//format:PART(qcow2)

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "qcow2.h"

static uint64_t l2e(const struct qcow2 *s, const uint8_t *t, unsigned i)
{
	return ld_be64(t + (size_t)i * s->l2_esize);
}

static uint64_t l2bm(const struct qcow2 *s, const uint8_t *t, unsigned i)
{
	return s->ext_l2 ? ld_be64(t + (size_t)i * 16 + 8) : 0;
}

static void l2_set(const struct qcow2 *s, uint8_t *t, unsigned i,
		   uint64_t e, uint64_t bm)
{
	st_be64(t + (size_t)i * s->l2_esize, e);
	if (s->ext_l2)
		st_be64(t + (size_t)i * 16 + 8, bm);
}

void qcow2_compressed_range(const struct qcow2 *s, uint64_t desc,
			    uint64_t *off, uint64_t *len)
{
	unsigned x = 62 - (s->cluster_bits - 8);
	uint64_t nsec;

	desc &= ~(QCOW2_OFLAG_COPIED | QCOW2_OFLAG_COMPRESSED);
	*off = desc & ((1ULL << x) - 1);
	nsec = desc >> x;
	*len = (nsec + 1) * 512 - (*off & 511);
}

static int corrupt(struct blk *bs, const char *what, uint64_t v)
{
	return qcow2_set_errmsg(bs, -EIO, "Image is corrupt: %s %#llx", what,
				(unsigned long long)v);
}

static int write_l1_entry(struct blk *bs, uint64_t i)
{
	struct qcow2 *s = qcow2_state(bs);
	uint8_t b[8];

	st_be64(b, s->l1[i]);
	return bfile_pwrite(bs->file, s->l1_offset + i * 8, b, 8);
}

int qcow2_l2_get(struct blk *bs, uint64_t off, bool alloc, uint8_t **tbl,
		 unsigned *idx)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t cs = s->cluster_size;
	uint64_t l1i = off >> (s->cluster_bits + s->l2_bits);
	uint64_t l1e, l2off;
	int64_t noff;
	uint8_t *old = NULL, *t;
	int ret;

	*tbl = NULL;
	*idx = (unsigned)((off >> s->cluster_bits) &
			  ((1ULL << s->l2_bits) - 1));
	if (l1i >= s->l1_size) {
		if (!alloc)
			return 0;
		return qcow2_set_errmsg(bs, -EIO, "Offset beyond the L1 "
					"table");
	}
	l1e = s->l1[l1i];
	l2off = l1e & QCOW2_OFFSET_MASK;
	if (l2off & (cs - 1))
		return corrupt(bs, "L2 table offset unaligned", l2off);
	if (!alloc || (l2off && (l1e & QCOW2_OFLAG_COPIED))) {
		if (!l2off)
			return 0;
		return qcow2_cache_get(bs, &s->l2c, l2off, false, tbl);
	}
	/* A new table, or a private copy of a shared one. */
	if (l2off) {
		ret = qcow2_cache_get(bs, &s->l2c, l2off, false, &t);
		if (ret < 0)
			return ret;
		old = malloc(cs);
		if (!old)
			return -ENOMEM;
		memcpy(old, t, cs);
	}
	noff = qcow2_alloc_clusters(bs, 1);
	if (noff < 0) {
		free(old);
		return (int)noff;
	}
	ret = qcow2_cache_get(bs, &s->l2c, (uint64_t)noff, true, &t);
	if (ret < 0)
		goto out;
	if (old) {
		memcpy(t, old, cs);
		/* entries shared with the old table are not ours alone */
		for (unsigned i = 0; i < (1u << s->l2_bits); i++) {
			uint64_t e = l2e(s, t, i) & ~QCOW2_OFLAG_COPIED;
			st_be64(t + (size_t)i * s->l2_esize, e);
		}
	}
	ret = bfile_pwrite(bs->file, (uint64_t)noff, t, cs);
	if (ret < 0)
		goto out;
	ret = qcow2_cache_flush(bs, &s->rbc);
	if (ret < 0)
		goto out;
	s->l1[l1i] = (uint64_t)noff | QCOW2_OFLAG_COPIED;
	ret = write_l1_entry(bs, l1i);
	if (ret < 0)
		goto out;
	if (l2off)
		qcow2_free_clusters(bs, l2off, cs);
	ret = qcow2_cache_get(bs, &s->l2c, (uint64_t)noff, false, tbl);
out:
	free(old);
	return ret;
}

/* Type and host offset of the unit (cluster, or subcluster sc) of one L2
 * entry. */
static int unit_type(struct blk *bs, uint64_t e, uint64_t bm, unsigned sc,
		     enum qcow2_type *t, uint64_t *h)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t hoff = e & QCOW2_OFFSET_MASK;

	*h = 0;
	if (e & QCOW2_OFLAG_COMPRESSED) {
		*t = QC_COMPRESSED;
		*h = e;
		return 0;
	}
	if (hoff & (s->cluster_size - 1))
		return corrupt(bs, "cluster offset unaligned", hoff);
	if (!s->ext_l2) {
		if (s->version >= 3 && (e & QCOW2_OFLAG_ZERO))
			*t = hoff ? QC_ZERO_ALLOC : QC_ZERO;
		else
			*t = hoff ? QC_NORMAL : QC_UNALLOC;
		*h = hoff;
		return 0;
	}
	if ((bm >> sc) & (bm >> (32 + sc)) & 1)
		return corrupt(bs, "subcluster both allocated and zero", e);
	if ((bm >> sc) & 1) {
		if (!hoff)
			return corrupt(bs, "allocated subcluster without host "
				       "cluster", e);
		*t = QC_NORMAL;
		*h = hoff + ((uint64_t)sc << s->sc_bits);
	} else if ((bm >> (32 + sc)) & 1) {
		*t = hoff ? QC_ZERO_ALLOC : QC_ZERO;
		*h = hoff ? hoff + ((uint64_t)sc << s->sc_bits) : 0;
	} else if (hoff) {
		*t = QC_UNALLOC_ALLOC;
		*h = hoff + ((uint64_t)sc << s->sc_bits);
	} else {
		*t = QC_UNALLOC;
	}
	return 0;
}

int qcow2_map(struct blk *bs, uint64_t off, uint64_t len, uint64_t *pnum,
	      uint64_t *host, enum qcow2_type *type)
{
	struct qcow2 *s = qcow2_state(bs);
	unsigned ubits = s->ext_l2 ? s->sc_bits : s->cluster_bits;
	uint64_t unit = 1ULL << ubits, span = 1ULL << (s->cluster_bits +
						       s->l2_bits);
	uint64_t end = MIN(off + len, ALIGN_DOWN(off, span) + span);
	uint64_t pos, h0 = 0;
	enum qcow2_type t0 = QC_UNALLOC;
	uint8_t *tbl;
	unsigned idx;
	int ret;

	ret = qcow2_l2_get(bs, off, false, &tbl, &idx);
	if (ret < 0)
		return ret;
	*host = 0;
	if (!tbl) {
		*type = QC_UNALLOC;
		*pnum = end - off;
		return 0;
	}
	for (pos = ALIGN_DOWN(off, unit); pos < end; pos += unit) {
		unsigned i = (unsigned)((pos >> s->cluster_bits) &
					((1ULL << s->l2_bits) - 1));
		unsigned sc = (unsigned)((pos >> ubits) &
					 ((1u << (s->cluster_bits - ubits)) -
					  1));
		enum qcow2_type t = QC_UNALLOC;
		uint64_t h;

		ret = unit_type(bs, l2e(s, tbl, i), l2bm(s, tbl, i), sc, &t,
				&h);
		if (ret < 0)
			return ret;
		if (pos == ALIGN_DOWN(off, unit)) {
			t0 = t;
			h0 = h;
		} else if (t != t0 || t == QC_COMPRESSED ||
			   ((t == QC_NORMAL || t == QC_ZERO_ALLOC ||
			     t == QC_UNALLOC_ALLOC) &&
			    h != h0 + (pos - ALIGN_DOWN(off, unit)))) {
			break;
		}
		if (t == QC_COMPRESSED) {
			pos = ALIGN_DOWN(pos, s->cluster_size) +
			      s->cluster_size;
			break;
		}
	}
	*type = t0;
	*pnum = MIN(pos, end) - off;
	if (t0 == QC_NORMAL || t0 == QC_ZERO_ALLOC || t0 == QC_UNALLOC_ALLOC)
		*host = h0 + (off & (unit - 1));
	else if (t0 == QC_COMPRESSED)
		*host = h0;
	return 0;
}

/* Buffers of the reading thread: the compressed bytes of one cluster, and
 * a whole inflated cluster when a read wants only part of it. Per thread
 * and kept, because allocating them per read costs more than it seems:
 * musl gives such blocks back to the kernel at once, and every munmap
 * shoots down the TLBs of all the process's CPUs. */
struct zbufs {
	uint8_t *in, *out;
	size_t incap, outcap;	/* bytes at in, out */
};

static pthread_key_t zb_key;
static bool zb_key_ok;
static pthread_once_t zb_once = PTHREAD_ONCE_INIT;

static void zb_free(void *p)
{
	struct zbufs *z = p;

	free(z->in);
	free(z->out);
	free(z);
}

static void zb_key_init(void)
{
	zb_key_ok = pthread_key_create(&zb_key, zb_free) == 0;
}

/* NULL: no memory. Without a thread slot, a caller-owned one (*own). */
static struct zbufs *zbufs_get(bool *own)
{
	struct zbufs *z;

	pthread_once(&zb_once, zb_key_init);
	*own = false;
	z = zb_key_ok ? pthread_getspecific(zb_key) : NULL;
	if (z)
		return z;
	z = calloc(1, sizeof(*z));
	if (z && (!zb_key_ok || pthread_setspecific(zb_key, z)))
		*own = true;
	return z;
}

static int zbuf_grow(uint8_t **p, size_t *cap, size_t need)
{
	if (need <= *cap)
		return 0;
	free(*p);
	*cap = 0;
	if (!(*p = malloc(need)))
		return -ENOMEM;
	*cap = need;
	return 0;
}

/* Inflates compressed cluster desc into out (a whole cluster), without
 * the lock: the descriptor was copied out of the L2 table under it. */
static int inflate_cluster(struct blk *bs, uint64_t desc, struct zbufs *z,
			   uint8_t *out)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t coff, clen;
	int ret;

	if (s->compression_type != 0)
		return qcow2_set_errmsg(bs, -ENOTSUP, "Compression type "
					"'zstd' is not supported in this "
					"build");
	qcow2_compressed_range(s, desc, &coff, &clen);
	if (clen > s->cluster_size * 2 + 512)
		return corrupt(bs, "compressed cluster too large", desc);
	ret = zbuf_grow(&z->in, &z->incap, clen);
	if (ret < 0)
		return ret;
	ret = bfile_pread(bs->file, coff, z->in, clen);
	if (ret < 0)
		return ret;
	ret = qcow2_inflate(z->in, clen, out, s->cluster_size);
	if (ret < 0)
		return corrupt(bs, "compressed cluster does not inflate",
			       desc);
	return 0;
}

/* n bytes at guest offset off of compressed cluster desc. A whole cluster
 * is inflated straight into buf; a part goes through the one-cluster cache
 * (s->zc_*), so that small reads of one cluster inflate it once. gen is
 * s->zc_gen when desc was mapped: if a cluster was freed since, desc may
 * name other data by now, and the result is not cached. */
static int read_compressed(struct blk *bs, uint64_t desc, uint64_t gen,
			   uint64_t off, uint8_t *buf, size_t n,
			   struct zbufs *z)
{
	struct qcow2 *s = qcow2_state(bs);
	size_t in = (size_t)(off & (s->cluster_size - 1));
	int ret;

	if (n == s->cluster_size)
		return inflate_cluster(bs, desc, z, buf);
	qcow2_lock(bs);
	if (s->zc_buf && s->zc_desc == desc) {
		memcpy(buf, s->zc_buf + in, n);
		qcow2_unlock(bs);
		return 0;
	}
	qcow2_unlock(bs);
	ret = zbuf_grow(&z->out, &z->outcap, s->cluster_size);
	if (ret < 0)
		return ret;
	ret = inflate_cluster(bs, desc, z, z->out);
	if (ret < 0)
		return ret;
	memcpy(buf, z->out + in, n);
	qcow2_lock(bs);
	if (!s->zc_buf)
		s->zc_buf = malloc(s->cluster_size);
	if (s->zc_buf && s->zc_gen == gen) {
		memcpy(s->zc_buf, z->out, s->cluster_size);
		s->zc_desc = desc;
	}
	qcow2_unlock(bs);
	return 0;
}

/* The lock is held only while mapping (qcow2.h, struct qcow2). */
int qcow2_pread(struct blk *bs, uint64_t off, void *buf, size_t len)
{
	struct qcow2 *s = qcow2_state(bs);
	struct zbufs *z = NULL;
	uint8_t *p = buf;
	bool own = false;
	int ret = 0;

	/* info works on encrypted images; their data cannot be read */
	if (s->crypt_method)
		return qcow2_set_errmsg(bs, -ENOTSUP, "Encrypted images are "
					"not supported in this build");

	while (len) {
		uint64_t n, h, gen;
		enum qcow2_type t;

		qcow2_lock(bs);
		ret = qcow2_map(bs, off, len, &n, &h, &t);
		gen = s->zc_gen;
		qcow2_unlock(bs);
		if (ret < 0)
			goto out;
		switch (t) {
		case QC_UNALLOC:
		case QC_UNALLOC_ALLOC:
			ret = blk_read_backing(bs, off, p, (size_t)n);
			break;
		case QC_ZERO:
		case QC_ZERO_ALLOC:
			memset(p, 0, (size_t)n);
			break;
		case QC_NORMAL:
			ret = bfile_pread(bs->file, h, p, (size_t)n);
			break;
		case QC_COMPRESSED:
			if (!z && !(z = zbufs_get(&own))) {
				ret = -ENOMEM;
				break;
			}
			ret = read_compressed(bs, h, gen, off, p, (size_t)n,
					      z);
			break;
		}
		if (ret < 0)
			goto out;
		p += n;
		off += n;
		len -= (size_t)n;
	}
out:
	if (own)
		zb_free(z);
	return ret;
}

/* Was the image preallocated with metadata only, i.e. do far more
 * clusters have references than the file has blocks? Then data clusters
 * may be holes in the file, and block status asks the file (as QEMU
 * does, with the same threshold). */
static bool meta_preallocated(struct blk *bs)
{
	struct qcow2 *s = qcow2_state(bs);
	int64_t len = bfile_size(bs->file), alloc = bfile_allocated(bs->file);
	uint64_t real, n, used = 0, rc, thr;

	if (s->meta_prealloc)
		return s->meta_prealloc == 2;
	s->meta_prealloc = 1;
	if (len < 0 || alloc < 0)
		return false;
	real = (uint64_t)alloc >> s->cluster_bits;
	thr = MAX(real * 10 / 9, real + 2);
	n = DIV_ROUND_UP((uint64_t)len, s->cluster_size);
	for (uint64_t c = 0; c < n && used < thr; c++) {
		if (qcow2_rc_get(bs, c, &rc) < 0)
			return false;
		if (rc)
			used++;
	}
	if (used >= thr)
		s->meta_prealloc = 2;
	return s->meta_prealloc == 2;
}

static int block_status_locked(struct blk *bs, uint64_t off, uint64_t len,
			       uint64_t *pnum, uint64_t *map,
			       struct bfile **mfile)
{
	uint64_t done = 0, h0 = 0;
	int st0 = -1;

	if (qcow2_state(bs)->crypt_method)
		return qcow2_set_errmsg(bs, -ENOTSUP, "Encrypted images are "
					"not supported in this build");

	while (done < len) {
		uint64_t n, h;
		enum qcow2_type t;
		int st, ret;

		ret = qcow2_map(bs, off + done, len - done, &n, &h, &t);
		if (ret < 0)
			return ret;
		switch (t) {
		case QC_UNALLOC: st = 0; break;
		case QC_UNALLOC_ALLOC:
			/* not this layer's, but the host cluster is there */
			st = BLK_STAT_OFFSET;
			break;
		case QC_ZERO: st = BLK_STAT_ZERO | BLK_STAT_ALLOCATED; break;
		case QC_ZERO_ALLOC:
			st = BLK_STAT_ZERO | BLK_STAT_ALLOCATED |
			     BLK_STAT_OFFSET;
			break;
		case QC_NORMAL:
			st = BLK_STAT_DATA | BLK_STAT_ALLOCATED |
			     BLK_STAT_OFFSET;
			break;
		default:
			st = BLK_STAT_DATA | BLK_STAT_ALLOCATED |
			     BLK_STAT_COMPRESSED;
			break;
		}
		if (st0 < 0) {
			st0 = st;
			h0 = h;
		} else if (st != st0 || ((st & BLK_STAT_OFFSET) &&
					 h != h0 + done)) {
			break;
		}
		done += n;
	}
	if (st0 & BLK_STAT_DATA && st0 & BLK_STAT_OFFSET &&
	    meta_preallocated(bs)) {
		/* data clusters that are holes in the file read as zero */
		uint64_t fn;
		int fst = bfile_block_status(bs->file, h0, done, &fn);

		if (fst & BLK_STAT_ZERO)
			st0 |= BLK_STAT_ZERO;
		if (fst >= 0 && fn > 0 && fn < done)
			done = fn;
	}
	*pnum = done;
	*map = (st0 & BLK_STAT_OFFSET) ? h0 : 0;
	*mfile = (st0 & BLK_STAT_OFFSET) ? bs->file : NULL;
	return st0;
}

int qcow2_block_status(struct blk *bs, uint64_t off, uint64_t len,
		       uint64_t *pnum, uint64_t *map, struct bfile **mfile)
{
	int ret;

	qcow2_lock(bs);
	ret = block_status_locked(bs, off, len, pnum, map, mfile);
	qcow2_unlock(bs);
	return ret;
}

/* ---- writes ---- */

static bool in_place(const struct qcow2 *s, uint64_t e)
{
	if (e & QCOW2_OFLAG_COMPRESSED)
		return false;
	if (!(e & QCOW2_OFLAG_COPIED) || !(e & QCOW2_OFFSET_MASK))
		return false;
	return s->ext_l2 || s->version < 3 || !(e & QCOW2_OFLAG_ZERO);
}

/* Drop the references the old entries held, once no L2 table on disk
 * points to their clusters any more. */
static int free_old(struct blk *bs, const uint64_t *old, unsigned n)
{
	struct qcow2 *s = qcow2_state(bs);
	bool any = false;
	int ret;

	for (unsigned i = 0; i < n; i++)
		if (old[i] & (QCOW2_OFFSET_MASK | QCOW2_OFLAG_COMPRESSED))
			any = true;
	if (!any)
		return 0;
	ret = qcow2_cache_flush(bs, &s->l2c);
	if (ret < 0)
		return ret;
	for (unsigned i = 0; i < n; i++)
		if (old[i] & QCOW2_OFLAG_COMPRESSED ||
		    (old[i] & QCOW2_OFFSET_MASK))
			qcow2_free_l2_entry(bs, old[i]);
	return 0;
}

/* A data cluster an L2 entry claims that is really the header, the L1
 * table or the refcount table (hostile or damaged image): writing there
 * would destroy the image. */
static bool overlaps_metadata(const struct qcow2 *s, uint64_t h)
{
	uint64_t cs = s->cluster_size;
	uint64_t l1e = s->l1_offset + ALIGN_UP((uint64_t)s->l1_size * 8, cs);
	uint64_t rte = s->rt_offset +
		       ((uint64_t)s->rt_clusters << s->cluster_bits);

	return h < cs || (h >= s->l1_offset && h < l1e) ||
	       (h >= s->rt_offset && h < rte);
}

static int write_in_place(struct blk *bs, uint64_t pos, const uint8_t *buf,
			  uint64_t n)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t cs = s->cluster_size, gc = ALIGN_DOWN(pos, cs);
	uint64_t a = pos - gc, b = a + n, A, B, unit, e, bm, mask, nbm, h;
	unsigned idx, sc0, sc1;
	uint8_t *tbl, *tmp;
	int ret;

	ret = qcow2_l2_get(bs, pos, true, &tbl, &idx);
	if (ret < 0)
		return ret;
	e = l2e(s, tbl, idx);
	h = e & QCOW2_OFFSET_MASK;
	if (overlaps_metadata(s, h))
		return corrupt(bs, "data cluster overlaps metadata", h);
	if (!s->ext_l2)
		return bfile_pwrite(bs->file, h + a, buf, n);
	bm = l2bm(s, tbl, idx);
	unit = 1ULL << s->sc_bits;
	A = ALIGN_DOWN(a, unit);
	B = ALIGN_UP(b, unit);
	sc0 = (unsigned)(A >> s->sc_bits);
	sc1 = (unsigned)(B >> s->sc_bits);
	mask = (sc1 - sc0 == 32 ? 0xffffffffULL :
		((1ULL << (sc1 - sc0)) - 1)) << sc0;
	if ((a != A && !((bm >> sc0) & 1)) ||
	    (b != B && !((bm >> (sc1 - 1)) & 1))) {
		tmp = malloc(B - A);
		if (!tmp)
			return -ENOMEM;
		ret = qcow2_pread(bs, gc + A, tmp, B - A);
		if (!ret) {
			memcpy(tmp + (a - A), buf, n);
			ret = bfile_pwrite(bs->file, h + A, tmp, B - A);
		}
		free(tmp);
	} else {
		ret = bfile_pwrite(bs->file, h + a, buf, n);
	}
	if (ret < 0)
		return ret;
	nbm = (bm | mask) & ~(mask << 32);
	if (nbm == bm)
		return 0;
	ret = qcow2_l2_get(bs, pos, true, &tbl, &idx);
	if (ret < 0)
		return ret;
	l2_set(s, tbl, idx, e, nbm);
	qcow2_cache_dirty(&s->l2c, tbl);
	return 0;
}

/* k clusters of one L2 table that all need new host clusters: one
 * contiguous allocation, partial first/last clusters completed from the
 * current content (backing file, zeroes or the old cluster). */
static int write_alloc_run(struct blk *bs, uint64_t pos, const uint8_t *buf,
			   uint64_t n, unsigned k)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t cs = s->cluster_size, gc0 = ALIGN_DOWN(pos, cs);
	uint64_t end = pos + n, gcl = gc0 + (uint64_t)(k - 1) * cs;
	uint8_t *hb = NULL, *tb = NULL, *tbl;
	uint64_t *old = NULL;
	unsigned d0, d1, idx;
	int64_t host;
	int ret = -ENOMEM;

	if (pos != gc0 || (k == 1 && end < gc0 + cs)) {
		hb = blk_alloc_buf(cs);
		if (!hb)
			goto out;
		ret = qcow2_pread(bs, gc0, hb, cs);
		if (ret < 0)
			goto out;
		memcpy(hb + (pos - gc0), buf, MIN(n, gc0 + cs - pos));
	}
	if (k > 1 && end < gcl + cs) {
		tb = blk_alloc_buf(cs);
		if (!tb)
			goto out;
		ret = qcow2_pread(bs, gcl, tb, cs);
		if (ret < 0)
			goto out;
		memcpy(tb, buf + (gcl - pos), end - gcl);
	}
	old = calloc(k, 8);
	if (!old)
		goto out;
	host = qcow2_alloc_clusters(bs, k);
	if (host < 0) {
		ret = (int)host;
		goto out;
	}
	d0 = hb ? 1 : 0;
	d1 = tb ? k - 1 : k;
	if (hb && (ret = bfile_pwrite(bs->file, (uint64_t)host, hb, cs)) < 0)
		goto out;
	if (d1 > d0) {
		ret = bfile_pwrite(bs->file, (uint64_t)host + d0 * cs,
				   buf + (gc0 + d0 * cs - pos),
				   (uint64_t)(d1 - d0) * cs);
		if (ret < 0)
			goto out;
	}
	if (tb && (ret = bfile_pwrite(bs->file, (uint64_t)host +
				      (uint64_t)(k - 1) * cs, tb, cs)) < 0)
		goto out;
	ret = qcow2_l2_get(bs, pos, true, &tbl, &idx);
	if (ret < 0)
		goto out;
	for (unsigned i = 0; i < k; i++) {
		old[i] = l2e(s, tbl, idx + i);
		l2_set(s, tbl, idx + i, ((uint64_t)host + i * cs) |
		       QCOW2_OFLAG_COPIED, 0xffffffffULL);
	}
	qcow2_cache_dirty(&s->l2c, tbl);
	ret = free_old(bs, old, k);
out:
	free(hb);
	free(tb);
	free(old);
	return ret;
}

int qcow2_pwrite(struct blk *bs, uint64_t off, const void *buf, size_t len)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t cs = s->cluster_size, span = cs << s->l2_bits;
	const uint8_t *p = buf;
	int ret;

	if (s->read_only)
		return -EACCES;
	while (len) {
		uint64_t tend = ALIGN_DOWN(off, span) + span;
		uint64_t n = MIN((uint64_t)len, tend - off), pos = off;
		uint8_t *tbl;
		unsigned idx;

		while (pos < off + n) {
			uint64_t gc = ALIGN_DOWN(pos, cs), m;
			unsigned k = 1;

			ret = qcow2_l2_get(bs, pos, true, &tbl, &idx);
			if (ret < 0)
				return ret;
			if (in_place(s, l2e(s, tbl, idx))) {
				m = MIN(off + n, gc + cs) - pos;
				ret = write_in_place(bs, pos, p + (pos - off),
						     m);
			} else {
				while (gc + (uint64_t)k * cs < off + n &&
				       !in_place(s, l2e(s, tbl, idx + k)))
					k++;
				m = MIN(off + n, gc + (uint64_t)k * cs) - pos;
				ret = write_alloc_run(bs, pos, p + (pos - off),
						      m, k);
			}
			if (ret < 0)
				return ret;
			pos += m;
		}
		p += n;
		off += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Whole units of [off, off+len) become zero (zero = true) or are
 * discarded. Partial units are left to the caller. */
static int zero_units(struct blk *bs, uint64_t off, uint64_t len, bool zero)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t cs = s->cluster_size, end = off + len;
	uint64_t span = cs << s->l2_bits;
	bool has_backing = bs->backing_file && bs->backing_file[0];
	bool unalloc = !zero && !has_backing;	/* discard to unallocated */
	unsigned nold = 0, maxold = 1u << s->l2_bits;
	uint64_t *olds = malloc((size_t)maxold * 8), tspan = UINT64_MAX;
	int ret = 0;

	if (!olds)
		return -ENOMEM;
	while (off < end) {
		uint64_t gc = ALIGN_DOWN(off, cs), ce = MIN(end, gc + cs);
		uint64_t e, bm, ne, nbm;
		uint8_t *tbl;
		unsigned idx;

		/* references dropped once per L2 table, not per cluster */
		if (ALIGN_DOWN(off, span) != tspan || nold == maxold) {
			ret = free_old(bs, olds, nold);
			if (ret < 0)
				goto out;
			nold = 0;
			tspan = ALIGN_DOWN(off, span);
		}
		ret = qcow2_l2_get(bs, off, !unalloc, &tbl, &idx);
		if (ret < 0)
			goto out;
		if (!tbl) {	/* nothing mapped there to discard */
			off = MIN(end, ALIGN_DOWN(off, span) + span);
			continue;
		}
		e = l2e(s, tbl, idx);
		bm = l2bm(s, tbl, idx);
		if (!s->ext_l2 || (off == gc && ce == gc + cs)) {
			/* whole cluster */
			ne = !unalloc && s->version >= 3 && !s->ext_l2 ?
			     QCOW2_OFLAG_ZERO : 0;
			nbm = !unalloc && s->ext_l2 ? 0xffffffff00000000ULL : 0;
			if (e & (QCOW2_OFFSET_MASK | QCOW2_OFLAG_COMPRESSED))
				olds[nold++] = e;
		} else {
			unsigned sc0 = (unsigned)((off - gc) >> s->sc_bits);
			unsigned sc1 = (unsigned)((ce - gc) >> s->sc_bits);
			uint64_t mask = ((1ULL << (sc1 - sc0)) - 1) << sc0;

			if (e & QCOW2_OFLAG_COMPRESSED) {
				ret = -ENOTSUP;
				goto out;
			}
			ne = e;
			nbm = bm & ~mask;
			if (!unalloc)
				nbm |= mask << 32;
		}
		if (ne != e || nbm != bm) {
			if (s->l1[off >> (s->cluster_bits + s->l2_bits)] &
			    QCOW2_OFLAG_COPIED) {
				l2_set(s, tbl, idx, ne, nbm);
				qcow2_cache_dirty(&s->l2c, tbl);
			} else {
				/* a shared table (snapshot): make it ours */
				ret = qcow2_l2_get(bs, off, true, &tbl, &idx);
				if (ret < 0)
					goto out;
				l2_set(s, tbl, idx, ne, nbm);
				qcow2_cache_dirty(&s->l2c, tbl);
			}
		}
		off = ce;
	}
	ret = free_old(bs, olds, nold);
out:
	free(olds);
	return ret;
}

int qcow2_pwrite_zeroes(struct blk *bs, uint64_t off, uint64_t len,
			unsigned flags)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t unit = s->ext_l2 ? 1ULL << s->sc_bits : s->cluster_size;
	uint64_t a = ALIGN_UP(off, unit), b = ALIGN_DOWN(off + len, unit);
	uint64_t size_end = ALIGN_UP(bs->size, unit);
	int ret;

	(void)flags;
	if (s->read_only)
		return -EACCES;
	if (s->version < 3)
		return -ENOTSUP;
	/* the tail unit past the end of the image counts as whole */
	if (off + len == bs->size)
		b = size_end;
	if (a >= b)
		return -ENOTSUP;
	if (a > off || b < off + len) {
		/* partial units through ordinary writes */
		uint8_t *z = calloc(1, (size_t)unit);
		if (!z)
			return -ENOMEM;
		ret = 0;
		if (a > off)
			ret = qcow2_pwrite(bs, off, z, (size_t)(a - off));
		if (!ret && b < off + len)
			ret = qcow2_pwrite(bs, b, z, (size_t)(off + len - b));
		free(z);
		if (ret < 0)
			return ret;
	}
	ret = zero_units(bs, a, b - a, true);
	if (ret == -ENOTSUP) {
		/* a compressed cluster cannot be zeroed in part */
		uint8_t *z = calloc(1, (size_t)unit);
		if (!z)
			return -ENOMEM;
		ret = 0;
		for (uint64_t p = a; p < b && !ret; p += unit)
			ret = qcow2_pwrite(bs, p, z, (size_t)unit);
		free(z);
	}
	return ret;
}

int qcow2_discard(struct blk *bs, uint64_t off, uint64_t len)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t cs = s->cluster_size;
	uint64_t a = ALIGN_UP(off, cs), b = ALIGN_DOWN(off + len, cs);
	int ret;

	if (s->read_only)
		return -EACCES;
	if (off + len == bs->size)
		b = ALIGN_UP(bs->size, cs);
	if (a >= b)
		return 0;
	ret = zero_units(bs, a, b - a, false);
	return ret == -ENOTSUP ? 0 : ret;	/* discard is advisory */
}

int qcow2_write_compressed(struct blk *bs, uint64_t off, const void *buf,
			   size_t len)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t cs = s->cluster_size;
	uint8_t *in = NULL, *out = NULL;
	const uint8_t *p = buf;
	int ret = 0;

	if (s->read_only)
		return -EACCES;
	if (off & (cs - 1))
		return -EINVAL;
	if (s->compression_type != 0)
		return qcow2_set_errmsg(bs, -ENOTSUP, "Compression type "
					"'zstd' is not supported in this "
					"build");
	in = malloc(cs);
	out = malloc(cs);
	if (!in || !out) {
		ret = -ENOMEM;
		goto out;
	}
	while (len) {
		size_t n = (size_t)MIN((uint64_t)len, cs);
		long clen;

		if (n < cs && off + n != bs->size) {
			ret = -EINVAL;
			goto out;
		}
		memcpy(in, p, n);
		memset(in + n, 0, cs - n);
		clen = qcow2_deflate(in, cs, out, cs - 1);
		if (clen < 0) {
			/* does not shrink: store it as it is */
			ret = qcow2_pwrite(bs, off, p, n);
			if (ret < 0)
				goto out;
			goto next;
		}
		ret = qcow2_write_precompressed(bs, off, out, (size_t)clen);
		if (ret < 0)
			goto out;
next:
		off += n;
		p += n;
		len -= n;
	}
out:
	free(in);
	free(out);
	return ret;
}

/* The second half of qcow2_write_compressed for img-convert, which
 * compresses in its workers (qcow2_compress_cluster, without bs->lock) and
 * commits in order (blk_driver.h: compress / write_precompressed). */
int qcow2_write_precompressed(struct blk *bs, uint64_t off, const void *cbuf,
			      size_t clen)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t cs = s->cluster_size, e, nsec, old;
	unsigned idx, x = 62 - (s->cluster_bits - 8);
	uint8_t *tbl;
	int64_t h;
	int ret;

	if (s->read_only)
		return -EACCES;
	if ((off & (cs - 1)) || !clen || clen >= cs ||
	    s->compression_type != 0)
		return -EINVAL;
	ret = qcow2_l2_get(bs, off, true, &tbl, &idx);
	if (ret < 0)
		return ret;
	h = qcow2_alloc_bytes(bs, (uint64_t)clen);
	if (h < 0)
		return (int)h;
	ret = bfile_pwrite(bs->file, (uint64_t)h, cbuf, clen);
	if (ret < 0)
		return ret;
	nsec = (((uint64_t)h + (uint64_t)clen - 1) >> 9) - ((uint64_t)h >> 9);
	e = (uint64_t)h | nsec << x | QCOW2_OFLAG_COMPRESSED;
	/* the allocation may have evicted the L2 table: look it up again */
	ret = qcow2_l2_get(bs, off, true, &tbl, &idx);
	if (ret < 0)
		return ret;
	old = l2e(s, tbl, idx);
	l2_set(s, tbl, idx, e, 0);
	qcow2_cache_dirty(&s->l2c, tbl);
	return free_old(bs, &old, 1);
}
