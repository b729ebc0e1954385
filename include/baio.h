/* baio.h - requests in flight on an O_DIRECT file through Linux AIO
 * (block/aio.c). One thread submits and reaps; -ENOSYS without libaio. */
#ifndef IMGBOX_BAIO_H
#define IMGBOX_BAIO_H

#include <stdbool.h>
#include <stdint.h>
#include <stddef.h>

struct baio;
struct bfile;
int baio_init(struct baio **pa, int depth);
void baio_free(struct baio *a);
/* -EAGAIN when depth requests are already in flight. */
int baio_submit(struct baio *a, struct bfile *f, bool write, uint64_t off,
		void *buf, size_t len, void *tag);
/* Waits for at least min completions; fills tags[i] and res[i] (bytes or
 * -errno) and returns how many. */
int baio_reap(struct baio *a, int min, void **tags, long *res, int max);
int baio_inflight(const struct baio *a);

#endif
