/* qcow2.c - the qcow2 format: header and extensions, open, info,
 * snapshot table, create, resize (docs/interop/qcow2.txt).
 * Mapping and writes live in map.c, refcounts in refcount.c,
 * compression in compress.c. */
//config:config FORMAT_QCOW2
//config:	bool "qcow2"
//config:	default y
//config:	help
//config:	  QEMU's copy-on-write format, versions 2 and 3: backing files,
//config:	  zero and compressed clusters, extended L2 entries, internal
//config:	  snapshot table, any refcount width.
//format:FORMAT(qcow2)

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "../fmt.h"
#include "qcow2.h"
#include <generated/config.h>

static const struct optdesc qcow2_create_opts[] = {
	/* Array order = the order of QEMU's "Formatting" line. */
	{ "encryption", OPT_BOOL, "Encrypt the image with format 'aes'. "
	  "(Deprecated in favor of encrypt.format=aes)", NULL, false },
	{ "encrypt.format", OPT_STRING, "Encrypt the image, format choices: "
	  "'aes', 'luks'", NULL, false },
	{ "encrypt.key-secret", OPT_STRING, "ID of secret providing qcow AES "
	  "key or LUKS passphrase", NULL, false },
	{ "encrypt.cipher-alg", OPT_STRING, "Name of encryption cipher "
	  "algorithm", NULL, false },
	{ "encrypt.cipher-mode", OPT_STRING, "Name of encryption cipher mode",
	  NULL, false },
	{ "encrypt.ivgen-alg", OPT_STRING, "Name of IV generator algorithm",
	  NULL, false },
	{ "encrypt.ivgen-hash-alg", OPT_STRING, "Name of IV generator hash "
	  "algorithm", NULL, false },
	{ "encrypt.hash-alg", OPT_STRING, "Name of encryption hash algorithm",
	  NULL, false },
	{ "encrypt.iter-time", OPT_NUMBER, "Time to spend in PBKDF in "
	  "milliseconds", NULL, false },
	{ "cluster_size", OPT_SIZE, "qcow2 cluster size", "65536", false },
	{ "extended_l2", OPT_BOOL, "Extended L2 tables", "off", false },
	{ "preallocation", OPT_STRING, "Preallocation mode (allowed values: "
	  "off, metadata, falloc, full)", NULL, false },
	{ "compression_type", OPT_STRING, "Compression method used for image "
	  "cluster compression", "zlib", false },
	QCOW2_OPTS_IMAGE("off", "16"),
	{ "nocow", OPT_BOOL, "Turn off copy-on-write (valid only on btrfs)",
	  NULL, true },
	{ "extent_size_hint", OPT_SIZE, "Extent size hint for the image file, "
	  "0 to disable", NULL, true },
	{ NULL, 0, NULL, NULL, false }
};

/* Readers fail outside the lock too (a corrupt compressed cluster). */
int qcow2_set_errmsg(struct blk *bs, int ret, const char *fmt, ...)
{
	va_list ap;

	qcow2_lock(bs);
	va_start(ap, fmt);
	vsnprintf(bs->errmsg, sizeof(bs->errmsg), fmt, ap);
	va_end(ap);
	qcow2_unlock(bs);
	return ret;
}

int qcow2_write_header_field(struct blk *bs, unsigned off, const void *v,
			     size_t len)
{
	return bfile_pwrite(bs->file, off, v, len);
}

static int qcow2_probe(const uint8_t *buf, size_t len, const char *filename)
{
	(void)filename;
	if (len >= 8 && ld_be32(buf) == QCOW2_MAGIC && ld_be32(buf + 4) >= 2)
		return 100;
	return 0;
}

/* A table at off of len bytes: cluster aligned, no overflow. */
static bool table_ok(const struct qcow2 *s, uint64_t off, uint64_t len)
{
	uint64_t end;

	if (off & (s->cluster_size - 1))
		return false;
	if (add_overflow_u64(off, len, &end) || end > INT64_MAX)
		return false;
	return true;
}

static const char *incompat_name(uint8_t *ft, uint32_t ftlen, unsigned bit,
				 char *name)
{
	for (uint32_t i = 0; i + 48 <= ftlen; i += 48)
		if (ft[i] == 0 && ft[i + 1] == bit) {
			memcpy(name, ft + i + 2, 46);
			name[46] = 0;
			return name;
		}
	return NULL;
}

static int unsupported_features(uint64_t mask, uint8_t *ft, uint32_t ftlen,
				struct err *e)
{
	char msg[900], name[47];
	size_t n = 0;

	msg[0] = 0;
	for (unsigned b = 0; b < 64; b++) {
		if (!(mask >> b & 1) || !incompat_name(ft, ftlen, b, name))
			continue;
		n += (size_t)snprintf(msg + n, sizeof(msg) - MIN(n,
				      sizeof(msg)), "%s%s", n ? ", " : "",
				      name);
		mask &= ~(1ULL << b);
		if (n >= sizeof(msg))
			n = sizeof(msg) - 1;
	}
	if (mask)
		snprintf(msg + n, sizeof(msg) - n, "%sUnknown incompatible "
			 "feature: %llx", n ? ", " : "",
			 (unsigned long long)mask);
	err_set(e, "Unsupported qcow2 feature(s): %s", msg);
	return -ENOTSUP;
}

/* Header extensions between the header and end (the backing file name or
 * the end of the first cluster). */
static int read_extensions(struct blk *bs, const uint8_t *hc, uint64_t start,
			   uint64_t end, uint8_t **ft, uint32_t *ftlen,
			   struct err *e)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t p = start;

	while (p + 8 <= end) {
		uint32_t type = ld_be32(hc + p), len = ld_be32(hc + p + 4);
		const uint8_t *d = hc + p + 8;

		p += 8;
		if (len > end - p)
			return fmt_err(e, -EINVAL, "Header extension too large");
		switch (type) {
		case QCOW2_EXT_END:
			return 0;
		case QCOW2_EXT_BACKING_FMT:
			if (len >= 16)
				return fmt_err(e, -EINVAL, "ERROR: "
					       "ext_backing_format: len=%u "
					       "too large (>=16)", len);
			free(bs->backing_fmt);
			bs->backing_fmt = strndup((const char *)d, len);
			if (!bs->backing_fmt)
				return -ENOMEM;
			break;
		case QCOW2_EXT_FEATURES:
			*ft = (uint8_t *)(uintptr_t)d;
			*ftlen = len;
			break;
		case QCOW2_EXT_BITMAPS:
			s->has_bitmaps = true;
			if (len >= 24) {
				s->bm_nb = ld_be32(d);
				s->bm_dir_size = ld_be64(d + 8);
				s->bm_dir_off = ld_be64(d + 16);
			}
			break;
		case QCOW2_EXT_CRYPTO:
			s->has_crypto_ext = true;
			break;
		case QCOW2_EXT_DATAFILE:
			free(s->datafile_name);
			s->datafile_name = strndup((const char *)d, len);
			if (!s->datafile_name)
				return -ENOMEM;
			break;
		default:
			break;	/* unknown: kept as they are on disk */
		}
		p += ALIGN_UP((uint64_t)len, 8);
	}
	return 0;
}

static int read_snapshots(struct blk *bs, struct err *e)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t off = s->snapshots_offset;
	uint8_t h[40], *x = NULL;

	if (!s->nb_snapshots)
		return 0;
	if (blk_meta_alloc(bs, (uint64_t)s->nb_snapshots * sizeof(*s->sn),
			   "snapshot table", e) < 0)
		return -EFBIG;
	s->sn = calloc(s->nb_snapshots, sizeof(*s->sn));
	if (!s->sn)
		return -ENOMEM;
	for (uint32_t i = 0; i < s->nb_snapshots; i++) {
		struct qcow2_snapshot *sn = &s->sn[i];
		uint32_t extra, idl, nml;
		int ret;

		if (off - s->snapshots_offset > QCOW2_MAX_SN_TABLE)
			return fmt_err(e, -EFBIG, "Snapshot table too large");
		ret = bfile_pread(bs->file, off, h, 40);
		if (ret < 0)
			return ret;
		sn->l1_offset = ld_be64(h);
		sn->l1_size = ld_be32(h + 8);
		idl = ld_be16(h + 12);
		nml = ld_be16(h + 14);
		sn->info.date_sec = ld_be32(h + 16);
		sn->info.date_nsec = ld_be32(h + 20);
		sn->info.vm_clock_nsec = ld_be64(h + 24);
		sn->info.vm_state_size = ld_be32(h + 32);
		extra = ld_be32(h + 36);
		if (extra > 1024)
			return fmt_err(e, -EFBIG, "Too much extra metadata in "
				       "snapshot table entry %u", i);
		x = calloc(1, extra + idl + nml + 1);
		if (!x)
			return -ENOMEM;
		ret = bfile_pread(bs->file, off + 40, x, extra + idl + nml);
		if (ret < 0) {
			free(x);
			return ret;
		}
		if (extra >= 8)
			sn->info.vm_state_size = ld_be64(x);
		if (extra >= 16)
			sn->disk_size = ld_be64(x + 8);
		else
			sn->disk_size = bs->size;
		if (extra >= 24 && ld_be64(x + 16) != UINT64_MAX) {
			sn->info.icount_valid = 1;
			sn->info.icount = ld_be64(x + 16);
		}
		snprintf(sn->info.id, sizeof(sn->info.id), "%.*s",
			 (int)MIN(idl, sizeof(sn->info.id) - 1),
			 (char *)x + extra);
		snprintf(sn->info.name, sizeof(sn->info.name), "%.*s",
			 (int)MIN(nml, sizeof(sn->info.name) - 1),
			 (char *)x + extra + idl);
		free(x);
		off = ALIGN_UP(off + 40 + extra + idl + nml, 8);
	}
	return 0;
}

static int caches_init(struct blk *bs)
{
	struct qcow2 *s = qcow2_state(bs);
	size_t cs = s->cluster_size;
	int nl2 = (int)MAX(4, MIN(64, (1u << 20) / cs));
	int nrb = (int)MAX(4, MIN(32, (256u << 10) / cs));
	int ret = qcow2_cache_init(&s->l2c, nl2, cs);

	if (ret < 0)
		return ret;
	return qcow2_cache_init(&s->rbc, nrb, cs);
}

/* Everything qcow2_open allocates; the block layer does not call close
 * after a failed open. */
static void free_state(struct qcow2 *s)
{
	qcow2_cache_free(&s->l2c);
	qcow2_cache_free(&s->rbc);
	free(s->l1);
	free(s->rt);
	free(s->sn);
	free(s->zc_buf);
	free(s->datafile_name);
	s->l1 = NULL;
	s->rt = NULL;
	s->sn = NULL;
	s->zc_buf = NULL;
	s->datafile_name = NULL;
}

static int qcow2_open(struct blk *bs, struct err *e)
{
	struct qcow2 *s = qcow2_state(bs);
	uint8_t hdr[112], *hc = NULL, *ft = NULL;
	uint32_t ftlen = 0, bfsize;
	uint64_t bfoff, l1_need, ext_end;
	int ret;

	ret = bfile_pread(bs->file, 0, hdr, sizeof(hdr));
	if (ret < 0) {
		err_set(e, "Could not read qcow2 header: %s", strerror(-ret));
		return ret;
	}
	if (ld_be32(hdr) != QCOW2_MAGIC)
		return fmt_err(e, -EINVAL, "Image is not in qcow2 format");
	s->version = ld_be32(hdr + QH_VERSION);
	if (s->version < 2 || s->version > 3)
		return fmt_err(e, -ENOTSUP, "Unsupported qcow2 version %u",
			       s->version);
	s->cluster_bits = ld_be32(hdr + QH_CLUSTER_BITS);
	if (s->cluster_bits < 9 || s->cluster_bits > 21)
		return fmt_err(e, -EINVAL, "Unsupported cluster size: 2^%i",
			       (int)s->cluster_bits);
	s->cluster_size = 1ULL << s->cluster_bits;
	if (s->version == 2) {
		memset(hdr + 72, 0, sizeof(hdr) - 72);
		s->header_length = 72;
		s->refcount_order = 4;
	} else {
		s->header_length = ld_be32(hdr + QH_HEADER_LEN);
		if (s->header_length < 104)
			return fmt_err(e, -EINVAL, "qcow2 header too short");
		if (s->header_length > s->cluster_size)
			return fmt_err(e, -EINVAL, "qcow2 header exceeds "
				       "cluster size");
		if (s->header_length < sizeof(hdr))
			memset(hdr + s->header_length, 0,
			       sizeof(hdr) - s->header_length);
		s->refcount_order = ld_be32(hdr + QH_REFCOUNT_ORDER);
	}
	s->incompat = ld_be64(hdr + QH_INCOMPAT);
	s->compat = ld_be64(hdr + QH_COMPAT);
	s->autoclear = ld_be64(hdr + QH_AUTOCLEAR);
	bfoff = ld_be64(hdr + QH_BACKING_OFF);
	bfsize = ld_be32(hdr + QH_BACKING_SIZE);
	if (bfoff > s->cluster_size)
		return fmt_err(e, -EINVAL, "Invalid backing file offset");
	hc = malloc(s->cluster_size);
	if (!hc)
		return -ENOMEM;
	ret = bfile_pread(bs->file, 0, hc, s->cluster_size);
	if (ret < 0)
		goto out;
	ext_end = bfoff ? bfoff : s->cluster_size;
	ret = read_extensions(bs, hc, s->header_length, ext_end, &ft, &ftlen,
			      e);
	if (ret < 0)
		goto out;
	if (s->incompat & ~QCOW2_INCOMPAT_KNOWN) {
		ret = unsupported_features(s->incompat & ~QCOW2_INCOMPAT_KNOWN,
					   ft, ftlen, e);
		goto out;
	}
	ret = -EINVAL;
	if ((s->incompat & QCOW2_INCOMPAT_CORRUPT) &&
	    (bs->flags & BLK_O_RDWR) && !(bs->flags & BLK_O_CHECK)) {
		err_set(e, "qcow2: Image is corrupt; cannot be opened "
			"read/write");
		ret = -EACCES;
		goto out;
	}
	if (s->refcount_order > 6) {
		err_set(e, "Reference count entry width too large; may not "
			"exceed 64 bits");
		goto out;
	}
	s->compression_type = s->header_length > QH_COMPRESSION ?
			      hdr[QH_COMPRESSION] : 0;
	if (s->compression_type > 1) {
		err_set(e, "qcow2: unknown compression type: %u",
			s->compression_type);
		goto out;
	}
	if (!s->compression_type && (s->incompat & QCOW2_INCOMPAT_COMPRESS)) {
		err_set(e, "qcow2: Compression type incompatible feature bit "
			"must not be set");
		goto out;
	}
	if (s->compression_type && !(s->incompat & QCOW2_INCOMPAT_COMPRESS)) {
		err_set(e, "qcow2: Compression type incompatible feature bit "
			"must be set");
		goto out;
	}
	s->crypt_method = ld_be32(hdr + QH_CRYPT);
	if (s->crypt_method > 2) {
		err_set(e, "Unsupported encryption method %u",
			s->crypt_method);
		goto out;
	}
	if (s->incompat & QCOW2_INCOMPAT_DATAFILE) {
		struct blk_ref ref;

		ret = s->datafile_name ? blk_ref_check(bs, "data file",
						       s->datafile_name, &ref,
						       e) : 0;
		if (ret < 0)
			goto out;
		err_set(e, "External data files are not supported in this "
			"build");
		ret = -ENOTSUP;
		goto out;
	}
	if (s->crypt_method && (bs->flags & BLK_O_RDWR)) {
		err_set(e, "Encrypted images are not supported in this build");
		ret = -ENOTSUP;
		goto out;
	}
	s->ext_l2 = s->incompat & QCOW2_INCOMPAT_EXTL2;
	if (s->ext_l2 && s->cluster_bits < 14) {
		err_set(e, "The cluster size must be at least 16 KiB for "
			"images with extended L2 entries");
		goto out;
	}
	s->l2_esize = s->ext_l2 ? 16 : 8;
	s->l2_bits = s->cluster_bits - (s->ext_l2 ? 4 : 3);
	s->sc_bits = s->cluster_bits - 5;

	bs->size = ld_be64(hdr + QH_SIZE);
	s->rt_offset = ld_be64(hdr + QH_RT_OFFSET);
	s->rt_clusters = ld_be32(hdr + QH_RT_CLUSTERS);
	if ((uint64_t)s->rt_clusters << s->cluster_bits >
	    QCOW2_MAX_RT_BYTES) {
		err_set(e, "Reference count table too large");
		goto out;
	}
	if (!table_ok(s, s->rt_offset, (uint64_t)s->rt_clusters <<
		      s->cluster_bits)) {
		err_set(e, "Reference count table offset invalid");
		goto out;
	}
	s->nb_snapshots = ld_be32(hdr + QH_NB_SNAPSHOTS);
	s->snapshots_offset = ld_be64(hdr + QH_SNAPSHOTS_OFF);
	if (s->nb_snapshots > QCOW2_MAX_SNAPSHOTS) {
		err_set(e, "Snapshot table too large");
		goto out;
	}
	if (!table_ok(s, s->snapshots_offset, (uint64_t)s->nb_snapshots *
		      40)) {
		err_set(e, "Snapshot table offset invalid");
		goto out;
	}
	s->l1_size = ld_be32(hdr + QH_L1_SIZE);
	s->l1_offset = ld_be64(hdr + QH_L1_OFFSET);
	if ((uint64_t)s->l1_size * 8 > QCOW2_MAX_L1_BYTES) {
		err_set(e, "Active L1 table too large");
		goto out;
	}
	if (bs->size > INT64_MAX) {
		err_set(e, "Image is too big");
		goto out;
	}
	l1_need = DIV_ROUND_UP(bs->size, 1ULL << (s->cluster_bits +
						  s->l2_bits));
	if (l1_need > s->l1_size) {
		err_set(e, "L1 table is too small");
		goto out;
	}
	if (!table_ok(s, s->l1_offset, (uint64_t)s->l1_size * 8)) {
		err_set(e, "Active L1 table offset invalid");
		goto out;
	}
	if (bfoff) {
		if (bfsize > 1023 || bfsize > s->cluster_size - bfoff) {
			err_set(e, "Backing file name too long");
			goto out;
		}
		bs->backing_file = strndup((char *)hc + bfoff, bfsize);
		if (!bs->backing_file) {
			ret = -ENOMEM;
			goto out;
		}
	}
	ret = blk_meta_alloc(bs, (uint64_t)s->l1_size * 8, "L1 table", e);
	if (ret < 0)
		goto out;
	s->l1 = calloc(s->l1_size ? s->l1_size : 1, 8);
	if (!s->l1) {
		ret = -ENOMEM;
		goto out;
	}
	if (s->l1_size) {
		uint8_t *b = malloc((size_t)s->l1_size * 8);
		if (!b) {
			ret = -ENOMEM;
			goto out;
		}
		ret = bfile_pread(bs->file, s->l1_offset, b,
				  (size_t)s->l1_size * 8);
		for (uint32_t i = 0; i < s->l1_size && !ret; i++)
			s->l1[i] = ld_be64(b + (size_t)i * 8);
		free(b);
		if (ret < 0) {
			err_set(e, "Could not read L1 table: %s",
				strerror(-ret));
			goto out;
		}
	}
	ret = qcow2_refcount_init(bs, e);
	if (ret < 0)
		goto out;
	ret = read_snapshots(bs, e);
	if (ret < 0)
		goto out;
	ret = caches_init(bs);
	if (ret < 0)
		goto out;
	s->read_only = !(bs->flags & BLK_O_RDWR);
	if (!s->read_only && (s->incompat & QCOW2_INCOMPAT_DIRTY) &&
	    !(bs->flags & BLK_O_CHECK)) {
		/* Refcounts may be stale (lazy refcounts, or a crash): they
		 * are rebuilt from the L1/L2 tables before any write, as
		 * QEMU does on opening such an image read-write. */
		struct check_result res = {
			.report = check_default_report,
		};

		ret = qcow2_check(bs, &res, CHECK_FIX_ERRORS |
				  CHECK_FIX_LEAKS);
		if (ret < 0 || res.corruptions || res.check_errors) {
			err_set(e, "Could not repair dirty image: %s",
				ret < 0 ? strerror(-ret) :
				"corruptions remain");
			ret = ret < 0 ? ret : -EIO;
			goto out;
		}
	}
	if (!s->read_only) {
		/* unknown auto-clear features must be cleared before any
		 * write (qcow2.txt "autoclear_features") */
		uint64_t ac = s->autoclear & QCOW2_AUTOCLEAR_BITMAPS;
		if (ac != s->autoclear && s->version >= 3) {
			uint8_t b[8];
			st_be64(b, ac);
			ret = qcow2_write_header_field(bs, QH_AUTOCLEAR, b, 8);
			if (ret < 0)
				goto out;
			s->autoclear = ac;
		}
	}
	ret = 0;
out:
	free(hc);
	if (ret < 0)
		free_state(s);
	return ret;
}


static void qcow2_close(struct blk *bs)
{
	struct qcow2 *s = qcow2_state(bs);

	if (!s)
		return;
	if (!s->read_only && s->l2c.e)
		qcow2_cache_flush_all(bs);
	free_state(s);
}

static int qcow2_flush(struct blk *bs)
{
	struct qcow2 *s = qcow2_state(bs);
	int ret;

	if (!s->read_only) {
		ret = qcow2_cache_flush_all(bs);
		if (ret < 0)
			return ret;
	}
	return bfile_flush(bs->file);
}

/* The bitmap directory as info lists it (qcow2.txt, "Bitmap directory"):
 * name, granularity and flags of each bitmap. */
static void bitmaps_info(struct blk *bs, struct val *d)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t n = s->bm_dir_size, p = 0;
	uint8_t *dir;
	struct val *arr;

	if (!s->has_bitmaps || !(s->autoclear & QCOW2_AUTOCLEAR_BITMAPS) ||
	    !s->bm_nb || n < 24 || n > QCOW2_MAX_SN_TABLE)
		return;
	dir = malloc(n);
	if (!dir)
		return;
	if (bfile_pread(bs->file, s->bm_dir_off, dir, n) < 0)
		goto out;
	arr = val_add_arr(d, "bitmaps");
	for (uint32_t i = 0; i < s->bm_nb && arr && p + 24 <= n; i++) {
		uint32_t flags = ld_be32(dir + p + 12);
		unsigned gbits = dir[p + 17];
		uint32_t nl = ld_be16(dir + p + 18);
		uint32_t extra = ld_be32(dir + p + 20);
		struct val *o, *f;
		char *name;

		if (extra > n || nl > n || p + 24 + extra + nl > n || gbits > 63)
			break;
		o = val_add_obj(arr, NULL);
		if (!o)
			break;
		f = val_add_arr(o, "flags");
		if (f && (flags & 1))
			val_add_str(f, NULL, "in-use");
		if (f && (flags & 2))
			val_add_str(f, NULL, "auto");
		name = strndup((char *)dir + p + 24 + extra, nl);
		if (name)
			val_add_str(o, "name", name);
		free(name);
		val_add_uint(o, "granularity", 1ULL << gbits);
		p = ALIGN_UP(p + 24 + extra + nl, 8);
	}
out:
	free(dir);
}

static int qcow2_get_info(struct blk *bs, struct blk_info *bi)
{
	struct qcow2 *s = qcow2_state(bs);
	struct val *o = val_obj(), *d;

	bi->cluster_size = s->cluster_size;
	bi->dirty = s->incompat & QCOW2_INCOMPAT_DIRTY;
	bi->encrypted = s->crypt_method != 0;
	if (!o)
		return -ENOMEM;
	val_add_str(o, "type", "qcow2");
	d = val_add_obj(o, "data");
	if (!d)
		return -ENOMEM;
	val_add_str(d, "compat", s->version == 2 ? "0.10" : "1.1");
	val_add_str(d, "compression-type",
		    s->compression_type ? "zstd" : "zlib");
	if (s->version >= 3)
		val_add_bool(d, "lazy-refcounts",
			     s->compat & QCOW2_COMPAT_LAZY);
	bitmaps_info(bs, d);
	val_add_uint(d, "refcount-bits", 1u << s->refcount_order);
	if (s->version >= 3) {
		val_add_bool(d, "corrupt",
			     s->incompat & QCOW2_INCOMPAT_CORRUPT);
		val_add_bool(d, "extended-l2", s->ext_l2);
	}
	bi->specific = o;
	return 0;
}

static int qcow2_snapshot_list(struct blk *bs, struct snapshot_info **list,
			       int *n)
{
	struct qcow2 *s = qcow2_state(bs);

	*list = NULL;
	*n = 0;
	if (!s->nb_snapshots)
		return 0;
	*list = calloc(s->nb_snapshots, sizeof(**list));
	if (!*list)
		return -ENOMEM;
	for (uint32_t i = 0; i < s->nb_snapshots; i++)
		(*list)[i] = s->sn[i].info;
	*n = (int)s->nb_snapshots;
	return 0;
}

/* ---- resize ---- */

/* Larger L1 table: copied, written, then the header points to it. */
static int grow_l1(struct blk *bs, uint64_t need)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t *nl1, bytes = need * 8;
	uint8_t *b, hdr[12];
	int64_t off;
	int ret;

	if (bytes > QCOW2_MAX_L1_BYTES)
		return qcow2_set_errmsg(bs, -EFBIG, "Active L1 table too "
					"large");
	nl1 = calloc(need, 8);
	b = calloc(1, ALIGN_UP(bytes, s->cluster_size));
	if (!nl1 || !b) {
		free(nl1);
		free(b);
		return -ENOMEM;
	}
	memcpy(nl1, s->l1, (size_t)s->l1_size * 8);
	off = qcow2_alloc_clusters(bs, DIV_ROUND_UP(bytes, s->cluster_size));
	if (off < 0) {
		ret = (int)off;
		goto out;
	}
	for (uint64_t i = 0; i < need; i++)
		st_be64(b + i * 8, nl1[i]);
	ret = bfile_pwrite(bs->file, (uint64_t)off, b, bytes);
	if (!ret)
		ret = qcow2_cache_flush(bs, &s->rbc);
	if (!ret)
		ret = bfile_flush(bs->file);
	if (ret < 0)
		goto out;
	st_be32(hdr, (uint32_t)need);
	st_be64(hdr + 4, (uint64_t)off);
	ret = qcow2_write_header_field(bs, QH_L1_SIZE, hdr, 12);
	if (ret < 0)
		goto out;
	if (s->l1_size)
		qcow2_free_clusters(bs, s->l1_offset,
				    ALIGN_UP((uint64_t)s->l1_size * 8,
					     s->cluster_size));
	free(s->l1);
	s->l1 = nl1;
	nl1 = NULL;
	s->l1_size = (uint32_t)need;
	s->l1_offset = (uint64_t)off;
out:
	free(nl1);
	free(b);
	return ret;
}

/* Allocate every cluster of [from, to) that is not allocated yet. */
static int preallocate(struct blk *bs, uint64_t from, uint64_t to,
		       uint64_t *hend)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t cs = s->cluster_size, span = cs << s->l2_bits;
	uint64_t pos = ALIGN_DOWN(from, cs);
	int ret;

	to = ALIGN_UP(to, cs);
	while (pos < to) {
		uint64_t end = MIN(to, ALIGN_DOWN(pos, span) + span), k;
		uint8_t *tbl;
		unsigned idx;
		int64_t h;

		ret = qcow2_l2_get(bs, pos, true, &tbl, &idx);
		if (ret < 0)
			return ret;
		k = (end - pos) / cs;
		h = qcow2_alloc_clusters(bs, k);
		if (h < 0)
			return (int)h;
		ret = qcow2_l2_get(bs, pos, true, &tbl, &idx);
		if (ret < 0)
			return ret;
		for (uint64_t i = 0; i < k; i++) {
			uint64_t old = ld_be64(tbl + (idx + i) * s->l2_esize);
			if (old) {
				/* keep what is there; give back the spare */
				qcow2_free_clusters(bs, (uint64_t)h + i * cs,
						    cs);
				continue;
			}
			st_be64(tbl + (idx + i) * s->l2_esize,
				((uint64_t)h + i * cs) | QCOW2_OFLAG_COPIED);
			*hend = MAX(*hend, (uint64_t)h + (i + 1) * cs);
		}
		qcow2_cache_dirty(&s->l2c, tbl);
		pos = end;
	}
	return 0;
}

/* Drop every cluster past the new end, then the L2 tables that no longer
 * map anything, then the file's tail of free clusters. */
static int shrink_to(struct blk *bs, uint64_t size)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t cs = s->cluster_size, span = cs << s->l2_bits;
	uint64_t nclusters, last = 0, rc;
	int64_t fs;
	int ret;

	for (uint64_t p = ALIGN_UP(size, cs); p < bs->size; p += cs) {
		uint8_t *tbl;
		unsigned idx;
		uint64_t e;

		ret = qcow2_l2_get(bs, p, false, &tbl, &idx);
		if (ret < 0)
			return ret;
		if (!tbl) {
			p = ALIGN_DOWN(p, span) + span - cs;
			continue;
		}
		e = ld_be64(tbl + (size_t)idx * s->l2_esize);
		if (!e && (!s->ext_l2 || !ld_be64(tbl + idx * 16 + 8)))
			continue;
		ret = qcow2_l2_get(bs, p, true, &tbl, &idx);
		if (ret < 0)
			return ret;
		memset(tbl + (size_t)idx * s->l2_esize, 0, s->l2_esize);
		qcow2_cache_dirty(&s->l2c, tbl);
		ret = qcow2_cache_flush(bs, &s->l2c);
		if (ret < 0)
			return ret;
		qcow2_free_l2_entry(bs, e);
	}
	for (uint64_t i = DIV_ROUND_UP(size, span); i < s->l1_size; i++) {
		uint64_t l2 = s->l1[i] & QCOW2_OFFSET_MASK;
		uint8_t z[8] = { 0 };
		if (!l2)
			continue;
		s->l1[i] = 0;
		ret = bfile_pwrite(bs->file, s->l1_offset + i * 8, z, 8);
		if (ret < 0)
			return ret;
		qcow2_free_clusters(bs, l2, cs);
	}
	ret = qcow2_cache_flush_all(bs);
	if (ret < 0)
		return ret;
	fs = bfile_size(bs->file);
	if (fs < 0)
		return (int)fs;
	nclusters = DIV_ROUND_UP((uint64_t)fs, cs);
	for (uint64_t c = 0; c < nclusters; c++) {
		ret = qcow2_rc_get(bs, c, &rc);
		if (ret < 0)
			return ret;
		if (rc)
			last = c + 1;
	}
	if (last && last < nclusters)
		return bfile_truncate(bs->file, last * cs, PREALLOC_OFF, NULL);
	return 0;
}

/* falloc/full: the data clusters of [from, to) get disk space (full:
 * written with zeroes); metadata clusters between them are left alone. */
static int prealloc_data(struct blk *bs, uint64_t from, uint64_t to,
			 int mode)
{
	size_t chunk = 1 << 20;
	uint8_t *z = NULL;
	uint64_t n, h;
	enum qcow2_type t;
	int ret = 0;

	if (mode == PREALLOC_FULL && !(z = calloc(1, chunk)))
		return -ENOMEM;
	for (uint64_t p = from; p < to && !ret; p += n) {
		ret = qcow2_map(bs, p, to - p, &n, &h, &t);
		if (ret < 0 || t != QC_NORMAL)
			continue;
		if (mode == PREALLOC_FALLOC) {
			ret = bfile_zero(bs->file, h, n, false);
			continue;
		}
		for (uint64_t d = 0; d < n && !ret; d += chunk)
			ret = bfile_pwrite(bs->file, h + d, z,
					   (size_t)MIN(chunk, n - d));
	}
	free(z);
	return ret;
}

static int qcow2_truncate(struct blk *bs, uint64_t size, int prealloc,
			  bool shrink, struct err *e)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t need, old = bs->size, end = 0;
	uint8_t b[8];
	int ret;

	/* qcow2.txt: the virtual size is stored in whole sectors */
	if (!IS_ALIGNED(size, 512))
		return fmt_err(e, -EINVAL, "The new size must be a multiple "
			       "of 512");
	/* A v2 snapshot table entry has no size of its own, so a snapshot
	 * would silently take the new size; v3 entries keep theirs. */
	if (s->nb_snapshots && s->version < 3)
		return fmt_err(e, -ENOTSUP, "Can't resize a v2 image which "
			       "has snapshots");
	if (size < old) {
		if (!shrink)
			return fmt_err(e, -EINVAL, "Use the --shrink option "
				       "to perform a shrink operation.");
		if (prealloc != PREALLOC_OFF)
			return fmt_err(e, -EINVAL, "Preallocation can't be "
				       "used for shrinking an image");
		ret = shrink_to(bs, size);
		if (ret < 0) {
			err_set(e, "Failed to shrink the image: %s",
				bs->errmsg[0] ? bs->errmsg : strerror(-ret));
			return ret;
		}
	}
	need = DIV_ROUND_UP(size, 1ULL << (s->cluster_bits + s->l2_bits));
	if (need > s->l1_size) {
		ret = grow_l1(bs, need);
		if (ret < 0) {
			err_set(e, "Failed to grow the L1 table: %s",
				bs->errmsg[0] ? bs->errmsg : strerror(-ret));
			return ret;
		}
	}
	if (size > old && prealloc != PREALLOC_OFF) {
		ret = preallocate(bs, old, size, &end);
		if (ret < 0) {
			err_set(e, "Preallocation failed: %s", strerror(-ret));
			return ret;
		}
	}
	ret = qcow2_cache_flush_all(bs);
	if (ret < 0)
		return ret;
	if (size > old && prealloc != PREALLOC_OFF) {
		/* the file covers the preallocated clusters */
		int64_t fs = bfile_size(bs->file);

		if (fs >= 0 && end > (uint64_t)fs) {
			ret = bfile_truncate(bs->file, end, PREALLOC_OFF, e);
			if (ret < 0)
				return ret;
		}
		if (prealloc != PREALLOC_METADATA) {
			ret = prealloc_data(bs, old, size, prealloc);
			if (ret < 0) {
				err_set(e, "Preallocation failed: %s",
					strerror(-ret));
				return ret;
			}
		}
	}
	st_be64(b, size);
	ret = qcow2_write_header_field(bs, QH_SIZE, b, 8);
	if (ret < 0)
		return ret;
	bs->size = size;
	return bfile_flush(bs->file);
}

/* ---- create ---- */

static int bad_value(struct err *e, const char *name, const char *v)
{
	err_set(e, "Parameter '%s' does not accept value '%s'", name, v);
	return -EINVAL;
}

static int qcow2_create(const char *filename, const struct optlist *opts,
			struct err *e)
{
	const char *v, *bfile = optlist_get(opts, "backing_file");
	const char *bfmt = optlist_get(opts, "backing_fmt");
	uint64_t size = 0, cs = 65536, rbits = 16;
	bool lazy = false, extl2 = false, b;
	int version = 3, prealloc = PREALLOC_OFF, ret;
	unsigned cbits, rorder = 0;
	uint8_t *hc = NULL;
	uint64_t p;
	struct bfile *f = NULL;
	struct blk *bs = NULL;

	if (optlist_get_size(opts, "size", &size, e) < 0)
		return -EINVAL;
	if ((v = optlist_get(opts, "compat"))) {
		if (!strcmp(v, "0.10") || !strcmp(v, "v2"))
			version = 2;
		else if (strcmp(v, "1.1") && strcmp(v, "v3"))
			return bad_value(e, "version", v);
	}
	if (optlist_get_size(opts, "cluster_size", &cs, e) < 0)
		return -EINVAL;
	if (cs < 512 || cs > (2u << 20) || (cs & (cs - 1)))
		return fmt_err(e, -EINVAL, "Cluster size must be a power of "
			       "two between 512 and 2048k");
	cbits = (unsigned)__builtin_ctzll(cs);
	if ((v = optlist_get(opts, "preallocation")) &&
	    blk_parse_prealloc(v, &prealloc) < 0)
		return bad_value(e, "preallocation", v);
	if (optlist_get_bool(opts, "lazy_refcounts", &lazy, e) < 0 ||
	    optlist_get_bool(opts, "extended_l2", &extl2, e) < 0)
		return -EINVAL;
	if ((v = optlist_get(opts, "refcount_bits"))) {
		char *end;
		rbits = strtoull(v, &end, 10);
		if (*end || !rbits || rbits > 64 || (rbits & (rbits - 1)))
			return fmt_err(e, -EINVAL, "Refcount width must be a "
				       "power of two and may not exceed 64 "
				       "bits");
	}
	while ((1ULL << rorder) < rbits)
		rorder++;
	if ((v = optlist_get(opts, "compression_type"))) {
		if (!strcmp(v, "zstd")) {
			if (version < 3)
				return fmt_err(e, -EINVAL, "Non-zlib "
					       "compression type is only "
					       "supported with compatibility "
					       "level 1.1 and above (use "
					       "version=v3 or greater)");
			err_set(e, "Compression type 'zstd' is not supported "
				"in this build");
			return -ENOTSUP;
		}
		if (strcmp(v, "zlib"))
			return bad_value(e, "compression-type", v);
	}
	if (optlist_get(opts, "encryption") || optlist_get(opts,
							   "encrypt.format")) {
		if (optlist_get_bool(opts, "encryption", &b, e) < 0)
			return -EINVAL;
		if (optlist_get(opts, "encryption") &&
		    optlist_get(opts, "encrypt.format"))
			return fmt_err(e, -EINVAL, "'encrypt.format' and its "
				       "alias 'encryption' can't be used at "
				       "the same time");
		if (b || optlist_get(opts, "encrypt.format"))
			return fmt_err(e, -ENOTSUP, "Encrypted images are not "
				       "supported in this build");
	}
	if (optlist_get(opts, "data_file"))
		return fmt_err(e, -ENOTSUP, "External data files are not "
			       "supported in this build");
	if (optlist_get_bool(opts, "data_file_raw", &b, e) < 0)
		return -EINVAL;
	if (optlist_get(opts, "data_file_raw") && b)
		return fmt_err(e, -EINVAL, "data-file-raw requires data-file");
	if (version < 3 && lazy)
		return fmt_err(e, -EINVAL, "Lazy refcounts only supported "
			       "with compatibility level 1.1 and above (use "
			       "version=v3 or greater)");
	if (version < 3 && rbits != 16)
		return fmt_err(e, -EINVAL, "Different refcount widths than 16 "
			       "bits require compatibility level 1.1 or above "
			       "(use version=v3 or greater)");
	if (extl2 && version < 3)
		return fmt_err(e, -EINVAL, "Extended L2 entries are only "
			       "supported with compatibility level 1.1 and "
			       "above (use version=v3 or greater)");
	if (extl2 && cs < 16384)
		return fmt_err(e, -EINVAL, "Extended L2 entries are only "
			       "supported with cluster sizes of at least "
			       "16384 bytes");
	if (bfile && bfile[0] && prealloc != PREALLOC_OFF && !extl2)
		return fmt_err(e, -EINVAL, "Backing file and preallocation "
			       "can only be used at the same time if "
			       "extended_l2 is on");
	if (bfmt && !(bfile && bfile[0]))
		return fmt_err(e, -EINVAL, "Backing format cannot be used "
			       "without backing file");

	hc = calloc(3, cs);
	if (!hc)
		return -ENOMEM;
	st_be32(hc, QCOW2_MAGIC);
	st_be32(hc + QH_VERSION, (uint32_t)version);
	st_be32(hc + QH_CLUSTER_BITS, cbits);
	st_be64(hc + QH_RT_OFFSET, cs);
	st_be32(hc + QH_RT_CLUSTERS, 1);
	p = 72;
	if (version >= 3) {
		st_be64(hc + QH_INCOMPAT, extl2 ? QCOW2_INCOMPAT_EXTL2 : 0);
		st_be64(hc + QH_COMPAT, lazy ? QCOW2_COMPAT_LAZY : 0);
		st_be32(hc + QH_REFCOUNT_ORDER, rorder);
		st_be32(hc + QH_HEADER_LEN, 112);
		p = 112;
	}
	/* QEMU leaves the feature name table out of small header clusters */
	if ((bfile && strlen(bfile) > 1023) ||
	    qcow2_header_tail(hc, cs, p, bfile && bfile[0] ? bfile : NULL,
			      bfmt && bfmt[0] ? bfmt : NULL,
			      version >= 3 && cs > 4096, NULL, 0, 0) < 0) {
		err_set(e, "Backing file name too long");
		ret = -EINVAL;
		goto out;
	}
	st_be64(hc + cs, 2 * cs);	/* refcount table -> block */
	for (unsigned c = 0; c < 3; c++) {	/* clusters 0..2 in use */
		uint8_t *rb = hc + 2 * cs;
		if (rbits >= 8)
			rb[c * (rbits / 8) + rbits / 8 - 1] = 1;
		else
			rb[c * rbits / 8] |= (uint8_t)(1u << (c * rbits % 8));
	}
	ret = bfile_open(&f, filename, BFILE_CREATE | BFILE_RDWR,
			 CACHE_WRITEBACK, e);
	if (ret < 0)
		goto out;
	ret = bfile_pwrite(f, 0, hc, 3 * cs);
	if (!ret)
		ret = bfile_flush(f);
	bfile_close(f);
	if (ret < 0) {
		err_set(e, "Could not write qcow2 header: %s", strerror(-ret));
		goto out;
	}
	ret = blk_open(&bs, filename, "qcow2", BLK_O_RDWR | BLK_O_NO_BACKING,
		       CACHE_WRITEBACK, e);
	if (ret < 0)
		goto out;
	/* the virtual size is a whole number of sectors, as in QEMU */
	ret = qcow2_truncate(bs, ALIGN_UP(size, 512), prealloc, false, e);
	if (ret < 0 && !e->msg[0])
		err_set(e, "Could not resize image: %s", strerror(-ret));
	blk_close(bs);
out:
	free(hc);
	return ret;
}

const struct blk_driver qcow2_driver = {
	.name = "qcow2",
	.caps = BLK_CAP_CREATE | BLK_CAP_WRITE | BLK_CAP_BACKING |
		BLK_CAP_COMPRESS | BLK_CAP_ZERO_INIT | BLK_CAP_RESIZE |
		BLK_CAP_SHRINK | BLK_CAP_ZERO_WRITES | BLK_CAP_MEASURE |
		BLK_CAP_SNAPSHOTS | BLK_CAP_CHECK | BLK_CAP_AMEND |
		BLK_CAP_PARALLEL_READ,
	.state_size = sizeof(struct qcow2),
	.create_opts = qcow2_create_opts,
	.probe = qcow2_probe,
	.open = qcow2_open,
	.close = qcow2_close,
	.pread = qcow2_pread,
	.pwrite = qcow2_pwrite,
	.pwrite_zeroes = qcow2_pwrite_zeroes,
	.discard = qcow2_discard,
	.block_status = qcow2_block_status,
	.write_compressed = qcow2_write_compressed,
	.compress = qcow2_compress_cluster,
	.write_precompressed = qcow2_write_precompressed,
	.flush = qcow2_flush,
	.truncate = qcow2_truncate,
	.create = qcow2_create,
	.get_info = qcow2_get_info,
	.snapshot_list = qcow2_snapshot_list,
	/* Callbacks only one applet uses are left out with it, so
	 * --gc-sections drops their code from small configurations. */
	.snapshot_create = ENABLE_APPLET_SNAPSHOT ? qcow2_snapshot_create :
			   NULL,
	.snapshot_apply = ENABLE_APPLET_SNAPSHOT ? qcow2_snapshot_apply : NULL,
	.snapshot_delete = ENABLE_APPLET_SNAPSHOT ? qcow2_snapshot_delete :
			   NULL,
	.amend = ENABLE_APPLET_AMEND ? qcow2_amend : NULL,
	.amend_opts = ENABLE_APPLET_AMEND ? qcow2_amend_opts : NULL,
	.measure = ENABLE_APPLET_MEASURE ? qcow2_measure : NULL,
	.change_backing = ENABLE_APPLET_REBASE ? qcow2_change_backing : NULL,
	.make_empty = ENABLE_APPLET_COMMIT ? qcow2_make_empty : NULL,
	.snapshot_load_tmp = ENABLE_APPLET_CONVERT || ENABLE_APPLET_MEASURE ?
			     qcow2_snapshot_load_tmp : NULL,
	.check = qcow2_check,
};
