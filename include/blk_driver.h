/* blk_driver.h - the format-driver interface: one const struct of
 * callbacks per format (formats/NAME.c), registered by its
 * "//format:FORMAT(NAME)" line and collected by kconfig/gen.sh.
 *
 * A driver sees only its own layer. It does all file I/O through bs->file
 * (bfile_*), reads unallocated ranges through blk_read_backing(), returns
 * 0 or -errno and puts detail in bs->errmsg or the struct err. */
#ifndef IMGBOX_BLK_DRIVER_H
#define IMGBOX_BLK_DRIVER_H

#include "blk.h"

struct blk_driver {
	const char *name;
	unsigned caps;
	size_t state_size;		/* bytes of bs->opaque */
	const struct optdesc *create_opts;	/* NULL-name terminated */

	/* Score 0..100 for the first len bytes (at least 512 when the file
	 * is that long). raw scores 1. */
	int (*probe)(const uint8_t *buf, size_t len, const char *filename);
	/* bs->file is open, bs->flags set. Set bs->size and, if any,
	 * bs->backing_file/backing_fmt (malloc'd). */
	int (*open)(struct blk *bs, struct err *e);
	void (*close)(struct blk *bs);

	int (*pread)(struct blk *bs, uint64_t off, void *buf, size_t len);
	int (*pwrite)(struct blk *bs, uint64_t off, const void *buf,
		      size_t len);
	/* Optional: the layer falls back to writing zero buffers. */
	int (*pwrite_zeroes)(struct blk *bs, uint64_t off, uint64_t len,
			     unsigned flags);
	int (*discard)(struct blk *bs, uint64_t off, uint64_t len);
	/* Status of [off, off+len) in this layer; *pnum > 0 on success. Set
	 * map and mfile with BLK_STAT_OFFSET. */
	int (*block_status)(struct blk *bs, uint64_t off, uint64_t len,
			    uint64_t *pnum, uint64_t *map,
			    struct bfile **mfile);
	int (*write_compressed)(struct blk *bs, uint64_t off, const void *buf,
				size_t len);
	int (*flush)(struct blk *bs);
	int (*truncate)(struct blk *bs, uint64_t size, int prealloc,
			bool shrink, struct err *e);

	/* opts: size, backing_file, backing_fmt and create_opts entries,
	 * already validated. The file does not exist yet or is truncated by
	 * the driver. */
	int (*create)(const char *filename, const struct optlist *opts,
		      struct err *e);
	int (*get_info)(struct blk *bs, struct blk_info *bi);
	int (*check)(struct blk *bs, struct check_result *res, int fix);

	int (*snapshot_list)(struct blk *bs, struct snapshot_info **list,
			     int *n);
	int (*snapshot_create)(struct blk *bs, const struct snapshot_info *sn,
			       struct err *e);
	int (*snapshot_apply)(struct blk *bs, const char *id_or_name,
			      struct err *e);
	int (*snapshot_delete)(struct blk *bs, const char *id,
			       const char *name, struct err *e);
	/* Rewrites the recorded backing file name/format (NULL file: none). */
	int (*change_backing)(struct blk *bs, const char *file,
			      const char *fmt, struct err *e);
	int (*amend)(struct blk *bs, const struct optlist *opts, bool force,
		     struct err *e);
	/* Options amend accepts (NULL-name terminated), for -o help and
	 * validation; create_opts not in it are creation-only. */
	const struct optdesc *amend_opts;
	/* in may be NULL (measure --size). */
	int (*measure)(const struct optlist *opts, struct blk *in,
		       uint64_t size, struct measure_info *mi, struct err *e);
	/* Optional: every range becomes unallocated, so reads go to the
	 * backing file (img-commit empties the committed image). */
	int (*make_empty)(struct blk *bs);
	/* Optional, read-only images: read the internal snapshot matching
	 * id and/or name instead of the image until it is closed; -ENOENT
	 * when none matches (img-measure -l). */
	int (*snapshot_load_tmp)(struct blk *bs, const char *id,
				 const char *name, struct err *e);
	/* Options recognised by create_opts printed on the Formatting line
	 * (qemu-img create). NULL: the generic printer. */

	/* Optional pair that lets convert compress on all cores and still
	 * commit in order. compress is called WITHOUT bs->lock and must only
	 * read settings fixed at open: it compresses one cluster (len <=
	 * cluster size, padded by the caller) into dst and returns the
	 * compressed length, or -ENOSPC when it does not fit in dstlen (the
	 * caller then writes the cluster uncompressed). write_precompressed
	 * stores such a result as the compressed cluster at off. */
	long (*compress)(struct blk *bs, void *dst, size_t dstlen,
			 const void *src, size_t len);
	int (*write_precompressed)(struct blk *bs, uint64_t off,
				   const void *cbuf, size_t clen);
	/* Optional: bytes on disk of all files of the image (info's disk
	 * size) when the image has more files than bs->file. */
	int64_t (*allocated_size)(struct blk *bs);
};

/* Locks a further file of the image (an extent) as bs->file is locked
 * (DESIGN.md, image locking); metadata: the file holds metadata too. */
int blk_lock_file(struct blk *bs, struct bfile *f, bool metadata,
		  struct err *e);

const struct blk_driver *blk_find_driver(const char *name);
/* NULL-terminated list of compiled-in drivers, in table order. */
extern const struct blk_driver *const blk_drivers[];
/* Probe: best-scoring driver for the first bytes of a file. */
const struct blk_driver *blk_probe(const uint8_t *buf, size_t len,
				   const char *filename);
/* A file name another file names (backing file, extent): relative to the
 * directory of image unless absolute. malloc'd; NULL without memory. */
char *blk_relative_path(const char *image, const char *name);

/* ---- the untrusted-image policy (block/untrusted.c); both pass
 * everything without BLK_O_UNTRUSTED ---- */
/* What blk_ref_check saw of a file an image names, for blk_ref_opened. */
struct blk_ref {
	uint64_t dev, ino;
	bool checked;
};
/* Before opening name, recorded in bs as what ("backing file", "extent",
 * "data file"): -EPERM with a message naming both when it is a protocol,
 * json:, absolute, has a '..' component, resolves outside bs's directory
 * or is not a regular file. */
int blk_ref_check(const struct blk *bs, const char *what, const char *name,
		  struct blk_ref *ref, struct err *e);
/* After opening it as f: still the file that was checked. */
int blk_ref_opened(const struct blk *bs, const char *what, const char *name,
		   const struct blk_ref *ref, const struct bfile *f,
		   struct err *e);
/* Memory an image makes us allocate, sized from its contents: call before
 * allocating a table of bytes (what: "L1 table", ...); -EFBIG with a
 * message (in e, else bs->errmsg) over BLK_UNTRUSTED_TABLE for one table
 * or BLK_UNTRUSTED_TOTAL for all tables of bs. blk_meta_free gives back
 * what a table freed before close had taken. */
#define BLK_UNTRUSTED_TABLE	(16ULL << 20)
#define BLK_UNTRUSTED_TOTAL	(64ULL << 20)
int blk_meta_alloc(struct blk *bs, uint64_t bytes, const char *what,
		   struct err *e);
void blk_meta_free(struct blk *bs, uint64_t bytes);
unsigned blk_default_flags(void);

/* For block/convert.c: the driver's write_precompressed under bs->lock. */
int blk_write_precompressed(struct blk *bs, uint64_t off, const void *cbuf,
			    size_t clen);

#endif
