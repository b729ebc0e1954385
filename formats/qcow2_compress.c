/* qcow2_compress.c - compressed clusters: raw deflate streams (no zlib
 * header), written with a 4 KiB window as QEMU does (qcow2.txt,
 * "Compressed Clusters Descriptor"). */
//format:PART(qcow2)

#include <errno.h>
#include <zlib.h>
#include "qcow2.h"

/* Decompression stops once a whole cluster has been produced: the input
 * may run on into the next compressed cluster's sector. */
int qcow2_inflate(const uint8_t *in, size_t inlen, uint8_t *out,
		  size_t outlen)
{
	z_stream z = { 0 };
	int ret;

	/* -15 accepts every raw stream, whatever window it was made with */
	if (inflateInit2(&z, -15) != Z_OK)
		return -ENOMEM;
	z.next_in = (Bytef *)(uintptr_t)in;
	z.avail_in = (uInt)inlen;
	z.next_out = out;
	z.avail_out = (uInt)outlen;
	ret = inflate(&z, Z_FINISH);
	inflateEnd(&z);
	if ((ret == Z_STREAM_END || ret == Z_BUF_ERROR || ret == Z_OK) &&
	    z.avail_out == 0)
		return 0;
	return -EIO;
}

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
