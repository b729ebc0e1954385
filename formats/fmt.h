/* fmt.h - plumbing the format drivers share, so that each driver keeps
 * only what its format says: the create options every format takes, the
 * first steps of open (file size, header bytes, messages), the loop of
 * table-mapped I/O and the steps of create around the format's own.
 * formats/fmt.c is compiled whenever any format is (it has no //format:
 * line); what a configuration does not use is dropped by the linker. */
#ifndef IMGBOX_FMT_H
#define IMGBOX_FMT_H

#include "blk_driver.h"

/* ---- create options ----
 * A driver's create_opts array is the Formatting line's order, so each
 * driver lists its own entries between these. The file protocol's
 * options come last and are hidden: -o help lists them only when a file
 * is named, as QEMU does. */
#define FMT_OPT(name, type, help) { name, type, help, NULL, false }
#define FMT_OPT_SIZE FMT_OPT("size", OPT_SIZE, "Virtual disk size")
#define FMT_OPT_BACKING_FILE \
	FMT_OPT("backing_file", OPT_STRING, "File name of a base image")
#define FMT_OPT_BACKING_FMT(help) FMT_OPT("backing_fmt", OPT_STRING, help)
#define FMT_OPT_BACKING \
	FMT_OPT_BACKING_FILE, \
	FMT_OPT_BACKING_FMT("Image format of the base image")
#define FMT_OPT_NOCOW \
	{ "nocow", OPT_BOOL, "Turn off copy-on-write (valid only on btrfs)", \
	  NULL, true }, \
	{ "extent_size_hint", OPT_SIZE, \
	  "Extent size hint for the image file, 0 to disable", NULL, true }
#define FMT_OPT_FILE \
	{ "preallocation", OPT_STRING, \
	  "Preallocation mode (allowed values: off, falloc, full)", NULL, \
	  true }, \
	FMT_OPT_NOCOW, \
	{ NULL, 0, NULL, NULL, false }

/* ---- the driver table ----
 * What every format with state of its own fills in, by the names its
 * file gives them: ID_create_opts, ID_probe, ID_open, ID_close,
 * ID_create and ID_get_info. */
#define FMT_DRIVER(id, state) \
	.name = #id, .state_size = sizeof(state), \
	.create_opts = id##_create_opts, .probe = id##_probe, \
	.open = id##_open, .close = id##_close, .create = id##_create, \
	.get_info = id##_get_info
/* The callbacks of a table-mapped format (fmt_map_* below). */
#define FMT_MAPPED_RW \
	.pread = fmt_map_pread, .pwrite = fmt_map_pwrite, .flush = fmt_flush
#define FMT_MAPPED_IO FMT_MAPPED_RW, .block_status = fmt_map_status

/* ---- messages and ranges ---- */
/* Puts the message in e and returns ret (a -errno), so that a refusal is
 * one statement. */
int fmt_err(struct err *e, int ret, const char *fmt, ...) PRINTF(3, 4);
/* QEMU's block layer refuses requests whose end passes INT64_MAX. */
bool fmt_range_ok(uint64_t off, uint64_t len);

/* ---- open ---- */
/* The size of bs->file, or -errno with QEMU's message. */
int64_t fmt_file_size(struct blk *bs, struct err *e);
/* The size of bs->file, with its first len bytes in h (a short file
 * reads as zero-padded); on a read error "Could not read WHAT: ...". */
int64_t fmt_read_header(struct blk *bs, void *h, size_t len,
			const char *what, struct err *e);
/* A backing file name of len bytes at off of bs->file, into
 * bs->backing_file; the message of a failed read is the driver's. */
int fmt_read_backing_name(struct blk *bs, uint64_t off, size_t len,
			  const char *msg, struct err *e);
/* Runs do_open and, when it fails, close: the block layer does not call
 * close after a failed open. */
int fmt_open(struct blk *bs, struct err *e,
	     int (*do_open)(struct blk *, struct err *),
	     void (*close)(struct blk *));
/* The default flush: the image is the one file. */
int fmt_flush(struct blk *bs);
/* Status of [host, host+*pnum) of f, a data range whose holes read as
 * zeroes (raw-like data: fixed disks, static images, flat extents). */
int fmt_file_status(struct bfile *f, uint64_t host, uint64_t *pnum,
		    uint64_t *map, struct bfile **mfile);

/* ---- table-mapped I/O (qcow, qed, vdi, vpc, vhdx) ----
 * The driver's lookup describes the run of guest bytes at off that its
 * tables map alike; the loops here split a request into such runs and
 * read, write or report each. A driver that uses them puts the pointer
 * to its struct fmt_map first in its state (bs->opaque) and names
 * fmt_map_pread, fmt_map_pwrite and fmt_map_status in its driver. */
enum fmt_kind {
	FMT_UNALLOC,		/* not in this layer: backing file or zeroes */
	FMT_ZERO,		/* reads as zeroes */
	FMT_DATA,		/* bytes at host in bs->file */
	FMT_DATA_FILE,		/* the same; holes of the file read as zero */
	FMT_OTHER,		/* the driver reads it (compressed) */
};
enum fmt_op { FMT_READ, FMT_WRITE, FMT_STATUS };

struct fmt_run {
	enum fmt_kind kind;
	uint64_t len;		/* bytes from off, 0 < len <= asked */
	uint64_t host;		/* FMT_DATA*: where off is in bs->file */
	uint64_t entry;		/* the driver's table entry, for itself */
};

struct fmt_map {
	/* The run at off, at most len bytes; op lets a driver refuse what
	 * it cannot do (a write to a corrupt table) before anything is
	 * done. */
	int (*lookup)(struct blk *bs, uint64_t off, uint64_t len,
		      enum fmt_op op, struct fmt_run *r);
	/* Writes the first r->len bytes of buf at guest offset off, a run
	 * that is not FMT_DATA*: allocates and fills in the table. It may
	 * shorten r->len to what it wrote. */
	int (*alloc_write)(struct blk *bs, uint64_t off, const uint8_t *buf,
			   struct fmt_run *r);
	/* Optional: reads a FMT_OTHER run. */
	int (*read_other)(struct blk *bs, uint64_t off, uint8_t *buf,
			  const struct fmt_run *r);
};

int fmt_map_pread(struct blk *bs, uint64_t off, void *buf, size_t len);
int fmt_map_pwrite(struct blk *bs, uint64_t off, const void *buf,
		   size_t len);
/* FMT_OTHER runs are reported as compressed data. */
int fmt_map_status(struct blk *bs, uint64_t off, uint64_t len,
		   uint64_t *pnum, uint64_t *map, struct bfile **mfile);

/* ---- create ---- */
/* Creates (or truncates) the image file, read-write. */
int fmt_create_file(struct bfile **f, const char *filename, struct err *e);
/* The preallocation option (PREALLOC_OFF when not given). */
int fmt_opt_prealloc(const struct optlist *opts, int *prealloc,
		     struct err *e);
/* Refuses a backing file for a format that has none. */
int fmt_no_backing(const struct optlist *opts, const char *format,
		   struct err *e);
/* The end of a create: a write-out that went well (ret 0) is flushed; a
 * write that failed (or the flush) is explained as "MSG: strerror";
 * the file is closed. Returns ret or the flush's error. */
int fmt_create_end(struct bfile *f, int ret, const char *msg,
		   struct err *e);
/* Writes len zero bytes at off (tables written out at create). */
int fmt_write_zeroes(struct bfile *f, uint64_t off, uint64_t len);

#endif
