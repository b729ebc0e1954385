/* blk.h - the block layer as applets see it: open images by name (probing
 * or -f), read/write/zero by byte offset, ask block status through the
 * backing chain, create/resize, and the option lists of -o.
 *
 * Rules (DESIGN.md): byte offsets and lengths everywhere; functions return
 * 0 (or a non-negative count) or -errno and never exit; failures that need
 * more words than errno leave them in a struct err or in blk->errmsg. */
#ifndef IMGBOX_BLK_H
#define IMGBOX_BLK_H

#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stddef.h>
#include <pthread.h>
#include "platform.h"
#include "value.h"

struct err {
	char msg[1024];
};
void err_set(struct err *e, const char *fmt, ...) PRINTF(2, 3);
/* "PREFIX: old message" */
void err_prefix(struct err *e, const char *fmt, ...) PRINTF(2, 3);

/* ---- cache modes (-t / -T) ---- */
enum blk_cache {
	CACHE_WRITEBACK, CACHE_UNSAFE, CACHE_NONE, CACHE_DIRECTSYNC,
	CACHE_WRITETHROUGH,
};
/* 0 or -EINVAL */
int blk_parse_cache(const char *s, int *mode);

/* ---- file protocol: the one choke point for all file I/O ---- */
struct bfile {
	int fd;
	char *name;
	bool direct;		/* O_DIRECT: bounce unaligned requests */
	bool sync;		/* writethrough/directsync: fdatasync each write */
	bool no_flush;		/* cache=unsafe */
	bool read_only;
	bool is_blockdev;
	unsigned align;		/* required alignment with O_DIRECT */
	uint64_t dev, ino;	/* identity, for loops and same-file tests */
};
#define BFILE_RDWR	0x1
#define BFILE_CREATE	0x2	/* O_CREAT, then truncated */
#define BFILE_EXCL	0x4	/* with CREATE: O_EXCL */
/* With BFILE_CREATE the file is locked as bfile_lock(W|RESIZE, all but
 * RESIZE) before it is truncated. */
int bfile_open(struct bfile **pf, const char *name, unsigned flags,
	       int cache, struct err *e);
/* Image locking interoperable with QEMU: permissions this open holds and
 * those it lets other processes hold (QEMU's bits; BLK_PERM_ALL shares
 * everything). -EAGAIN with QEMU's message when another process holds
 * what we do not share or does not share what we hold. */
#define BLK_PERM_CONSISTENT_READ	0x1
#define BLK_PERM_WRITE			0x2
#define BLK_PERM_WRITE_UNCHANGED	0x4
#define BLK_PERM_RESIZE			0x8
#define BLK_PERM_ALL			0xf
int bfile_lock(struct bfile *f, unsigned perm, unsigned shared,
	       struct err *e);
void bfile_close(struct bfile *f);
/* Reads past end of file return zeroes. */
int bfile_pread(struct bfile *f, uint64_t off, void *buf, size_t len);
int bfile_pwrite(struct bfile *f, uint64_t off, const void *buf, size_t len);
int bfile_flush(struct bfile *f);
int64_t bfile_size(struct bfile *f);
int64_t bfile_allocated(struct bfile *f);	/* bytes on disk */
/* prealloc: PREALLOC_* below */
int bfile_truncate(struct bfile *f, uint64_t size, int prealloc,
		   struct err *e);
/* Make [off,off+len) read as zero; unmap = may deallocate (punch hole). */
int bfile_zero(struct bfile *f, uint64_t off, uint64_t len, bool unmap);
int bfile_discard(struct bfile *f, uint64_t off, uint64_t len);
/* Returns BLK_STAT_DATA or BLK_STAT_ZERO for the run starting at off, with
 * its length (capped at len) in *pnum. */
int bfile_block_status(struct bfile *f, uint64_t off, uint64_t len,
		       uint64_t *pnum);
/* Copies len bytes inside the kernel (copy_file_range). -EXDEV, -EINVAL,
 * -ENOSYS, -EOPNOTSUPP, -ENOTSUP, -EBADF: not possible between these
 * files; use reads and writes. */
int bfile_copy_range(struct bfile *src, uint64_t soff, struct bfile *dst,
		     uint64_t doff, uint64_t len);
struct blk_aio;
/* For blk_aio_init: a queue of requests in flight on f. */
int bfile_aio_init(struct blk_aio **pq, struct bfile *f, int depth);
/* Allocate an aligned I/O buffer (4 KiB aligned); free with free(). */
void *blk_alloc_buf(size_t len);

enum { PREALLOC_OFF, PREALLOC_METADATA, PREALLOC_FALLOC, PREALLOC_FULL };
int blk_parse_prealloc(const char *s, int *mode);
extern const char *const prealloc_names[];

/* ---- option lists (-o a=b,c=d; ",," is a literal comma) ---- */
enum opt_type { OPT_STRING, OPT_SIZE, OPT_BOOL, OPT_NUMBER };
struct optdesc {
	const char *name;
	enum opt_type type;
	const char *help;
	const char *def;	/* default printed on the Formatting line */
	bool hidden;		/* accepted, not listed by -o help */
};
struct optlist {
	int n;
	struct { char *name, *value; } *v;
};
int optlist_parse(struct optlist *l, const char *s, struct err *e);
const char *optlist_get(const struct optlist *l, const char *name);
int optlist_set(struct optlist *l, const char *name, const char *value);
void optlist_del(struct optlist *l, const char *name);
int optlist_get_size(const struct optlist *l, const char *name,
		     uint64_t *out, struct err *e);	/* 1 set, 0 absent */
int optlist_get_bool(const struct optlist *l, const char *name, bool *out,
		     struct err *e);			/* 1 set, 0 absent */
/* Rejects names not in desc (NULL-name terminated) and bad typed values. */
int optlist_validate(const struct optlist *l, const struct optdesc *desc,
		     const char *fmt, struct err *e);
void optlist_free(struct optlist *l);
/* Size with qemu-img's suffixes (b k K M G T P E, decimal fractions).
 * 0 or -EINVAL / -ERANGE. */
int parse_size(const char *s, uint64_t *out);

/* ---- capabilities: what a format can do, asked with blk_can() or
 * blk_format_can(); declared by each driver, never guessed from names. */
#define BLK_CAP_CREATE		0x0001
#define BLK_CAP_WRITE		0x0002
#define BLK_CAP_BACKING		0x0004	/* images may have backing files */
#define BLK_CAP_COMPRESS	0x0008	/* write_compressed works */
#define BLK_CAP_ZERO_INIT	0x0010	/* a new image reads as zeroes */
#define BLK_CAP_THREADSAFE	0x0020	/* all callbacks may run concurrently */
#define BLK_CAP_SNAPSHOTS	0x0040
#define BLK_CAP_RESIZE		0x0080
#define BLK_CAP_SHRINK		0x0100
#define BLK_CAP_CHECK		0x0200
#define BLK_CAP_AMEND		0x0400
#define BLK_CAP_MEASURE		0x0800
#define BLK_CAP_ZERO_WRITES	0x1000	/* pwrite_zeroes is cheap */
/* Guest byte N is byte N of bs->file, so requests may go to the file as
 * they are (libaio, copy offload). */
#define BLK_CAP_FILE_MAP	0x2000
/* pread and block_status may run concurrently (the driver guards its
 * metadata with bs->lock itself); the other callbacks are serialised. */
#define BLK_CAP_PARALLEL_READ	0x4000

/* ---- images ---- */
/* block status bits */
#define BLK_STAT_DATA		0x01	/* reads come from data in a file */
#define BLK_STAT_ZERO		0x02	/* reads as zeroes */
#define BLK_STAT_ALLOCATED	0x04	/* this layer decides the content */
#define BLK_STAT_OFFSET		0x08	/* *map is a host offset in *mfile */
#define BLK_STAT_COMPRESSED	0x10

/* open flags */
#define BLK_O_RDWR		0x01
#define BLK_O_NO_BACKING	0x02	/* leave the backing chain closed */
/* -U: let other processes write and resize (read-only opens only) */
#define BLK_O_SHARE		0x04
#define BLK_O_CHECK		0x08	/* for check: tolerate what check reports */
#define BLK_O_PROBED		0x10	/* format was guessed (set by blk_open) */
#define BLK_O_NO_FLUSH_ON_CLOSE	0x20
#define BLK_O_NO_IO		0x40	/* metadata only (info): no read lock */
#define BLK_O_NO_SHARE		0x80	/* nobody may write it meanwhile
					   (convert source, as qemu-img) */
#define BLK_O_RESIZE		0x100	/* may change the size (resize) */
/* Untrusted image (DESIGN.md): the files it names are confined to its
 * directory, its tables to BLK_UNTRUSTED_TABLE / _TOTAL bytes. Backing
 * files inherit it; blk_open adds it when blk_set_untrusted(true). */
#define BLK_O_UNTRUSTED		0x200

#define BLK_MAX_CHAIN		64	/* backing chain depth cap */

/* Opaque here: only block/ and formats/ see the driver (blk_driver.h). */
struct blk_driver;
struct blk {
	const struct blk_driver *drv;
	void *opaque;			/* drv->state_size bytes */
	struct bfile *file;		/* the image file itself */
	char *filename;			/* as given */
	uint64_t size;			/* virtual size in bytes */
	unsigned flags;			/* BLK_O_* */
	int cache;
	int depth;			/* 0 = top of the chain */
	/* Backing file as recorded in the image (empty if none), its format
	 * if recorded, the path it resolves to, and the open image. */
	char *backing_file;
	char *backing_fmt;
	char *backing_path;
	struct blk *backing;
	pthread_mutex_t lock;		/* serialises callbacks (recursive) */
	char errmsg[512];		/* detail for the last -errno, if any */
	uint64_t meta_bytes;		/* tables counted by blk_meta_alloc */
};

/* The process default of BLK_O_UNTRUSTED for every blk_open (--untrusted,
 * IMGBOX_UNTRUSTED, CONFIG_UNTRUSTED_DEFAULT, decided by the applets). */
void blk_set_untrusted(bool on);

/* Opens filename with format fmt (NULL: probe). Opens the backing chain
 * unless BLK_O_NO_BACKING. Message in e on failure. */
int blk_open(struct blk **pbs, const char *filename, const char *fmt,
	     unsigned flags, int cache, struct err *e);
void blk_close(struct blk *bs);	/* flushes if writable */
/* Strips "file:"; other "proto:" prefixes are an error. */
int blk_strip_protocol(const char *name, const char **out, struct err *e);
/* Path the recorded backing file name resolves to (relative names are
 * relative to the image's directory); malloc'd, NULL if none. */
char *blk_backing_path(const struct blk *bs);
/* The untrusted-image policy on bs's recorded backing file name, for a
 * caller that opens it itself (info --backing-chain): 0, or -EPERM with
 * the refusal in e. */
int blk_backing_allowed(const struct blk *bs, struct err *e);
/* Open the backing chain of an image opened with BLK_O_NO_BACKING. */
int blk_open_backing(struct blk *bs, struct err *e);

int blk_pread(struct blk *bs, uint64_t off, void *buf, size_t len);
int blk_pwrite(struct blk *bs, uint64_t off, const void *buf, size_t len);
#define BLK_ZERO_MAY_UNMAP	0x1
int blk_pwrite_zeroes(struct blk *bs, uint64_t off, uint64_t len,
		      unsigned flags);
/* Whole clusters only; -ENOTSUP if the format cannot compress. */
int blk_write_compressed(struct blk *bs, uint64_t off, const void *buf,
			 size_t len);
int blk_discard(struct blk *bs, uint64_t off, uint64_t len);
int blk_flush(struct blk *bs);
int blk_truncate(struct blk *bs, uint64_t size, int prealloc, bool shrink,
		 struct err *e);

/* Status of this layer only (BLK_STAT_ALLOCATED clear = ask backing). */
int blk_block_status(struct blk *bs, uint64_t off, uint64_t len,
		     uint64_t *pnum, uint64_t *map, struct bfile **mfile);
/* Status through the chain down to (not including) base (NULL: whole
 * chain). *depth is the layer that decided (0 = bs); a range no layer
 * allocates reads as zero, has no BLK_STAT_ALLOCATED, and its depth is the
 * chain length. */
int blk_block_status_above(struct blk *bs, struct blk *base, uint64_t off,
			   uint64_t len, uint64_t *pnum, uint64_t *map,
			   struct bfile **mfile, int *depth);
/* Requests in flight from one thread (Linux AIO, img-bench -n, convert
 * -t none) on an image whose guest bytes are its file's bytes, opened with
 * O_DIRECT. blk_aio_align is the alignment of offset, length and buffer
 * such requests need, 0 when bs cannot take them; without libaio every
 * call fails with -ENOSYS and callers use threads. */
unsigned blk_aio_align(struct blk *bs);
int blk_aio_init(struct blk_aio **pq, struct blk *bs, int depth);
void blk_aio_free(struct blk_aio *q);
/* -EAGAIN when depth requests are already in flight. */
int blk_aio_submit(struct blk_aio *q, bool write, uint64_t off, void *buf,
		   size_t len, void *tag);
/* Waits for at least min completions; fills tags[i] and res[i] (bytes or
 * -errno) and returns how many. */
int blk_aio_reap(struct blk_aio *q, int min, void **tags, long *res,
		 int max);
int blk_aio_inflight(const struct blk_aio *q);
/* Status of the host file under a BLK_STAT_OFFSET run (mfile, map of a
 * block status answer): BLK_STAT_DATA or BLK_STAT_ZERO for the run at off
 * (length in *pnum); *to_end when the run reaches the end of the file. */
int blk_file_status(struct bfile *f, uint64_t off, uint64_t len,
		    uint64_t *pnum, bool *to_end);
/* Both images are the same file. */
bool blk_same_file(const struct blk *a, const struct blk *b);

/* Read for a range this layer does not allocate: from the backing image,
 * zeroes where there is none or past its end. For drivers. */
int blk_read_backing(struct blk *bs, uint64_t off, void *buf, size_t len);

/* Creates an image. opts carries size (bytes), backing_file, backing_fmt
 * and format options; validated against the driver's create_opts. */
int blk_create(const char *fmt, const char *filename, struct optlist *opts,
	       struct err *e);

/* Generic information about an open image, for info. */
struct blk_info {
	uint64_t cluster_size;		/* 0 = not applicable */
	bool dirty;
	bool encrypted;
	struct val *specific;		/* format-specific object or NULL */
	/* Writes must be whole compressed clusters (vmdk streamOptimized):
	 * convert then compresses as if -c had been given, like qemu-img. */
	bool needs_compressed_writes;
};
int blk_get_info(struct blk *bs, struct blk_info *bi);

struct snapshot_info {
	char id[128];
	char name[256];
	uint64_t vm_state_size;
	uint32_t date_sec, date_nsec;
	uint64_t vm_clock_nsec;
	uint32_t icount_valid;
	uint64_t icount;
};

/* Results of a consistency check (qemu-img check). */
struct check_result {
	int corruptions, leaks, check_errors;
	int corruptions_fixed, leaks_fixed;
	uint64_t image_end_offset;
	uint64_t total_clusters, allocated_clusters, fragmented_clusters,
		 compressed_clusters;
	bool has_stats;
	/* Where the problems found go, one line at a time as they are found
	 * (no newline; NULL drops them). Set by the caller; a check keeps it
	 * whatever it does to the counters. Streaming keeps memory bounded
	 * on an image with millions of problems. */
	void (*report)(void *opaque, int kind, const char *line);
	void *report_opaque;
};
#define CHECK_FIX_LEAKS	0x1
#define CHECK_FIX_ERRORS	0x2
/* Kinds of report line: CHECK_LINE is shown as it is, CHECK_ERROR is an
 * error message that the caller prefixes with its program name. */
enum { CHECK_LINE, CHECK_ERROR };
/* Formats one report line and hands it to r->report. */
void check_report(struct check_result *r, int kind, const char *fmt, ...)
	PRINTF(3, 4);
void check_vreport(struct check_result *r, int kind, const char *fmt,
		   va_list ap) PRINTF(3, 0);
/* The sink of checks that run inside another operation (a dirty qcow2
 * image is repaired when it is opened read-write, and what was repaired
 * is reported). Set once by the program before it opens images; NULL
 * drops the lines. */
extern void (*check_default_report)(void *opaque, int kind,
				    const char *line);

/* Size estimate (qemu-img measure). */
struct measure_info {
	uint64_t required, fully_allocated, bitmaps;
	bool has_bitmaps;
};

/* ---- the format registry ---- */
/* Name of the i-th compiled-in format (table order), NULL past the end. */
const char *blk_format_at(int i);
bool blk_format_exists(const char *fmt);
/* false for a format that is not compiled in */
bool blk_format_can(const char *fmt, unsigned cap);
/* Option tables (NULL-name terminated): what create accepts, in the
 * order of the "Formatting" line; what amend accepts (NULL when the
 * format cannot amend). */
const struct optdesc *blk_format_create_opts(const char *fmt);
const struct optdesc *blk_format_amend_opts(const char *fmt);

/* ---- operations on an open image: the block layer checks capability,
 * read-only and range, and serialises drivers that are not thread-safe.
 * -ENOTSUP where the format has no such operation. ---- */
const char *blk_format(const struct blk *bs);
bool blk_can(const struct blk *bs, unsigned cap);
/* Bytes on disk of all the image's files (info's disk size). */
int64_t blk_allocated_size(struct blk *bs);
/* fix: CHECK_FIX_* */
int blk_check(struct blk *bs, struct check_result *res, int fix);
/* opts validated against blk_format_amend_opts() here. */
int blk_amend(struct blk *bs, const struct optlist *opts, bool force,
	      struct err *e);
/* Size of an image of format fmt made from in (NULL: of the given size). */
int blk_measure(const char *fmt, const struct optlist *opts, struct blk *in,
		uint64_t size, struct measure_info *mi, struct err *e);
/* *list is malloc'd (free it); *n = 0 for formats without snapshots. */
int blk_snapshot_list(struct blk *bs, struct snapshot_info **list, int *n);
int blk_snapshot_create(struct blk *bs, const struct snapshot_info *sn,
			struct err *e);
int blk_snapshot_apply(struct blk *bs, const char *id_or_name,
		       struct err *e);
int blk_snapshot_delete(struct blk *bs, const char *id, const char *name,
			struct err *e);
/* Read-only images: read the internal snapshot matching id and/or name
 * instead of the image until it is closed; -ENOENT when none matches. */
bool blk_can_load_snapshot(const struct blk *bs);
int blk_snapshot_load_tmp(struct blk *bs, const char *id, const char *name,
			  struct err *e);
/* Rewrites the recorded backing file name and format (NULL file: none). */
int blk_change_backing(struct blk *bs, const char *file, const char *fmt,
		       struct err *e);
/* Every range becomes unallocated, so reads go to the backing file. */
int blk_make_empty(struct blk *bs);

/* ---- the convert engine (block/convert.c) behind img-convert: one or
 * more source images (concatenated) into one open target, driven by block
 * status, with N worker threads, zero detection, in-order or out-of-order
 * writes and compression in the workers. It never prints: progress and
 * warnings go to the callbacks, failures to the struct err. ---- */
#define CONVERT_MAX_WORKERS	16
#define CONVERT_DEFAULT_WORKERS	8
#define CONVERT_DEFAULT_SPARSE	4096

struct convert_opts {
	struct blk **src;		/* sources, concatenated in order */
	int nsrc;
	struct blk *target;		/* open read-write */

	int workers;			/* 1..16 (-m) */
	bool out_of_order;		/* -W: write as chunks finish */
	bool compress;			/* -c */
	/* -S: zero runs of this many bytes (aligned) become holes; 0 writes
	 * every byte (fully allocated output). */
	uint64_t min_sparse;
	/* The target reads as zero everywhere before we start (fresh image
	 * without backing of a zero-initialised format, --target-is-zero):
	 * zero ranges cost no write. */
	bool target_is_zero;
	/* -B: the target has a backing file with the content of the source's
	 * backing chain. Ranges the top source image does not allocate are
	 * skipped, and data equal to the new backing file is not written. */
	bool target_has_backing;
	/* The target was created by this run: its own layer is empty, so it
	 * reads as its backing file, and data or zeroes the backing file
	 * already holds need no write. */
	bool target_is_new;
	/* With target_has_backing: per source, the image of its backing
	 * chain that is the target's new backing file (NULL: not in the
	 * chain; then only the top source image counts, as in qemu-img).
	 * Ranges nothing above it allocates are skipped. May be NULL. */
	struct blk **src_base;
	bool copy_range;		/* -C: copy_file_range where possible */
	bool salvage;			/* --salvage: zero-fill unreadable areas */
	uint64_t rate_limit;		/* -r: bytes per second, 0 = none */

	/* Called after each chunk is done, from a worker thread, serialised
	 * by the engine: done grows to total. */
	void (*progress)(void *opaque, uint64_t done, uint64_t total);
	/* A warning the caller should print (--salvage). */
	void (*warn)(void *opaque, const char *msg);
	void *opaque;
};

/* Copies everything; 0 or -errno with a message naming the file and the
 * offset in e. Sources must have a total size <= the target's. */
int convert_run(const struct convert_opts *o, struct err *e);

/* Bytes of source data that were read, and written to the target (for
 * statistics); valid after convert_run. */
struct convert_stats {
	uint64_t bytes_read, bytes_written, bytes_zeroed, compressed_clusters;
};
int convert_run_stats(const struct convert_opts *o, struct convert_stats *st,
		      struct err *e);

/* Offset of the first byte in buf[0..len) that is in a non-zero granule:
 * the buffer is seen as granules of gran bytes aligned to absolute offsets
 * (buf starts at absolute offset off). Returns len when all are zero. */
size_t convert_zero_run(const uint8_t *buf, size_t len, uint64_t off,
			uint64_t gran);
/* Length of the run of data granules starting at buf (not zero). */
size_t convert_data_run(const uint8_t *buf, size_t len, uint64_t off,
			uint64_t gran);

#endif
