/* amend.c - the amend command for qcow2: compat level up and down,
 * lazy refcounts, refcount width, size (qcow2.txt; the option set and
 * messages of qemu 7.2).
 *
 * Everything that can be refused is checked before the first write.
 * Then: upgrade, lazy refcounts, refcount width, size, downgrade (the
 * order in which QEMU applies them). The refcount width changes by
 * writing a complete new refcount structure past the end of the file
 * and switching to it with one header write, so an interruption leaves
 * the old structure in force. A downgrade turns zero clusters into data
 * (or unallocated) clusters before the header says version 2. */
//format:PART(qcow2)

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "qcow2.h"


/* What QEMU's amend -o help lists for qcow2. */
const struct optdesc qcow2_amend_opts[] = {
	{ "encrypt.keyslot", OPT_NUMBER, "Select a single keyslot to modify "
	  "explicitly", NULL, false },
	{ "encrypt.state", OPT_STRING, "Select new state of affected keyslots "
	  "(active/inactive)", NULL, false },
	{ "encrypt.old-secret", OPT_STRING, "Select all keyslots that match "
	  "this password", NULL, false },
	{ "encrypt.new-secret", OPT_STRING, "New secret to set in the "
	  "matching keyslots. Empty string to erase", NULL, false },
	{ "encrypt.iter-time", OPT_NUMBER, "Time to spend in PBKDF in "
	  "milliseconds", NULL, false },
	QCOW2_OPTS_IMAGE(NULL, NULL),
	{ NULL, 0, NULL, NULL, false }
};

/* errno text as glibc words it, as in QEMU's messages */
static const char *errstr(int err)
{
	switch (err) {
	case EIO: return "Input/output error";
	case ENOMEM: return "Cannot allocate memory";
	case ENOTSUP: return "Operation not supported";
	default: return strerror(err);
	}
}

static int fail(struct err *e, int ret, const char *msg)
{
	err_set(e, "%s", msg);
	return ret;
}

/* ---- header ---- */

/* Rewrites the first cluster for version: v3 gets QEMU's feature name
 * table (above 4 KiB clusters), v2 loses it; the backing name and format
 * and the other extensions stay. */
static int rebuild_header(struct blk *bs, uint32_t version)
{
	struct qcow2 *s = qcow2_state(bs);
	const char *bf = bs->backing_file, *bfmt = bs->backing_fmt;

	return qcow2_rewrite_header(bs, version, bf && bf[0] ? bf : NULL,
				    bfmt && bfmt[0] ? bfmt : NULL,
				    version >= 3 && s->cluster_size > 4096);
}

/* ---- refcount width ---- */

/* A new refcount table and blocks of width 2^order past the end of the
 * file, counting every cluster as now (the old structure as free), then
 * one header write switches to it. */
static int change_refcount_order(struct blk *bs, unsigned order,
				 struct err *e)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t cs = s->cluster_size, nmax, start, nb = 0, tc = 0, total;
	uint64_t epb = 1ULL << (s->cluster_bits + 3 - order), rc;
	uint8_t *buf = NULL, *old = NULL, hdr[52];
	int64_t fsize;
	int nrbc = s->rbc.n, ret;

	nmax = order == 6 ? UINT64_MAX : (1ULL << (1u << order)) - 1;
	ret = qcow2_cache_flush_all(bs);
	if (ret < 0)
		return ret;
	fsize = bfile_size(bs->file);
	if (fsize < 0)
		return (int)fsize;
	start = DIV_ROUND_UP((uint64_t)fsize, cs);
	/* the old table and blocks are free once the new one is in force */
	old = calloc(1, start / 8 + 1);
	buf = blk_alloc_buf(cs);
	if (!old || !buf) {
		ret = -ENOMEM;
		goto out;
	}
	for (uint64_t c = 0; c < s->rt_clusters; c++)
		if ((s->rt_offset >> s->cluster_bits) + c < start)
			old[((s->rt_offset >> s->cluster_bits) + c) / 8] |=
				(uint8_t)(1u << (((s->rt_offset >>
						   s->cluster_bits) + c) % 8));
	for (uint64_t i = 0; i < s->rt_size; i++) {
		uint64_t c = (s->rt[i] & QCOW2_RT_OFFSET_MASK) >>
			     s->cluster_bits;
		if (c && c < start)
			old[c / 8] |= (uint8_t)(1u << (c % 8));
	}
	for (uint64_t c = 0; c < start; c++) {
		ret = qcow2_rc_get(bs, c, &rc);
		if (ret < 0)
			goto out;
		if (rc > nmax && !(old[c / 8] >> (c % 8) & 1)) {
			err_set(e, "Cannot decrease refcount entry width to %u "
				"bits: Cluster at offset %#llx has a refcount "
				"of %llu", 1u << order,
				(unsigned long long)(c * cs),
				(unsigned long long)rc);
			ret = -EINVAL;
			goto out;
		}
	}
	for (;;) {
		uint64_t nnb, ntc;
		total = start + nb + tc;
		nnb = DIV_ROUND_UP(total, epb);
		ntc = DIV_ROUND_UP(nnb * 8, cs);
		if (nnb == nb && ntc == tc)
			break;
		nb = nnb;
		tc = ntc;
	}
	if (tc * cs > QCOW2_MAX_RT_BYTES) {
		ret = -EFBIG;
		goto out;
	}
	for (uint64_t b = 0; b < nb; b++) {
		memset(buf, 0, cs);
		for (uint64_t c = b * epb; c < MIN((b + 1) * epb, total);
		     c++) {
			if (c >= start) {
				rc = 1;
			} else if (old[c / 8] >> (c % 8) & 1) {
				continue;
			} else {
				ret = qcow2_rc_get(bs, c, &rc);
				if (ret < 0)
					goto out;
			}
			qcow2_rb_set(order, buf, c - b * epb, rc);
		}
		ret = bfile_pwrite(bs->file, (start + b) * cs, buf, cs);
		if (ret < 0)
			goto out;
	}
	for (uint64_t t = 0; t < tc; t++) {
		memset(buf, 0, cs);
		for (uint64_t k = 0; k < cs / 8 && t * (cs / 8) + k < nb; k++)
			st_be64(buf + k * 8, (start + t * (cs / 8) + k) * cs);
		ret = bfile_pwrite(bs->file, (start + nb + t) * cs, buf, cs);
		if (ret < 0)
			goto out;
	}
	ret = bfile_flush(bs->file);
	if (ret < 0)
		goto out;
	/* rt_offset, rt_clusters .. refcount_order: one write, one sector */
	ret = bfile_pread(bs->file, QH_RT_OFFSET, hdr, sizeof(hdr));
	if (ret < 0)
		goto out;
	st_be64(hdr, (start + nb) * cs);
	st_be32(hdr + 8, (uint32_t)tc);
	st_be32(hdr + QH_REFCOUNT_ORDER - QH_RT_OFFSET, order);
	ret = qcow2_write_header_field(bs, QH_RT_OFFSET, hdr, sizeof(hdr));
	if (!ret)
		ret = bfile_flush(bs->file);
	if (ret < 0)
		goto out;
	/* the in-memory view follows */
	qcow2_cache_free(&s->rbc);
	free(s->rt);
	s->rt = NULL;
	s->rt_offset = (start + nb) * cs;
	s->rt_clusters = (uint32_t)tc;
	s->refcount_order = order;
	s->free_hint = 0;
	s->free_byte_off = 0;
	ret = qcow2_cache_init(&s->rbc, nrbc, cs);
	if (!ret)
		ret = qcow2_refcount_init(bs, e);
out:
	free(old);
	free(buf);
	return ret;
}

/* ---- downgrade: zero clusters ---- */

/* Zero clusters do not exist in version 2: without a backing file they
 * become unallocated, with one they get a cluster of zeroes (counted
 * once for every L1 table that reaches the L2 table). */
static int expand_l1(struct blk *bs, const uint64_t *l1, uint32_t n,
		     const uint8_t *zero, uint64_t *gone)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t cs = s->cluster_size, rc2;
	unsigned per = 1u << s->l2_bits;
	bool backing = bs->backing_file && bs->backing_file[0];
	uint8_t *copy = malloc(cs), *t;
	int ret = 0;

	if (!copy)
		return -ENOMEM;
	for (uint32_t i = 0; i < n; i++) {
		uint64_t l2off = l1[i] & QCOW2_OFFSET_MASK;
		unsigned ng = 0;
		bool dirty = false;

		if (!l2off)
			continue;
		ret = qcow2_rc_get(bs, l2off >> s->cluster_bits, &rc2);
		if (ret < 0)
			goto out;
		ret = qcow2_cache_get(bs, &s->l2c, l2off, false, &t);
		if (ret < 0)
			goto out;
		memcpy(copy, t, cs);
		for (unsigned j = 0; j < per; j++) {
			uint8_t *p = copy + (size_t)j * 8;
			uint64_t en = ld_be64(p), off;
			int64_t h;

			if ((en & QCOW2_OFLAG_COMPRESSED) ||
			    !(en & QCOW2_OFLAG_ZERO))
				continue;
			off = en & QCOW2_OFFSET_MASK;
			if (off)
				gone[ng++] = off;
			dirty = true;
			if (!backing) {
				st_be64(p, 0);
				continue;
			}
			h = qcow2_alloc_clusters(bs, 1);
			if (h < 0) {
				ret = (int)h;
				goto out;
			}
			if (rc2 > 1) {
				ret = qcow2_rc_update(bs, (uint64_t)h, cs,
						      (int64_t)rc2 - 1);
				if (ret < 0)
					goto out;
			}
			ret = bfile_pwrite(bs->file, (uint64_t)h, zero, cs);
			if (ret < 0)
				goto out;
			st_be64(p, (uint64_t)h |
				(rc2 == 1 ? QCOW2_OFLAG_COPIED : 0));
		}
		if (!dirty)
			continue;
		ret = qcow2_cache_get(bs, &s->l2c, l2off, false, &t);
		if (ret < 0)
			goto out;
		memcpy(t, copy, cs);
		qcow2_cache_dirty(&s->l2c, t);
		ret = qcow2_cache_flush_all(bs);
		if (ret < 0)
			goto out;
		/* nothing points to the preallocated clusters any more */
		for (unsigned k = 0; k < ng; k++) {
			ret = qcow2_rc_update(bs, gone[k], cs,
					      -(int64_t)rc2);
			if (ret < 0)
				goto out;
		}
	}
out:
	free(copy);
	return ret;
}

static int expand_zero_clusters(struct blk *bs)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t cs = s->cluster_size, *gone;
	uint8_t *zero = blk_alloc_buf(cs), *b = NULL;
	int ret;

	gone = malloc(sizeof(*gone) << s->l2_bits);
	if (!zero || !gone) {
		ret = -ENOMEM;
		goto out;
	}
	memset(zero, 0, cs);
	ret = expand_l1(bs, s->l1, s->l1_size, zero, gone);
	for (uint32_t i = 0; !ret && i < s->nb_snapshots; i++) {
		uint32_t n = s->sn[i].l1_size;
		uint64_t *l1;

		if ((uint64_t)n * 8 > QCOW2_MAX_L1_BYTES ||
		    (s->sn[i].l1_offset & (cs - 1))) {
			ret = -EINVAL;
			break;
		}
		l1 = calloc(n ? n : 1, 8);
		b = malloc(n ? (size_t)n * 8 : 1);
		if (!l1 || !b) {
			free(l1);
			ret = -ENOMEM;
			break;
		}
		ret = bfile_pread(bs->file, s->sn[i].l1_offset, b,
				  (size_t)n * 8);
		for (uint32_t k = 0; k < n; k++)
			l1[k] = ld_be64(b + (size_t)k * 8);
		free(b);
		b = NULL;
		if (!ret)
			ret = expand_l1(bs, l1, n, zero, gone);
		free(l1);
	}
	if (!ret)
		ret = qcow2_cache_flush_all(bs);
out:
	free(zero);
	free(gone);
	return ret;
}

/* ---- amend ---- */

static bool str_differs(const char *a, const char *b)
{
	if (!a || !b)
		return a != b;
	return strcmp(a, b) != 0;
}

int qcow2_amend(struct blk *bs, const struct optlist *opts, bool force,
		struct err *e)
{
	struct qcow2 *s = qcow2_state(bs);
	const char *v, *bf, *bfmt, *cur_bf = NULL, *cur_fmt = NULL;
	uint32_t ver = s->version;
	uint64_t size = 0, rbits = 0;
	unsigned order = s->refcount_order;
	bool lazy = s->compat & QCOW2_COMPAT_LAZY, b;
	int ret;

	(void)force;	/* only encryption changes need it */
	if (s->read_only)
		return -EACCES;
	if ((v = optlist_get(opts, "compat"))) {
		if (!strcmp(v, "0.10") || !strcmp(v, "v2"))
			ver = 2;
		else if (!strcmp(v, "1.1") || !strcmp(v, "v3"))
			ver = 3;
		else {
			err_set(e, "Unknown compatibility level %s", v);
			return -EINVAL;
		}
	}
	if (optlist_get_size(opts, "size", &size, e) < 0)
		return -EINVAL;
	for (int i = 0; i < opts->n; i++)
		if (!strncmp(opts->v[i].name, "encrypt.", 8))
			return fail(e, -EINVAL, "Can't amend encryption "
				    "options - encryption not present");
	if (optlist_get_bool(opts, "lazy_refcounts", &lazy, e) < 0)
		return -EINVAL;
	if ((v = optlist_get(opts, "refcount_bits"))) {
		char *end;
		rbits = strtoull(v, &end, 0);
		if (*end || !rbits || rbits > 64 || (rbits & (rbits - 1)))
			return fail(e, -EINVAL, "Refcount width must be a "
				    "power of two and may not exceed 64 bits");
		order = (unsigned)__builtin_ctzll(rbits);
	}
	if (optlist_get(opts, "data_file"))
		return fail(e, -EINVAL, "data-file can only be set for images "
			    "that use an external data file");
	if (optlist_get_bool(opts, "data_file_raw", &b, e) < 0)
		return -EINVAL;
	if (optlist_get(opts, "data_file_raw") && b)
		return fail(e, -EINVAL, "data-file-raw cannot be set on "
			    "existing images");
	bf = optlist_get(opts, "backing_file");
	bfmt = optlist_get(opts, "backing_fmt");
	if (bs->backing_file && bs->backing_file[0])
		cur_bf = bs->backing_file;
	if (cur_bf && bs->backing_fmt && bs->backing_fmt[0])
		cur_fmt = bs->backing_fmt;
	if ((bf || bfmt) && (str_differs(bf, cur_bf) ||
			     str_differs(bfmt, cur_fmt)))
		return fail(e, -EINVAL, "Cannot amend the backing file\nYou "
			    "can use '" QEMU_IMG_CMD " rebase' instead.");
	if (order != s->refcount_order && ver < 3 && order != 4)
		return fail(e, -EINVAL, "Refcount widths other than 16 bits "
			    "require compatibility level 1.1 or above (use "
			    "compat=1.1 or greater)");
	if (lazy && !(s->compat & QCOW2_COMPAT_LAZY) && ver < 3)
		return fail(e, -EINVAL, "Lazy refcounts only supported with "
			    "compatibility level 1.1 and above (use compat=1.1 "
			    "or greater)");
	if (size && size != bs->size) {
		if (size & 511)
			return fail(e, -EINVAL, "The new size must be a "
				    "multiple of 512");
		if (s->nb_snapshots && MAX(ver, s->version) < 3)
			return fail(e, -ENOTSUP, "Can't resize a v2 image "
				    "which has snapshots");
	}
	if (ver < s->version) {
		uint64_t fsize = size ? size : bs->size;

		if (order != 4)
			return fail(e, -ENOTSUP, "compat=0.10 requires "
				    "refcount_bits=16");
		for (uint32_t i = 0; i < s->nb_snapshots; i++)
			if (s->sn[i].info.vm_state_size ||
			    s->sn[i].disk_size != fsize)
				return fail(e, -ENOTSUP, "Internal snapshots "
					    "cannot be stored when "
					    "downgrading to compat=0.10");
		if (s->incompat & ~QCOW2_INCOMPAT_COMPRESS) {
			err_set(e, "Cannot downgrade an image with "
				"incompatible features 0x%llx set",
				(unsigned long long)(s->incompat &
						     ~QCOW2_INCOMPAT_COMPRESS));
			return -ENOTSUP;
		}
		if (s->compression_type)
			return fail(e, -EINVAL, "Cannot downgrade an image "
				    "with zstd compression type and existing "
				    "compressed clusters");
	}

	/* upgrade first: the other changes may need version 3 */
	if (ver > s->version) {
		ret = qcow2_snapshot_table_upgrade(bs);
		if (ret < 0) {
			err_set(e, "Failed to update the snapshot table: %s",
				errstr(-ret));
			return ret;
		}
		s->incompat = s->compat = s->autoclear = 0;
		ret = rebuild_header(bs, 3);
		if (ret < 0) {
			err_set(e, "Failed to update the image header: %s",
				errstr(-ret));
			return ret;
		}
	}
	if (lazy != !!(s->compat & QCOW2_COMPAT_LAZY)) {
		uint8_t c[8];
		uint64_t nc = lazy ? s->compat | QCOW2_COMPAT_LAZY :
			      s->compat & ~QCOW2_COMPAT_LAZY;

		st_be64(c, nc);
		ret = qcow2_write_header_field(bs, QH_COMPAT, c, 8);
		if (!ret)
			ret = bfile_flush(bs->file);
		if (ret < 0) {
			err_set(e, "Failed to update the image header: %s",
				errstr(-ret));
			return ret;
		}
		s->compat = nc;
	}
	if (order != s->refcount_order) {
		ret = change_refcount_order(bs, order, e);
		if (ret < 0) {
			if (!e->msg[0])
				err_set(e, "Failed to change the refcount "
					"width: %s", errstr(-ret));
			return ret;
		}
	}
	if (size && size != bs->size) {
		ret = bs->drv->truncate(bs, size, PREALLOC_OFF, true, e);
		if (ret < 0) {
			if (!e->msg[0])
				err_set(e, "%s", errstr(-ret));
			return ret;
		}
		bs->size = size;
	}
	/* downgrade last */
	if (ver < s->version) {
		ret = expand_zero_clusters(bs);
		if (ret < 0) {
			err_set(e, "Failed to turn zero into data clusters: %s",
				errstr(-ret));
			return ret;
		}
		s->compat = s->autoclear = 0;
		ret = rebuild_header(bs, 2);
		if (ret < 0) {
			err_set(e, "Failed to update the image header: %s",
				errstr(-ret));
			return ret;
		}
	}
	return bfile_flush(bs->file);
}
