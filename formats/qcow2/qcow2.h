/* qcow2.h - internal interface of the qcow2 driver (the files of formats/qcow2/).
 *
 * Layout (docs/interop/qcow2.txt): a header cluster, a refcount table of
 * refcount blocks, an L1 table of L2 tables of cluster descriptors, an
 * optional snapshot table. All on-disk integers are big-endian.
 *
 * Other parts of imgbox (check, snapshots) use the metadata through the
 * functions below: qcow2_rc_get/qcow2_rc_update for refcounts,
 * qcow2_alloc_clusters/qcow2_free_clusters for allocation, qcow2_l2_get
 * for the L1/L2 walk and qcow2_cache_flush_all to write metadata back. */
#ifndef IMGBOX_QCOW2_H
#define IMGBOX_QCOW2_H

#include <pthread.h>
#include "blk_driver.h"

extern const struct blk_driver qcow2_driver;

/* The options from "size" to "refcount_bits" that create and amend both
 * take, in QEMU's order; create shows defaults for the last two. */
#define QCOW2_OPTS_IMAGE(lazy_default, refcount_bits_default) \
	{ "size", OPT_SIZE, "Virtual disk size", NULL, false }, \
	{ "compat", OPT_STRING, \
	  "Compatibility level (v2 [0.10] or v3 [1.1])", NULL, false }, \
	{ "backing_file", OPT_STRING, "File name of a base image", NULL, \
	  false }, \
	{ "backing_fmt", OPT_STRING, "Image format of the base image", \
	  NULL, false }, \
	{ "data_file", OPT_STRING, "File name of an external data file", \
	  NULL, false }, \
	{ "data_file_raw", OPT_BOOL, "The external data file must stay " \
	  "valid as a raw image", NULL, false }, \
	{ "lazy_refcounts", OPT_BOOL, "Postpone refcount updates", \
	  lazy_default, false }, \
	{ "refcount_bits", OPT_NUMBER, "Width of a reference count entry " \
	  "in bits", refcount_bits_default, false }

#define QCOW2_MAGIC		0x514649fbu	/* "QFI\xfb" */

#define QCOW2_INCOMPAT_DIRTY	(1ULL << 0)
#define QCOW2_INCOMPAT_CORRUPT	(1ULL << 1)
#define QCOW2_INCOMPAT_DATAFILE	(1ULL << 2)
#define QCOW2_INCOMPAT_COMPRESS	(1ULL << 3)
#define QCOW2_INCOMPAT_EXTL2	(1ULL << 4)
#define QCOW2_INCOMPAT_KNOWN	0x1fULL
#define QCOW2_COMPAT_LAZY	(1ULL << 0)
#define QCOW2_AUTOCLEAR_BITMAPS	(1ULL << 0)
#define QCOW2_AUTOCLEAR_RAWDATA	(1ULL << 1)

#define QCOW2_EXT_END		0x00000000u
#define QCOW2_EXT_BACKING_FMT	0xe2792acau
#define QCOW2_EXT_FEATURES	0x6803f857u
#define QCOW2_EXT_BITMAPS	0x23852875u
#define QCOW2_EXT_CRYPTO	0x0537be77u
#define QCOW2_EXT_DATAFILE	0x44415441u

/* Table entries */
#define QCOW2_OFLAG_COPIED	(1ULL << 63)
#define QCOW2_OFLAG_COMPRESSED	(1ULL << 62)
#define QCOW2_OFLAG_ZERO	(1ULL << 0)
#define QCOW2_OFFSET_MASK	0x00fffffffffffe00ULL	/* bits 9-55 */
#define QCOW2_L1E_RESERVED	0x7f000000000001ffULL
#define QCOW2_L2E_RESERVED	0x3f000000000001feULL
#define QCOW2_RT_OFFSET_MASK	0xfffffffffffffe00ULL

/* Header field offsets */
#define QH_VERSION		4
#define QH_BACKING_OFF		8
#define QH_BACKING_SIZE		16
#define QH_CLUSTER_BITS		20
#define QH_SIZE			24
#define QH_CRYPT		32
#define QH_L1_SIZE		36
#define QH_L1_OFFSET		40
#define QH_RT_OFFSET		48
#define QH_RT_CLUSTERS		56
#define QH_NB_SNAPSHOTS		60
#define QH_SNAPSHOTS_OFF	64
#define QH_INCOMPAT		72
#define QH_COMPAT		80
#define QH_AUTOCLEAR		88
#define QH_REFCOUNT_ORDER	96
#define QH_HEADER_LEN		100
#define QH_COMPRESSION		104

/* Caps on what a hostile image can make us allocate. */
#define QCOW2_MAX_L1_BYTES	(32u << 20)
#define QCOW2_MAX_RT_BYTES	(8u << 20)
#define QCOW2_MAX_SNAPSHOTS	65536
#define QCOW2_MAX_SN_TABLE	(64u << 20)

/* A small LRU cache of cluster-sized metadata tables. */
struct qcow2_cache_ent {
	uint64_t off;		/* 0 = empty slot */
	uint64_t lru;
	bool dirty;
	uint8_t *data;
};
struct qcow2_cache {
	int n;
	size_t csize;
	uint64_t tick;
	struct qcow2_cache_ent *e;
};

/* Cluster types as the read side sees a unit (cluster or subcluster). */
enum qcow2_type {
	QC_UNALLOC,		/* ask the backing file */
	QC_UNALLOC_ALLOC,	/* same, inside an allocated host cluster */
	QC_ZERO,		/* reads as zero, no host cluster */
	QC_ZERO_ALLOC,		/* reads as zero, host cluster preallocated */
	QC_NORMAL,		/* data at the host offset */
	QC_COMPRESSED,		/* compressed descriptor in *host */
};

struct qcow2_snapshot {
	uint64_t l1_offset;
	uint32_t l1_size;
	struct snapshot_info info;
	uint64_t disk_size;
};

struct qcow2 {
	uint32_t version;
	unsigned cluster_bits;
	uint64_t cluster_size;
	unsigned l2_bits;		/* log2(entries per L2 table) */
	unsigned l2_esize;		/* 8, or 16 with extended L2 */
	bool ext_l2;
	unsigned sc_bits;		/* log2(subcluster size) */
	uint32_t header_length;
	uint64_t incompat, compat, autoclear;
	uint8_t compression_type;
	uint32_t crypt_method;

	uint32_t l1_size;
	uint64_t l1_offset;
	uint64_t *l1;			/* host byte order */

	unsigned refcount_order;
	uint64_t rc_max;		/* largest refcount value */
	unsigned rb_bits;		/* log2(entries per refcount block) */
	uint64_t rt_offset;
	uint32_t rt_clusters;
	uint64_t rt_size;		/* entries */
	uint64_t *rt;			/* host byte order */
	uint64_t free_hint;		/* first cluster that may be free */
	uint64_t free_byte_off;		/* compressed data packing */

	uint32_t nb_snapshots;
	uint64_t snapshots_offset;
	struct qcow2_snapshot *sn;

	bool has_bitmaps;
	uint32_t bm_nb;			/* bitmaps extension, kept as is */
	uint64_t bm_dir_size, bm_dir_off;
	bool has_datafile;
	bool has_crypto_ext;
	char *datafile_name;

	/* Locking (the driver is BLK_CAP_PARALLEL_READ): bs->lock guards
	 * every field below and the tables above that change after open (l1,
	 * rt, sn, the allocator), and bs->errmsg. The block layer holds it
	 * around every callback but pread and block_status, which take it
	 * only to map a range and copy the host offsets out; their data I/O,
	 * the backing file and inflating run without it. */
	struct qcow2_cache l2c, rbc;
	/* last decompressed cluster, for reads of parts of one */
	uint64_t zc_desc;
	uint64_t zc_gen;		/* counts frees of clusters */
	uint8_t *zc_buf;
	bool read_only;
	int meta_prealloc;		/* 0 unknown, 1 no, 2 yes */
};

static inline struct qcow2 *qcow2_state(struct blk *bs)
{
	return bs->opaque;
}

static inline void qcow2_lock(struct blk *bs)
{
	pthread_mutex_lock(&bs->lock);
}

static inline void qcow2_unlock(struct blk *bs)
{
	pthread_mutex_unlock(&bs->lock);
}

/* qcow2.c */
int qcow2_set_errmsg(struct blk *bs, int ret, const char *fmt, ...)
	PRINTF(3, 4);
int qcow2_write_header_field(struct blk *bs, unsigned off, const void *v,
			     size_t len);

/* the metadata cache (in refcount.c) */
/* The header cluster hc (cs bytes, zeroed past p) from p on: the
 * backing format extension (file and fmt given), QEMU's feature name
 * table (features > 0), the extensions of old from q up to limit except
 * those two (features < 0: old feature tables stay), the end mark and
 * the backing name with its header fields. -ENOSPC when it does not fit. */
int qcow2_header_tail(uint8_t *hc, uint64_t cs, uint64_t p, const char *file,
		      const char *fmt, int features, const uint8_t *old,
		      uint64_t q, uint64_t limit);
/* Rewrites and flushes the first cluster: the header as it is, or, for
 * another version, rebuilt from s; then qcow2_header_tail. */
int qcow2_rewrite_header(struct blk *bs, uint32_t version, const char *file,
			 const char *fmt, int features);
int qcow2_cache_init(struct qcow2_cache *c, int n, size_t csize);
void qcow2_cache_free(struct qcow2_cache *c);
/* Returns the cached table at host offset off (read unless fresh). */
int qcow2_cache_get(struct blk *bs, struct qcow2_cache *c, uint64_t off,
		    bool fresh, uint8_t **data);
void qcow2_cache_dirty(struct qcow2_cache *c, uint8_t *data);
int qcow2_cache_flush(struct blk *bs, struct qcow2_cache *c);
/* Refcount blocks first, then L2 tables (refcount before reference). */
int qcow2_cache_flush_all(struct blk *bs);
void qcow2_cache_drop(struct qcow2_cache *c, uint64_t off);

/* refcount.c */
int qcow2_refcount_init(struct blk *bs, struct err *e);
/* refcount of cluster index ci (0 if beyond the table) */
int qcow2_rc_get(struct blk *bs, uint64_t ci, uint64_t *rc);
/* Entry i of a refcount block of 2^order-bit entries, in the on-disk
 * encoding (qcow2.txt: big endian; below 8 bits, entry 0 sits in the least
 * significant bits of byte 0). check.c counts in the same encoding. */
static inline uint64_t qcow2_rb_get(unsigned order, const uint8_t *b,
				    uint64_t i)
{
	unsigned bits = 1u << order;

	switch (bits) {
	case 64: return ld_be64(b + i * 8);
	case 32: return ld_be32(b + i * 4);
	case 16: return ld_be16(b + i * 2);
	case 8: return b[i];
	default:
		return (uint64_t)(b[i * bits / 8] >> (i * bits % 8)) &
		       ((1u << bits) - 1);
	}
}

static inline void qcow2_rb_set(unsigned order, uint8_t *b, uint64_t i,
				uint64_t v)
{
	unsigned bits = 1u << order, sh, m;

	switch (bits) {
	case 64: st_be64(b + i * 8, v); return;
	case 32: st_be32(b + i * 4, (uint32_t)v); return;
	case 16: st_be16(b + i * 2, (uint16_t)v); return;
	case 8: b[i] = (uint8_t)v; return;
	default:
		sh = (unsigned)(i * bits % 8);
		m = ((1u << bits) - 1) << sh;
		b[i * bits / 8] = (uint8_t)((b[i * bits / 8] & ~m) |
					    ((v << sh) & m));
	}
}
/* add delta (may be negative) to the refcount of clusters covering
 * [off, off+len) */
int qcow2_rc_update(struct blk *bs, uint64_t off, uint64_t len,
		    int64_t delta);
/* n contiguous fresh clusters, refcount 1; returns the host offset */
int64_t qcow2_alloc_clusters(struct blk *bs, uint64_t n);
int64_t qcow2_alloc_bytes(struct blk *bs, uint64_t len);
void qcow2_free_clusters(struct blk *bs, uint64_t off, uint64_t len);
/* s uses the refcount table rt (n entries, host order; s takes it) that
 * the header now points to at off, of the given clusters */
void qcow2_set_rt(struct qcow2 *s, uint64_t *rt, uint64_t n, uint64_t off,
		  uint32_t clusters);
/* drop the reference an L2 entry holds */
void qcow2_free_l2_entry(struct blk *bs, uint64_t entry);

/* map.c */
/* The L2 table covering guest offset off; alloc: make one that is ours
 * (refcount 1) if needed. NULL table (ret 0) = none and !alloc. */
int qcow2_l2_get(struct blk *bs, uint64_t off, bool alloc, uint8_t **tbl,
		 unsigned *idx);
int qcow2_map(struct blk *bs, uint64_t off, uint64_t len, uint64_t *pnum,
	      uint64_t *host, enum qcow2_type *type);
int qcow2_pread(struct blk *bs, uint64_t off, void *buf, size_t len);
int qcow2_pwrite(struct blk *bs, uint64_t off, const void *buf, size_t len);
int qcow2_pwrite_zeroes(struct blk *bs, uint64_t off, uint64_t len,
			unsigned flags);
int qcow2_discard(struct blk *bs, uint64_t off, uint64_t len);
int qcow2_block_status(struct blk *bs, uint64_t off, uint64_t len,
		       uint64_t *pnum, uint64_t *map, struct bfile **mfile);
int qcow2_write_compressed(struct blk *bs, uint64_t off, const void *buf,
			   size_t len);
/* its two halves, for convert's workers (blk_driver.h) */
long qcow2_compress_cluster(struct blk *bs, void *dst, size_t dstlen,
			    const void *src, size_t len);
int qcow2_write_precompressed(struct blk *bs, uint64_t off, const void *cbuf,
			      size_t clen);
/* compressed descriptor -> host offset and byte length */
void qcow2_compressed_range(const struct qcow2 *s, uint64_t desc,
			    uint64_t *off, uint64_t *len);

/* check.c: consistency check, fix = CHECK_FIX_* */
int qcow2_check(struct blk *bs, struct check_result *res, int fix);

/* The driver's other callbacks, each in the file of its subject. */
/* measure.c */
int qcow2_measure(const struct optlist *opts, struct blk *in, uint64_t size,
		  struct measure_info *mi, struct err *e);
/* backing.c */
int qcow2_change_backing(struct blk *bs, const char *file, const char *fmt,
			 struct err *e);
int qcow2_make_empty(struct blk *bs);
/* snapload.c */
int qcow2_snapshot_load_tmp(struct blk *bs, const char *id, const char *name,
			    struct err *e);
/* amend.c */
int qcow2_amend(struct blk *bs, const struct optlist *opts, bool force,
		struct err *e);
extern const struct optdesc qcow2_amend_opts[];
/* snapshot.c */
int qcow2_snapshot_create(struct blk *bs, const struct snapshot_info *sn,
			  struct err *e);
int qcow2_snapshot_apply(struct blk *bs, const char *id_or_name,
			 struct err *e);
int qcow2_snapshot_delete(struct blk *bs, const char *id, const char *name,
			  struct err *e);
/* txn.c: a metadata change that takes effect in one header write.
 * begin reads the refcounts into memory; ref/ref_tree/alloc change them
 * there (alloc: clusters past the image as it was, refcount 1, for new
 * copies of tables); write_l1 settles OFLAG_COPIED in the active tree l1
 * (copying the L2 tables whose flags change) and writes it anew; commit
 * writes new refcount blocks and table, then the header fields from size
 * to snapshots_offset, and makes s describe the new image. Until commit
 * returns 0 the image on disk is the old one. */
struct qcow2_txn {
	struct blk *bs;
	uint8_t *rc;		/* refcounts after the change, disk encoding */
	uint8_t *dirty;		/* per refcount block: changed */
	uint64_t blocks;	/* refcount blocks rc holds */
	uint64_t nb;		/* clusters counted */
	uint64_t next;		/* next cluster to allocate */
	/* the header after the change */
	uint64_t size;
	uint64_t *l1;		/* active L1, host order */
	uint32_t l1_size;
	uint64_t l1_offset;
	uint32_t nb_snapshots;
	uint64_t snapshots_offset;
};
int qcow2_txn_begin(struct blk *bs, struct qcow2_txn *t);
void qcow2_txn_free(struct qcow2_txn *t);
int qcow2_txn_ref(struct qcow2_txn *t, uint64_t off, uint64_t len,
		  int delta);
/* delta on every L2 table and host cluster the tree l1[0..n) reaches */
int qcow2_txn_ref_tree(struct qcow2_txn *t, const uint64_t *l1, uint32_t n,
		       int delta);
int64_t qcow2_txn_alloc(struct qcow2_txn *t, uint64_t len);
int qcow2_txn_write_l1(struct qcow2_txn *t, bool free_old);
int qcow2_txn_commit(struct qcow2_txn *t);
/* for amend (snapshot.c; weak in check.c, which works without it) */
int qcow2_snapshot_table_upgrade(struct blk *bs);

/* compress.c */
/* Thread-safe: each thread keeps its own inflate state. */
int qcow2_inflate(const uint8_t *in, size_t inlen, uint8_t *out,
		  size_t outlen);
/* >0: compressed length; -ENOSPC: does not shrink */
long qcow2_deflate(const uint8_t *in, size_t inlen, uint8_t *out,
		   size_t outlen);

#endif
