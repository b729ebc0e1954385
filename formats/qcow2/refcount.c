/* refcount.c - the metadata cache, reference counts and cluster
 * allocation (qcow2.txt, "Host cluster management").
 *
 * Ordering for crash safety: a refcount block reaches the disk before the
 * table entry that points to it, refcount blocks reach the disk before
 * the L2 tables that reference their clusters (qcow2_cache_flush_all and
 * the eviction path), and a grown refcount table is written completely
 * before the header points to it. */
//format:PART(qcow2)

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "qcow2.h"

/* ---- cache ---- */

int qcow2_cache_init(struct qcow2_cache *c, int n, size_t csize)
{
	c->e = calloc((size_t)n, sizeof(*c->e));
	if (!c->e)
		return -ENOMEM;
	c->n = n;
	c->csize = csize;
	c->tick = 0;
	return 0;
}

void qcow2_cache_free(struct qcow2_cache *c)
{
	for (int i = 0; i < c->n; i++)
		free(c->e[i].data);
	free(c->e);
	c->e = NULL;
	c->n = 0;
}

static int cache_writeback(struct blk *bs, struct qcow2_cache *c,
			   struct qcow2_cache_ent *ent)
{
	struct qcow2 *s = qcow2_state(bs);
	int ret;

	if (!ent->dirty)
		return 0;
	/* L2 entries may point at clusters whose refcounts are still only in
	 * the cache: those go first. */
	if (c == &s->l2c) {
		ret = qcow2_cache_flush(bs, &s->rbc);
		if (ret < 0)
			return ret;
	}
	ret = bfile_pwrite(bs->file, ent->off, ent->data, c->csize);
	if (ret < 0)
		return ret;
	ent->dirty = false;
	return 0;
}

int qcow2_cache_get(struct blk *bs, struct qcow2_cache *c, uint64_t off,
		    bool fresh, uint8_t **data)
{
	struct qcow2_cache_ent *victim = NULL;
	int ret;

	for (int i = 0; i < c->n; i++) {
		struct qcow2_cache_ent *ent = &c->e[i];
		if (ent->off == off && ent->data) {
			ent->lru = ++c->tick;
			if (fresh)
				memset(ent->data, 0, c->csize);
			*data = ent->data;
			return 0;
		}
		if (!victim || (victim->data && (!ent->data ||
					ent->lru < victim->lru)))
			victim = ent;
	}
	if (!victim->data) {
		victim->data = blk_alloc_buf(c->csize);
		if (!victim->data)
			return -ENOMEM;
	} else {
		ret = cache_writeback(bs, c, victim);
		if (ret < 0)
			return ret;
	}
	victim->off = 0;
	if (fresh) {
		memset(victim->data, 0, c->csize);
	} else {
		ret = bfile_pread(bs->file, off, victim->data, c->csize);
		if (ret < 0)
			return ret;
	}
	victim->off = off;
	victim->dirty = false;
	victim->lru = ++c->tick;
	*data = victim->data;
	return 0;
}

void qcow2_cache_dirty(struct qcow2_cache *c, uint8_t *data)
{
	for (int i = 0; i < c->n; i++)
		if (c->e[i].data == data) {
			c->e[i].dirty = true;
			return;
		}
}

int qcow2_cache_flush(struct blk *bs, struct qcow2_cache *c)
{
	struct qcow2 *s = qcow2_state(bs);
	bool wrote = false;
	int ret;

	/* one barrier for all of the refcount blocks before any L2 table */
	if (c == &s->l2c) {
		ret = qcow2_cache_flush(bs, &s->rbc);
		if (ret < 0)
			return ret;
	}
	for (int i = 0; i < c->n; i++) {
		if (!c->e[i].dirty)
			continue;
		ret = bfile_pwrite(bs->file, c->e[i].off, c->e[i].data,
				   c->csize);
		if (ret < 0)
			return ret;
		c->e[i].dirty = false;
		wrote = true;
	}
	if (wrote && c == &s->rbc)
		return bfile_flush(bs->file);
	return 0;
}

int qcow2_cache_flush_all(struct blk *bs)
{
	struct qcow2 *s = qcow2_state(bs);
	int ret = qcow2_cache_flush(bs, &s->rbc);

	if (ret < 0)
		return ret;
	return qcow2_cache_flush(bs, &s->l2c);
}

void qcow2_cache_drop(struct qcow2_cache *c, uint64_t off)
{
	for (int i = 0; i < c->n; i++)
		if (c->e[i].off == off) {
			c->e[i].off = 0;
			c->e[i].dirty = false;
			c->e[i].lru = 0;
		}
}

/* ---- refcounts ---- */

int qcow2_refcount_init(struct blk *bs, struct err *e)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t bytes = (uint64_t)s->rt_clusters << s->cluster_bits;
	uint8_t *buf;
	int ret;

	s->rc_max = s->refcount_order == 6 ? UINT64_MAX :
		    (1ULL << (1u << s->refcount_order)) - 1;
	s->rb_bits = s->cluster_bits + 3 - s->refcount_order;
	if (bytes > QCOW2_MAX_RT_BYTES) {
		err_set(e, "Reference count table too large");
		return -EINVAL;
	}
	if (blk_meta_alloc(bs, bytes, "refcount table", e) < 0)
		return -EFBIG;
	s->rt_size = bytes / 8;
	s->rt = calloc(s->rt_size ? s->rt_size : 1, 8);
	buf = malloc(bytes ? bytes : 1);
	if (!s->rt || !buf) {
		free(buf);
		return -ENOMEM;
	}
	ret = bfile_pread(bs->file, s->rt_offset, buf, bytes);
	if (ret < 0) {
		free(buf);
		err_set(e, "Could not read refcount table: %s",
			strerror(-ret));
		return ret;
	}
	for (uint64_t i = 0; i < s->rt_size; i++)
		s->rt[i] = ld_be64(buf + i * 8);
	free(buf);
	return 0;
}

static int rb_offset(struct blk *bs, uint64_t bi, uint64_t *off)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t e;

	*off = 0;
	if (bi >= s->rt_size)
		return 0;
	e = s->rt[bi];
	if (e & 0x1ff)
		return qcow2_set_errmsg(bs, -EIO, "Refcount table entry "
					"%llu is corrupt",
					(unsigned long long)bi);
	*off = e & QCOW2_RT_OFFSET_MASK;
	return 0;
}

int qcow2_rc_get(struct blk *bs, uint64_t ci, uint64_t *rc)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t off;
	uint8_t *b;
	int ret = rb_offset(bs, ci >> s->rb_bits, &off);

	*rc = 0;
	if (ret < 0 || !off)
		return ret;
	ret = qcow2_cache_get(bs, &s->rbc, off, false, &b);
	if (ret < 0)
		return ret;
	*rc = qcow2_rb_get(s->refcount_order, b,
			   ci & ((1ULL << s->rb_bits) - 1));
	return 0;
}

/* First run of n clusters with refcount 0 at or after the hint; the hint
 * moves past it so that nested allocations do not reuse it. */
static int64_t find_free(struct blk *bs, uint64_t n)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t start = s->free_hint, run = 0, rc;
	uint64_t limit = QCOW2_OFFSET_MASK >> s->cluster_bits;
	int ret;

	while (run < n) {
		uint64_t ci = start + run;
		if (ci >= limit)
			return -EFBIG;
		ret = qcow2_rc_get(bs, ci, &rc);
		if (ret < 0)
			return ret;
		if (rc) {
			start = ci + 1;
			run = 0;
		} else {
			run++;
		}
	}
	s->free_hint = start + n;
	return (int64_t)start;
}

static int rc_set(struct blk *bs, uint64_t ci, uint64_t v);

/* A new refcount table (and the blocks that count it) at the end of the
 * used area, written completely before the header points to it. */
static int grow_rt(struct blk *bs, uint64_t min_entries)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t cs = s->cluster_size, epc = cs / 8;
	int64_t fsize = bfile_size(bs->file);
	uint64_t ci0, nb = 0, tc, entries, old_off = s->rt_offset;
	uint64_t old_clusters = s->rt_clusters, end, first_b, last_b;
	uint64_t *nrt = NULL;
	uint8_t *buf = NULL, hdr[12];
	int ret;

	if (fsize < 0)
		return (int)fsize;
	ci0 = MAX(s->free_hint, ALIGN_UP((uint64_t)fsize, cs) / cs);
	entries = MAX(min_entries, s->rt_size + s->rt_size / 2);
	tc = DIV_ROUND_UP(entries, epc);
	for (;;) {
		uint64_t nnb = 0, ntc;
		/* a table past the cap (hostile offsets): give up before
		 * walking the blocks it would need */
		if (tc > QCOW2_MAX_RT_BYTES / cs)
			return -EFBIG;
		end = ci0 + nb + tc;
		first_b = ci0 >> s->rb_bits;
		last_b = (end - 1) >> s->rb_bits;
		for (uint64_t b = first_b; b <= last_b; b++)
			if (b >= s->rt_size || !s->rt[b])
				nnb++;
		ntc = DIV_ROUND_UP(MAX(entries, last_b + 1), epc);
		if (nnb == nb && ntc == tc)
			break;
		nb = nnb;
		tc = ntc;
	}
	if (tc * cs > QCOW2_MAX_RT_BYTES)
		return -EFBIG;
	entries = tc * epc;
	nrt = calloc(entries, 8);
	buf = blk_alloc_buf(tc * cs > cs ? tc * cs : cs);
	if (!nrt || !buf) {
		ret = -ENOMEM;
		goto out;
	}
	memcpy(nrt, s->rt, s->rt_size * 8);
	/* new blocks, in block order, each counting the area it covers */
	{
		uint64_t at = ci0;
		for (uint64_t b = first_b; b <= last_b; b++) {
			uint64_t lo, hi;
			if (b < s->rt_size && s->rt[b])
				continue;
			memset(buf, 0, cs);
			lo = MAX(b << s->rb_bits, ci0);
			hi = MIN((b + 1) << s->rb_bits, end);
			for (uint64_t c = lo; c < hi; c++)
				qcow2_rb_set(s->refcount_order, buf,
					     c & ((1ULL << s->rb_bits) - 1),
					     1);
			ret = bfile_pwrite(bs->file, at * cs, buf, cs);
			if (ret < 0)
				goto out;
			nrt[b] = at * cs;
			at++;
		}
	}
	memset(buf, 0, tc * cs);
	for (uint64_t i = 0; i < entries; i++)
		st_be64(buf + i * 8, nrt[i]);
	ret = bfile_pwrite(bs->file, (ci0 + nb) * cs, buf, tc * cs);
	if (ret < 0)
		goto out;
	ret = qcow2_cache_flush(bs, &s->rbc);
	if (ret < 0)
		goto out;
	ret = bfile_flush(bs->file);
	if (ret < 0)
		goto out;
	st_be64(hdr, (ci0 + nb) * cs);
	st_be32(hdr + 8, (uint32_t)tc);
	ret = qcow2_write_header_field(bs, QH_RT_OFFSET, hdr, 12);
	if (ret < 0)
		goto out;
	ret = bfile_flush(bs->file);
	if (ret < 0)
		goto out;
	qcow2_set_rt(s, nrt, entries, (ci0 + nb) * cs, (uint32_t)tc);
	nrt = NULL;
	if (s->free_hint < end)
		s->free_hint = end;
	/* area clusters that fall into blocks that existed before */
	for (uint64_t c = ci0; c < end; c++) {
		uint64_t b = c >> s->rb_bits, rc;
		bool fresh = false;
		for (uint64_t k = 0; k < nb; k++)
			if (s->rt[b] == (ci0 + k) * cs)
				fresh = true;
		if (fresh)
			continue;
		ret = qcow2_rc_get(bs, c, &rc);
		if (ret < 0)
			goto out;
		if (!rc && (ret = rc_set(bs, c, 1)) < 0)
			goto out;
	}
	ret = qcow2_rc_update(bs, old_off, old_clusters * cs, -1);
out:
	free(nrt);
	free(buf);
	return ret;
}

static int alloc_refblock(struct blk *bs, uint64_t bi)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t cs = s->cluster_size, off;
	uint8_t *b, ent[8];
	int64_t ci;
	int ret;

	if (bi >= s->rt_size) {
		ret = grow_rt(bs, bi + 1);
		if (ret < 0)
			return ret;
		if (s->rt[bi])
			return 0;
	}
	ci = find_free(bs, 1);
	if (ci < 0)
		return (int)ci;
	off = (uint64_t)ci * cs;
	if (((uint64_t)ci >> s->rb_bits) != bi) {
		/* counted elsewhere: that count first */
		ret = rc_set(bs, (uint64_t)ci, 1);
		if (ret < 0)
			return ret;
		if (s->rt[bi])	/* the nested allocation made ours */
			return qcow2_rc_update(bs, off, cs, -1);
	}
	ret = qcow2_cache_get(bs, &s->rbc, off, true, &b);
	if (ret < 0)
		return ret;
	if (((uint64_t)ci >> s->rb_bits) == bi)
		qcow2_rb_set(s->refcount_order, b,
			     (uint64_t)ci & ((1ULL << s->rb_bits) - 1), 1);
	ret = bfile_pwrite(bs->file, off, b, cs);
	if (ret < 0)
		return ret;
	st_be64(ent, off);
	ret = bfile_pwrite(bs->file, s->rt_offset + bi * 8, ent, 8);
	if (ret < 0)
		return ret;
	s->rt[bi] = off;
	return 0;
}

static int rc_set(struct blk *bs, uint64_t ci, uint64_t v)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t bi = ci >> s->rb_bits, off;
	uint8_t *b;
	int ret;

	ret = rb_offset(bs, bi, &off);
	if (ret < 0)
		return ret;
	if (!off) {
		if (!v)
			return 0;
		ret = alloc_refblock(bs, bi);
		if (ret < 0)
			return ret;
		off = s->rt[bi] & QCOW2_RT_OFFSET_MASK;
	}
	ret = qcow2_cache_get(bs, &s->rbc, off, false, &b);
	if (ret < 0)
		return ret;
	qcow2_rb_set(s->refcount_order, b, ci & ((1ULL << s->rb_bits) - 1),
		     v);
	qcow2_cache_dirty(&s->rbc, b);
	return 0;
}

int qcow2_rc_update(struct blk *bs, uint64_t off, uint64_t len,
		    int64_t delta)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t first, last, rc;
	int ret;

	if (!len)
		return 0;
	first = off >> s->cluster_bits;
	last = (off + len - 1) >> s->cluster_bits;
	for (uint64_t ci = first; ci <= last; ci++) {
		ret = qcow2_rc_get(bs, ci, &rc);
		if (ret < 0)
			return ret;
		if ((delta < 0 && rc < (uint64_t)-delta) ||
		    (delta > 0 && s->rc_max - rc < (uint64_t)delta))
			return qcow2_set_errmsg(bs, -EIO, "Refcount of cluster "
						"%llu out of range",
						(unsigned long long)ci);
		rc += (uint64_t)delta;
		ret = rc_set(bs, ci, rc);
		if (ret < 0)
			return ret;
		if (!rc) {
			if (ci < s->free_hint)
				s->free_hint = ci;
			qcow2_cache_drop(&s->l2c, ci << s->cluster_bits);
			qcow2_cache_drop(&s->rbc, ci << s->cluster_bits);
			/* no more packing of compressed data into it */
			if (s->free_byte_off &&
			    (s->free_byte_off >> s->cluster_bits) == ci)
				s->free_byte_off = 0;
			/* the cached decompressed cluster may live there */
			s->zc_desc = 0;
			s->zc_gen++;
		}
	}
	return 0;
}

int64_t qcow2_alloc_clusters(struct blk *bs, uint64_t n)
{
	struct qcow2 *s = qcow2_state(bs);
	int64_t ci = find_free(bs, n);
	int ret;

	if (ci < 0)
		return ci;
	for (uint64_t i = 0; i < n; i++) {
		ret = rc_set(bs, (uint64_t)ci + i, 1);
		if (ret < 0)
			return ret;
	}
	return ci << s->cluster_bits;
}

int64_t qcow2_alloc_bytes(struct blk *bs, uint64_t len)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t cs = s->cluster_size, off = s->free_byte_off, rc;
	int64_t ci;
	int ret;

	if (off) {
		ret = qcow2_rc_get(bs, off >> s->cluster_bits, &rc);
		if (ret < 0)
			return ret;
		if (!rc || rc >= s->rc_max)
			off = 0;
	}
	if (!off || cs - (off & (cs - 1)) < len) {
		uint64_t have = off ? cs - (off & (cs - 1)) : 0;
		uint64_t need = DIV_ROUND_UP(len - have, cs);
		ci = find_free(bs, need);
		if (ci < 0)
			return ci;
		/* continue in the next cluster when it is contiguous */
		if (!off || ((uint64_t)ci << s->cluster_bits) !=
			    ALIGN_UP(off, cs))
			off = (uint64_t)ci << s->cluster_bits;
	}
	ret = qcow2_rc_update(bs, off, len, 1);
	if (ret < 0)
		return ret;
	s->free_byte_off = (off + len) & (cs - 1) ? off + len : 0;
	return (int64_t)off;
}

void qcow2_set_rt(struct qcow2 *s, uint64_t *rt, uint64_t n, uint64_t off,
		  uint32_t clusters)
{
	free(s->rt);
	s->rt = rt;
	s->rt_size = n;
	s->rt_offset = off;
	s->rt_clusters = clusters;
}

void qcow2_free_clusters(struct blk *bs, uint64_t off, uint64_t len)
{
	/* A failure leaks clusters, which check can repair; the data the
	 * guest sees is already consistent. */
	(void)qcow2_rc_update(bs, off, len, -1);
}

void qcow2_free_l2_entry(struct blk *bs, uint64_t entry)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t off, len;

	if (entry & QCOW2_OFLAG_COMPRESSED) {
		qcow2_compressed_range(s, entry, &off, &len);
		qcow2_free_clusters(bs, off, len);
		return;
	}
	off = entry & QCOW2_OFFSET_MASK;
	if (off)
		qcow2_free_clusters(bs, off, s->cluster_size);
}
