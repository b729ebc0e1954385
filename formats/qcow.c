/* qcow.c - QEMU's original copy-on-write format (version 1): a big-endian
 * 48-byte header, the backing file name after it, one L1 table of L2 table
 * offsets and L2 tables of cluster offsets; bit 63 of an L2 entry marks a
 * deflate-compressed cluster whose byte length sits just below it. AES
 * encrypted images are described but not read or written. */
//config:config FORMAT_QCOW
//config:	bool "qcow"
//config:	default y
//config:	help
//config:	  QEMU copy-on-write images, version 1 (.qcow): two-level
//config:	  tables, compressed clusters, backing files. Read, write,
//config:	  compressed writes and create; encrypted images are refused.
//format:FORMAT(qcow)

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include "fmt.h"

#define QCOW_MAGIC		0x514649fbu	/* "QFI\xfb" */
#define QCOW_HDR_SIZE		48
#define QCOW_COMPRESSED		(1ULL << 63)
#define QCOW_MAX_BACKING	1023u
#define QCOW_NO_KEY_MSG	"Parameter 'encrypt.key-secret' is required for cipher"

struct qcow {
	const struct fmt_map *map;	/* first: fmt_map_* find it here */
	unsigned cluster_bits, l2_bits;
	uint32_t crypt;
	uint64_t cluster_size, l2_entries, l1_size, l1_offset;
	uint64_t file_end;		/* current end of the file */
	uint64_t *l2;			/* one cached L2 table */
	uint64_t l2_offset;		/* 0: none cached */
	uint64_t l1_idx, l1_val;	/* last L1 entry read */
	bool l1_valid;
	uint8_t *zbuf;			/* compressed input, one cluster */
	uint8_t *cbuf;			/* last decompressed cluster */
	uint64_t cbuf_entry;		/* its L2 entry, 0: none */
};

static const struct optdesc qcow_create_opts[] = {
	FMT_OPT_SIZE,
	FMT_OPT_BACKING_FILE,
	FMT_OPT_BACKING_FMT("Format of the backing image"),
	{ "encryption", OPT_BOOL, "Encrypt the image with format 'aes'. "
	  "(Deprecated in favor of encrypt.format=aes)", NULL, false },
	{ "encrypt.format", OPT_STRING,
	  "Encrypt the image, format choices: 'aes'", NULL, false },
	{ "encrypt.key-secret", OPT_STRING,
	  "ID of the secret that provides the AES encryption key", NULL,
	  false },
	FMT_OPT_FILE
};

static const struct fmt_map qcow_map;

static int qcow_probe(const uint8_t *buf, size_t len, const char *filename)
{
	(void)filename;
	if (len >= QCOW_HDR_SIZE && ld_be32(buf) == QCOW_MAGIC &&
	    ld_be32(buf + 4) == 1)
		return 100;
	return 0;
}

static int qcow_do_open(struct blk *bs, struct err *e)
{
	struct qcow *s = bs->opaque;
	uint8_t h[QCOW_HDR_SIZE];
	uint64_t size, boff, shift_span;
	uint32_t version, blen;
	int64_t fsize = fmt_read_header(bs, h, sizeof(h), "header", e);
	int ret;

	if (fsize < 0)
		return (int)fsize;
	if (ld_be32(h) != QCOW_MAGIC)
		return fmt_err(e, -EINVAL, "Image not in qcow format");
	version = ld_be32(h + 4);
	if (version != 1)
		return fmt_err(e, -ENOTSUP, "qcow (v1) does not support qcow "
			       "version %u%s", version,
			       version == 2 || version == 3 ?
			       "\nTry the 'qcow2' driver instead." : "");
	boff = ld_be64(h + 8);
	blen = ld_be32(h + 16);
	size = ld_be64(h + 24);
	s->cluster_bits = h[32];
	s->l2_bits = h[33];
	s->crypt = ld_be32(h + 36);
	s->l1_offset = ld_be64(h + 40);

	if (size <= 1)
		return fmt_err(e, -EINVAL, "Image size is too small (must be "
			       "at least 2 bytes)");
	if (s->cluster_bits < 9 || s->cluster_bits > 16)
		return fmt_err(e, -EINVAL, "Cluster size must be between 512 "
			       "and 64k");
	/* L2 tables of 512 bytes .. 64 KiB */
	if (s->l2_bits < 6 || s->l2_bits > 13)
		return fmt_err(e, -EINVAL, "L2 table size must be between 512 "
			       "and 64k");
	if (s->crypt > 1)
		return fmt_err(e, -EINVAL, "invalid encryption method in qcow "
			       "header");
	/* Encrypted images can be described (info) but not read: refuse them
	 * wherever data is going to be accessed, as QEMU does without the
	 * key. */
	if (s->crypt && !(bs->flags & BLK_O_NO_BACKING))
		return fmt_err(e, -EINVAL, QCOW_NO_KEY_MSG);
	s->cluster_size = 1ULL << s->cluster_bits;
	s->l2_entries = 1ULL << s->l2_bits;
	shift_span = 1ULL << (s->cluster_bits + s->l2_bits);
	if (size > UINT64_MAX - shift_span)
		return fmt_err(e, -EINVAL, "Image too large");
	s->l1_size = (size + shift_span - 1) / shift_span;
	if (s->l1_size > INT_MAX / 8)
		return fmt_err(e, -EINVAL, "Image too large");
	/* The L1 table is read an entry at a time (it can be hundreds of
	 * MiB for huge images); only its range is checked here. */
	if (!fmt_range_ok(s->l1_offset, s->l1_size * 8))
		return fmt_err(e, -EIO, "Could not open '%s': %s",
			       bs->filename, strerror(EIO));
	if (boff) {
		if (blen > QCOW_MAX_BACKING)
			return fmt_err(e, -EINVAL, "Backing file name too long");
		if (!fmt_range_ok(boff, blen))
			return fmt_err(e, -EIO, "Could not open '%s': %s",
				       bs->filename, strerror(EIO));
		ret = fmt_read_backing_name(bs, boff, blen, "Could not read "
					    "backing file name: %s", e);
		if (ret < 0)
			return ret;
	}
	s->l2 = malloc(s->l2_entries * 8);
	s->zbuf = malloc(s->cluster_size);
	s->cbuf = malloc(s->cluster_size);
	if (!s->l2 || !s->zbuf || !s->cbuf)
		return fmt_err(e, -ENOMEM, "%s", strerror(ENOMEM));
	s->map = &qcow_map;
	s->file_end = (uint64_t)fsize;
	/* QEMU counts whole sectors: the tail of a size that is not a
	 * multiple of 512 is not part of the disk. */
	bs->size = ALIGN_DOWN(size, 512);
	return 0;
}

static void qcow_close(struct blk *bs)
{
	struct qcow *s = bs->opaque;

	free(s->l2);
	free(s->zbuf);
	free(s->cbuf);
	s->l2 = NULL;
	s->zbuf = s->cbuf = NULL;
}

static int qcow_open(struct blk *bs, struct err *e)
{
	return fmt_open(bs, e, qcow_do_open, qcow_close);
}

static int qcow_read_l1(struct blk *bs, uint64_t i, uint64_t *v)
{
	struct qcow *s = bs->opaque;
	uint8_t raw[8];
	int ret;

	if (i >= s->l1_size)
		return -EINVAL;
	if (s->l1_valid && s->l1_idx == i) {
		*v = s->l1_val;
		return 0;
	}
	ret = bfile_pread(bs->file, s->l1_offset + i * 8, raw, 8);
	if (ret < 0)
		return ret;
	*v = ld_be64(raw);
	s->l1_idx = i;
	s->l1_val = *v;
	s->l1_valid = true;
	return 0;
}

static int qcow_load_l2(struct blk *bs, uint64_t off)
{
	struct qcow *s = bs->opaque;
	int ret;

	if (s->l2_offset == off)
		return 0;
	if (!fmt_range_ok(off, s->l2_entries * 8))
		return -EIO;
	s->l2_offset = 0;
	ret = bfile_pread(bs->file, off, s->l2, s->l2_entries * 8);
	if (ret < 0)
		return ret;
	for (uint64_t i = 0; i < s->l2_entries; i++)
		s->l2[i] = ld_be64(&s->l2[i]);
	s->l2_offset = off;
	return 0;
}

static void qcow_compressed_loc(const struct qcow *s, uint64_t entry,
				uint64_t *off, uint64_t *len)
{
	unsigned sb = 63 - s->cluster_bits;

	*off = entry & ((1ULL << sb) - 1);
	*len = (entry >> sb) & (s->cluster_size - 1);
}

/* Inflates the compressed cluster of entry into s->cbuf. */
static int qcow_decompress(struct blk *bs, uint64_t entry)
{
	struct qcow *s = bs->opaque;
	uint64_t off, len;
	z_stream z;
	int ret;

	if (s->cbuf_entry == entry)
		return 0;
	s->cbuf_entry = 0;
	qcow_compressed_loc(s, entry, &off, &len);
	if (!fmt_range_ok(off, len))
		return -EIO;
	ret = bfile_pread(bs->file, off, s->zbuf, (size_t)len);
	if (ret < 0)
		return ret;
	memset(&z, 0, sizeof(z));
	if (inflateInit2(&z, -12) != Z_OK)
		return -ENOMEM;
	z.next_in = s->zbuf;
	z.avail_in = (uInt)len;
	z.next_out = s->cbuf;
	z.avail_out = (uInt)s->cluster_size;
	ret = inflate(&z, Z_FINISH);
	inflateEnd(&z);
	if ((ret != Z_STREAM_END && ret != Z_BUF_ERROR) || z.avail_out)
		return -EIO;
	s->cbuf_entry = entry;
	return 0;
}

/* The run at off of clusters of the same kind as the one at off, within
 * one L2 table: unallocated, or host-contiguous plain clusters; a
 * compressed cluster (FMT_OTHER) is a run of its own. */
static int qcow_lookup(struct blk *bs, uint64_t off, uint64_t len,
		       enum fmt_op op, struct fmt_run *r)
{
	struct qcow *s = bs->opaque;
	uint64_t cs = s->cluster_size, in = off & (cs - 1);
	uint64_t span = 1ULL << (s->cluster_bits + s->l2_bits);
	uint64_t l1i = off >> (s->cluster_bits + s->l2_bits), l2off;
	uint64_t l2i = (off >> s->cluster_bits) & (s->l2_entries - 1);
	uint64_t n = cs - in, first;
	int ret;

	if (s->crypt) {
		if (op == FMT_READ)
			snprintf(bs->errmsg, sizeof(bs->errmsg),
				 QCOW_NO_KEY_MSG);
		return -EACCES;
	}
	ret = qcow_read_l1(bs, l1i, &l2off);
	if (ret < 0)
		return ret;
	len = MIN(len, span - (off & (span - 1)));
	r->kind = FMT_UNALLOC;
	r->entry = 0;
	r->len = len;
	if (!l2off)	/* no L2 table: the whole rest of its span */
		return 0;
	ret = qcow_load_l2(bs, l2off);
	if (ret < 0)
		return ret;
	first = s->l2[l2i];
	for (uint64_t i = l2i + 1; n < len && !(first & QCOW_COMPRESSED) &&
	     i < s->l2_entries; i++) {
		uint64_t want = first ? first + (i - l2i) * cs : 0;
		if (s->l2[i] != want)
			break;
		n += cs;
	}
	r->entry = first;
	r->len = MIN(n, len);
	if (first & QCOW_COMPRESSED)
		r->kind = FMT_OTHER;
	else if (first)
		r->kind = FMT_DATA;
	r->host = first + in;
	return 0;
}

static int qcow_read_compressed(struct blk *bs, uint64_t off, uint8_t *buf,
				const struct fmt_run *r)
{
	struct qcow *s = bs->opaque;
	int ret = qcow_decompress(bs, r->entry);

	if (ret == 0)
		memcpy(buf, s->cbuf + (off & (s->cluster_size - 1)),
		       (size_t)r->len);
	return ret;
}

/* Space at the end of the file, aligned. */
static uint64_t qcow_alloc(struct qcow *s, uint64_t len, uint64_t align)
{
	uint64_t off = ALIGN_UP(s->file_end, align);

	s->file_end = off + len;
	return off;
}

/* The L2 table of guest offset off, created (zeroed, at the end of the
 * file, cluster aligned) and linked from L1 when missing. */
static int qcow_get_l2(struct blk *bs, uint64_t off)
{
	struct qcow *s = bs->opaque;
	uint64_t l1i = off >> (s->cluster_bits + s->l2_bits), l2off;
	uint8_t raw[8];
	int ret = qcow_read_l1(bs, l1i, &l2off);

	if (ret < 0)
		return ret;
	if (l2off)
		return qcow_load_l2(bs, l2off);
	l2off = qcow_alloc(s, s->l2_entries * 8, s->cluster_size);
	if (!fmt_range_ok(l2off, s->l2_entries * 8))
		return -EFBIG;
	s->l2_offset = 0;
	memset(s->l2, 0, s->l2_entries * 8);
	ret = bfile_pwrite(bs->file, l2off, s->l2, s->l2_entries * 8);
	if (ret < 0)
		return ret;
	st_be64(raw, l2off);
	s->l1_valid = false;
	ret = bfile_pwrite(bs->file, s->l1_offset + l1i * 8, raw, 8);
	if (ret < 0)
		return ret;
	s->l1_idx = l1i;
	s->l1_val = l2off;
	s->l1_valid = true;
	s->l2_offset = l2off;
	return 0;
}

static int qcow_set_entry(struct blk *bs, uint64_t off, uint64_t entry)
{
	struct qcow *s = bs->opaque;
	uint64_t i = (off >> s->cluster_bits) & (s->l2_entries - 1);
	uint8_t raw[8];

	s->l2[i] = entry;
	st_be64(raw, entry);
	return bfile_pwrite(bs->file, s->l2_offset + i * 8, raw, 8);
}

/* Writes into the first cluster of a run that is unallocated or
 * compressed: a new plain cluster gets the old content around the new
 * bytes. */
static int qcow_write_new(struct blk *bs, uint64_t off, const uint8_t *buf,
			  struct fmt_run *r)
{
	struct qcow *s = bs->opaque;
	uint64_t cs = s->cluster_size, start = ALIGN_DOWN(off, cs), host;
	uint64_t n = MIN(r->len, start + cs - off), entry = r->entry;
	uint8_t *c = NULL;
	const uint8_t *src = buf;
	int ret;

	r->len = n;

	if (n < cs) {
		c = blk_alloc_buf(cs);
		if (!c)
			return -ENOMEM;
		memset(c, 0, cs);
		if (entry & QCOW_COMPRESSED) {
			ret = qcow_decompress(bs, entry);
			if (ret < 0)
				goto out;
			memcpy(c, s->cbuf, cs);
		} else if (start < bs->size) {
			ret = blk_read_backing(bs, start, c,
					       (size_t)MIN(cs, bs->size - start));
			if (ret < 0)
				goto out;
		}
		memcpy(c + (off - start), buf, n);
		src = c;
	}
	ret = qcow_get_l2(bs, start);
	if (ret < 0)
		goto out;
	host = qcow_alloc(s, cs, cs);
	if (!fmt_range_ok(host, cs) || host >= 1ULL << (63 - s->cluster_bits)) {
		ret = -EFBIG;
		goto out;
	}
	ret = bfile_pwrite(bs->file, host, src, cs);
	if (ret == 0)
		ret = qcow_set_entry(bs, start, host);
out:
	free(c);
	return ret;
}

static const struct fmt_map qcow_map = {
	.lookup = qcow_lookup,
	.alloc_write = qcow_write_new,
	.read_other = qcow_read_compressed,
};

/* Unallocated clusters of an image without a backing file already read
 * as zeroes; everything else is written. */
static int qcow_pwrite_zeroes(struct blk *bs, uint64_t off, uint64_t len,
			      unsigned flags)
{
	uint8_t *z = NULL;
	int ret = 0;

	(void)flags;
	while (len) {
		struct fmt_run r;

		ret = qcow_lookup(bs, off, len, FMT_WRITE, &r);
		if (ret < 0)
			break;
		if (r.entry || (bs->backing_file && bs->backing_file[0])) {
			r.len = MIN(r.len, 1 << 20);
			if (!z && !(z = calloc(1, 1 << 20))) {
				ret = -ENOMEM;
				break;
			}
			ret = fmt_map_pwrite(bs, off, z, (size_t)r.len);
			if (ret < 0)
				break;
		}
		off += r.len;
		len -= r.len;
	}
	free(z);
	return ret;
}

static int qcow_write_compressed(struct blk *bs, uint64_t off,
				 const void *buf, size_t len)
{
	struct qcow *s = bs->opaque;
	uint64_t cs = s->cluster_size, host, entry;
	uint8_t *in = (uint8_t *)buf, *pad = NULL;
	z_stream z;
	long clen;
	int ret;

	if (s->crypt)
		return -EACCES;
	if (!IS_ALIGNED(off, cs) || len > cs ||
	    (len < cs && off + len != bs->size))
		return -EINVAL;
	if (len < cs) {
		/* the last, partial cluster of the disk */
		pad = calloc(1, cs);
		if (!pad)
			return -ENOMEM;
		memcpy(pad, buf, len);
		in = pad;
	}
	memset(&z, 0, sizeof(z));
	if (deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
			 Z_DEFAULT_STRATEGY) != Z_OK) {
		free(pad);
		return -ENOMEM;
	}
	z.next_in = in;
	z.avail_in = (uInt)cs;
	z.next_out = s->zbuf;
	z.avail_out = (uInt)cs;
	ret = deflate(&z, Z_FINISH);
	clen = (long)(cs - z.avail_out);
	deflateEnd(&z);
	if (ret != Z_STREAM_END || (uint64_t)clen >= cs) {
		/* does not shrink: store it plainly */
		ret = fmt_map_pwrite(bs, off, in,
				     (size_t)cs > len ? len : cs);
		free(pad);
		return ret;
	}
	free(pad);
	ret = qcow_get_l2(bs, off);
	if (ret < 0)
		return ret;
	/* Compressed clusters are packed at 512-byte boundaries. */
	host = qcow_alloc(s, (uint64_t)clen, 512);
	if (host >= 1ULL << (63 - s->cluster_bits))
		return -EFBIG;
	s->cbuf_entry = 0;
	ret = bfile_pwrite(bs->file, host, s->zbuf, (size_t)clen);
	if (ret < 0)
		return ret;
	entry = QCOW_COMPRESSED | (uint64_t)clen << (63 - s->cluster_bits) |
		host;
	return qcow_set_entry(bs, off, entry);
}

static int qcow_get_info(struct blk *bs, struct blk_info *bi)
{
	struct qcow *s = bs->opaque;

	bi->cluster_size = s->cluster_size;
	bi->encrypted = s->crypt != 0;
	return 0;
}

static int qcow_create(const char *filename, const struct optlist *opts,
		       struct err *e)
{
	const char *bf = optlist_get(opts, "backing_file");
	const char *ef = optlist_get(opts, "encrypt.format");
	uint64_t size = 0, l1_size, l1off;
	unsigned cbits = 12, l2bits = 9;
	size_t blen = bf ? strlen(bf) : 0;
	uint8_t h[QCOW_HDR_SIZE];
	struct bfile *f;
	bool enc = false;
	int ret;

	/* QEMU creates the file first; refused options leave it empty. */
	ret = fmt_create_file(&f, filename, e);
	if (ret < 0)
		return ret;
	ret = -EINVAL;
	if (optlist_get_size(opts, "size", &size, e) < 0 ||
	    optlist_get_bool(opts, "encryption", &enc, e) < 0)
		goto out;
	if (enc || ef || optlist_get(opts, "encrypt.key-secret")) {
		if (ef && strcmp(ef, "aes"))
			fmt_err(e, 0, "Parameter 'format' does not accept "
				"value '%s'", ef);
		else if (!optlist_get(opts, "encrypt.key-secret"))
			ret = fmt_err(e, -ENOTSUP, QCOW_NO_KEY_MSG);
		else
			ret = fmt_err(e, -ENOTSUP, "AES encrypted qcow images "
				      "are not supported");
		goto out;
	}
	size = ALIGN_UP(size, 512);
	if (!size) {
		fmt_err(e, 0, "Image size is too small, cannot be zero length");
		goto out;
	}
	if (blen > QCOW_MAX_BACKING) {
		fmt_err(e, 0, "Backing file name too long");
		goto out;
	}
	if (blen) {
		/* overlays use 512-byte clusters so that no write ever
		 * needs a partial-cluster copy from the backing file */
		cbits = 9;
		l2bits = 12;
	}
	l1_size = DIV_ROUND_UP(size, 1ULL << (cbits + l2bits));
	l1off = QCOW_HDR_SIZE + blen;
	if (l1_size > INT_MAX / 8) {
		ret = fmt_err(e, -EFBIG, "Image size is too big");
		goto out;
	}
	memset(h, 0, sizeof(h));
	st_be32(h, QCOW_MAGIC);
	st_be32(h + 4, 1);
	if (blen) {
		st_be64(h + 8, QCOW_HDR_SIZE);
		st_be32(h + 16, (uint32_t)blen);
	}
	st_be64(h + 24, size);
	h[32] = (uint8_t)cbits;
	h[33] = (uint8_t)l2bits;
	st_be64(h + 40, l1off);
	ret = bfile_pwrite(f, 0, h, sizeof(h));
	if (ret == 0 && blen)
		ret = bfile_pwrite(f, QCOW_HDR_SIZE, bf, blen);
	/* the L1 table is written out as zeroes, like QEMU does */
	if (ret == 0)
		ret = fmt_write_zeroes(f, l1off, ALIGN_UP(l1_size * 8, 512));
out:
	return fmt_create_end(f, ret, "Could not write the image", e);
}

const struct blk_driver qcow_driver = {
	FMT_DRIVER(qcow, struct qcow),
	.caps = BLK_CAP_CREATE | BLK_CAP_WRITE | BLK_CAP_BACKING |
		BLK_CAP_COMPRESS | BLK_CAP_ZERO_INIT,
	FMT_MAPPED_IO,
	.pwrite_zeroes = qcow_pwrite_zeroes,
	.write_compressed = qcow_write_compressed,
};
