/* aio.c - Linux native AIO (libaio) on an O_DIRECT file: keep many
 * requests in flight from one thread. Used by img-bench -n; requests must
 * be aligned to the file's O_DIRECT alignment (the caller's business: this
 * is a fast path, not a general one). Without libaio every call returns
 * -ENOSYS and callers use their thread path. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "blk.h"
#include "baio.h"
#include <generated/config.h>

#if ENABLE_LIBAIO
#include <libaio.h>

struct baio {
	io_context_t ctx;
	int depth;
	struct iocb *cbs;		/* depth control blocks */
	struct iocb **free;		/* stack of unused ones */
	int nfree;
	struct io_event *ev;
};

int baio_init(struct baio **pa, int depth)
{
	struct baio *a = calloc(1, sizeof(*a));
	int ret;

	*pa = NULL;
	if (!a)
		return -ENOMEM;
	a->depth = depth;
	a->cbs = calloc((size_t)depth, sizeof(*a->cbs));
	a->free = calloc((size_t)depth, sizeof(*a->free));
	a->ev = calloc((size_t)depth, sizeof(*a->ev));
	if (!a->cbs || !a->free || !a->ev) {
		baio_free(a);
		return -ENOMEM;
	}
	ret = io_setup(depth, &a->ctx);
	if (ret < 0) {
		a->ctx = 0;
		baio_free(a);
		return ret;
	}
	for (int i = 0; i < depth; i++)
		a->free[a->nfree++] = &a->cbs[i];
	*pa = a;
	return 0;
}

void baio_free(struct baio *a)
{
	if (!a)
		return;
	if (a->ctx)
		io_destroy(a->ctx);
	free(a->cbs);
	free(a->free);
	free(a->ev);
	free(a);
}

int baio_submit(struct baio *a, struct bfile *f, bool write, uint64_t off,
		void *buf, size_t len, void *tag)
{
	struct iocb *cb;
	int ret;

	if (!a->nfree)
		return -EAGAIN;
	cb = a->free[--a->nfree];
	if (write)
		io_prep_pwrite(cb, f->fd, buf, len, (long long)off);
	else
		io_prep_pread(cb, f->fd, buf, len, (long long)off);
	cb->data = tag;
	do
		ret = io_submit(a->ctx, 1, &cb);
	while (ret == -EINTR || ret == -EAGAIN);
	if (ret != 1) {
		a->free[a->nfree++] = cb;
		return ret < 0 ? ret : -EIO;
	}
	return 0;
}

int baio_reap(struct baio *a, int min, void **tags, long *res, int max)
{
	int n;

	if (max > a->depth)
		max = a->depth;
	do
		n = io_getevents(a->ctx, min, max, a->ev, NULL);
	while (n == -EINTR);
	if (n < 0)
		return n;
	for (int i = 0; i < n; i++) {
		struct iocb *cb = a->ev[i].obj;
		long r = (long)a->ev[i].res;

		tags[i] = cb->data;
		/* a short transfer is an error for a block request */
		if (r >= 0 && (size_t)r != cb->u.c.nbytes)
			r = -EIO;
		res[i] = r;
		a->free[a->nfree++] = cb;
	}
	return n;
}

int baio_inflight(const struct baio *a)
{
	return a->depth - a->nfree;
}

#else

int baio_init(struct baio **pa, int depth)
{
	(void)depth;
	*pa = NULL;
	return -ENOSYS;
}
void baio_free(struct baio *a) { (void)a; }
int baio_submit(struct baio *a, struct bfile *f, bool write, uint64_t off,
		void *buf, size_t len, void *tag)
{
	return -ENOSYS;
}
int baio_reap(struct baio *a, int min, void **tags, long *res, int max)
{
	return -ENOSYS;
}
int baio_inflight(const struct baio *a) { (void)a; return 0; }
#endif
