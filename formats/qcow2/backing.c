/* backing.c - qcow2 operations on the backing relation: rewrite the
 * recorded backing file name and format (rebase), and empty the image so
 * that every read goes to the backing file again (commit).
 *
 * qcow2.txt: the backing file name is stored unterminated at
 * backing_file_offset (backing_file_size bytes, at most 1023) inside the
 * first cluster; its format is the header extension 0xe2792aca. */
//format:PART(qcow2)

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "qcow2.h"

int qcow2_change_backing(struct blk *bs, const char *file, const char *fmt,
			 struct err *e);
int qcow2_make_empty(struct blk *bs);

/* Rebuilds the first cluster: the header as it is, the backing format
 * extension (if any), every other extension in its order, the end mark,
 * then the backing file name. */
int qcow2_change_backing(struct blk *bs, const char *file, const char *fmt,
			 struct err *e)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t cs = s->cluster_size, p, q, name_off = 0, limit;
	size_t flen = file ? strlen(file) : 0, mlen = fmt ? strlen(fmt) : 0;
	uint8_t *old = NULL, *hc = NULL;
	int ret;

	if (s->read_only)
		return -EACCES;
	if ((fmt && !file) || flen > 1023 || mlen >= 16) {
		err_set(e, "%s", strerror(EINVAL));
		return -EINVAL;
	}
	old = malloc(cs);
	hc = calloc(1, cs);
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
	memcpy(hc, old, s->header_length);
	p = s->header_length;
	if (file && file[0] && fmt) {
		if (p + 8 + ALIGN_UP(mlen, 8) + 8 > cs) {
			ret = -ENOSPC;
			goto out;
		}
		st_be32(hc + p, QCOW2_EXT_BACKING_FMT);
		st_be32(hc + p + 4, (uint32_t)mlen);
		memcpy(hc + p + 8, fmt, mlen);
		p += 8 + ALIGN_UP(mlen, 8);
	}
	for (q = s->header_length; q + 8 <= limit;) {
		uint32_t type = ld_be32(old + q), len = ld_be32(old + q + 4);
		uint64_t sz = 8 + ALIGN_UP((uint64_t)len, 8);

		if (type == QCOW2_EXT_END || sz > limit - q)
			break;
		if (type != QCOW2_EXT_BACKING_FMT) {
			if (p + sz + 8 > cs) {
				ret = -ENOSPC;
				goto out;
			}
			memcpy(hc + p, old + q, sz);
			p += sz;
		}
		q += sz;
	}
	if (p + 8 > cs) {
		ret = -ENOSPC;
		goto out;
	}
	p += 8;			/* end of extensions: type 0, length 0 */
	if (file && file[0]) {
		name_off = p;
		if (p + flen > cs) {
			ret = -ENOSPC;
			goto out;
		}
		memcpy(hc + p, file, flen);
	} else
		flen = 0;
	st_be64(hc + QH_BACKING_OFF, name_off);
	st_be32(hc + QH_BACKING_SIZE, (uint32_t)flen);
	ret = bfile_pwrite(bs->file, 0, hc, cs);
	if (ret < 0)
		goto out;
	ret = bfile_flush(bs->file);
	if (ret < 0)
		goto out;
	free(bs->backing_file);
	free(bs->backing_fmt);
	bs->backing_file = strdup(flen ? file : "");
	bs->backing_fmt = strdup(flen && fmt ? fmt : "");
	if (!bs->backing_file || !bs->backing_fmt)
		ret = -ENOMEM;
out:
	if (ret == -ENOSPC)
		err_set(e, "No space left in the file header");
	else if (ret < 0 && !e->msg[0])
		err_set(e, "%s", strerror(-ret));
	free(old);
	free(hc);
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
