/* compare.c - img-compare: do two images show the guest the same bytes? */
//config:config APPLET_COMPARE
//config:	bool "img-compare"
//config:	default y
//config:	help
//config:	  usage: img-compare [--object objectdef] [--image-opts] [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2
//config:
//config:	  Compare the guest-visible contents of two images. Ranges that
//config:	  both images report as zero or unallocated are not read.
//config:
//config:	  -f FMT    format of the first image (default: probe)
//config:	  -F FMT    format of the second image (default: probe)
//config:	  -T CACHE  cache mode for reading (default writeback)
//config:	  -p        show progress
//config:	  -q        quiet: only the exit code tells
//config:	  -s        strict: different sizes or allocation also differ
//config:	  -U        force share (no locking)
//config:
//config:	  Exit code: 0 identical, 1 different, 2 an image could not be
//config:	  opened, 3 block status failed, 4 a read failed.
//applet:APPLET(compare, "img-compare", "f:F:T:pqsU", "object:*,image-opts,force-share=U")

#define FOR_compare
#include <pthread.h>
#include <unistd.h>
#include "imgbox.h"

/* qemu-img compares in pieces of this size, and a read error names the
 * start of the piece, so we cut the same pieces. */
#define PIECE		(2u << 20)
#define SECTOR		512u
#define QUEUE_LEN	16
/* Our status bit for "this extent ends at the end of the image", which
 * qemu's block status carries and strict mode compares. */
#define STAT_EOF	0x100

/* NOTHING: a zero range, queued only to keep progress in order */
enum { CMP_BOTH, ZERO_1, ZERO_2, NOTHING };
enum { RES_SAME, RES_DIFF, RES_READ_ERR };

struct task {
	uint64_t off, len;
	int kind;
	int done;
	int res;		/* RES_* */
	uint64_t where;		/* RES_DIFF: offset; RES_READ_ERR: piece */
	int err, which;		/* RES_READ_ERR: errno, image 0/1 */
};

struct cmp {
	struct blk *bs[2];
	const char *name[2];
	bool quiet;
	struct task q[QUEUE_LEN];
	unsigned head, tail, take;	/* consume, fill, worker cursors */
	bool stop;
	pthread_mutex_t lock;
	pthread_cond_t work, done;
	pthread_t *threads;
	int nthreads;
	/* progress (-p), as qemu-img prints it */
	float cur, last;
	uint64_t progress_base;
};

/* redrawn after each 2% */
static void progress_step(struct cmp *c, uint64_t delta)
{
	if (!progress_shown())
		return;
	if (c->progress_base)
		c->cur += (float)delta / (float)c->progress_base * 100.0f;
	if (c->cur > 100)
		c->cur = 100;
	if (c->cur > c->last + 2.0f || c->cur == 0 || c->cur == 100 ||
	    delta == 0) {
		c->last = c->cur;
		progress_print(c->cur);
	}
}

/* Word-at-a-time checks (musl's memcmp goes byte by byte). Buffers come
 * from blk_alloc_buf and pieces start at 512-byte multiples, so the words
 * are aligned; a tail shorter than a word is compared bytewise. */
typedef uint64_t __attribute__((may_alias)) word_t;

static bool block_zero(const uint8_t *p, size_t n)
{
	const word_t *w = (const word_t *)p;
	size_t nw = n / 8;
	uint64_t acc = 0;

	for (size_t i = 0; i < nw; i++)
		acc |= w[i];
	for (size_t i = nw * 8; i < n; i++)
		acc |= p[i];
	return !acc;
}

static bool block_equal(const uint8_t *a, const uint8_t *b, size_t n)
{
	const word_t *x = (const word_t *)a, *y = (const word_t *)b;
	size_t nw = n / 8;
	uint64_t acc = 0;

	for (size_t i = 0; i < nw; i++)
		acc |= x[i] ^ y[i];
	for (size_t i = nw * 8; i < n; i++)
		acc |= (uint64_t)(a[i] ^ b[i]);
	return !acc;
}

/* Offset (from buf) of the first 512-byte block that is not all zero, or
 * -1: qemu-img reports mismatches against zero in whole sectors. */
static int64_t first_nonzero_block(const uint8_t *buf, size_t len)
{
	for (size_t i = 0; i < len; i += SECTOR)
		if (!block_zero(buf + i, MIN(SECTOR, len - i)))
			return (int64_t)i;
	return -1;
}

/* Offset of the first 512-byte block where a and b differ, or -1. */
static int64_t first_diff_block(const uint8_t *a, const uint8_t *b,
				size_t len)
{
	for (size_t i = 0; i < len; i += SECTOR)
		if (!block_equal(a + i, b + i, MIN(SECTOR, len - i)))
			return (int64_t)i;
	return -1;
}

static void run_task(struct cmp *c, struct task *t, uint8_t *b1, uint8_t *b2)
{
	int64_t at;
	int ret;

	t->res = RES_SAME;
	if (t->kind == NOTHING)
		return;
	if (t->kind == CMP_BOTH) {
		ret = blk_pread(c->bs[0], t->off, b1, t->len);
		if (ret < 0) {
			t->which = 0;
			goto read_err;
		}
		ret = blk_pread(c->bs[1], t->off, b2, t->len);
		if (ret < 0) {
			t->which = 1;
			goto read_err;
		}
		at = first_diff_block(b1, b2, t->len);
	} else {
		t->which = t->kind == ZERO_1 ? 0 : 1;
		ret = blk_pread(c->bs[t->which], t->off, b1, t->len);
		if (ret < 0)
			goto read_err;
		at = first_nonzero_block(b1, t->len);
	}
	if (at >= 0) {
		t->res = RES_DIFF;
		t->where = t->off + (uint64_t)at;
	}
	return;
read_err:
	t->res = RES_READ_ERR;
	t->where = t->off;
	t->err = -ret;
}

static void *worker(void *arg)
{
	struct cmp *c = arg;
	uint8_t *b1 = blk_alloc_buf(PIECE), *b2 = blk_alloc_buf(PIECE);

	pthread_mutex_lock(&c->lock);
	for (;;) {
		struct task *t;

		while (!c->stop && c->take == c->tail)
			pthread_cond_wait(&c->work, &c->lock);
		if (c->stop)
			break;
		t = &c->q[c->take++ % QUEUE_LEN];
		pthread_mutex_unlock(&c->lock);
		if ((!b1 || !b2) && t->kind != NOTHING) {
			t->res = RES_READ_ERR;
			t->where = t->off;
			t->err = ENOMEM;
			t->which = 0;
		} else
			run_task(c, t, b1, b2);
		pthread_mutex_lock(&c->lock);
		t->done = 1;
		pthread_cond_broadcast(&c->done);
	}
	pthread_mutex_unlock(&c->lock);
	free(b1);
	free(b2);
	return NULL;
}

static void stop_workers(struct cmp *c)
{
	pthread_mutex_lock(&c->lock);
	c->stop = true;
	pthread_cond_broadcast(&c->work);
	pthread_mutex_unlock(&c->lock);
	for (int i = 0; i < c->nthreads; i++)
		pthread_join(c->threads[i], NULL);
	free(c->threads);
	c->nthreads = 0;
}

/* Ends the command: progress line, close, exit code. */
NORETURN static void finish(struct cmp *c, int code)
{
	if (c->nthreads)
		stop_workers(c);
	progress_end();
	blk_close(c->bs[0]);
	blk_close(c->bs[1]);
	die_exit(code);
}

/* Waits for the oldest queued piece; a mismatch or error there ends the
 * command, since every piece before it has already been found equal. */
static void consume_one(struct cmp *c)
{
	struct task *t = &c->q[c->head % QUEUE_LEN];

	pthread_mutex_lock(&c->lock);
	while (!t->done)
		pthread_cond_wait(&c->done, &c->lock);
	c->head++;
	pthread_mutex_unlock(&c->lock);
	if (t->res == RES_DIFF) {
		if (!c->quiet)
			printf("Content mismatch at offset %llu!\n",
			       (unsigned long long)t->where);
		finish(c, 1);
	}
	if (t->res == RES_READ_ERR) {
		msg("Error while reading offset %llu of %s: %s",
		    (unsigned long long)t->where, c->name[t->which],
		    strerror(t->err));
		finish(c, 4);
	}
	progress_step(c, t->len);
}

static void drain(struct cmp *c)
{
	while (c->head != c->tail)
		consume_one(c);
}

static void queue_piece(struct cmp *c, uint64_t off, uint64_t len, int kind)
{
	struct task *t;

	if (!c->nthreads) {
		long n = sysconf(_SC_NPROCESSORS_ONLN);
		c->nthreads = (int)MIN(MAX(n, 2), 8);
		c->threads = calloc((size_t)c->nthreads, sizeof(pthread_t));
		if (!c->threads)
			die("out of memory");
		for (int i = 0; i < c->nthreads; i++)
			if (pthread_create(&c->threads[i], NULL, worker, c))
				die("Could not start a thread");
	}
	if (c->tail - c->head == QUEUE_LEN)
		consume_one(c);
	t = &c->q[c->tail % QUEUE_LEN];
	memset(t, 0, sizeof(*t));
	t->off = off;
	t->len = len;
	t->kind = kind;
	pthread_mutex_lock(&c->lock);
	c->tail++;
	pthread_cond_signal(&c->work);
	pthread_mutex_unlock(&c->lock);
}

/* Queue [off, off+len) in qemu-img's pieces. */
static void queue_range(struct cmp *c, uint64_t off, uint64_t len, int kind)
{
	while (len) {
		uint64_t n = MIN(len, PIECE);
		queue_piece(c, off, n, kind);
		off += n;
		len -= n;
	}
}

/* Block status through the whole chain, with the bits qemu's strict mode
 * compares: zeroes past the end of a shorter backing file count as
 * allocated there, a data extent whose host range is a hole in the file
 * reads as zero, and the extent that reaches the end of the image carries
 * EOF (so does one that reaches the end of the bottom image when no layer
 * allocates it). */
static int status(struct cmp *c, int i, uint64_t off, uint64_t *pnum)
{
	struct blk *bs = c->bs[i], *cur = bs;
	struct bfile *mf = NULL;
	uint64_t map = 0, n, len = bs->size - off;
	int st;

	for (;;) {
		if (cur != bs && off >= cur->size) {
			st = BLK_STAT_ZERO | BLK_STAT_ALLOCATED;
			*pnum = len;
			mf = NULL;
			break;
		}
		st = blk_block_status(cur, off, len, pnum, &map, &mf);
		if (st < 0) {
			msg("Sector allocation test failed for %s",
			    c->name[i]);
			finish(c, 3);
		}
		len = *pnum;
		if (st & BLK_STAT_ALLOCATED)
			break;
		if (!cur->backing) {
			/* qemu keeps this layer's own end-of-image bit */
			st = BLK_STAT_ZERO;
			if (off + *pnum == cur->size)
				st |= STAT_EOF;
			mf = NULL;
			break;
		}
		cur = cur->backing;
	}
	if ((st & (BLK_STAT_DATA | BLK_STAT_OFFSET | BLK_STAT_ZERO)) ==
	    (BLK_STAT_DATA | BLK_STAT_OFFSET) && mf) {
		bool to_end;
		int fs = blk_file_status(mf, map, *pnum, &n, &to_end);

		if (fs >= 0 && (fs & BLK_STAT_ZERO) && to_end)
			st |= BLK_STAT_ZERO;	/* a hole to the end */
		else if (fs >= 0) {
			*pnum = MIN(*pnum, n);
			st |= fs & BLK_STAT_ZERO;
		}
	}
	st &= BLK_STAT_DATA | BLK_STAT_ZERO | BLK_STAT_ALLOCATED |
	      BLK_STAT_OFFSET | BLK_STAT_COMPRESSED | STAT_EOF;
	if (off + *pnum == bs->size)
		st |= STAT_EOF;
	return st;
}

static void open_one(struct cmp *c, int i, const char *fmt, unsigned flags,
		     int cache)
{
	struct err e = { "" };
	int ret = blk_open(&c->bs[i], c->name[i], fmt, flags, cache, &e);

	if (ret < 0) {
		msg("Could not open '%s': %s", c->name[i],
		    e.msg[0] ? e.msg : strerror(-ret));
		finish(c, 2);
	}
}

int compare_main(int argc, char **argv)
{
	static struct cmp c;
	int i = opts_parse(argc, argv), cache = CACHE_WRITEBACK;
	uint64_t off = 0, min_size, max_size;

	pthread_mutex_init(&c.lock, NULL);
	pthread_cond_init(&c.work, NULL);
	pthread_cond_init(&c.done, NULL);
	if (argc - i != 2)
		die_usage("Expecting two image file names");
	if (HAS(image_opts))
		die("--image-opts is not supported");
	c.name[0] = argv[i];
	c.name[1] = argv[i + 1];
	c.quiet = HAS(q);
	progress_start(HAS(p) && !c.quiet);
	if (HAS(T) && blk_parse_cache(ARG(T), &cache) < 0) {
		msg("Invalid source cache option: %s", ARG(T));
		finish(&c, 2);
	}
	/* Read-only: compare never opens an image for writing. */
	open_one(&c, 0, HAS(f) ? ARG(f) : NULL, HAS(U) ? BLK_O_SHARE : 0,
		 cache);
	open_one(&c, 1, HAS(F) ? ARG(F) : NULL, HAS(U) ? BLK_O_SHARE : 0,
		 cache);

	min_size = MIN(c.bs[0]->size, c.bs[1]->size);
	max_size = MAX(c.bs[0]->size, c.bs[1]->size);
	c.progress_base = max_size;
	progress_step(&c, 0);

	if (HAS(s) && c.bs[0]->size != c.bs[1]->size) {
		if (!c.quiet)
			printf("Strict mode: Image size mismatch!\n");
		finish(&c, 1);
	}

	while (off < min_size) {
		uint64_t n1, n2, n;
		int s1 = status(&c, 0, off, &n1);
		int s2 = status(&c, 1, off, &n2);
		bool a1 = s1 & BLK_STAT_ALLOCATED, a2 = s2 & BLK_STAT_ALLOCATED;

		n = MIN(n1, n2);
		if (HAS(s) && s1 != s2) {
			/* earlier pieces may still hold a mismatch */
			drain(&c);
			if (!c.quiet)
				printf("Strict mode: Offset %llu block status "
				       "mismatch!\n", (unsigned long long)off);
			finish(&c, 1);
		}
		if ((s1 & BLK_STAT_ZERO) && (s2 & BLK_STAT_ZERO))
			queue_piece(&c, off, n, NOTHING);
		else if (a1 == a2)
			queue_range(&c, off, n, CMP_BOTH);
		else
			queue_range(&c, off, n, a1 ? ZERO_1 : ZERO_2);
		off += n;
	}

	if (c.bs[0]->size != c.bs[1]->size) {
		int big = c.bs[0]->size > c.bs[1]->size ? 0 : 1;

		drain(&c);
		if (!c.quiet)
			printf("Warning: Image size mismatch!\n");
		/* The longer image must read as zero past the other's end. */
		while (off < max_size) {
			uint64_t n;
			int st = status(&c, big, off, &n);

			if ((st & BLK_STAT_ALLOCATED) && !(st & BLK_STAT_ZERO))
				queue_range(&c, off, n,
					    big ? ZERO_2 : ZERO_1);
			else
				queue_piece(&c, off, n, NOTHING);
			off += n;
		}
	}
	drain(&c);
	if (!c.quiet)
		printf("Images are identical.\n");
	finish(&c, 0);
}
