/* backing.c - the qcow2 header cluster and the backing relation: build
 * the header's extensions and backing name (create, amend, rebase),
 * rewrite the recorded backing file name and format (rebase), and empty
 * the image so that every read goes to the backing file again (commit).
 *
 * qcow2.txt: the backing file name is stored unterminated at
 * backing_file_offset (backing_file_size bytes, at most 1023) inside the
 * first cluster; its format is the header extension 0xe2792aca. */
//format:PART(qcow2)

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "qcow2.h"


/* The feature name table QEMU writes into v3 headers. */
static const struct {
	uint8_t type, bit;
	const char *name;
} feature_names[] = {
	{ 0, 0, "dirty bit" }, { 0, 1, "corrupt bit" },
	{ 0, 2, "external data file" }, { 0, 3, "compression type" },
	{ 0, 4, "extended L2 entries" }, { 1, 0, "lazy refcounts" },
	{ 2, 0, "bitmaps" }, { 2, 1, "raw external data" },
};

static int put_ext(uint8_t *hc, uint64_t cs, uint64_t *p, uint32_t type,
		   const void *d, uint64_t len)
{
	uint64_t sz = 8 + ALIGN_UP(len, 8);

	if (*p + sz + 8 > cs)	/* room for the end mark too */
		return -ENOSPC;
	st_be32(hc + *p, type);
	st_be32(hc + *p + 4, (uint32_t)len);
	memcpy(hc + *p + 8, d, len);
	*p += sz;
	return 0;
}

int qcow2_header_tail(uint8_t *hc, uint64_t cs, uint64_t p, const char *file,
		      const char *fmt, int features, const uint8_t *old,
		      uint64_t q, uint64_t limit)
{
	size_t flen = file ? strlen(file) : 0;
	int ret = 0;

	if (flen && fmt)
		ret = put_ext(hc, cs, &p, QCOW2_EXT_BACKING_FMT, fmt,
			      strlen(fmt));
	if (!ret && features > 0) {
		uint8_t ft[ARRAY_SIZE(feature_names) * 48] = { 0 };

		for (size_t i = 0; i < ARRAY_SIZE(feature_names); i++) {
			ft[i * 48] = feature_names[i].type;
			ft[i * 48 + 1] = feature_names[i].bit;
			memcpy(ft + i * 48 + 2, feature_names[i].name,
			       strlen(feature_names[i].name));
		}
		ret = put_ext(hc, cs, &p, QCOW2_EXT_FEATURES, ft, sizeof(ft));
	}
	while (!ret && old && q + 8 <= limit) {
		uint32_t type = ld_be32(old + q), len = ld_be32(old + q + 4);
		uint64_t sz = 8 + ALIGN_UP((uint64_t)len, 8);

		if (type == QCOW2_EXT_END || sz > limit - q)
			break;
		if (type != QCOW2_EXT_BACKING_FMT &&
		    (type != QCOW2_EXT_FEATURES || features < 0))
			ret = put_ext(hc, cs, &p, type, old + q + 8, len);
		q += sz;
	}
	if (ret < 0 || p + 8 > cs)
		return -ENOSPC;
	p += 8;			/* end of extensions: type 0, length 0 */
	if (p + flen > cs)
		return -ENOSPC;
	if (flen)
		memcpy(hc + p, file, flen);
	st_be64(hc + QH_BACKING_OFF, flen ? p : 0);
	st_be32(hc + QH_BACKING_SIZE, (uint32_t)flen);
	return 0;
}

int qcow2_rewrite_header(struct blk *bs, uint32_t version, const char *file,
			 const char *fmt, int features)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t cs = s->cluster_size, limit, p;
	uint8_t *old = malloc(cs), *hc = calloc(1, cs);
	int ret;

	if (!old || !hc) {
		ret = -ENOMEM;
		goto out;
	}
	ret = bfile_pread(bs->file, 0, old, cs);
	if (ret < 0)
		goto out;
	/* extensions end at the old name, or at the end of the cluster */
	limit = ld_be64(old + QH_BACKING_OFF);
	if (!limit || limit > cs)
		limit = cs;
	if (s->header_length > limit) {
		ret = -EINVAL;
		goto out;
	}
	if (version == s->version) {
		p = s->header_length;
		memcpy(hc, old, p);
	} else {
		memcpy(hc, old, 72);
		st_be32(hc + QH_VERSION, version);
		p = 72;
		if (version >= 3) {
			st_be64(hc + QH_INCOMPAT, s->incompat);
			st_be64(hc + QH_COMPAT, s->compat);
			st_be64(hc + QH_AUTOCLEAR, s->autoclear);
			st_be32(hc + QH_REFCOUNT_ORDER, s->refcount_order);
			st_be32(hc + QH_HEADER_LEN, 112);
			hc[QH_COMPRESSION] = s->compression_type;
			p = 112;
		}
	}
	ret = qcow2_header_tail(hc, cs, p, file, fmt, features, old,
				s->header_length, limit);
	if (!ret)
		ret = qcow2_cache_flush_all(bs);
	if (!ret)
		ret = bfile_flush(bs->file);
	if (!ret)
		ret = bfile_pwrite(bs->file, 0, hc, cs);
	if (!ret)
		ret = bfile_flush(bs->file);
	if (!ret) {
		s->version = version;
		s->header_length = (uint32_t)p;
	}
out:
	free(old);
	free(hc);
	return ret;
}

int qcow2_change_backing(struct blk *bs, const char *file, const char *fmt,
			 struct err *e)
{
	struct qcow2 *s = qcow2_state(bs);
	size_t flen = file ? strlen(file) : 0, mlen = fmt ? strlen(fmt) : 0;
	int ret;

	if (s->read_only)
		return -EACCES;
	if ((fmt && !file) || flen > 1023 || mlen >= 16) {
		err_set(e, "%s", strerror(EINVAL));
		return -EINVAL;
	}
	ret = qcow2_rewrite_header(bs, s->version, flen ? file : NULL, fmt, -1);
	if (!ret) {
		free(bs->backing_file);
		free(bs->backing_fmt);
		bs->backing_file = strdup(flen ? file : "");
		bs->backing_fmt = strdup(flen && fmt ? fmt : "");
		if (!bs->backing_file || !bs->backing_fmt)
			ret = -ENOMEM;
	}
	if (ret == -ENOSPC)
		err_set(e, "No space left in the file header");
	else if (ret < 0 && !e->msg[0])
		err_set(e, "%s", strerror(-ret));
	return ret;
}

/* Every cluster becomes unallocated (reads go to the backing file). The
 * L2 entries are cleared and written before the clusters they pointed to
 * lose their references, so an interruption can only leak clusters. */
int qcow2_make_empty(struct blk *bs)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t span = s->cluster_size << s->l2_bits, *gone = NULL;
	unsigned per = 1u << s->l2_bits;
	int ret = 0;

	if (s->read_only)
		return -EACCES;
	gone = malloc(sizeof(*gone) * per);
	if (!gone)
		return -ENOMEM;
	for (uint64_t off = 0; off < bs->size; off += span) {
		uint8_t *tbl;
		unsigned idx, n = 0, i;
		bool any = false;

		ret = qcow2_l2_get(bs, off, false, &tbl, &idx);
		if (ret < 0)
			goto out;
		if (!tbl)
			continue;
		for (i = 0; i < per && !any; i++) {
			uint8_t *ent = tbl + (size_t)i * s->l2_esize;
			any = ld_be64(ent) || (s->ext_l2 && ld_be64(ent + 8));
		}
		if (!any)
			continue;
		/* a table shared with a snapshot is copied first */
		ret = qcow2_l2_get(bs, off, true, &tbl, &idx);
		if (ret < 0)
			goto out;
		for (i = 0; i < per; i++) {
			uint8_t *ent = tbl + (size_t)i * s->l2_esize;
			uint64_t v = ld_be64(ent) & ~QCOW2_OFLAG_COPIED;

			if (v & ~QCOW2_OFLAG_ZERO)
				gone[n++] = v;
			st_be64(ent, 0);
			if (s->ext_l2)
				st_be64(ent + 8, 0);
		}
		qcow2_cache_dirty(&s->l2c, tbl);
		ret = qcow2_cache_flush_all(bs);
		if (ret < 0)
			goto out;
		for (i = 0; i < n; i++)
			qcow2_free_l2_entry(bs, gone[i]);
	}
	ret = qcow2_cache_flush_all(bs);
	if (ret == 0)
		ret = bfile_flush(bs->file);
out:
	free(gone);
	return ret;
}
