/* qed.c - QEMU Enhanced Disk: a little-endian header, one L1 table and
 * L2 tables of table_size clusters each, data clusters allocated at the
 * end of the file (docs/interop/qed_spec.txt). */
//config:config FORMAT_QED
//config:	bool "qed"
//config:	default y
//config:	help
//config:	  QEMU Enhanced Disk images (.qed): two-level cluster tables,
//config:	  backing files and zero clusters. Read, write, create, grow
//config:	  and check.
//format:FORMAT(qed)

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "fmt.h"

#define QED_MAGIC		0x00444551	/* "QED\0" little-endian */
#define QED_HDR_SIZE		64
#define QED_F_BACKING_FILE	0x1
#define QED_F_NEED_CHECK	0x2
#define QED_F_BACKING_RAW	0x4	/* backing file is raw, never probe */
#define QED_F_KNOWN		0x7
#define QED_MIN_CLUSTER		4096u
#define QED_MAX_CLUSTER		(64u << 20)
#define QED_MAX_TABLE		16u
/* Metadata cap: one table (L1 or a cached L2) in memory. */
#define QED_MAX_TABLE_BYTES	(256ULL << 20)
/* The longest backing file name QEMU reads (its buffer is PATH_MAX). */
#define QED_MAX_BACKING_NAME	4095u
/* Cluster bitmap cap for check: 2^31 clusters of the file. */
#define QED_MAX_CHECK_CLUSTERS	(1ULL << 31)

/* An L2 entry: 0 = unallocated (ask backing), 1 = reads as zeroes. */
#define QED_UNALLOC	0
#define QED_ZERO	1

struct qed {
	const struct fmt_map *map;	/* first: fmt_map_* find it here */
	uint32_t cluster_size, table_size, header_size;
	unsigned cluster_bits, table_bits;	/* table_bits: log2(entries) */
	uint64_t entries;			/* per table */
	uint64_t table_bytes;
	uint64_t features, compat, autoclear;
	uint64_t l1_offset, image_size;
	uint64_t header_end;		/* header_size * cluster_size */
	uint64_t file_end;		/* next cluster to allocate */
	uint64_t *l1;
	uint64_t *l2;			/* one cached L2 table */
	uint64_t l2_offset;		/* its offset, 0 = none cached */
};

static const struct optdesc qed_create_opts[] = {
	FMT_OPT_SIZE,
	FMT_OPT_BACKING,
	{ "cluster_size", OPT_SIZE, "Cluster size (in bytes)", "65536",
	  false },
	FMT_OPT("table_size", OPT_SIZE, "L1/L2 table size (in clusters)"),
	FMT_OPT_FILE
};

static const struct fmt_map qed_map;

static bool is_pow2(uint64_t v)
{
	return v && !(v & (v - 1));
}

static unsigned log2_u64(uint64_t v)
{
	unsigned n = 0;

	while (v > 1) {
		v >>= 1;
		n++;
	}
	return n;
}

static bool qed_cluster_size_ok(uint64_t cs)
{
	return is_pow2(cs) && cs >= QED_MIN_CLUSTER && cs <= QED_MAX_CLUSTER;
}

static bool qed_table_size_ok(uint64_t ts)
{
	return is_pow2(ts) && ts <= QED_MAX_TABLE;
}

/* Largest image the tables can map: entries^2 clusters. QEMU computes it
 * in 64-bit arithmetic that wraps for the biggest geometries; we do the
 * same so that the same images are refused. */
static uint64_t qed_max_size(uint64_t cs, uint64_t ts)
{
	uint64_t entries = cs * ts / 8;

	return entries * entries * cs;
}

static bool qed_image_size_ok(uint64_t size, uint64_t cs, uint64_t ts)
{
	return IS_ALIGNED(size, 512) && size <= qed_max_size(cs, ts);
}

static int qed_probe(const uint8_t *buf, size_t len, const char *filename)
{
	(void)filename;
	if (len < QED_HDR_SIZE || ld_le32(buf) != QED_MAGIC)
		return 0;
	return 100;
}

/* A data cluster offset is valid when aligned, past the header and inside
 * the file. */
static bool qed_cluster_ok(const struct qed *s, uint64_t off)
{
	return IS_ALIGNED(off, s->cluster_size) && off >= s->header_end &&
	       off < s->file_end;
}

/* A table offset is valid when its first and last cluster are. Like QEMU,
 * a one-cluster table fails the "last cluster past the first" test. */
static bool qed_table_ok(const struct qed *s, uint64_t off)
{
	uint64_t last = off + (uint64_t)(s->table_size - 1) * s->cluster_size;

	if (last <= off)
		return false;
	return qed_cluster_ok(s, off) && qed_cluster_ok(s, last);
}

static int qed_read_table(struct blk *bs, uint64_t off, uint64_t *t)
{
	struct qed *s = bs->opaque;
	int ret = bfile_pread(bs->file, off, t, s->table_bytes);

	if (ret < 0)
		return ret;
	for (uint64_t i = 0; i < s->entries; i++)
		t[i] = ld_le64(&t[i]);
	return 0;
}

static int qed_write_header(struct blk *bs)
{
	struct qed *s = bs->opaque;
	uint8_t h[48];

	st_le32(h, QED_MAGIC);
	st_le32(h + 4, s->cluster_size);
	st_le32(h + 8, s->table_size);
	st_le32(h + 12, s->header_size);
	st_le64(h + 16, s->features);
	st_le64(h + 24, s->compat);
	st_le64(h + 32, s->autoclear);
	st_le64(h + 40, s->l1_offset);
	/* image_size follows at 48; the backing name fields never change */
	{
		uint8_t sz[8];
		int ret = bfile_pwrite(bs->file, 0, h, sizeof(h));
		if (ret < 0)
			return ret;
		st_le64(sz, s->image_size);
		return bfile_pwrite(bs->file, 48, sz, 8);
	}
}

static int qed_check_impl(struct blk *bs, struct check_result *res,
			  int fix);

static int qed_do_open(struct blk *bs, struct err *e)
{
	struct qed *s = bs->opaque;
	uint8_t h[QED_HDR_SIZE];
	int64_t fsize = fmt_read_header(bs, h, sizeof(h), "header", e);
	int ret;

	if (fsize < 0)
		return (int)fsize;
	if (ld_le32(h) != QED_MAGIC)
		return fmt_err(e, -EINVAL, "Image not in QED format");
	s->cluster_size = ld_le32(h + 4);
	s->table_size = ld_le32(h + 8);
	s->header_size = ld_le32(h + 12);
	s->features = ld_le64(h + 16);
	s->compat = ld_le64(h + 24);
	s->autoclear = ld_le64(h + 32);
	s->l1_offset = ld_le64(h + 40);
	s->image_size = ld_le64(h + 48);

	if (s->features & ~(uint64_t)QED_F_KNOWN)
		return fmt_err(e, -ENOTSUP, "Unsupported QED features: %llx",
			       (unsigned long long)(s->features &
						    ~(uint64_t)QED_F_KNOWN));
	if (!qed_cluster_size_ok(s->cluster_size))
		return fmt_err(e, -EINVAL, "QED cluster size is invalid");
	if (!qed_table_size_ok(s->table_size))
		return fmt_err(e, -EINVAL, "QED table size is invalid");
	if (!qed_image_size_ok(s->image_size, s->cluster_size,
			       s->table_size))
		return fmt_err(e, -EINVAL, "QED image size is invalid");
	s->cluster_bits = log2_u64(s->cluster_size);
	s->table_bytes = (uint64_t)s->table_size * s->cluster_size;
	s->entries = s->table_bytes / 8;
	s->table_bits = log2_u64(s->entries);
	s->header_end = (uint64_t)s->header_size * s->cluster_size;
	/* A partial cluster at the end of the file does not count: new
	 * clusters start at the last cluster boundary (spec: "extra
	 * information after the last cluster may not be preserved"). */
	s->file_end = ALIGN_DOWN((uint64_t)fsize, s->cluster_size);
	if (!qed_table_ok(s, s->l1_offset))
		return fmt_err(e, -EINVAL, "QED table offset is invalid");
	if (s->table_bytes > QED_MAX_TABLE_BYTES)
		return fmt_err(e, -EFBIG, "QED table of %llu bytes is too "
			       "large", (unsigned long long)s->table_bytes);

	if (s->features & QED_F_BACKING_FILE) {
		uint32_t boff = ld_le32(h + 56), blen = ld_le32(h + 60);

		if ((uint64_t)boff + blen > s->header_end)
			return fmt_err(e, -EINVAL, "QED backing filename "
				       "offset is invalid");
		if (blen > QED_MAX_BACKING_NAME)
			return fmt_err(e, -EINVAL, "Failed to read backing "
				       "filename");
		ret = fmt_read_backing_name(bs, boff, blen, "Failed to read "
					    "backing filename", e);
		if (ret < 0)
			return ret;
		if (s->features & QED_F_BACKING_RAW) {
			bs->backing_fmt = strdup("raw");
			if (!bs->backing_fmt)
				return -ENOMEM;
		}
	}

	if (blk_meta_alloc(bs, 2ULL * s->table_bytes, "QED L1 and L2 tables",
			   e) < 0)
		return -EFBIG;
	s->l1 = malloc(s->table_bytes);
	s->l2 = malloc(s->table_bytes);
	if (!s->l1 || !s->l2)
		return fmt_err(e, -ENOMEM, "%s", strerror(ENOMEM));
	ret = qed_read_table(bs, s->l1_offset, s->l1);
	if (ret < 0)
		return fmt_err(e, ret, "Could not read L1 table: %s",
			       strerror(-ret));
	bs->size = s->image_size;
	s->map = &qed_map;

	if (bs->flags & BLK_O_RDWR) {
		bool dirty = false;

		/* Unknown autoclear bits are dropped by a writer (spec). */
		if (s->autoclear) {
			s->autoclear = 0;
			dirty = true;
		}
		/* An interrupted writer left the image marked: repair what a
		 * check can repair, then clear the mark. */
		if ((s->features & QED_F_NEED_CHECK) &&
		    !(bs->flags & BLK_O_CHECK)) {
			struct check_result r;
			memset(&r, 0, sizeof(r));
			ret = qed_check_impl(bs, &r, CHECK_FIX_ERRORS);
			if (ret < 0)
				return fmt_err(e, ret, "Image corrupted");
			/* the mark stays while something is left unfixed */
			if (r.corruptions == r.corruptions_fixed &&
			    !r.check_errors) {
				s->features &= ~(uint64_t)QED_F_NEED_CHECK;
				dirty = true;
			}
		}
		if (dirty) {
			ret = qed_write_header(bs);
			if (ret < 0)
				return fmt_err(e, ret, "Could not update "
					       "header: %s", strerror(-ret));
		}
	}
	return 0;
}

static void qed_close(struct blk *bs)
{
	struct qed *s = bs->opaque;

	free(s->l1);
	free(s->l2);
	s->l1 = s->l2 = NULL;
}

static int qed_open(struct blk *bs, struct err *e)
{
	return fmt_open(bs, e, qed_do_open, qed_close);
}

/* Loads the L2 table at off into the cache. */
static int qed_load_l2(struct blk *bs, uint64_t off)
{
	struct qed *s = bs->opaque;
	int ret;

	if (s->l2_offset == off)
		return 0;
	if (!qed_table_ok(s, off))
		return -EINVAL;
	s->l2_offset = 0;
	ret = qed_read_table(bs, off, s->l2);
	if (ret < 0)
		return ret;
	s->l2_offset = off;
	return 0;
}

/* Position of a guest offset in the tables. */
static void qed_index(const struct qed *s, uint64_t off, uint64_t *l1i,
		      uint64_t *l2i)
{
	*l1i = off >> (s->cluster_bits + s->table_bits);
	*l2i = (off >> s->cluster_bits) & (s->entries - 1);
}

/* Bytes from off to the end of its L2 table's range, capped at len. */
static uint64_t qed_span(const struct qed *s, uint64_t off, uint64_t len)
{
	uint64_t span = 1ULL << (s->cluster_bits + s->table_bits);
	uint64_t left = span - (off & (span - 1));

	return MIN(left, len);
}

/* Classifies the run starting at off (inside one L2 span, at most len
 * bytes): the L2 entry of its first cluster (0, 1 or a host offset) and
 * the run length. Data runs are host-contiguous. */
static int qed_lookup(struct blk *bs, uint64_t off, uint64_t len,
		      enum fmt_op op, struct fmt_run *r)
{
	struct qed *s = bs->opaque;
	uint64_t l1i, l2i, l2off, first, cs = s->cluster_size;
	uint64_t in = off & (cs - 1), n;
	int ret;

	(void)op;
	len = qed_span(s, off, len);
	qed_index(s, off, &l1i, &l2i);
	l2off = s->l1[l1i];
	r->kind = FMT_UNALLOC;
	r->entry = QED_UNALLOC;
	r->len = len;
	if (l2off == QED_UNALLOC)
		return 0;
	ret = qed_load_l2(bs, l2off);
	if (ret < 0)
		return ret;
	first = s->l2[l2i];
	if (first != QED_UNALLOC && first != QED_ZERO &&
	    !qed_cluster_ok(s, first))
		return -EINVAL;
	n = cs - in;
	for (uint64_t i = l2i + 1; n < len && i < s->entries; i++) {
		uint64_t e = s->l2[i];
		if (first == QED_UNALLOC || first == QED_ZERO) {
			if (e != first)
				break;
		} else if (e != first + (i - l2i) * cs ||
			   !qed_cluster_ok(s, e)) {
			break;
		}
		n += cs;
	}
	r->entry = first;
	r->len = MIN(n, len);
	if (first == QED_ZERO)
		r->kind = FMT_ZERO;
	else if (first != QED_UNALLOC)
		r->kind = FMT_DATA;
	r->host = first + in;
	return 0;
}

/* Writes L2 entries [i, i+n) of the cached table to disk. */
static int qed_write_l2_entries(struct blk *bs, uint64_t i, uint64_t n)
{
	struct qed *s = bs->opaque;
	uint8_t *raw = malloc(n * 8);
	int ret;

	if (!raw)
		return -ENOMEM;
	for (uint64_t k = 0; k < n; k++)
		st_le64(raw + k * 8, s->l2[i + k]);
	ret = bfile_pwrite(bs->file, s->l2_offset + i * 8, raw, n * 8);
	free(raw);
	return ret;
}

/* Makes sure the L2 table for l1i exists and is cached: a new one is
 * placed at the end of the file, written whole, then linked from L1. */
static int qed_get_l2(struct blk *bs, uint64_t l1i)
{
	struct qed *s = bs->opaque;
	uint64_t off;
	uint8_t raw[8];
	int ret;

	if (s->l1[l1i] != QED_UNALLOC)
		return qed_load_l2(bs, s->l1[l1i]);
	off = s->file_end;
	s->l2_offset = 0;
	memset(s->l2, 0, s->table_bytes);
	ret = bfile_pwrite(bs->file, off, s->l2, s->table_bytes);
	if (ret < 0)
		return ret;
	s->file_end = off + s->table_bytes;
	st_le64(raw, off);
	ret = bfile_pwrite(bs->file, s->l1_offset + l1i * 8, raw, 8);
	if (ret < 0)
		return ret;
	s->l1[l1i] = off;
	s->l2_offset = off;
	return 0;
}

/* Fills a whole new cluster at guest offset coff with what it read as
 * before it was allocated: backing data or zeroes. */
static int qed_cow_fill(struct blk *bs, uint64_t coff, uint64_t entry,
			uint8_t *cbuf)
{
	struct qed *s = bs->opaque;
	uint64_t n = s->cluster_size;

	memset(cbuf, 0, n);
	if (entry != QED_UNALLOC || coff >= s->image_size)
		return 0;
	n = MIN(n, s->image_size - coff);
	return blk_read_backing(bs, coff, cbuf, (size_t)n);
}

/* Allocates and writes the clusters of a run of unallocated or zero
 * clusters [off, off+len) (one L2 span), data first, then the L2 entries.
 * buf NULL: the new clusters read as zero. */
static int qed_alloc_write(struct blk *bs, uint64_t off, const uint8_t *buf,
			   struct fmt_run *r)
{
	uint64_t len = r->len, entry = r->entry;
	struct qed *s = bs->opaque;
	uint64_t cs = s->cluster_size, start = ALIGN_DOWN(off, cs);
	uint64_t end = ALIGN_UP(off + len, cs), nclusters = (end - start) / cs;
	uint64_t host = s->file_end, l1i, l2i;
	uint8_t *cbuf = NULL;
	int ret = 0;

	if (host > UINT64_MAX - (end - start) - s->table_bytes)
		return -EFBIG;
	cbuf = blk_alloc_buf(cs);
	if (!cbuf)
		return -ENOMEM;
	for (uint64_t c = start; c < end; c += cs) {
		uint64_t lo = MAX(c, off), hi = MIN(c + cs, off + len);
		uint64_t h = host + (c - start);

		if (lo == c && hi == c + cs && buf) {
			/* whole cluster from the caller */
			ret = bfile_pwrite(bs->file, h, buf + (c - off), cs);
		} else {
			ret = qed_cow_fill(bs, c, entry, cbuf);
			if (ret < 0)
				break;
			if (buf)
				memcpy(cbuf + (lo - c), buf + (lo - off),
				       hi - lo);
			else
				memset(cbuf + (lo - c), 0, hi - lo);
			ret = bfile_pwrite(bs->file, h, cbuf, cs);
		}
		if (ret < 0)
			break;
	}
	free(cbuf);
	if (ret < 0)
		return ret;
	s->file_end = host + (end - start);
	qed_index(s, start, &l1i, &l2i);
	ret = qed_get_l2(bs, l1i);
	if (ret < 0)
		return ret;
	for (uint64_t k = 0; k < nclusters; k++)
		s->l2[l2i + k] = host + k * cs;
	return qed_write_l2_entries(bs, l2i, nclusters);
}

static const struct fmt_map qed_map = {
	.lookup = qed_lookup,
	.alloc_write = qed_alloc_write,
};

/* Whole clusters become zero clusters (entry 1, which also hides the
 * backing file); allocated clusters are zeroed in place so that nothing
 * leaks; partial clusters are written. */
static int qed_pwrite_zeroes(struct blk *bs, uint64_t off, uint64_t len,
			     unsigned flags)
{
	struct qed *s = bs->opaque;
	uint64_t cs = s->cluster_size;

	(void)flags;
	while (len) {
		uint64_t entry, n, head, l1i, l2i;
		struct fmt_run r;
		int ret;

		ret = qed_lookup(bs, off, len, FMT_WRITE, &r);
		if (ret < 0)
			return ret;
		entry = r.entry;
		n = r.len;
		head = off & (cs - 1);
		if (head || n < cs) {
			/* partial cluster: at most up to its end */
			n = r.len = MIN(n, cs - head);
			if (entry == QED_ZERO)
				;
			else if (entry == QED_UNALLOC)
				ret = qed_alloc_write(bs, off, NULL, &r);
			else
				ret = bfile_zero(bs->file, entry + head, n,
						 false);
		} else {
			n = ALIGN_DOWN(n, cs);
			if (entry == QED_ZERO)
				;
			else if (entry != QED_UNALLOC) {
				ret = bfile_zero(bs->file, entry, n, false);
			} else {
				qed_index(s, off, &l1i, &l2i);
				ret = qed_get_l2(bs, l1i);
				if (ret < 0)
					return ret;
				for (uint64_t k = 0; k < n / cs; k++)
					s->l2[l2i + k] = QED_ZERO;
				ret = qed_write_l2_entries(bs, l2i, n / cs);
			}
		}
		if (ret < 0)
			return ret;
		off += n;
		len -= n;
	}
	return 0;
}

static int qed_truncate(struct blk *bs, uint64_t size, int prealloc,
			bool shrink, struct err *e)
{
	struct qed *s = bs->opaque;
	uint64_t old = s->image_size;
	int ret;

	(void)shrink;
	if (prealloc != PREALLOC_OFF) {
		err_set(e, "Unsupported preallocation mode '%s'",
			prealloc_names[prealloc]);
		return -ENOTSUP;
	}
	if (!qed_image_size_ok(size, s->cluster_size, s->table_size)) {
		err_set(e, "Invalid image size specified");
		return -EINVAL;
	}
	if (size < old) {
		err_set(e, "Shrinking images is currently not supported");
		return -ENOTSUP;
	}
	s->image_size = size;
	ret = qed_write_header(bs);
	if (ret < 0) {
		s->image_size = old;
		err_set(e, "Failed to update the image size: %s",
			strerror(-ret));
	}
	return ret;
}

/* Rewrites the backing file name after the header (it must fit in the
 * header clusters) and the feature bits that go with it. */

/* QED's "backing file is raw" bit: the backing file's bytes are the guest
 * bytes (a format that maps guest bytes to file bytes one to one). */
static bool backing_is_raw(const char *fmt)
{
	return fmt && blk_format_can(fmt, BLK_CAP_FILE_MAP);
}

static int qed_change_backing(struct blk *bs, const char *file,
			      const char *fmt, struct err *e)
{
	struct qed *s = bs->opaque;
	size_t len = file ? strlen(file) : 0;
	char *nb = NULL, *nf = NULL;
	uint8_t loc[8];
	int ret;

	if (QED_HDR_SIZE + (uint64_t)len > s->header_end ||
	    len > QED_MAX_BACKING_NAME) {
		err_set(e, "No space left in the file header");
		return -ENOSPC;
	}
	if (file && (!(nb = strdup(file)) ||
		     (fmt && !(nf = strdup(fmt))))) {
		free(nb);
		return -ENOMEM;
	}
	s->features &= ~(uint64_t)(QED_F_BACKING_FILE | QED_F_BACKING_RAW);
	if (file) {
		s->features |= QED_F_BACKING_FILE;
		if (backing_is_raw(fmt))
			s->features |= QED_F_BACKING_RAW;
		ret = bfile_pwrite(bs->file, QED_HDR_SIZE, file, len);
		if (ret < 0)
			goto fail;
	}
	st_le32(loc, QED_HDR_SIZE);
	st_le32(loc + 4, (uint32_t)len);
	ret = bfile_pwrite(bs->file, 56, loc, 8);
	if (ret == 0)
		ret = qed_write_header(bs);
	if (ret < 0)
		goto fail;
	free(bs->backing_file);
	free(bs->backing_fmt);
	bs->backing_file = nb;
	/* QED records only "raw" as a backing format */
	bs->backing_fmt = backing_is_raw(nf) ? nf : NULL;
	if (bs->backing_fmt != nf)
		free(nf);
	return 0;
fail:
	free(nb);
	free(nf);
	err_set(e, "%s", strerror(-ret));
	return ret;
}

static int qed_get_info(struct blk *bs, struct blk_info *bi)
{
	struct qed *s = bs->opaque;

	bi->cluster_size = s->cluster_size;
	return 0;
}

/* Marks clusters [off, off+n*cs) used; false if one already was. */
static bool qed_mark(uint8_t *map, uint64_t cl, uint64_t n)
{
	bool ok = true;

	for (uint64_t i = cl; i < cl + n; i++) {
		if (map[i >> 3] & (1u << (i & 7)))
			ok = false;
		map[i >> 3] |= (uint8_t)(1u << (i & 7));
	}
	return ok;
}

/* QED check: every L1/L2 offset valid and referenced once; clusters of
 * the file nobody references are leaks (they cannot be repaired: QED has
 * no refcounts, so a leak is only wasted space). With fix, invalid
 * offsets are cleared, which makes the range unallocated. */
static int qed_check_impl(struct blk *bs, struct check_result *res,
			  int fix)
{
	struct qed *s = bs->opaque;
	uint64_t cs = s->cluster_size, nfile = s->file_end / cs;
	uint64_t last = 0, tcl = s->table_size;
	uint8_t *map;
	bool l1_dirty = false;
	int ret = 0;

	if (nfile > QED_MAX_CHECK_CLUSTERS)
		return -EFBIG;
	map = calloc(1, (size_t)(nfile / 8 + 1));
	if (!map)
		return -ENOMEM;
	res->total_clusters = DIV_ROUND_UP(s->image_size, cs);
	res->has_stats = true;
	qed_mark(map, 0, MIN(s->header_size, nfile));
	qed_mark(map, s->l1_offset / cs, tcl);
	for (uint64_t i = 0; i < s->entries; i++) {
		uint64_t l2off = s->l1[i];
		bool l2_dirty = false;

		if (l2off == QED_UNALLOC)
			continue;
		if (!qed_table_ok(s, l2off)) {
			res->corruptions++;
			if (fix & CHECK_FIX_ERRORS) {
				s->l1[i] = QED_UNALLOC;
				l1_dirty = true;
				res->corruptions_fixed++;
			}
			continue;
		}
		if (!qed_mark(map, l2off / cs, tcl)) {
			res->corruptions++;
			continue;
		}
		ret = qed_load_l2(bs, l2off);
		if (ret < 0) {
			res->check_errors++;
			ret = 0;
			continue;
		}
		for (uint64_t j = 0; j < s->entries; j++) {
			uint64_t d = s->l2[j];

			if (d == QED_UNALLOC || d == QED_ZERO)
				continue;
			res->allocated_clusters++;
			if (last && d != last + cs)
				res->fragmented_clusters++;
			last = d;
			if (!qed_cluster_ok(s, d)) {
				res->corruptions++;
				if (fix & CHECK_FIX_ERRORS) {
					s->l2[j] = QED_UNALLOC;
					l2_dirty = true;
					res->corruptions_fixed++;
				}
				continue;
			}
			if (!qed_mark(map, d / cs, 1))
				res->corruptions++;
		}
		if (l2_dirty) {
			ret = qed_write_l2_entries(bs, 0, s->entries);
			if (ret < 0)
				break;
		}
	}
	for (uint64_t c = 0; c < nfile && !ret; c++)
		if (!(map[c >> 3] & (1u << (c & 7))))
			res->leaks++;
	free(map);
	if (!ret && l1_dirty) {
		uint8_t *raw = malloc(s->table_bytes);
		if (!raw)
			return -ENOMEM;
		for (uint64_t i = 0; i < s->entries; i++)
			st_le64(raw + i * 8, s->l1[i]);
		ret = bfile_pwrite(bs->file, s->l1_offset, raw,
				   s->table_bytes);
		free(raw);
	}
	return ret;
}

static int qed_check(struct blk *bs, struct check_result *res, int fix)
{
	struct qed *s = bs->opaque;
	int ret;

	if (fix && !(bs->flags & BLK_O_RDWR))
		fix = 0;
	ret = qed_check_impl(bs, res, fix);
	if (ret < 0)
		return ret;
	/* A clean image no longer needs a check on open. */
	if (fix && res->corruptions == res->corruptions_fixed &&
	    (s->features & QED_F_NEED_CHECK)) {
		s->features &= ~(uint64_t)QED_F_NEED_CHECK;
		ret = qed_write_header(bs);
	}
	return ret;
}

static int qed_create(const char *filename, const struct optlist *opts,
		      struct err *e)
{
	uint64_t size = 0, cs = 65536, ts = 4, hdr_clusters = 1, l1off;
	const char *bf = optlist_get(opts, "backing_file");
	const char *bfmt = optlist_get(opts, "backing_fmt");
	struct bfile *f;
	uint8_t *h = NULL;
	size_t blen = bf ? strlen(bf) : 0, hlen;
	int prealloc, ret;

	/* QEMU creates the file before looking at the options, so a refused
	 * option leaves an empty file behind; do the same. */
	ret = fmt_create_file(&f, filename, e);
	if (ret < 0)
		return ret;
	ret = -EINVAL;
	if (optlist_get_size(opts, "size", &size, e) < 0 ||
	    optlist_get_size(opts, "cluster_size", &cs, e) < 0 ||
	    optlist_get_size(opts, "table_size", &ts, e) < 0 ||
	    fmt_opt_prealloc(opts, &prealloc, e) < 0)
		goto out;
	if (!qed_cluster_size_ok(cs)) {
		fmt_err(e, 0, "QED cluster size must be within range [%u, %u] "
			"and power of 2", QED_MIN_CLUSTER, QED_MAX_CLUSTER);
		goto out;
	}
	if (!qed_table_size_ok(ts)) {
		fmt_err(e, 0, "QED table size must be within range [1, %u] "
			"and power of 2", QED_MAX_TABLE);
		goto out;
	}
	if (size > UINT64_MAX - 511) {
		fmt_err(e, 0, "Image size too large");
		goto out;
	}
	size = ALIGN_UP(size, 512);
	if (!qed_image_size_ok(size, cs, ts)) {
		fmt_err(e, 0, "QED image size must be a non-zero multiple of "
			"cluster size and less than %llu bytes",
			(unsigned long long)qed_max_size(cs, ts));
		goto out;
	}
	if (cs * ts > QED_MAX_TABLE_BYTES) {
		ret = fmt_err(e, -EFBIG, "QED tables of %llu bytes are too "
			      "large", (unsigned long long)(cs * ts));
		goto out;
	}
	if (blen > QED_MAX_BACKING_NAME || QED_HDR_SIZE + blen > cs) {
		fmt_err(e, 0, "Backing file name too long");
		goto out;
	}
	l1off = hdr_clusters * cs;
	hlen = QED_HDR_SIZE + blen;
	h = calloc(1, hlen);
	if (!h) {
		ret = -ENOMEM;
		goto out;
	}
	st_le32(h, QED_MAGIC);
	st_le32(h + 4, (uint32_t)cs);
	st_le32(h + 8, (uint32_t)ts);
	st_le32(h + 12, (uint32_t)hdr_clusters);
	if (bf && bf[0]) {
		uint64_t feat = QED_F_BACKING_FILE;
		if (backing_is_raw(bfmt))
			feat |= QED_F_BACKING_RAW;
		st_le64(h + 16, feat);
		st_le32(h + 56, QED_HDR_SIZE);
		st_le32(h + 60, (uint32_t)blen);
		memcpy(h + QED_HDR_SIZE, bf, blen);
	}
	st_le64(h + 40, l1off);
	st_le64(h + 48, size);
	/* The L1 table is written out (allocated) like QEMU does, then the
	 * header; the header cluster stays sparse past the header. */
	ret = fmt_write_zeroes(f, l1off, cs * ts);
	if (ret == 0)
		ret = bfile_pwrite(f, 0, h, hlen);
out:
	free(h);
	return fmt_create_end(f, ret, "Could not write the image", e);
}

const struct blk_driver qed_driver = {
	FMT_DRIVER(qed, struct qed),
	.caps = BLK_CAP_CREATE | BLK_CAP_WRITE | BLK_CAP_BACKING |
		BLK_CAP_ZERO_INIT | BLK_CAP_RESIZE | BLK_CAP_CHECK |
		BLK_CAP_ZERO_WRITES,
	FMT_MAPPED_IO,
	.pwrite_zeroes = qed_pwrite_zeroes,
	.truncate = qed_truncate,
	.check = qed_check,
	.change_backing = qed_change_backing,
};
