/* bench.c - img-bench: time many equal read or write requests, depth of
 * them in flight, as qemu-img bench does. With -n (and -t none) a raw
 * image's requests go through libaio from one thread; otherwise depth
 * threads (at most 64) keep the requests in flight. */
//config:config APPLET_BENCH
//config:	bool "img-bench"
//config:	default y
//config:	help
//config:	  usage: img-bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename
//config:
//config:	  Run COUNT (default 75000) read requests, or write requests with
//config:	  -w, of BUFFER_SIZE bytes (default 4k) on FILENAME, DEPTH (default
//config:	  64) in flight, from OFFSET on in steps of STEP_SIZE (default
//config:	  the buffer size, wrapping at the end of the image).
//config:
//config:	  -n                  native AIO (libaio); needs -t none
//config:	  -i AIO              threads, native or io_uring (= threads)
//config:	  -t CACHE            cache mode (default writeback)
//config:	  --flush-interval=N  flush after every N writes
//config:	  --no-drain          do not wait for requests in flight to flush
//config:	  --pattern=BYTE      byte written by -w (default 0)
//config:	  -U                  force share (no locking)
//applet:APPLET(bench, "img-bench", "c:d:f:i:no:qs:S:t:wU", "flush-interval:,no-drain,pattern:,force-share=U,image-opts")

#define FOR_bench
#include <limits.h>
#include <time.h>
#include "imgbox.h"
#include "blk.h"

struct bench {
	struct blk *bs;
	bool write, drain;
	long count, depth, flush_interval;
	size_t bufsize;
	uint64_t step, offset, image_size;
	int pattern;

	pthread_mutex_t lock;
	pthread_cond_t cond;
	long issued, completed, inflight;
	bool flushing;
	int ret;
};

static const char *const suffix_msg = "You may use k, M, G, T, P or E "
	"suffixes for\n%s: kilobytes, megabytes, gigabytes, terabytes, "
	"petabytes and exabytes.";

static long parse_long(const char *s, const char *errmsg)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 0);
	if (errno || end == s || *end || v < 0 || v > INT_MAX)
		die("%s", errmsg);
	return v;
}

static uint64_t parse_sz(const char *s, const char *what, bool int_max)
{
	uint64_t v;
	char fmt[256];

	if (parse_size(s, &v) < 0) {
		snprintf(fmt, sizeof(fmt), "Invalid %s specified. %s", what,
			 suffix_msg);
		die(fmt, progname);
	}
	if (int_max && v > INT_MAX)
		die("Invalid %s specified. Must be between 0 and %d.", what,
		    INT_MAX);
	return v;
}

/* Offset of request i: qemu-img bench wraps at the end of the image. */
static uint64_t next_offset(struct bench *b, uint64_t cur)
{
	cur += b->step;
	return b->image_size ? cur % b->image_size : 0;
}

/* ---- thread path ---- */

static void *bench_thread(void *arg)
{
	struct bench *b = arg;
	uint8_t *buf = blk_alloc_buf(b->bufsize);

	if (!buf) {
		pthread_mutex_lock(&b->lock);
		b->ret = -ENOMEM;
		pthread_mutex_unlock(&b->lock);
		return NULL;
	}
	memset(buf, b->pattern, b->bufsize);
	for (;;) {
		uint64_t off;
		int ret;

		pthread_mutex_lock(&b->lock);
		while (b->flushing && !b->ret)
			pthread_cond_wait(&b->cond, &b->lock);
		if (b->ret || b->issued >= b->count) {
			pthread_mutex_unlock(&b->lock);
			break;
		}
		off = b->offset;
		b->offset = next_offset(b, b->offset);
		b->issued++;
		b->inflight++;
		pthread_mutex_unlock(&b->lock);

		ret = b->write ? blk_pwrite(b->bs, off, buf, b->bufsize) :
				 blk_pread(b->bs, off, buf, b->bufsize);

		pthread_mutex_lock(&b->lock);
		b->inflight--;
		b->completed++;
		if (ret < 0 && !b->ret)
			b->ret = ret;
		if (!ret && b->write && b->flush_interval &&
		    b->completed % b->flush_interval == 0) {
			if (b->drain) {
				/* no new requests until the flush is done */
				b->flushing = true;
				while (b->inflight && !b->ret)
					pthread_cond_wait(&b->cond, &b->lock);
			}
			pthread_mutex_unlock(&b->lock);
			ret = blk_flush(b->bs);
			pthread_mutex_lock(&b->lock);
			if (ret < 0 && !b->ret)
				b->ret = ret;
			b->flushing = false;
		}
		pthread_cond_broadcast(&b->cond);
		pthread_mutex_unlock(&b->lock);
	}
	free(buf);
	return NULL;
}

static int run_threads(struct bench *b)
{
	pthread_t tid[64];
	long n = MIN(MIN(b->depth, 64), MAX(b->count, 1));
	int started = 0;

	for (long i = 0; i < n; i++) {
		if (pthread_create(&tid[i], NULL, bench_thread, b))
			break;
		started++;
	}
	if (!started)
		return -EAGAIN;
	for (int i = 0; i < started; i++)
		pthread_join(tid[i], NULL);
	return b->ret;
}

/* ---- libaio path: one thread, depth requests in flight ---- */

static int run_aio(struct bench *b, struct blk_aio *a)
{
	long n = MAX(MIN(b->depth, b->count), 1);
	uint8_t **bufs = calloc((size_t)n, sizeof(*bufs));
	void **tags = calloc((size_t)n, sizeof(*tags));
	long *res = calloc((size_t)n, sizeof(*res));
	int nfree = 0, ret = 0;
	long since_flush = 0;

	if (!bufs || !tags || !res) {
		ret = -ENOMEM;
		goto out;
	}
	for (long i = 0; i < n; i++) {
		bufs[i] = blk_alloc_buf(b->bufsize);
		if (!bufs[i]) {
			ret = -ENOMEM;
			goto out;
		}
		memset(bufs[i], b->pattern, b->bufsize);
	}
	/* tags double as the stack of free buffers */
	for (long i = 0; i < n; i++)
		tags[nfree++] = bufs[i];
	while (b->completed < b->count) {
		while (nfree && b->issued < b->count &&
		       !(b->flush_interval && b->drain &&
			 since_flush >= b->flush_interval)) {
			void *buf = tags[--nfree];
			ret = blk_aio_submit(a, b->write, b->offset, buf,
					     b->bufsize, buf);
			if (ret < 0)
				goto out;
			b->offset = next_offset(b, b->offset);
			b->issued++;
			since_flush++;
		}
		if (blk_aio_inflight(a)) {
			void *done[64];
			long r[64];
			int got = blk_aio_reap(a, 1, done, r,
					(int)MIN(64, blk_aio_inflight(a)));
			if (got < 0) {
				ret = got;
				goto out;
			}
			for (int i = 0; i < got; i++) {
				if (r[i] < 0 && !ret)
					ret = (int)r[i];
				tags[nfree++] = done[i];
				b->completed++;
			}
			if (ret < 0)
				goto out;
		}
		if (b->write && b->flush_interval &&
		    since_flush >= b->flush_interval &&
		    (!b->drain || !blk_aio_inflight(a))) {
			ret = blk_flush(b->bs);
			if (ret < 0)
				goto out;
			since_flush = 0;
		}
	}
out:
	while (blk_aio_inflight(a) > 0) { /* never free a buffer in flight */
		void *done[64];
		long r[64];
		if (blk_aio_reap(a, 1, done, r, 64) < 0)
			break;
	}
	if (bufs)
		for (long i = 0; i < n; i++)
			free(bufs[i]);
	free(bufs);
	free(tags);
	free(res);
	return ret;
}

int bench_main(int argc, char **argv)
{
	struct bench b = { 0 };
	struct timespec t0, t1;
	const char *fmt;
	int i = opts_parse(argc, argv), cache = CACHE_WRITEBACK, ret;
	bool native = HAS(n);
	struct blk_aio *a = NULL;
	unsigned al;

	b.count = 75000;
	b.depth = 64;
	b.bufsize = 4096;
	b.drain = !HAS(no_drain);
	b.write = HAS(w);
	fmt = HAS(f) ? ARG(f) : NULL;
	if (HAS(c))
		b.count = parse_long(ARG(c), "Invalid request count specified");
	if (HAS(d)) {
		b.depth = parse_long(ARG(d), "Invalid queue depth specified");
		/* qemu-img waits forever with no request in flight */
		if (!b.depth)
			die("Invalid queue depth specified");
	}
	if (HAS(i)) {
		if (!strcmp(ARG(i), "native"))
			native = true;
		else if (strcmp(ARG(i), "threads") &&
			 strcmp(ARG(i), "io_uring"))
			die("Invalid aio option: %s", ARG(i));
	}
	if (HAS(o))
		b.offset = parse_sz(ARG(o), "offset", false);
	if (HAS(s))
		b.bufsize = (size_t)parse_sz(ARG(s), "buffer size", true);
	b.step = HAS(S) ? parse_sz(ARG(S), "step_size", true) : b.bufsize;
	if (HAS(t) && blk_parse_cache(ARG(t), &cache) < 0)
		die("Invalid cache mode");
	if (HAS(flush_interval))
		b.flush_interval = parse_long(ARG(flush_interval),
					      "Invalid flush interval specified");
	if (HAS(pattern))
		b.pattern = (int)parse_long(ARG(pattern),
					    "Invalid pattern byte specified");
	if (b.pattern > 255)
		die("Invalid pattern byte specified");
	if (HAS(image_opts))
		die("--image-opts is not supported by imgbox");
	if (b.flush_interval && !b.write)
		die("--flush-interval is only available in write tests");
	if (b.flush_interval && b.flush_interval < b.depth && !b.drain)
		die("Flush interval can't be smaller than depth");
	if (argc - i != 1)
		die_usage("Expecting one image file name");

	if (native && cache != CACHE_NONE && cache != CACHE_DIRECTSYNC)
		die("Could not open '%s': aio=native was specified, but it "
		    "requires cache.direct=on, which was not specified.",
		    argv[i]);
	b.bs = open_image(argv[i], fmt, (b.write ? BLK_O_RDWR : 0) |
			  (HAS(U) ? BLK_O_SHARE : 0), cache);
	b.image_size = b.bs->size;
	pthread_mutex_init(&b.lock, NULL);
	pthread_cond_init(&b.cond, NULL);

	printf("Sending %ld %s requests, %zu bytes each, %ld in parallel "
	       "(starting at offset %llu, step size %llu)\n", b.count,
	       b.write ? "write" : "read", b.bufsize, b.depth,
	       (unsigned long long)b.offset, (unsigned long long)b.step);
	if (b.flush_interval)
		printf("Sending flush every %ld requests\n", b.flush_interval);
	fflush(stdout);

	/* libaio only where the request goes to the file unchanged (raw),
	 * aligned for O_DIRECT, inside the file. */
	al = blk_aio_align(b.bs);
	if (native && al && b.bufsize && IS_ALIGNED(b.bufsize, al) &&
	    IS_ALIGNED(b.step, al) && IS_ALIGNED(b.offset, al) &&
	    b.bufsize <= b.image_size &&
	    blk_aio_init(&a, b.bs, (int)MAX(MIN(b.depth, b.count), 1)) < 0)
		a = NULL;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	if (!b.count)
		ret = 0;
	else if (a)
		ret = run_aio(&b, a);
	else
		ret = run_threads(&b);
	if (!ret && b.write && b.drain)
		ret = blk_flush(b.bs);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	blk_aio_free(a);
	if (ret < 0)
		die("Failed request: %s", strerror(-ret == EINVAL ? EIO : -ret));
	printf("Run completed in %.3f seconds.\n",
	       (double)(t1.tv_sec - t0.tv_sec) +
	       (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
	blk_close(b.bs);
	return 0;
}
