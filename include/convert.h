/* convert.h - the copy engine behind img-convert: one or more source
 * images (concatenated) into one open target, driven by block status, with
 * N worker threads, zero detection, in-order or out-of-order writes and
 * compression in the workers.
 *
 * The engine never prints and never exits: it returns 0 or -errno with the
 * message in the struct err, and reports progress and warnings through the
 * callbacks. Other applets (commit, rebase, dd) may reuse it. */
#ifndef IMGBOX_CONVERT_H
#define IMGBOX_CONVERT_H

#include <stdbool.h>
#include <stdint.h>
#include "blk.h"

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
