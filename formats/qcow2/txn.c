/* txn.c - metadata changes that take effect in one header write.
 *
 * Taking, dropping or applying a snapshot changes the refcount of every
 * cluster the snapshot reaches and, with it, the OFLAG_COPIED flag of the
 * active tables that point to those clusters. QEMU's check counts a
 * flag that disagrees with its refcount as corruption, so changing the
 * two in place, one after the other, leaves a corrupt image behind a kill
 * that comes in between.
 *
 * A transaction works on copies instead. The refcounts after the change
 * are computed in memory from the refcount blocks on disk; every L2 table,
 * L1 table, snapshot table and refcount block that changes is written as
 * a new copy into clusters past the end of the image as it was; then one
 * write of header bytes 24..71 (disk size, L1 table, refcount table,
 * snapshot table: all in the first sector) switches to the new structure.
 * Up to that write the old image is untouched, and after it the old
 * copies are free clusters of the new one: an interruption at any point
 * leaves the old image or the new one, never a mix. Flushes before and
 * after the header write keep that order on the disk. */
//format:PART(qcow2)

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "qcow2.h"

/* The refcounts in memory: 2 bytes a cluster with the default width, so
 * 1 GiB covers 2^29 clusters (32 TiB of 64 KiB clusters). */
#define TXN_MAX_RC_BYTES	(1ULL << 30)

static uint64_t rc_of(const struct qcow2_txn *t, uint64_t ci)
{
	return ci < t->nb ?
	       qcow2_rb_get(qcow2_state(t->bs)->refcount_order, t->rc, ci) : 0;
}

/* Room for the refcounts of clusters [0, n): whole refcount blocks. */
static int txn_grow(struct qcow2_txn *t, uint64_t n)
{
	struct qcow2 *s = qcow2_state(t->bs);
	uint64_t cs = s->cluster_size, blocks, bytes;
	uint8_t *p, *d;

	if (n <= t->nb)
		return 0;
	blocks = DIV_ROUND_UP(n, 1ULL << s->rb_bits);
	bytes = blocks * cs;
	if (bytes > TXN_MAX_RC_BYTES)
		return qcow2_set_errmsg(t->bs, -ENOMEM, "Image too large "
					"for a metadata update in memory");
	if (blocks > t->blocks) {
		int ret = blk_meta_alloc(t->bs, (blocks - t->blocks) * cs,
					 "refcount update", NULL);
		if (ret < 0)
			return ret;
		p = realloc(t->rc, bytes);
		if (!p)
			return -ENOMEM;
		t->rc = p;
		memset(p + t->blocks * cs, 0, (blocks - t->blocks) * cs);
		d = realloc(t->dirty, blocks);
		if (!d)
			return -ENOMEM;
		t->dirty = d;
		memset(d + t->blocks, 0, blocks - t->blocks);
		t->blocks = blocks;
	}
	t->nb = n;
	return 0;
}

static void rc_put(struct qcow2_txn *t, uint64_t ci, uint64_t v)
{
	struct qcow2 *s = qcow2_state(t->bs);

	qcow2_rb_set(s->refcount_order, t->rc, ci, v);
	t->dirty[ci >> s->rb_bits] = 1;
}

int qcow2_txn_begin(struct blk *bs, struct qcow2_txn *t)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t cs = s->cluster_size, used = 0, top;
	int64_t size;
	int ret;

	memset(t, 0, sizeof(*t));
	t->bs = bs;
	/* the tables are read from the file from here on */
	ret = qcow2_cache_flush_all(bs);
	if (ret < 0)
		return ret;
	size = bfile_size(bs->file);
	if (size < 0)
		return (int)size;
	for (uint64_t bi = 0; bi < s->rt_size; bi++)
		if (s->rt[bi] & QCOW2_RT_OFFSET_MASK)
			used = bi + 1;
	ret = txn_grow(t, MAX(used << s->rb_bits,
			      DIV_ROUND_UP((uint64_t)size, cs)));
	if (ret < 0)
		goto fail;
	for (uint64_t bi = 0; bi < used; bi++) {
		uint64_t off = s->rt[bi] & QCOW2_RT_OFFSET_MASK;

		if (s->rt[bi] & 0x1ff) {
			ret = qcow2_set_errmsg(bs, -EIO, "Refcount table "
					       "entry %llu is corrupt",
					       (unsigned long long)bi);
			goto fail;
		}
		if (!off)
			continue;
		ret = bfile_pread(bs->file, off, t->rc + bi * cs, cs);
		if (ret < 0)
			goto fail;
	}
	/* new clusters go past everything the old image uses */
	top = t->nb;
	while (top && !rc_of(t, top - 1))
		top--;
	t->next = MAX(top, DIV_ROUND_UP((uint64_t)size, cs));
	t->size = bs->size;
	t->l1_size = s->l1_size;
	t->l1 = calloc(s->l1_size ? s->l1_size : 1, 8);
	if (!t->l1) {
		ret = -ENOMEM;
		goto fail;
	}
	memcpy(t->l1, s->l1, (size_t)s->l1_size * 8);
	t->nb_snapshots = s->nb_snapshots;
	t->snapshots_offset = s->snapshots_offset;
	return 0;
fail:
	qcow2_txn_free(t);
	return ret;
}

void qcow2_txn_free(struct qcow2_txn *t)
{
	if (t->bs)
		blk_meta_free(t->bs, t->blocks *
			      qcow2_state(t->bs)->cluster_size);
	t->blocks = t->nb = 0;
	free(t->rc);
	free(t->dirty);
	free(t->l1);
	t->rc = t->dirty = NULL;
	t->l1 = NULL;
}

int qcow2_txn_ref(struct qcow2_txn *t, uint64_t off, uint64_t len,
		  int delta)
{
	struct qcow2 *s = qcow2_state(t->bs);
	uint64_t first = off >> s->cluster_bits, last, v;
	int ret;

	if (!len)
		return 0;
	last = (off + len - 1) >> s->cluster_bits;
	ret = txn_grow(t, last + 1);
	if (ret < 0)
		return ret;
	/* a reference past the old end (a broken image) is not reused */
	if (last >= t->next)
		t->next = last + 1;
	for (uint64_t ci = first; ci <= last; ci++) {
		v = rc_of(t, ci);
		if (delta > 0 && v >= s->rc_max)
			return qcow2_set_errmsg(t->bs, -EINVAL, "Refcount "
						"overflow");
		if (delta < 0 && !v)
			return qcow2_set_errmsg(t->bs, -EIO, "Image is "
						"corrupt: refcount of cluster "
						"%llu below zero",
						(unsigned long long)ci);
		rc_put(t, ci, delta > 0 ? v + 1 : v - 1);
	}
	return 0;
}

int64_t qcow2_txn_alloc(struct qcow2_txn *t, uint64_t len)
{
	struct qcow2 *s = qcow2_state(t->bs);
	uint64_t n = DIV_ROUND_UP(len, s->cluster_size), first = t->next;
	int ret;

	if (first + n > (QCOW2_OFFSET_MASK >> s->cluster_bits))
		return -EFBIG;
	ret = txn_grow(t, first + n);
	if (ret < 0)
		return ret;
	for (uint64_t k = 0; k < n; k++)
		rc_put(t, first + k, 1);
	t->next = first + n;
	return (int64_t)(first << s->cluster_bits);
}

static int bad_entry(struct blk *bs, const char *what, uint64_t v)
{
	return qcow2_set_errmsg(bs, -EIO, "Image is corrupt: %s %#llx", what,
				(unsigned long long)v);
}

/* The host clusters an L2 entry holds (len 0: none). */
static int entry_range(struct blk *bs, uint64_t e, uint64_t *off,
		       uint64_t *len)
{
	struct qcow2 *s = qcow2_state(bs);

	if (e & QCOW2_OFLAG_COMPRESSED) {
		qcow2_compressed_range(s, e, off, len);
		return 0;
	}
	*off = e & QCOW2_OFFSET_MASK;
	*len = *off ? s->cluster_size : 0;
	if (*off & (s->cluster_size - 1))
		return bad_entry(bs, "data cluster offset unaligned", *off);
	return 0;
}

static int read_l2(struct blk *bs, uint64_t off, uint8_t *buf)
{
	if (off & (qcow2_state(bs)->cluster_size - 1))
		return bad_entry(bs, "L2 table offset unaligned", off);
	return bfile_pread(bs->file, off, buf, qcow2_state(bs)->cluster_size);
}

int qcow2_txn_ref_tree(struct qcow2_txn *t, const uint64_t *l1, uint32_t n,
		       int delta)
{
	struct qcow2 *s = qcow2_state(t->bs);
	uint64_t cs = s->cluster_size, off, len;
	unsigned per = 1u << s->l2_bits;
	uint8_t *buf = malloc(cs);
	int ret = 0;

	if (!buf)
		return -ENOMEM;
	for (uint32_t i = 0; i < n && !ret; i++) {
		uint64_t l2 = l1[i] & QCOW2_OFFSET_MASK;

		if (!l2)
			continue;
		ret = read_l2(t->bs, l2, buf);
		for (unsigned j = 0; j < per && !ret; j++) {
			ret = entry_range(t->bs, ld_be64(buf + (size_t)j *
							 s->l2_esize),
					  &off, &len);
			if (!ret)
				ret = qcow2_txn_ref(t, off, len, delta);
		}
		if (!ret)
			ret = qcow2_txn_ref(t, l2, cs, delta);
	}
	free(buf);
	return ret;
}

/* OFLAG_COPIED in the new active tree, set exactly where the refcount
 * after the change is 1. An L2 table whose flags change is written as a
 * new copy that only the active tree references. */
static int settle(struct qcow2_txn *t)
{
	struct qcow2 *s = qcow2_state(t->bs);
	uint64_t cs = s->cluster_size;
	unsigned per = 1u << s->l2_bits;
	uint8_t *buf = malloc(cs);
	int ret = 0;

	if (!buf)
		return -ENOMEM;
	for (uint32_t i = 0; i < t->l1_size && !ret; i++) {
		uint64_t l2 = t->l1[i] & QCOW2_OFFSET_MASK;
		bool changed = false;
		int64_t copy;

		if (!l2)
			continue;
		ret = read_l2(t->bs, l2, buf);
		for (unsigned j = 0; j < per && !ret; j++) {
			uint8_t *p = buf + (size_t)j * s->l2_esize;
			uint64_t e = ld_be64(p), off, len, want;

			ret = entry_range(t->bs, e, &off, &len);
			if (ret || !len || (e & QCOW2_OFLAG_COMPRESSED))
				continue;
			want = rc_of(t, off >> s->cluster_bits) == 1 ?
			       e | QCOW2_OFLAG_COPIED :
			       e & ~QCOW2_OFLAG_COPIED;
			if (want != e) {
				st_be64(p, want);
				changed = true;
			}
		}
		if (!ret && changed) {
			copy = qcow2_txn_alloc(t, cs);
			ret = copy < 0 ? (int)copy :
			      bfile_pwrite(t->bs->file, (uint64_t)copy, buf, cs);
			if (!ret)
				ret = qcow2_txn_ref(t, l2, cs, -1);
			l2 = (uint64_t)copy;
		}
		if (!ret)
			t->l1[i] = rc_of(t, l2 >> s->cluster_bits) == 1 ?
				   l2 | QCOW2_OFLAG_COPIED : l2;
	}
	free(buf);
	return ret;
}

/* The active L1 table, settled, in new clusters. The old one loses its
 * reference unless the caller hands it on (to a new snapshot). */
int qcow2_txn_write_l1(struct qcow2_txn *t, bool free_old)
{
	struct qcow2 *s = qcow2_state(t->bs);
	uint64_t bytes = (uint64_t)t->l1_size * 8;
	uint8_t *b;
	int64_t off;
	int ret = settle(t);

	if (ret < 0)
		return ret;
	if (free_old && s->l1_size) {
		ret = qcow2_txn_ref(t, s->l1_offset, (uint64_t)s->l1_size * 8,
				    -1);
		if (ret < 0)
			return ret;
	}
	t->l1_offset = 0;
	if (!bytes)
		return 0;
	b = malloc(bytes);
	if (!b)
		return -ENOMEM;
	for (uint32_t i = 0; i < t->l1_size; i++)
		st_be64(b + (size_t)i * 8, t->l1[i]);
	off = qcow2_txn_alloc(t, bytes);
	ret = off < 0 ? (int)off : bfile_pwrite(t->bs->file, (uint64_t)off,
						 b, bytes);
	free(b);
	t->l1_offset = off < 0 ? 0 : (uint64_t)off;
	return ret;
}

/* New refcount blocks for the blocks that changed, and a new refcount
 * table: allocating them changes refcounts too, so until nothing more
 * changes. */
static int place_refcounts(struct qcow2_txn *t, uint64_t **pnew,
			   uint64_t *prt_off, uint64_t *prt_cl)
{
	struct qcow2 *s = qcow2_state(t->bs);
	uint64_t cs = s->cluster_size, *nb = NULL, have = 0, rt_cl = 0;
	int64_t a, rt_off = 0;
	bool again;
	int ret;

	ret = qcow2_txn_ref(t, s->rt_offset, (uint64_t)s->rt_clusters * cs,
			    -1);
	do {
		again = false;
		for (uint64_t bi = 0; !ret && bi < t->blocks; bi++) {
			uint64_t old = bi < s->rt_size ?
				       s->rt[bi] & QCOW2_RT_OFFSET_MASK : 0;

			if (bi >= have) {
				uint64_t *p = realloc(nb, t->blocks * 8);
				if (!p) {
					ret = -ENOMEM;
					break;
				}
				memset(p + have, 0, (t->blocks - have) * 8);
				nb = p;
				have = t->blocks;
			}
			if (!t->dirty[bi] || nb[bi])
				continue;
			a = qcow2_txn_alloc(t, cs);
			if (a < 0) {
				ret = (int)a;
				break;
			}
			nb[bi] = (uint64_t)a;
			if (old)
				ret = qcow2_txn_ref(t, old, cs, -1);
			again = true;
		}
		if (!ret && DIV_ROUND_UP(MAX(t->blocks, s->rt_size) * 8, cs) >
			    rt_cl) {
			if (rt_cl)
				ret = qcow2_txn_ref(t, (uint64_t)rt_off,
						    rt_cl * cs, -1);
			rt_cl = DIV_ROUND_UP(MAX(t->blocks + 1, s->rt_size) *
					     8, cs);
			if (rt_cl * cs > QCOW2_MAX_RT_BYTES)
				ret = qcow2_set_errmsg(t->bs, -EFBIG,
						       "Reference count table "
						       "too large");
			if (!ret) {
				rt_off = qcow2_txn_alloc(t, rt_cl * cs);
				if (rt_off < 0)
					ret = (int)rt_off;
			}
			again = true;
		}
	} while (!ret && again);
	*pnew = nb;
	*prt_off = rt_off < 0 ? 0 : (uint64_t)rt_off;
	*prt_cl = rt_cl;
	return ret;
}

int qcow2_txn_commit(struct qcow2_txn *t)
{
	struct blk *bs = t->bs;
	struct qcow2 *s = qcow2_state(bs);
	uint64_t cs = s->cluster_size, *nb = NULL, *rt = NULL, rt_off, rt_cl;
	uint64_t n;
	uint8_t *buf = NULL, h[48];
	int ret;

	ret = place_refcounts(t, &nb, &rt_off, &rt_cl);
	if (ret < 0)
		goto out;
	n = rt_cl * cs / 8;
	rt = calloc(n, 8);
	buf = malloc(rt_cl * cs);
	if (!rt || !buf) {
		ret = -ENOMEM;
		goto out;
	}
	for (uint64_t bi = 0; bi < n; bi++) {
		if (bi < t->blocks && nb[bi])
			rt[bi] = nb[bi];
		else if (bi < s->rt_size)
			rt[bi] = s->rt[bi];
		st_be64(buf + bi * 8, rt[bi]);
	}
	for (uint64_t bi = 0; bi < t->blocks && !ret; bi++)
		if (nb[bi])
			ret = bfile_pwrite(bs->file, nb[bi], t->rc + bi * cs,
					   cs);
	if (!ret)
		ret = bfile_pwrite(bs->file, rt_off, buf, rt_cl * cs);
	/* everything the new header reaches is on disk before it */
	if (!ret)
		ret = bfile_flush(bs->file);
	if (ret < 0)
		goto out;
	st_be64(h, t->size);
	st_be32(h + 8, s->crypt_method);
	st_be32(h + 12, t->l1_size);
	st_be64(h + 16, t->l1_offset);
	st_be64(h + 24, rt_off);
	st_be32(h + 32, (uint32_t)rt_cl);
	st_be32(h + 36, t->nb_snapshots);
	st_be64(h + 40, t->snapshots_offset);
	ret = qcow2_write_header_field(bs, QH_SIZE, h, sizeof(h));
	if (!ret)
		ret = bfile_flush(bs->file);
	if (ret < 0)
		goto out;
	/* the new structure is the image now */
	qcow2_set_rt(s, rt, n, rt_off, (uint32_t)rt_cl);
	rt = NULL;
	free(s->l1);
	s->l1 = t->l1;
	t->l1 = NULL;
	s->l1_size = t->l1_size;
	s->l1_offset = t->l1_offset;
	s->nb_snapshots = t->nb_snapshots;
	s->snapshots_offset = t->snapshots_offset;
	bs->size = t->size;
	for (int i = 0; i < s->rbc.n; i++)
		qcow2_cache_drop(&s->rbc, s->rbc.e[i].off);
	for (int i = 0; i < s->l2c.n; i++)
		qcow2_cache_drop(&s->l2c, s->l2c.e[i].off);
	s->free_hint = 0;
	s->free_byte_off = 0;
	s->zc_gen++;
out:
	free(nb);
	free(rt);
	free(buf);
	return ret;
}
