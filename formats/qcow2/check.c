/* check.c - consistency check and repair of qcow2 images
 * (the check command, -r leaks|all).
 *
 * The check counts every reference the metadata makes (header, L1/L2
 * tables of the image and of each snapshot, data clusters, snapshot table,
 * refcount table and blocks, encryption header, bitmaps) into an in-memory
 * refcount array and compares it with the refcounts on disk
 * (qcow2.txt, "Host cluster management"). The array uses the on-disk
 * refcount encoding, so that a broken refcount structure can be rebuilt by
 * writing slices of it as new refcount blocks.
 *
 * The report lines (streamed to the caller through struct check_result)
 * and the counting rules follow QEMU 7.2, which is the oracle of the test
 * suite: a mismatch where the refcount is higher than the references is a
 * leak, lower is a corruption, and a referenced cluster without any
 * refcount (or a broken refcount block) makes the refcount structure be
 * rebuilt under -r all. */
//format:PART(qcow2)

#include <errno.h>
#include <stdarg.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "qcow2.h"

/* Memory cap of the computed refcounts (QEMU itself stops at 2^31
 * clusters). */
#define CK_MAX_ARRAY_BYTES	(1ULL << 30)
#define CK_MAX_CLUSTERS		0x7fffffffULL
#define CK_MAX_L1_ENTRIES	((32ULL << 20) / 8)
#define CK_MAX_BITMAP_DIR	(64ULL << 20)
#define CK_REFT_RESERVED	0x1ffULL
#define CK_BME_RESERVED		0xff000000000001feULL
#define CK_L2_BITMAP_ALLOC	0xffffffffULL

/* Header extensions that reference clusters: the encryption header and
 * the bitmap directory. */
struct ck_ext {
	uint64_t crypt_off, crypt_len;
	uint32_t nb_bitmaps;
	uint64_t bmdir_off, bmdir_size;
};

struct ck {
	struct blk *bs;
	struct qcow2 *s;
	struct check_result *res;
	uint8_t *rc;		/* computed refcounts, on-disk encoding */
	uint64_t nb;		/* clusters covered by rc */
	uint64_t rc_bytes;	/* allocated bytes of rc (whole clusters) */
	bool rebuild;
	bool report;		/* bs->errmsg says why the repair stopped */
	bool signaled;		/* the corruption message was printed */
	struct ck_ext ext;
	uint64_t sn_size;	/* bytes of the snapshot table */
	int64_t flen;		/* file length (0: ask the file) */
};

/* One line of the report, in the caller's sink. */
static void ck_say(struct ck *c, const char *fmt, ...) PRINTF(2, 3);
static void ck_say(struct ck *c, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	check_vreport(c->res, CHECK_LINE, fmt, ap);
	va_end(ap);
}

/* ---- the computed refcount array ---- */

static uint64_t ck_get(const struct ck *c, uint64_t i)
{
	return i < c->nb ? qcow2_rb_get(c->s->refcount_order, c->rc, i) : 0;
}

/* True when refcount block bi of the computed array counts no reference.
 * The loops over every cluster skip such blocks whole: a hostile image
 * (a refcount block far past the end, moved into the file by -r all) can
 * make the array span hundreds of millions of clusters. */
static bool ck_block_unused(const struct ck *c, uint64_t bi)
{
	uint64_t cs = c->s->cluster_size, start = bi * cs;
	const uint8_t *p = c->rc + start;

	if (start >= c->rc_bytes)
		return true;
	return !p[0] && !memcmp(p, p + 1, cs - 1);
}

/* Room for n clusters; the byte size stays a multiple of the cluster size
 * so that any refcount block's slice can be written as it is. */
static int ck_resize(struct ck *c, uint64_t n)
{
	uint64_t cs = c->s->cluster_size, bytes;
	uint8_t *p;

	if (n > CK_MAX_CLUSTERS * 2)
		return -EFBIG;
	bytes = ALIGN_UP(DIV_ROUND_UP(n << c->s->refcount_order, 8), cs);
	if (bytes > CK_MAX_ARRAY_BYTES)
		return -ENOMEM;
	if (bytes > c->rc_bytes) {
		if (blk_meta_alloc(c->bs, bytes - c->rc_bytes,
				   "refcount check array", NULL) < 0)
			return -EFBIG;
		p = realloc(c->rc, bytes);
		if (!p)
			return -ENOMEM;
		memset(p + c->rc_bytes, 0, bytes - c->rc_bytes);
		c->rc = p;
		c->rc_bytes = bytes;
	}
	c->nb = n;
	return 0;
}

/* One more reference to every cluster of [off, off+size). */
static int ck_ref(struct ck *c, uint64_t off, uint64_t size)
{
	struct qcow2 *s = c->s;
	uint64_t cs = s->cluster_size, end, first, last;
	int64_t flen;
	int ret;

	if (!size)
		return 0;
	flen = c->flen ? c->flen : bfile_size(c->bs->file);
	if (flen < 0)
		return (int)flen;
	c->flen = flen;
	/* The last cluster may be partly beyond the end of the file. */
	if (add_overflow_u64(off, size, &end) ||
	    (end > (uint64_t)flen && end - (uint64_t)flen >= cs)) {
		ck_say(c, "ERROR: counting reference for region "
		       "exceeding the end of the file by one cluster or more: "
		       "offset 0x%" PRIx64 " size 0x%" PRIx64, off, size);
		c->res->corruptions++;
		return 0;
	}
	first = off >> s->cluster_bits;
	last = (end - 1) >> s->cluster_bits;
	for (uint64_t k = first; k <= last; k++) {
		uint64_t v;

		if (k >= c->nb) {
			ret = ck_resize(c, k + 1);
			if (ret < 0) {
				c->res->check_errors++;
				return ret;
			}
		}
		v = qcow2_rb_get(s->refcount_order, c->rc, k);
		if (v == s->rc_max) {
			ck_say(c, "ERROR: overflow cluster offset=0x%"
			       PRIx64, k << s->cluster_bits);
			ck_say(c, "Use " QEMU_IMG_CMD " amend to increase "
			       "the refcount entry width or " QEMU_IMG_CMD
			       " convert to create a clean copy if the image "
			       "cannot be opened for writing");
			c->res->corruptions++;
			continue;
		}
		qcow2_rb_set(s->refcount_order, c->rc, k, v + 1);
	}
	return 0;
}

/* Metadata found where it must not be: said once per check, as qemu
 * does; an image open for writing gets its corrupt bit set (qcow2.txt,
 * incompatible feature bit 1), so that nothing else writes to it. */
static void signal_corruption(struct ck *c, const char *fmt, ...)
	PRINTF(2, 3);
static void signal_corruption(struct ck *c, const char *fmt, ...)
{
	struct qcow2 *s = c->s;
	char what[200];
	uint8_t b[8];
	va_list ap;

	if (c->signaled)
		return;
	c->signaled = true;
	va_start(ap, fmt);
	vsnprintf(what, sizeof(what), fmt, ap);
	va_end(ap);
	if (s->read_only) {
		ck_say(c, "qcow2: Image is corrupt: %s; further non-fatal "
		       "corruption events will be suppressed", what);
		return;
	}
	ck_say(c, "qcow2: Marking image as corrupt: %s; further "
	       "corruption events will be suppressed", what);
	if (s->version < 3)
		return;
	st_be64(b, s->incompat | QCOW2_INCOMPAT_CORRUPT);
	if (qcow2_write_header_field(c->bs, QH_INCOMPAT, b, 8) == 0 &&
	    bfile_flush(c->bs->file) == 0)
		s->incompat |= QCOW2_INCOMPAT_CORRUPT;
}

/* ---- overlap check before every repair write ---- */

enum {
	OL_HEADER = 0x1, OL_ACTIVE_L1 = 0x2, OL_ACTIVE_L2 = 0x4,
	OL_RT = 0x8, OL_RB = 0x10, OL_SN_TABLE = 0x20, OL_INACTIVE_L1 = 0x40,
	OL_BITMAP_DIR = 0x100,
};

static bool overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
	return alen && blen && a < b + blen && b < a + alen;
}

/* Name of the metadata (other than the kinds in ign) that a write of
 * [off, off+len), widened to whole clusters, would overwrite; NULL if
 * none. Inactive L2 tables are not looked at (too costly, as in qemu's
 * default mode). */
static const char *overlap_name(struct ck *c, unsigned ign, uint64_t off,
				uint64_t len)
{
	struct qcow2 *s = c->s;
	uint64_t cs = s->cluster_size, mask = QCOW2_RT_OFFSET_MASK;

	len = ALIGN_UP((off & (cs - 1)) + len, cs);
	off &= ~(cs - 1);
	if (!(ign & OL_HEADER) && off < cs)
		return "qcow2_header";
	if (!(ign & OL_ACTIVE_L1) &&
	    overlaps(off, len, s->l1_offset, (uint64_t)s->l1_size * 8))
		return "active L1 table";
	if (!(ign & OL_ACTIVE_L2))
		for (uint32_t i = 0; i < s->l1_size; i++) {
			uint64_t l2 = s->l1[i] & QCOW2_OFFSET_MASK;
			if (l2 && overlaps(off, len, l2, cs))
				return "active L2 table";
		}
	if (!(ign & OL_RT) && overlaps(off, len, s->rt_offset, s->rt_size * 8))
		return "refcount table";
	if (!(ign & OL_RB))
		for (uint64_t i = 0; i < s->rt_size; i++)
			if ((s->rt[i] & mask) &&
			    overlaps(off, len, s->rt[i] & mask, cs))
				return "refcount block";
	if (!(ign & OL_SN_TABLE) &&
	    overlaps(off, len, s->snapshots_offset, c->sn_size))
		return "snapshot table";
	if (!(ign & OL_INACTIVE_L1))
		for (uint32_t i = 0; i < s->nb_snapshots; i++)
			if (overlaps(off, len, s->sn[i].l1_offset,
				     (uint64_t)s->sn[i].l1_size * 8))
				return "inactive L1 table";
	if (!(ign & OL_BITMAP_DIR) && c->ext.nb_bitmaps &&
	    overlaps(off, len, c->ext.bmdir_off, c->ext.bmdir_size))
		return "bitmap directory";
	return NULL;
}

/* 0, or -EIO after signalling the corruption the write would cause. */
static int overlap_check(struct ck *c, unsigned ign, uint64_t off,
			 uint64_t len)
{
	const char *what = overlap_name(c, ign, off, len);

	if (!what)
		return 0;
	signal_corruption(c, "Preventing invalid write on metadata (overlaps "
			  "with %s)", what);
	return -EIO;
}

/* Refcount of cluster ci as the image records it. */
static int disk_rc(struct ck *c, uint64_t ci, uint64_t *rc)
{
	struct qcow2 *s = c->s;
	uint64_t bi = ci >> s->rb_bits, off;
	uint8_t *b;
	int ret;

	*rc = 0;
	if (bi >= s->rt_size)
		return 0;
	off = s->rt[bi] & QCOW2_RT_OFFSET_MASK;
	if (!off)
		return 0;
	if (off & (s->cluster_size - 1)) {
		signal_corruption(c, "Refblock offset %#" PRIx64 " unaligned "
				  "(reftable index: %#" PRIx64 ")", off, bi);
		return -EIO;
	}
	ret = qcow2_cache_get(c->bs, &s->rbc, off, false, &b);
	if (ret < 0)
		return ret;
	*rc = qcow2_rb_get(s->refcount_order, b,
			   ci & ((1ULL << s->rb_bits) - 1));
	return 0;
}

/* ---- references ---- */

enum { T_UNALLOC, T_ZERO_PLAIN, T_ZERO_ALLOC, T_NORMAL, T_COMPRESSED };

static int l2_type(const struct qcow2 *s, uint64_t e)
{
	if (e & QCOW2_OFLAG_COMPRESSED)
		return T_COMPRESSED;
	if ((e & QCOW2_OFLAG_ZERO) && !s->ext_l2)
		return e & QCOW2_OFFSET_MASK ? T_ZERO_ALLOC : T_ZERO_PLAIN;
	return e & QCOW2_OFFSET_MASK ? T_NORMAL : T_UNALLOC;
}

/* A preallocated cluster at a misaligned offset holds no data: the entry
 * becomes a plain zero cluster. With subclusters it loses its offset only:
 * no subcluster of it is allocated, so its zero bits stay as they are and
 * the others go on reading the backing file. */
static int fix_entry_by_zero(struct ck *c, uint64_t l2_off, uint8_t *t,
			     unsigned i, bool active, bool *overlap)
{
	struct qcow2 *s = c->s;
	uint8_t *p = t + (size_t)i * s->l2_esize;
	uint64_t at = l2_off + (uint64_t)i * s->l2_esize;
	int ret;

	if (s->ext_l2) {
		st_be64(p, 0);
		st_be64(p + 8, ld_be64(p + 8) & (CK_L2_BITMAP_ALLOC << 32));
	} else {
		st_be64(p, QCOW2_OFLAG_ZERO);
	}
	/* an inactive table must not land on an active one either */
	ret = overlap_check(c, active ? OL_ACTIVE_L2 : 0, at, s->l2_esize);
	*overlap = ret < 0;
	if (ret < 0) {
		ck_say(c, "ERROR: Overlap check failed");
		c->res->check_errors++;
		return ret;
	}
	qcow2_cache_drop(&s->l2c, l2_off);
	c->flen = 0;	/* the write may extend the file */
	ret = bfile_pwrite(c->bs->file, at, p, s->l2_esize);
	if (!ret)
		ret = bfile_flush(c->bs->file);
	if (ret < 0) {
		ck_say(c, "ERROR: Failed to overwrite L2 table entry: "
		       "%s", strerror(-ret));
		c->res->check_errors++;
		return ret;
	}
	c->res->corruptions--;
	c->res->corruptions_fixed++;
	return 0;
}

static int check_l2(struct ck *c, uint64_t l2_off, bool stats, int fix,
		    bool active)
{
	struct qcow2 *s = c->s;
	struct check_result *res = c->res;
	uint64_t cs = s->cluster_size, next = 0;
	unsigned n = 1u << s->l2_bits;
	uint8_t *t = malloc(cs);
	int ret;

	if (!t) {
		res->check_errors++;
		return -ENOMEM;
	}
	ret = bfile_pread(c->bs->file, l2_off, t, cs);
	if (ret < 0) {
		ck_say(c, "ERROR: I/O error in check_refcounts_l2");
		res->check_errors++;
		goto out;
	}
	for (unsigned i = 0; i < n; i++) {
		uint8_t *p = t + (size_t)i * s->l2_esize;
		uint64_t e = ld_be64(p), bm = s->ext_l2 ? ld_be64(p + 8) : 0;
		uint64_t off, len;
		int type = l2_type(s, e);
		bool data;

		if (type != T_COMPRESSED && (e & QCOW2_L2E_RESERVED)) {
			ck_say(c, "ERROR found l2 entry with reserved "
			       "bits set: %" PRIx64, e);
			res->corruptions++;
		}
		switch (type) {
		case T_COMPRESSED:
			if (e & QCOW2_OFLAG_COPIED) {
				qcow2_compressed_range(s, e, &off, &len);
				ck_say(c, "ERROR: coffset=0x%" PRIx64 ": "
				       "copied flag must never be set for "
				       "compressed clusters", off);
				e &= ~QCOW2_OFLAG_COPIED;
				res->corruptions++;
			}
			if (bm) {
				ck_say(c, "ERROR compressed cluster %u "
				       "with non-zero subcluster allocation "
				       "bitmap, entry=0x%" PRIx64, i, e);
				res->corruptions++;
				break;
			}
			qcow2_compressed_range(s, e, &off, &len);
			ret = ck_ref(c, off, len);
			if (ret < 0)
				goto out;
			if (stats) {
				/* compressed clusters count as fragmented */
				res->allocated_clusters++;
				res->compressed_clusters++;
				res->fragmented_clusters++;
			}
			break;
		case T_ZERO_ALLOC:
		case T_NORMAL:
			off = e & QCOW2_OFFSET_MASK;
			if ((bm >> 32) & bm) {
				res->corruptions++;
				ck_say(c, "ERROR offset=%" PRIx64 ": "
				       "Allocated cluster has corrupted "
				       "subcluster allocation bitmap", off);
			}
			if (off & (cs - 1)) {
				res->corruptions++;
				data = s->ext_l2 ? (bm & CK_L2_BITMAP_ALLOC) :
				       !(e & QCOW2_OFLAG_ZERO);
				if (data) {
					ck_say(c, "ERROR offset=%" PRIx64
					       ": Data cluster is not properly"
					       " aligned; L2 entry "
					       "corrupted.", off);
				} else {
					ck_say(c, "%s offset=%" PRIx64
					       ": Preallocated cluster is not "
					       "properly aligned; L2 entry "
					       "corrupted.",
					       fix & CHECK_FIX_ERRORS ?
					       "Repairing" : "ERROR", off);
					if (fix & CHECK_FIX_ERRORS) {
						bool ol;
						ret = fix_entry_by_zero(c,
							l2_off, t, i, active,
							&ol);
						if (ol) {
							/* stop: this table is
							 * not what it seems */
							ret = -EIO;
							goto out;
						}
						if (!ret)
							continue;
					}
				}
			}
			if (stats) {
				res->allocated_clusters++;
				if (next && off != next)
					res->fragmented_clusters++;
				next = off + cs;
			}
			ret = ck_ref(c, off, cs);
			if (ret < 0)
				goto out;
			break;
		case T_UNALLOC:
			if (bm & CK_L2_BITMAP_ALLOC) {
				res->corruptions++;
				ck_say(c, "ERROR: Unallocated cluster has"
				       " non-zero subcluster allocation "
				       "map");
			}
			break;
		default:
			break;
		}
	}
	ret = 0;
out:
	free(t);
	return ret;
}

static int check_l1(struct ck *c, uint64_t l1_off, uint32_t l1_size,
		    bool stats, int fix, bool active)
{
	struct qcow2 *s = c->s;
	struct check_result *res = c->res;
	uint8_t *t;
	int ret;

	if (!l1_size)
		return 0;
	ret = ck_ref(c, l1_off, (uint64_t)l1_size * 8);
	if (ret < 0)
		return ret;
	t = malloc((size_t)l1_size * 8);
	if (!t) {
		res->check_errors++;
		return -ENOMEM;
	}
	ret = bfile_pread(c->bs->file, l1_off, t, (size_t)l1_size * 8);
	if (ret < 0) {
		ck_say(c, "ERROR: I/O error in check_refcounts_l1");
		res->check_errors++;
		goto out;
	}
	for (uint32_t i = 0; i < l1_size; i++) {
		uint64_t e = ld_be64(t + (size_t)i * 8), l2;

		if (!e)
			continue;
		if (e & QCOW2_L1E_RESERVED) {
			ck_say(c, "ERROR found L1 entry with reserved "
			       "bits set: %" PRIx64, e);
			res->corruptions++;
		}
		l2 = e & QCOW2_OFFSET_MASK;
		ret = ck_ref(c, l2, s->cluster_size);
		if (ret < 0)
			goto out;
		if (l2 & (s->cluster_size - 1)) {
			ck_say(c, "ERROR l2_offset=%" PRIx64 ": Table is "
			       "not cluster aligned; L1 entry corrupted",
			       l2);
			res->corruptions++;
		}
		ret = check_l2(c, l2, stats, fix, active);
		if (ret < 0)
			goto out;
	}
	ret = 0;
out:
	free(t);
	return ret;
}

/* Byte length of the snapshot table (entries are 8-byte aligned; the
 * last one is counted without its padding). */
static int snapshot_table_size(struct ck *c, uint64_t *size)
{
	struct qcow2 *s = c->s;
	uint64_t off = s->snapshots_offset, end = off;
	uint8_t h[40];
	int ret;

	for (uint32_t i = 0; i < s->nb_snapshots; i++) {
		off = ALIGN_UP(off, 8);
		if (off - s->snapshots_offset > QCOW2_MAX_SN_TABLE)
			return -EFBIG;
		ret = bfile_pread(c->bs->file, off, h, sizeof(h));
		if (ret < 0)
			return ret;
		off += 40 + (uint64_t)ld_be32(h + 36) + ld_be16(h + 12) +
		       ld_be16(h + 14);
		end = off;
	}
	*size = end - s->snapshots_offset;
	return 0;
}

static int read_exts(struct ck *c, struct ck_ext *x)
{
	struct qcow2 *s = c->s;
	uint64_t cs = s->cluster_size, p = s->header_length, end;
	uint8_t *h = malloc(cs);
	int ret;

	memset(x, 0, sizeof(*x));
	if (!h)
		return -ENOMEM;
	ret = bfile_pread(c->bs->file, 0, h, cs);
	if (ret < 0)
		goto out;
	end = ld_be64(h + QH_BACKING_OFF);
	if (!end || end > cs)
		end = cs;
	if (s->version < 3)
		p = 72;
	while (p + 8 <= end) {
		uint32_t type = ld_be32(h + p), len = ld_be32(h + p + 4);
		const uint8_t *d = h + p + 8;

		p += 8;
		if (type == QCOW2_EXT_END || len > end - p)
			break;
		if (type == QCOW2_EXT_CRYPTO && len >= 16) {
			x->crypt_off = ld_be64(d);
			x->crypt_len = ld_be64(d + 8);
		}
		if (type == QCOW2_EXT_BITMAPS && len >= 24) {
			x->nb_bitmaps = ld_be32(d);
			x->bmdir_size = ld_be64(d + 8);
			x->bmdir_off = ld_be64(d + 16);
		}
		p += ALIGN_UP((uint64_t)len, 8);
	}
	/* bitmaps written by a program that did not know them are stale and
	 * not used (qcow2.txt, "autoclear_features" bit 0) */
	if (!(s->autoclear & QCOW2_AUTOCLEAR_BITMAPS))
		x->nb_bitmaps = 0;
out:
	free(h);
	return ret;
}

static bool bitmap_entry_ok(uint64_t e, uint64_t cs)
{
	uint64_t off = e & QCOW2_OFFSET_MASK;

	if (e & CK_BME_RESERVED)
		return false;
	return !off || (!(e & 1) && !(off & (cs - 1)));
}

static int check_bitmaps(struct ck *c, const struct ck_ext *x)
{
	struct qcow2 *s = c->s;
	uint64_t cs = s->cluster_size;
	uint8_t *dir = NULL, *tbl = NULL;
	uint64_t p = 0;
	int ret;

	if (!x->nb_bitmaps)
		return 0;
	ret = ck_ref(c, x->bmdir_off, x->bmdir_size);
	if (ret < 0)
		return ret;
	if (x->bmdir_size > CK_MAX_BITMAP_DIR || !x->bmdir_size ||
	    (x->bmdir_off & (cs - 1)))
		goto bad;
	dir = malloc(x->bmdir_size);
	if (!dir) {
		c->res->check_errors++;
		return -ENOMEM;
	}
	ret = bfile_pread(c->bs->file, x->bmdir_off, dir, x->bmdir_size);
	if (ret < 0)
		goto bad;
	for (uint32_t i = 0; i < x->nb_bitmaps; i++) {
		uint64_t toff, tsize, esz;

		if (x->bmdir_size - p < 24)
			goto bad;
		toff = ld_be64(dir + p);
		tsize = ld_be32(dir + p + 8);
		esz = ALIGN_UP(24 + (uint64_t)ld_be32(dir + p + 20) +
			       ld_be16(dir + p + 18), 8);
		if (esz > x->bmdir_size - p || (toff & (cs - 1)) ||
		    tsize * 8 > QCOW2_MAX_L1_BYTES)
			goto bad;
		p += esz;
		ret = ck_ref(c, toff, tsize * 8);
		if (ret < 0)
			goto out;
		free(tbl);
		tbl = malloc(tsize * 8 + 1);
		if (!tbl) {
			c->res->check_errors++;
			ret = -ENOMEM;
			goto out;
		}
		ret = bfile_pread(c->bs->file, toff, tbl, tsize * 8);
		if (ret < 0) {
			c->res->corruptions++;
			ret = 0;
			break;
		}
		for (uint64_t k = 0; k < tsize; k++) {
			uint64_t e = ld_be64(tbl + k * 8);

			if (!bitmap_entry_ok(e, cs)) {
				c->res->corruptions++;
				continue;
			}
			if (!(e & QCOW2_OFFSET_MASK))
				continue;
			ret = ck_ref(c, e & QCOW2_OFFSET_MASK, cs);
			if (ret < 0)
				goto out;
		}
	}
	ret = 0;
	goto out;
bad:
	c->res->corruptions++;
	ret = -EINVAL;
out:
	free(dir);
	free(tbl);
	return ret;
}

/* Every refcount block: aligned, inside the file, referenced once. */
static int check_refblocks(struct ck *c, int fix)
{
	struct qcow2 *s = c->s;
	struct check_result *res = c->res;
	uint64_t cs = s->cluster_size;
	int ret;

	for (uint64_t i = 0; i < s->rt_size; i++) {
		uint64_t off = s->rt[i] & QCOW2_RT_OFFSET_MASK;
		uint64_t ci = off >> s->cluster_bits;
		struct err e;
		int64_t size;

		if (s->rt[i] & CK_REFT_RESERVED) {
			ck_say(c, "ERROR refcount table entry %" PRIu64
			       " has reserved bits set", i);
			res->corruptions++;
			c->rebuild = true;
			continue;
		}
		if (off & (cs - 1)) {
			ck_say(c, "ERROR refcount block %" PRIu64 " is "
			       "not cluster aligned; refcount table entry "
			       "corrupted", i);
			res->corruptions++;
			c->rebuild = true;
			continue;
		}
		if (ci >= c->nb) {
			res->corruptions++;
			ck_say(c, "%s refcount block %" PRIu64 " is "
			       "outside image", fix & CHECK_FIX_ERRORS ?
			       "Repairing" : "ERROR", i);
			if (!(fix & CHECK_FIX_ERRORS))
				continue;
			/* the block becomes the zeroed last cluster */
			ret = -EINVAL;
			if (off > INT64_MAX - cs)
				goto resize_fail;
			ret = bfile_truncate(c->bs->file, off + cs,
					     PREALLOC_OFF, &e);
			if (ret < 0) {
				/* the file layer's message, reported as an
				 * error of the program */
				check_report(c->res, CHECK_ERROR, "%s",
					     e.msg);
				goto resize_fail;
			}
			c->flen = 0;
			size = bfile_size(c->bs->file);
			ret = size < 0 ? (int)size : 0;
			if (ret < 0)
				goto resize_fail;
			ret = ck_resize(c, DIV_ROUND_UP((uint64_t)size, cs));
			if (ret < 0) {
				res->check_errors++;
				return ret;
			}
			res->corruptions--;
			res->corruptions_fixed++;
			ret = ck_ref(c, off, cs);
			if (ret < 0)
				return ret;
			continue;
resize_fail:
			c->rebuild = true;
			ck_say(c, "ERROR could not resize image: %s",
			       strerror(-ret));
			continue;
		}
		if (!off)
			continue;
		ret = ck_ref(c, off, cs);
		if (ret < 0)
			return ret;
		if (ck_get(c, ci) != 1) {
			ck_say(c, "ERROR refcount block %" PRIu64
			       " refcount=%" PRIu64, i, ck_get(c, ci));
			res->corruptions++;
			c->rebuild = true;
		}
	}
	return 0;
}

/* Counts every reference of the image into c->rc. */
static int calculate(struct ck *c, int fix)
{
	struct qcow2 *s = c->s;
	int ret;

	c->flen = 0;
	ret = snapshot_table_size(c, &c->sn_size);
	if (!ret)
		ret = read_exts(c, &c->ext);
	if (ret < 0) {
		c->res->check_errors++;
		return ret;
	}
	ret = ck_ref(c, 0, s->cluster_size);
	if (ret < 0)
		return ret;
	ret = check_l1(c, s->l1_offset, s->l1_size, true, fix, true);
	if (ret < 0)
		return ret;
	for (uint32_t i = 0; i < s->nb_snapshots; i++) {
		const struct qcow2_snapshot *sn = &s->sn[i];

		if (sn->l1_offset & (s->cluster_size - 1)) {
			ck_say(c, "ERROR snapshot %s (%s) l1_offset=%#"
			       PRIx64 ": L1 table is not cluster aligned; "
			       "snapshot table entry corrupted",
			       sn->info.id, sn->info.name, sn->l1_offset);
			c->res->corruptions++;
			continue;
		}
		if (sn->l1_size > CK_MAX_L1_ENTRIES) {
			ck_say(c, "ERROR snapshot %s (%s) l1_size=%#"
			       PRIx32 ": L1 table is too large; snapshot "
			       "table entry corrupted", sn->info.id,
			       sn->info.name, sn->l1_size);
			c->res->corruptions++;
			continue;
		}
		ret = check_l1(c, sn->l1_offset, sn->l1_size, false, fix,
			       false);
		if (ret < 0)
			return ret;
	}
	ret = ck_ref(c, s->snapshots_offset, c->sn_size);
	if (ret < 0)
		return ret;
	ret = ck_ref(c, s->rt_offset, s->rt_size * 8);
	if (ret < 0)
		return ret;
	if (c->ext.crypt_len) {
		ret = ck_ref(c, c->ext.crypt_off, c->ext.crypt_len);
		if (ret < 0)
			return ret;
	}
	ret = check_bitmaps(c, &c->ext);
	if (ret < 0)
		return ret;
	return check_refblocks(c, fix);
}

/* Compares the image's refcounts with the computed ones; with fix, leaks
 * (refcount too high) and corruptions (too low, but not zero) are
 * corrected. *highest: last cluster in use. */
static void compare(struct ck *c, int fix, uint64_t *highest)
{
	struct qcow2 *s = c->s;
	struct check_result *res = c->res;

	*highest = 0;
	for (uint64_t i = 0; i < c->nb; i++) {
		uint64_t r1, r2, diff, bi = i >> s->rb_bits;
		int *fixed = NULL;
		int ret;

		/* no refcount block on disk, no reference counted: the
		 * whole block agrees */
		if (!(i & ((1ULL << s->rb_bits) - 1)) &&
		    (bi >= s->rt_size ||
		     !(s->rt[bi] & QCOW2_RT_OFFSET_MASK)) &&
		    ck_block_unused(c, bi)) {
			i += (1ULL << s->rb_bits) - 1;
			continue;
		}
		r2 = qcow2_rb_get(s->refcount_order, c->rc, i);
		ret = disk_rc(c, i, &r1);
		if (ret < 0) {
			ck_say(c, "Can't get refcount for cluster %"
			       PRIu64 ": %s", i, strerror(-ret));
			res->check_errors++;
			continue;
		}
		if (r1 || r2)
			*highest = i;
		if (r1 == r2)
			continue;
		if (!r1)
			c->rebuild = true;
		else if (r1 > r2 && (fix & CHECK_FIX_LEAKS))
			fixed = &res->leaks_fixed;
		else if (r1 < r2 && (fix & CHECK_FIX_ERRORS))
			fixed = &res->corruptions_fixed;
		ck_say(c, "%s cluster %" PRIu64 " refcount=%" PRIu64
		       " reference=%" PRIu64, fixed ? "Repairing" :
		       r1 < r2 ? "ERROR" : "Leaked", i, r1, r2);
		diff = r1 > r2 ? r1 - r2 : r2 - r1;
		if (fixed && diff <= INT64_MAX) {
			int64_t d = r1 > r2 ? -(int64_t)diff : (int64_t)diff;
			uint64_t off = i << s->cluster_bits;

			ret = qcow2_rc_update(c->bs, off, s->cluster_size, d);
			if (ret >= 0) {
				/* a freed cluster is discarded, as qemu
				 * does, which keeps the file sparse */
				if (!r2)
					(void)bfile_discard(c->bs->file, off,
							    s->cluster_size);
				(*fixed)++;
				continue;
			}
		}
		if (r1 < r2)
			res->corruptions++;
		else
			res->leaks++;
	}
}

/* ---- rebuilding the refcount structure ---- */

/* count free clusters in c->rc from *first_free on (growing the array at
 * the end of the image when needed), now with refcount 1. */
static int64_t alloc_in_array(struct ck *c, uint64_t count,
			      uint64_t *first_free)
{
	uint64_t ci = *first_free, run = 0;
	bool first_gap = true;
	int ret;

	for (; ci < c->nb && run < count; ci++) {
		if (!qcow2_rb_get(c->s->refcount_order, c->rc, ci)) {
			run++;
			if (first_gap) {
				*first_free = ci;
				first_gap = false;
			}
		} else {
			run = 0;
		}
	}
	if (run < count) {
		ret = ck_resize(c, ci + count - run);
		if (ret < 0)
			return ret;
	}
	ci -= run;
	for (uint64_t k = 0; k < count; k++)
		qcow2_rb_set(c->s->refcount_order, c->rc, ci + k, 1);
	return (int64_t)(ci << c->s->cluster_bits);
}

/* Writes a refcount block for every block of [first, end) that has a
 * cluster in use, allocating the blocks in the array itself. Returns 1 if
 * the new refcount table had to grow, 0 if not, or -errno. */
static int write_refblocks(struct ck *c, uint64_t first, uint64_t end,
			   uint64_t **prt, uint64_t *pn)
{
	struct qcow2 *s = c->s;
	uint64_t cs = s->cluster_size, first_free = 0, *rt = *prt, n = *pn;
	bool grown = false;
	int ret;

	for (uint64_t ci = first; ci < end; ci++) {
		uint64_t bi = ci >> s->rb_bits, bstart = bi << s->rb_bits;
		uint64_t boff;

		if (ci == bstart && ck_block_unused(c, bi)) {
			ci = bstart + (1ULL << s->rb_bits) - 1;
			continue;
		}
		if (!ck_get(c, ci))
			continue;
		if (bi < n && rt[bi]) {
			boff = rt[bi];
		} else {
			int64_t a;

			/* never inside a block already written */
			if (first_free < bstart)
				first_free = bstart;
			a = alloc_in_array(c, 1, &first_free);
			if (a < 0)
				return qcow2_set_errmsg(c->bs, (int)a,
					"ERROR allocating refblock: %s",
					strerror((int)-a));
			boff = (uint64_t)a;
			if ((boff >> s->cluster_bits) >= end)
				end = (boff >> s->cluster_bits) + 1;
			if (bi >= n) {
				uint64_t nn = ALIGN_UP((bi + 1) * 8, cs) / 8;
				uint64_t *p;

				if (nn * 8 > QCOW2_MAX_RT_BYTES)
					return qcow2_set_errmsg(c->bs, -EFBIG,
						"ERROR allocating reftable "
						"memory");
				p = realloc(rt, nn * 8);
				if (!p)
					return qcow2_set_errmsg(c->bs, -ENOMEM,
						"ERROR allocating reftable "
						"memory");
				memset(p + n, 0, (nn - n) * 8);
				*prt = rt = p;
				*pn = n = nn;
				grown = true;
			}
			rt[bi] = boff;
		}
		/* the block is the slice of the array it describes */
		ret = overlap_check(c, 0, boff, cs);
		if (!ret)
			ret = bfile_pwrite(c->bs->file, boff, c->rc + bi * cs,
					   cs);
		if (ret < 0)
			return qcow2_set_errmsg(c->bs, ret, "ERROR writing "
						"refblock: %s",
						strerror(-ret));
		ci = bstart + (1ULL << s->rb_bits) - 1;
	}
	return grown;
}

/* New refcount blocks and table from the computed refcounts, placed in
 * clusters nothing uses; the header switches to them last, so a failure
 * before leaves the old structure in place. The old blocks become
 * leaks that the caller frees. */
static int rebuild(struct ck *c)
{
	struct qcow2 *s = c->s;
	struct blk *bs = c->bs;
	uint64_t cs = s->cluster_size, *rt = NULL, n = 0, len = 0, tc = 0;
	int64_t rt_off = -1;
	uint8_t *buf = NULL, hdr[12];
	int ret;

	ret = qcow2_cache_flush(bs, &s->rbc);
	if (ret < 0)
		goto fail;
	for (int i = 0; i < s->rbc.n; i++)
		qcow2_cache_drop(&s->rbc, s->rbc.e[i].off);
	ret = write_refblocks(c, 0, c->nb, &rt, &n);
	if (ret < 0)
		goto fail;
	do {
		uint64_t first_free = 0, start;

		len = n * 8;
		tc = DIV_ROUND_UP(len, cs);
		rt_off = alloc_in_array(c, tc, &first_free);
		if (rt_off < 0) {
			ret = qcow2_set_errmsg(bs, (int)rt_off, "ERROR "
					       "allocating reftable: %s",
					       strerror((int)-rt_off));
			goto fail;
		}
		start = (uint64_t)rt_off >> s->cluster_bits;
		ret = write_refblocks(c, start, start + tc, &rt, &n);
		if (ret < 0)
			goto fail;
	} while (ret > 0);
	buf = blk_alloc_buf(len);
	if (!buf) {
		ret = -ENOMEM;
		goto fail;
	}
	for (uint64_t i = 0; i < n; i++)
		st_be64(buf + i * 8, rt[i]);
	ret = overlap_check(c, 0, (uint64_t)rt_off, len);
	if (!ret)
		ret = bfile_pwrite(bs->file, (uint64_t)rt_off, buf, len);
	if (ret < 0) {
		qcow2_set_errmsg(bs, ret, "ERROR writing reftable: %s",
				 strerror(-ret));
		goto fail;
	}
	/* everything the new table points to is on disk before the header
	 * points to it */
	ret = bfile_flush(bs->file);
	if (ret < 0)
		goto fail;
	st_be64(hdr, (uint64_t)rt_off);
	st_be32(hdr + 8, (uint32_t)tc);
	ret = qcow2_write_header_field(bs, QH_RT_OFFSET, hdr, sizeof(hdr));
	if (!ret)
		ret = bfile_flush(bs->file);
	if (ret < 0) {
		qcow2_set_errmsg(bs, ret, "ERROR setting reftable: %s",
				 strerror(-ret));
		goto fail;
	}
	qcow2_set_rt(s, rt, n, (uint64_t)rt_off, (uint32_t)tc);
	s->free_hint = 0;
	s->free_byte_off = 0;
	free(buf);
	return 0;
fail:
	free(rt);
	free(buf);
	return ret;
}

/* ---- OFLAG_COPIED ---- */

static int write_l1_entry(struct ck *c, uint32_t i)
{
	uint8_t b[8];

	int ret = overlap_check(c, OL_ACTIVE_L1, c->s->l1_offset +
				(uint64_t)i * 8, 8);

	if (ret < 0)
		return ret;
	st_be64(b, c->s->l1[i]);
	return bfile_pwrite(c->bs->file, c->s->l1_offset + (uint64_t)i * 8,
			    b, 8);
}

/* The COPIED flag of the active L1/L2 entries must be set exactly when
 * the refcount of what they point to is 1. */
static int check_copied(struct ck *c, int fix)
{
	struct qcow2 *s = c->s;
	struct check_result *res = c->res;
	uint64_t cs = s->cluster_size;
	unsigned n = 1u << s->l2_bits;
	uint8_t *t = malloc(cs);
	bool repair;
	int ret = 0;

	if (!t) {
		res->check_errors++;
		return -ENOMEM;
	}
	if (fix & CHECK_FIX_ERRORS)
		repair = true;
	else if (fix & CHECK_FIX_LEAKS)
		/* safe only when the refcounts are known to be right */
		repair = !res->check_errors && !res->corruptions &&
			 !res->leaks;
	else
		repair = false;
	for (uint32_t i = 0; i < s->l1_size; i++) {
		uint64_t l1e = s->l1[i], l2 = l1e & QCOW2_OFFSET_MASK, rc;
		int dirty = 0;

		if (!l2)
			continue;
		if (disk_rc(c, l2 >> s->cluster_bits, &rc) < 0)
			continue;
		if ((rc == 1) != !!(l1e & QCOW2_OFLAG_COPIED)) {
			res->corruptions++;
			ck_say(c, "%s OFLAG_COPIED L2 cluster: l1_index="
			       "%u l1_entry=%" PRIx64 " refcount=%" PRIu64,
			       repair ? "Repairing" : "ERROR", i, l1e, rc);
			if (repair) {
				s->l1[i] = rc == 1 ? l1e | QCOW2_OFLAG_COPIED :
					   l1e & ~QCOW2_OFLAG_COPIED;
				ret = write_l1_entry(c, i);
				if (ret < 0) {
					res->check_errors++;
					goto out;
				}
				res->corruptions--;
				res->corruptions_fixed++;
			}
		}
		ret = bfile_pread(c->bs->file, l2, t, cs);
		if (ret < 0) {
			ck_say(c, "ERROR: Could not read L2 table: %s",
			       strerror(-ret));
			res->check_errors++;
			goto out;
		}
		for (unsigned j = 0; j < n; j++) {
			uint8_t *p = t + (size_t)j * s->l2_esize;
			uint64_t e = ld_be64(p);
			int type = l2_type(s, e);

			if (type != T_NORMAL && type != T_ZERO_ALLOC)
				continue;
			if (disk_rc(c, (e & QCOW2_OFFSET_MASK) >>
				    s->cluster_bits, &rc) < 0)
				continue;
			if ((rc == 1) == !!(e & QCOW2_OFLAG_COPIED))
				continue;
			res->corruptions++;
			ck_say(c, "%s OFLAG_COPIED data cluster: "
			       "l2_entry=%" PRIx64 " refcount=%" PRIu64,
			       repair ? "Repairing" : "ERROR", e, rc);
			if (repair) {
				st_be64(p, rc == 1 ? e | QCOW2_OFLAG_COPIED :
					e & ~QCOW2_OFLAG_COPIED);
				dirty++;
			}
		}
		if (dirty) {
			ret = overlap_check(c, OL_ACTIVE_L2, l2, cs);
			if (ret < 0) {
				ck_say(c, "ERROR: Could not write L2 "
				       "table; metadata overlap check failed: "
				       "%s", strerror(-ret));
				res->check_errors++;
				goto out;
			}
			qcow2_cache_drop(&s->l2c, l2);
			ret = bfile_pwrite(c->bs->file, l2, t, cs);
			if (ret < 0) {
				ck_say(c, "ERROR: Could not write L2 "
				       "table: %s", strerror(-ret));
				res->check_errors++;
				goto out;
			}
			res->corruptions -= dirty;
			res->corruptions_fixed += dirty;
		}
	}
	ret = 0;
out:
	free(t);
	return ret;
}

/* ---- the check ---- */

static bool bs_has_msg(const struct blk *bs)
{
	return bs->errmsg[0] != 0;
}

static int check_refcounts(struct ck *c, int fix)
{
	struct qcow2 *s = c->s;
	struct check_result *res = c->res;
	struct check_result pre;
	uint64_t cs = s->cluster_size, highest = 0, nb;
	int64_t size = bfile_size(c->bs->file);
	int ret;

	if (size < 0) {
		res->check_errors++;
		return (int)size;
	}
	nb = DIV_ROUND_UP((uint64_t)size, cs);
	if (nb > CK_MAX_CLUSTERS) {
		res->check_errors++;
		return -EFBIG;
	}
	res->total_clusters = DIV_ROUND_UP(c->bs->size & ~511ULL, cs);
	res->has_stats = true;
	ret = ck_resize(c, nb);
	if (ret < 0) {
		res->check_errors++;
		return ret;
	}
	ret = calculate(c, fix);
	if (ret < 0)
		return ret;
	/* with a plain repair, the comparison runs again to fix */
	pre = *res;
	compare(c, 0, &highest);

	if (c->rebuild && (fix & CHECK_FIX_ERRORS)) {
		struct check_result old = *res, saved;
		int fresh_leaks = 0;

		ck_say(c, "Rebuilding refcount structure");
		ret = rebuild(c);
		if (ret < 0) {
			c->report = bs_has_msg(c->bs);
			res->check_errors++;
			return ret;
		}
		res->corruptions = 0;
		res->leaks = 0;
		/* references again, now with the new table counted */
		c->rebuild = false;
		memset(c->rc, 0, c->rc_bytes);
		ret = calculate(c, 0);
		if (ret < 0)
			return ret;
		if (fix & CHECK_FIX_LEAKS) {
			/* the old structure is leaked now: free it; leaks
			 * that remain were made by the rebuild */
			saved = *res;
			*res = (struct check_result){
				.report = res->report,
				.report_opaque = res->report_opaque,
			};
			compare(c, CHECK_FIX_LEAKS, &highest);
			if (c->rebuild)
				ck_say(c, "ERROR rebuilt refcount "
				       "structure is still broken");
			fresh_leaks = res->leaks;
			*res = saved;
		}
		if (res->corruptions < old.corruptions)
			res->corruptions_fixed += old.corruptions -
						  res->corruptions;
		if (res->leaks < old.leaks)
			res->leaks_fixed += old.leaks - res->leaks;
		res->leaks += fresh_leaks;
	} else if (fix) {
		if (c->rebuild) {
			ck_say(c, "ERROR need to rebuild refcount "
			       "structures");
			res->check_errors++;
			return -EIO;
		}
		if (res->leaks || res->corruptions) {
			*res = pre;
			compare(c, fix, &highest);
		}
	}
	if (fix) {
		ret = qcow2_cache_flush_all(c->bs);
		if (ret < 0) {
			res->check_errors++;
			return ret;
		}
	}
	ret = check_copied(c, fix);
	if (ret < 0)
		return ret;
	res->image_end_offset = (highest + 1) * cs;
	return 0;
}

/* Clears the dirty and corrupt bits of an image found consistent. */
static int mark_clean(struct blk *bs)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t bits = QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT;
	uint8_t b[8];
	int ret;

	if (!(s->incompat & bits) || s->version < 3)
		return 0;
	ret = qcow2_cache_flush_all(bs);
	if (!ret)
		ret = bfile_flush(bs->file);
	if (ret < 0)
		return ret;
	st_be64(b, s->incompat & ~bits);
	ret = qcow2_write_header_field(bs, QH_INCOMPAT, b, 8);
	if (!ret)
		ret = bfile_flush(bs->file);
	if (ret < 0)
		return ret;
	s->incompat &= ~bits;
	return 0;
}

/* From snapshot.c when it is built: rewrites the snapshot table
 * with complete entries. */
int qcow2_snapshot_table_upgrade(struct blk *bs) __attribute__((weak));

/* Version 3 snapshot table entries must carry at least the 64-bit VM
 * state size and the disk size (16 bytes of extra data). Returns how
 * many do not. */
static int check_sn_extra(struct ck *c, int fix)
{
	struct qcow2 *s = c->s;
	uint64_t off = s->snapshots_offset;
	uint8_t h[40];
	int bad = 0, ret;

	if (s->version < 3)
		return 0;
	for (uint32_t i = 0; i < s->nb_snapshots; i++) {
		off = ALIGN_UP(off, 8);
		if (off - s->snapshots_offset > QCOW2_MAX_SN_TABLE)
			break;
		ret = bfile_pread(c->bs->file, off, h, sizeof(h));
		if (ret < 0)
			return ret;
		if (ld_be32(h + 36) < 16) {
			ck_say(c, "%s snapshot table entry %u is "
			       "incomplete", fix & CHECK_FIX_ERRORS ?
			       "Repairing" : "ERROR", i);
			bad++;
		}
		off += 40 + (uint64_t)ld_be32(h + 36) + ld_be16(h + 12) +
		       ld_be16(h + 14);
	}
	return bad;
}

int qcow2_check(struct blk *bs, struct check_result *res, int fix)
{
	struct qcow2 *s = qcow2_state(bs);
	struct ck c = { .bs = bs, .s = s, .res = res };
	int ret, sn_bad;

	if (!(bs->flags & BLK_O_RDWR) || s->read_only)
		fix = 0;
	bs->errmsg[0] = 0;
	if (fix) {
		/* the check reads metadata from the file itself */
		ret = qcow2_cache_flush_all(bs);
		if (ret < 0)
			return ret;
	}
	sn_bad = check_sn_extra(&c, fix);
	if (sn_bad < 0) {
		res->check_errors++;
		return sn_bad;
	}
	ret = check_refcounts(&c, fix);
	free(c.rc);
	blk_meta_free(bs, c.rc_bytes);
	if (!ret && sn_bad && (fix & CHECK_FIX_ERRORS) &&
	    qcow2_snapshot_table_upgrade) {
		ret = qcow2_cache_flush_all(bs);
		if (!ret)
			ret = qcow2_snapshot_table_upgrade(bs);
		if (ret < 0) {
			ck_say(&c, "ERROR failed to update the snapshot "
			       "table: %s", strerror(-ret));
			res->check_errors++;
		} else {
			res->corruptions_fixed += sn_bad;
			sn_bad = 0;
		}
	}
	res->corruptions += sn_bad;
	/* only the messages of a failed rebuild are worth showing; others
	 * are left over from calls whose failure the check counted */
	if (ret >= 0 || !c.report)
		bs->errmsg[0] = 0;
	if (ret < 0)
		goto out;
	if (fix && !res->check_errors && !res->corruptions)
		ret = mark_clean(bs);
out:
	if (fix) {
		int r = qcow2_cache_flush_all(bs);
		if (!ret && r < 0)
			ret = r;
	}
	return ret;
}
