/* compress.c - compressed clusters: raw deflate streams (no zlib
 * header), written with a 4 KiB window as QEMU does (qcow2.txt,
 * "Compressed Clusters Descriptor"). */
//format:PART(qcow2)

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <zlib.h>
#include "qcow2.h"

long qcow2_deflate(const uint8_t *in, size_t inlen, uint8_t *out,
		   size_t outlen)
{
	z_stream z = { 0 };
	long n;
	int ret;

	if (deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
			 Z_DEFAULT_STRATEGY) != Z_OK)
		return -ENOMEM;
	z.next_in = (Bytef *)(uintptr_t)in;
	z.avail_in = (uInt)inlen;
	z.next_out = out;
	z.avail_out = (uInt)outlen;
	ret = deflate(&z, Z_FINISH);
	n = (long)(outlen - z.avail_out);
	deflateEnd(&z);
	if (ret != Z_STREAM_END)
		return -ENOSPC;
	return n;
}

/* img-convert's workers compress (and inflate) one cluster after another:
 * each thread keeps one deflate and one inflate state (deflateReset,
 * inflateReset) instead of allocating zlib's window and tables, and
 * faulting them in, for every cluster. */
static pthread_key_t z_key, zi_key;
static bool z_key_ok, zi_key_ok;
static pthread_once_t z_once = PTHREAD_ONCE_INIT;

static void z_free(void *p)
{
	deflateEnd(p);
	free(p);
}

static void zi_free(void *p)
{
	inflateEnd(p);
	free(p);
}

static void z_key_init(void)
{
	z_key_ok = pthread_key_create(&z_key, z_free) == 0;
	zi_key_ok = pthread_key_create(&zi_key, zi_free) == 0;
}

/* Decompression stops once a whole cluster has been produced: the input
 * may run on into the next compressed cluster's sector. */
static int inflate_with(z_stream *z, const uint8_t *in, size_t inlen,
			uint8_t *out, size_t outlen)
{
	int ret;

	z->next_in = (Bytef *)(uintptr_t)in;
	z->avail_in = (uInt)inlen;
	z->next_out = out;
	z->avail_out = (uInt)outlen;
	ret = inflate(z, Z_FINISH);
	if ((ret == Z_STREAM_END || ret == Z_BUF_ERROR || ret == Z_OK) &&
	    z->avail_out == 0)
		return 0;
	return -EIO;
}

int qcow2_inflate(const uint8_t *in, size_t inlen, uint8_t *out,
		  size_t outlen)
{
	z_stream *z;
	int ret;

	pthread_once(&z_once, z_key_init);
	z = zi_key_ok ? pthread_getspecific(zi_key) : NULL;
	if (z) {
		if (inflateReset(z) != Z_OK)
			return -ENOMEM;
		return inflate_with(z, in, inlen, out, outlen);
	}
	z = calloc(1, sizeof(*z));
	if (!z)
		return -ENOMEM;
	/* -15 accepts every raw stream, whatever window it was made with */
	if (inflateInit2(z, -15) != Z_OK) {
		free(z);
		return -ENOMEM;
	}
	ret = inflate_with(z, in, inlen, out, outlen);
	if (!zi_key_ok || pthread_setspecific(zi_key, z))
		zi_free(z);	/* no slot: it was a one-off stream */
	return ret;
}

long qcow2_compress_cluster(struct blk *bs, void *dst, size_t dstlen,
			    const void *src, size_t len)
{
	const struct qcow2 *s = qcow2_state(bs);
	z_stream *z;
	long n;
	int ret;

	if (s->compression_type != 0)
		return -ENOTSUP;	/* zstd: write_compressed says why */
	pthread_once(&z_once, z_key_init);
	z = z_key_ok ? pthread_getspecific(z_key) : NULL;
	if (!z) {
		z = calloc(1, sizeof(*z));
		if (!z)
			return -ENOMEM;
		/* memLevel 8: a 4 KiB window needs no 64k-entry hash table,
		 * and sliding the smaller one is ~10% cheaper; the output is
		 * the same size to within 0.1% */
		if (deflateInit2(z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 8,
				 Z_DEFAULT_STRATEGY) != Z_OK) {
			free(z);
			return -ENOMEM;
		}
		if (!z_key_ok || pthread_setspecific(z_key, z)) {
			/* no slot: a one-off stream */
			n = qcow2_deflate(src, len, dst, dstlen);
			z_free(z);
			return n < 0 ? -ENOSPC : n;
		}
	} else if (deflateReset(z) != Z_OK) {
		return -ENOMEM;
	}
	z->next_in = (Bytef *)(uintptr_t)src;
	z->avail_in = (uInt)len;
	z->next_out = dst;
	z->avail_out = (uInt)dstlen;
	ret = deflate(z, Z_FINISH);
	n = (long)(dstlen - z->avail_out);
	return ret == Z_STREAM_END ? n : -ENOSPC;
}
