/* file.c - the file protocol: every byte imgbox reads or writes goes
 * through here (regular files and block devices), synchronously, in flight
 * through Linux AIO or copied inside the kernel. It is the only file that
 * makes I/O system calls on images: one choke point for O_DIRECT bounce
 * buffers, flush policy and fault injection. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>
#include "blk.h"
#include <generated/config.h>
#if ENABLE_LIBAIO
#include <libaio.h>
#endif

/* From the kernel's uapi headers, which musl-gcc does not see. */
#ifndef BLKGETSIZE64
#define BLKGETSIZE64 _IOR(0x12, 114, size_t)
#endif
#ifndef BLKSSZGET
#define BLKSSZGET _IO(0x12, 104)
#endif
#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif
#ifndef FALLOC_FL_ZERO_RANGE
#define FALLOC_FL_ZERO_RANGE 0x10
#endif
#ifndef F_OFD_GETLK
#define F_OFD_GETLK 36
#define F_OFD_SETLK 37
#endif

/* ---- fault injection: IMGBOX_FAULT=op:errno:n[,op:errno:n...] makes the
 * n-th (1-based) and every later call of op (read, write, flush, trunc,
 * lock: taking a lock byte) fail with errno. Tests use it for ENOSPC and
 * EIO paths. A copy inside the kernel counts as a read and a write; a
 * request in flight fails when it completes, as a real transfer error
 * would. In place of errno, "kill" makes the n-th call kill the process
 * with SIGKILL before it does anything, as an outside kill between two
 * calls would: the crash-safety sweeps stop a command after each of its
 * writes in turn.
 * IMGBOX_FAULT_COUNT=FILE writes the number of calls of each op to FILE
 * at exit ("write 12"), so that a sweep knows how far to go. */
enum { F_READ, F_WRITE, F_FLUSH, F_TRUNC, F_LOCKBYTE, F_NR };
#define F_KILL	(-1)
static const char *const fault_names[F_NR] = { "read", "write", "flush",
					       "trunc", "lock" };
static struct {
	int init;
	const char *count_file;
	int err[F_NR];
	long after[F_NR];
	atomic_long count[F_NR];
} fault;

static void fault_count_write(void)
{
	char buf[128];
	int fd, len = 0;

	fd = open(fault.count_file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC,
		  0644);
	if (fd < 0)
		return;
	for (int i = 0; i < F_NR; i++)
		len += snprintf(buf + len, sizeof(buf) - len, "%s %ld\n",
				fault_names[i], (long)fault.count[i]);
	(void)!write(fd, buf, len);
	close(fd);
}

static void fault_parse(void)
{
	const char *s = getenv("IMGBOX_FAULT");
	char buf[256], *save = NULL, *tok;

	fault.init = 1;
	fault.count_file = getenv("IMGBOX_FAULT_COUNT");
	if (fault.count_file && *fault.count_file)
		atexit(fault_count_write);
	else
		fault.count_file = NULL;
	if (!s)
		return;
	snprintf(buf, sizeof(buf), "%s", s);
	for (tok = strtok_r(buf, ",", &save); tok;
	     tok = strtok_r(NULL, ",", &save)) {
		char name[16], what[16];
		long n;

		if (sscanf(tok, "%15[a-z]:%15[a-z0-9]:%ld", name, what,
			   &n) != 3)
			continue;
		for (int i = 0; i < F_NR; i++)
			if (!strcmp(name, fault_names[i])) {
				fault.err[i] = strcmp(what, "kill") ?
					       atoi(what) : F_KILL;
				fault.after[i] = n;
			}
	}
}

static int fault_hit(int op)
{
	if (!ENABLE_FAULT_INJECTION)
		return 0;
	if (!fault.init)
		fault_parse();
	if (!fault.err[op] && !fault.count_file)
		return 0;
	if (atomic_fetch_add(&fault.count[op], 1) + 1 < fault.after[op] ||
	    !fault.err[op])
		return 0;
	if (fault.err[op] == F_KILL)
		raise(SIGKILL);
	return -fault.err[op];
}

void *blk_alloc_buf(size_t len)
{
	void *p = NULL;

	if (posix_memalign(&p, 4096, len ? len : 1))
		return NULL;
	return p;
}

int bfile_open(struct bfile **pf, const char *name, unsigned flags,
	       int cache, struct err *e)
{
	struct bfile *f;
	struct stat st;
	int oflags = O_CLOEXEC;

	*pf = NULL;
	if (!name[0] && !(flags & BFILE_CREATE)) {
		err_set(e, "The 'file' block driver requires a file name");
		return -EINVAL;
	}
	oflags |= (flags & BFILE_RDWR) ? O_RDWR : O_RDONLY;
	/* truncated below, once no other process is found using the file */
	if (flags & BFILE_CREATE)
		oflags |= O_CREAT | O_RDWR;
	if (flags & BFILE_EXCL)
		oflags |= O_EXCL;
	if (cache == CACHE_NONE || cache == CACHE_DIRECTSYNC)
		oflags |= O_DIRECT;
	if (cache == CACHE_DIRECTSYNC || cache == CACHE_WRITETHROUGH)
		oflags |= O_DSYNC;

	f = calloc(1, sizeof(*f));
	if (!f || !(f->name = strdup(name))) {
		free(f);
		err_set(e, "Could not open '%s': %s", name, strerror(ENOMEM));
		return -ENOMEM;
	}
	f->fd = open(name, oflags, 0644);
	if (f->fd < 0) {
		int ret = -errno;
		err_set(e, "Could not %s '%s': %s",
			(flags & BFILE_CREATE) ? "create" : "open", name,
			strerror(errno));
		free(f->name);
		free(f);
		return ret;
	}
	if (fstat(f->fd, &st) < 0 ||
	    (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))) {
		err_set(e, "'file' driver requires '%s' to be a regular file",
			name);
		close(f->fd);
		free(f->name);
		free(f);
		return -EINVAL;
	}
	f->is_blockdev = S_ISBLK(st.st_mode);
	f->dev = st.st_dev;
	f->ino = st.st_ino;
	f->direct = !!(oflags & O_DIRECT);
	f->no_flush = cache == CACHE_UNSAFE;
	f->read_only = !(oflags & O_RDWR);
	f->align = 1;
	if (f->direct) {
		int ss = 0;
		f->align = 512;
		if (f->is_blockdev && ioctl(f->fd, BLKSSZGET, &ss) == 0 &&
		    ss > 512 && ss <= 65536)
			f->align = (unsigned)ss;
		else if (!f->is_blockdev && st.st_blksize >= 512 &&
			 st.st_blksize <= 4096)
			f->align = 4096 > st.st_blksize ? 4096 : (unsigned)st.st_blksize;
	}
	*pf = f;
	if (flags & BFILE_CREATE) {
		/* as QEMU while it creates an image: it writes and resizes,
		 * and lets nobody else resize */
		int ret = bfile_lock(f, BLK_PERM_WRITE | BLK_PERM_RESIZE,
				     BLK_PERM_ALL & ~BLK_PERM_RESIZE, e);
		if (!ret && !f->is_blockdev && ftruncate(f->fd, 0) < 0) {
			ret = -errno;
			err_set(e, "Could not create '%s': %s", name,
				strerror(errno));
		}
		if (ret < 0) {
			bfile_close(f);
			*pf = NULL;
			return ret;
		}
	}
	return 0;
}

/* One byte per permission bit, as QEMU's file protocol locks them: a
 * shared lock on 100 + bit says "I hold it", on 200 + bit "I let nobody
 * else hold it". Open file description locks belong to this descriptor,
 * so ours never conflict with each other, and they go when it closes. */
enum { LOCK_PERM_BASE = 100, LOCK_SHARED_BASE = 200, LOCK_NBITS = 4 };

static int ofd_lock(int fd, int cmd, short type, int byte)
{
	struct flock fl = { .l_type = type, .l_whence = SEEK_SET,
			    .l_start = byte, .l_len = 1 };
	int ret = cmd == F_OFD_SETLK ? fault_hit(F_LOCKBYTE) : 0;

	if (ret)
		return ret;
	if (fcntl(fd, cmd, &fl) < 0)
		return -errno;
	return cmd == F_OFD_GETLK && fl.l_type != F_UNLCK ? -EAGAIN : 0;
}

int bfile_lock(struct bfile *f, unsigned perm, unsigned shared,
	       struct err *e)
{
	static const char *const names[LOCK_NBITS] = {
		"consistent read", "write", "write unchanged", "resize" };
	int byte, ret;

	/* take ours first, then look for others' (two processes doing
	 * this at once cannot both miss each other) */
	for (int i = 0; i < 2 * LOCK_NBITS; i++) {
		bool held = i < LOCK_NBITS ? perm >> i & 1 :
					     !(shared >> (i - LOCK_NBITS) & 1);
		byte = i < LOCK_NBITS ? LOCK_PERM_BASE + i :
					LOCK_SHARED_BASE + i - LOCK_NBITS;
		if (held && (ret = ofd_lock(f->fd, F_OFD_SETLK, F_RDLCK,
					    byte)) < 0) {
			/* a kernel without OFD locks (before Linux 3.15):
			 * no locking, as QEMU's default locking=auto */
			if (ret == -EINVAL)
				return 0;
			err_set(e, "Failed to lock byte %d: %s", byte,
				strerror(-ret));
			return ret;
		}
	}
	/* something we hold that another one does not share, then
	 * something we do not share that another one holds */
	for (int i = 0; i < 2 * LOCK_NBITS; i++) {
		int bit = i % LOCK_NBITS;
		bool mine = i < LOCK_NBITS ? perm >> bit & 1 :
					     !(shared >> bit & 1);
		byte = i < LOCK_NBITS ? LOCK_SHARED_BASE + bit :
					LOCK_PERM_BASE + bit;
		if (!mine)
			continue;
		ret = ofd_lock(f->fd, F_OFD_GETLK, F_WRLCK, byte);
		if (ret == -EAGAIN) {
			err_set(e, "Failed to get %s\"%s\" lock\nIs another "
				"process using the image [%s]?",
				i < LOCK_NBITS ? "" : "shared ", names[bit],
				f->name);
			return ret;
		}
		if (ret < 0) {
			err_set(e, "Failed to get lock byte %d: %s", byte,
				strerror(-ret));
			return ret;
		}
	}
	return 0;
}

void bfile_close(struct bfile *f)
{
	if (!f)
		return;
	close(f->fd);
	free(f->name);
	free(f);
}

/* The whole of [off, off+len): short transfers are continued; a read
 * past the end of the file gives zeroes, a write that makes no progress
 * is a full disk. buf is only read from when writing. */
static int raw_io_full(int fd, uint64_t off, void *buf, size_t len,
		       bool write)
{
	char *p = buf;

	while (len) {
		ssize_t n = write ? pwrite(fd, p, len, (off_t)off)
				  : pread(fd, p, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0 && write)
			return -ENOSPC;
		if (n == 0) {
			memset(p, 0, len);
			return 0;
		}
		p += n;
		off += (uint64_t)n;
		len -= (size_t)n;
	}
	return 0;
}

static int raw_pread_full(int fd, uint64_t off, void *buf, size_t len)
{
	return raw_io_full(fd, off, buf, len, false);
}

static int raw_pwrite_full(int fd, uint64_t off, const void *buf, size_t len)
{
	return raw_io_full(fd, off, (void *)buf, len, true);
}

static int aligned(struct bfile *f, uint64_t off, const void *buf, size_t len)
{
	return IS_ALIGNED(off, f->align) && IS_ALIGNED(len, f->align) &&
	       IS_ALIGNED((uintptr_t)buf, f->align);
}

/* O_DIRECT wants aligned requests: an unaligned one goes through a
 * buffer for the aligned superset of [off, off+len); a write reads it
 * first unless both ends are aligned (read-modify-write). buf is only
 * read from when writing. */
static int bounce_rw(struct bfile *f, uint64_t off, void *buf, size_t len,
		     bool write)
{
	uint64_t start = ALIGN_DOWN(off, f->align);
	size_t blen = (size_t)(ALIGN_UP(off + len, f->align) - start);
	char *b = blk_alloc_buf(blen);
	int ret = 0;

	if (!b)
		return -ENOMEM;
	if (!write || start != off || !IS_ALIGNED(off + len, f->align))
		ret = raw_pread_full(f->fd, start, b, blen);
	if (!ret && write) {
		memcpy(b + (off - start), buf, len);
		ret = raw_pwrite_full(f->fd, start, b, blen);
	} else if (!ret) {
		memcpy(buf, b + (off - start), len);
	}
	free(b);
	return ret;
}

int bfile_pread(struct bfile *f, uint64_t off, void *buf, size_t len)
{
	int ret = fault_hit(F_READ);

	if (ret)
		return ret;
	if (!len)
		return 0;
	if (f->direct && !aligned(f, off, buf, len))
		return bounce_rw(f, off, buf, len, false);
	return raw_pread_full(f->fd, off, buf, len);
}

int bfile_pwrite(struct bfile *f, uint64_t off, const void *buf, size_t len)
{
	int ret = fault_hit(F_WRITE);

	if (ret)
		return ret;
	if (!len)
		return 0;
	if (f->read_only)
		return -EBADF;
	if (f->direct && !aligned(f, off, buf, len))
		return bounce_rw(f, off, (void *)buf, len, true);
	return raw_pwrite_full(f->fd, off, buf, len);
}

int bfile_flush(struct bfile *f)
{
	int ret = fault_hit(F_FLUSH);

	if (ret)
		return ret;
	if (f->no_flush || f->read_only)
		return 0;
	if (fdatasync(f->fd) < 0)
		return -errno;
	return 0;
}

int64_t bfile_size(struct bfile *f)
{
	struct stat st;

	if (f->is_blockdev) {
		uint64_t sz;
		if (ioctl(f->fd, BLKGETSIZE64, &sz) < 0)
			return -errno;
		return (int64_t)sz;
	}
	if (fstat(f->fd, &st) < 0)
		return -errno;
	return st.st_size;
}

int64_t bfile_allocated(struct bfile *f)
{
	struct stat st;

	if (fstat(f->fd, &st) < 0)
		return -errno;
	return (int64_t)st.st_blocks * 512;
}

static int write_zeroes_slow(struct bfile *f, uint64_t off, uint64_t len)
{
	size_t chunk = 1 << 20;
	char *z = blk_alloc_buf(chunk);
	int ret = 0;

	if (!z)
		return -ENOMEM;
	memset(z, 0, chunk);
	while (len && !ret) {
		size_t n = len < chunk ? (size_t)len : chunk;
		ret = bfile_pwrite(f, off, z, n);
		off += n;
		len -= n;
	}
	free(z);
	return ret;
}

int bfile_truncate(struct bfile *f, uint64_t size, int prealloc,
		   struct err *e)
{
	int64_t old = bfile_size(f);
	int ret = fault_hit(F_TRUNC);

	if (ret) {
		err_set(e, "Could not resize file: %s", strerror(-ret));
		return ret;
	}
	if (old < 0) {
		err_set(e, "Could not get file size: %s", strerror((int)-old));
		return (int)old;
	}
	if (f->is_blockdev) {
		if (size > (uint64_t)old) {
			err_set(e, "Cannot grow device files");
			return -EINVAL;
		}
		return 0;
	}
	if (prealloc == PREALLOC_METADATA) {
		err_set(e, "Unsupported preallocation mode: metadata");
		return -ENOTSUP;
	}
	if (prealloc == PREALLOC_FALLOC && size > (uint64_t)old) {
		ret = posix_fallocate(f->fd, old, (off_t)(size - (uint64_t)old));
		if (ret) {
			err_set(e, "Could not preallocate new data: %s",
				strerror(ret));
			return -ret;
		}
		return 0;
	}
	if (ftruncate(f->fd, (off_t)size) < 0) {
		ret = -errno;
		err_set(e, "Could not resize file: %s", strerror(errno));
		return ret;
	}
	if (prealloc == PREALLOC_FULL && size > (uint64_t)old) {
		ret = write_zeroes_slow(f, (uint64_t)old, size - (uint64_t)old);
		if (ret) {
			err_set(e, "Could not write zeros for preallocation: %s",
				strerror(-ret));
			(void)!ftruncate(f->fd, old);
			return ret;
		}
	}
	return 0;
}

int bfile_zero(struct bfile *f, uint64_t off, uint64_t len, bool unmap)
{
	int64_t size;
	int ret;

	if (!len)
		return 0;
	if (f->read_only)
		return -EBADF;
	ret = fault_hit(F_WRITE);
	if (ret)
		return ret;
	size = bfile_size(f);
	/* Past the end of a regular file everything reads as zero already,
	 * but the file must still cover the range. */
	if (!f->is_blockdev && size >= 0 && off >= (uint64_t)size) {
		if (ftruncate(f->fd, (off_t)(off + len)) < 0)
			return -errno;
		return 0;
	}
	if (unmap && fallocate(f->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			       (off_t)off, (off_t)len) == 0) {
		if (!f->is_blockdev && size >= 0 && off + len > (uint64_t)size &&
		    ftruncate(f->fd, (off_t)(off + len)) < 0)
			return -errno;
		return 0;
	}
	if (fallocate(f->fd, FALLOC_FL_ZERO_RANGE, (off_t)off, (off_t)len) == 0)
		return 0;
	return write_zeroes_slow(f, off, len);
}

int bfile_discard(struct bfile *f, uint64_t off, uint64_t len)
{
	if (f->read_only)
		return -EBADF;
	if (fallocate(f->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
		      (off_t)off, (off_t)len) < 0)
		return -errno;
	return 0;
}

int bfile_block_status(struct bfile *f, uint64_t off, uint64_t len,
		       uint64_t *pnum)
{
	off_t data, hole;
	int64_t size = bfile_size(f);

	*pnum = len;
	if (size >= 0 && off >= (uint64_t)size)
		return BLK_STAT_ZERO;
	if (size >= 0 && off + len > (uint64_t)size)
		len = (uint64_t)size - off;
	*pnum = len;
	data = lseek(f->fd, (off_t)off, SEEK_DATA);
	if (data < 0) {
		if (errno == ENXIO)	/* hole to the end */
			return BLK_STAT_ZERO;
		return BLK_STAT_DATA;	/* no SEEK_DATA: assume data */
	}
	if ((uint64_t)data > off) {
		*pnum = MIN((uint64_t)data - off, len);
		return BLK_STAT_ZERO;
	}
	hole = lseek(f->fd, (off_t)off, SEEK_HOLE);
	if (hole < 0 || (uint64_t)hole <= off)
		return BLK_STAT_DATA;
	*pnum = MIN((uint64_t)hole - off, len);
	return BLK_STAT_DATA;
}

int bfile_copy_range(struct bfile *src, uint64_t soff, struct bfile *dst,
		     uint64_t doff, uint64_t len)
{
	off_t in = (off_t)soff, out = (off_t)doff;
	int ret = fault_hit(F_READ);

	if (!ret)
		ret = fault_hit(F_WRITE);
	if (ret)
		return ret;
	if (dst->read_only)
		return -EBADF;
	while (len) {
		ssize_t n = copy_file_range(src->fd, &in, dst->fd, &out,
					    (size_t)MIN(len, 1u << 30), 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		len -= (uint64_t)n;
	}
	return 0;
}

/* ---- requests in flight (Linux AIO) ---- */
#if ENABLE_LIBAIO
struct blk_aio {
	io_context_t ctx;
	struct bfile *f;
	int depth;
	struct iocb *cbs;		/* depth control blocks */
	struct iocb **free;		/* stack of unused ones */
	int nfree;
	struct io_event *ev;
};

int bfile_aio_init(struct blk_aio **pq, struct bfile *f, int depth)
{
	struct blk_aio *q = calloc(1, sizeof(*q));
	int ret;

	*pq = NULL;
	if (!q)
		return -ENOMEM;
	q->f = f;
	q->depth = depth;
	q->cbs = calloc((size_t)depth, sizeof(*q->cbs));
	q->free = calloc((size_t)depth, sizeof(*q->free));
	q->ev = calloc((size_t)depth, sizeof(*q->ev));
	if (!q->cbs || !q->free || !q->ev) {
		blk_aio_free(q);
		return -ENOMEM;
	}
	ret = io_setup(depth, &q->ctx);
	if (ret < 0) {
		q->ctx = 0;
		blk_aio_free(q);
		return ret;
	}
	for (int i = 0; i < depth; i++)
		q->free[q->nfree++] = &q->cbs[i];
	*pq = q;
	return 0;
}

void blk_aio_free(struct blk_aio *q)
{
	if (!q)
		return;
	if (q->ctx)
		io_destroy(q->ctx);
	free(q->cbs);
	free(q->free);
	free(q->ev);
	free(q);
}

int blk_aio_submit(struct blk_aio *q, bool write, uint64_t off, void *buf,
		   size_t len, void *tag)
{
	struct iocb *cb;
	int ret;

	if (!q->nfree)
		return -EAGAIN;
	cb = q->free[--q->nfree];
	if (write)
		io_prep_pwrite(cb, q->f->fd, buf, len, (long long)off);
	else
		io_prep_pread(cb, q->f->fd, buf, len, (long long)off);
	cb->data = tag;
	do
		ret = io_submit(q->ctx, 1, &cb);
	while (ret == -EINTR || ret == -EAGAIN);
	if (ret != 1) {
		q->free[q->nfree++] = cb;
		return ret < 0 ? ret : -EIO;
	}
	return 0;
}

int blk_aio_reap(struct blk_aio *q, int min, void **tags, long *res, int max)
{
	int n;

	if (max > q->depth)
		max = q->depth;
	do
		n = io_getevents(q->ctx, min, max, q->ev, NULL);
	while (n == -EINTR);
	if (n < 0)
		return n;
	for (int i = 0; i < n; i++) {
		struct iocb *cb = q->ev[i].obj;
		long r = (long)q->ev[i].res;

		tags[i] = cb->data;
		/* a short transfer is an error for a block request */
		if (r >= 0 && (size_t)r != cb->u.c.nbytes)
			r = -EIO;
		if (r >= 0) {
			int fe = fault_hit(cb->aio_lio_opcode == IO_CMD_PWRITE ?
					   F_WRITE : F_READ);
			if (fe)
				r = fe;
		}
		res[i] = r;
		q->free[q->nfree++] = cb;
	}
	return n;
}

int blk_aio_inflight(const struct blk_aio *q)
{
	return q->depth - q->nfree;
}

#else

int bfile_aio_init(struct blk_aio **pq, struct bfile *f, int depth)
{
	(void)f;
	(void)depth;
	*pq = NULL;
	return -ENOSYS;
}
void blk_aio_free(struct blk_aio *q) { (void)q; }
int blk_aio_submit(struct blk_aio *q, bool write, uint64_t off, void *buf,
		   size_t len, void *tag)
{
	(void)q; (void)write; (void)off; (void)buf; (void)len; (void)tag;
	return -ENOSYS;
}
int blk_aio_reap(struct blk_aio *q, int min, void **tags, long *res, int max)
{
	(void)q; (void)min; (void)tags; (void)res; (void)max;
	return -ENOSYS;
}
int blk_aio_inflight(const struct blk_aio *q) { (void)q; return 0; }
#endif
