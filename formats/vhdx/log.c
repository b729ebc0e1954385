/* log.c - the VHDX metadata log (MS-VHDX 2.3): a circular buffer of
 * entries, each a 4 KiB-aligned header with descriptors (data sectors or
 * zero ranges to write into the file) followed by the data sectors. When
 * the current header names a log GUID, the active sequence (from the tail
 * named by the newest entry up to that entry) must be replayed before the
 * BAT or metadata are trusted. Read-only opens refuse such images with
 * QEMU's message. */
//format:PART(vhdx)

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "vhdx.h"

#define LOG_SECTOR		4096u
#define LOG_ENTRY_HDR		64u
#define LOG_DESC_SIZE		32u
/* One entry in memory at most; larger ones are refused. */
#define LOG_MAX_ENTRY		(32u << 20)

struct log_entry {
	uint64_t pos, seq, flushed, last;
	uint32_t len, tail, ndesc;
};

struct log_ctx {
	struct blk *bs;
	const uint8_t *guid;
	uint64_t off, len;		/* log region in the file */
};

static int log_read(struct log_ctx *c, uint64_t pos, void *buf, size_t n)
{
	/* entries wrap around the end of the circular log */
	size_t first = (size_t)MIN((uint64_t)n, c->len - pos);
	int ret = bfile_pread(c->bs->file, c->off + pos, buf, first);

	if (ret == 0 && first < n)
		ret = bfile_pread(c->bs->file, c->off, (uint8_t *)buf + first,
				  n - first);
	return ret;
}

/* Validates the entry at pos completely (checksum, descriptors, data
 * sector sequence numbers). *data receives it (malloc'd) when valid. */
static int log_entry_at(struct log_ctx *c, uint64_t pos,
			struct log_entry *le, uint8_t **data)
{
	uint8_t h[LOG_ENTRY_HDR], *buf;
	uint64_t desc_area, ndata = 0;
	int ret;

	*data = NULL;
	ret = log_read(c, pos, h, sizeof(h));
	if (ret < 0)
		return ret;
	le->pos = pos;
	le->len = ld_le32(h + 8);
	le->tail = ld_le32(h + 12);
	le->seq = ld_le64(h + 16);
	le->ndesc = ld_le32(h + 24);
	le->flushed = ld_le64(h + 48);
	le->last = ld_le64(h + 56);
	if (memcmp(h, "loge", 4) || memcmp(h + 32, c->guid, 16) ||
	    le->len < LOG_SECTOR || le->len % LOG_SECTOR ||
	    le->len > c->len || le->len > LOG_MAX_ENTRY ||
	    le->tail % LOG_SECTOR || le->tail >= c->len || !le->seq)
		return 0;
	desc_area = ALIGN_UP(LOG_ENTRY_HDR + (uint64_t)le->ndesc *
			     LOG_DESC_SIZE, LOG_SECTOR);
	if (desc_area > le->len)
		return 0;
	buf = malloc(le->len);
	if (!buf)
		return -ENOMEM;
	ret = log_read(c, pos, buf, le->len);
	if (ret < 0)
		goto bad;
	if (ld_le32(buf + 4) != vhdx_checksum(buf, le->len, 4))
		goto bad;
	for (uint32_t i = 0; i < le->ndesc; i++) {
		const uint8_t *d = buf + LOG_ENTRY_HDR + i * LOG_DESC_SIZE;

		if (ld_le64(d + 24) != le->seq)
			goto bad;
		if (!memcmp(d, "desc", 4)) {
			const uint8_t *sec = buf + desc_area +
					     ndata * LOG_SECTOR;
			if (desc_area + (ndata + 1) * LOG_SECTOR > le->len ||
			    memcmp(sec, "data", 4) ||
			    ((uint64_t)ld_le32(sec + 4) << 32 |
			     ld_le32(sec + 4092)) != le->seq)
				goto bad;
			ndata++;
		} else if (memcmp(d, "zero", 4)) {
			goto bad;
		}
	}
	if (desc_area + ndata * LOG_SECTOR != le->len)
		goto bad;
	*data = buf;
	return 1;
bad:
	free(buf);
	return ret < 0 ? ret : 0;
}

/* A target range must stay out of the header area and the log itself. */
static bool target_ok(struct log_ctx *c, uint64_t off, uint64_t len)
{
	if (off % LOG_SECTOR || len % LOG_SECTOR || off < VHDX_MIB ||
	    off > VHDX_MAX_FILE || len > VHDX_MAX_FILE - off)
		return false;
	return off + len <= c->off || off >= c->off + c->len;
}

static int log_apply(struct log_ctx *c, const struct log_entry *le,
		     const uint8_t *buf)
{
	uint64_t desc_area = ALIGN_UP(LOG_ENTRY_HDR + (uint64_t)le->ndesc *
				      LOG_DESC_SIZE, LOG_SECTOR);
	uint8_t *sector = malloc(LOG_SECTOR);
	uint64_t ndata = 0;
	int ret = 0;

	if (!sector)
		return -ENOMEM;
	for (uint32_t i = 0; i < le->ndesc && !ret; i++) {
		const uint8_t *d = buf + LOG_ENTRY_HDR + i * LOG_DESC_SIZE;
		uint64_t off = ld_le64(d + 16);

		if (!memcmp(d, "zero", 4)) {
			uint64_t n = ld_le64(d + 8);
			if (!target_ok(c, off, n)) {
				ret = -EINVAL;
				break;
			}
			ret = bfile_zero(c->bs->file, off, n, false);
		} else {
			const uint8_t *sec = buf + desc_area +
					     ndata++ * LOG_SECTOR;
			if (!target_ok(c, off, LOG_SECTOR)) {
				ret = -EINVAL;
				break;
			}
			/* leading 8 and trailing 4 bytes live in the
			 * descriptor, where the sector has its signature and
			 * sequence number */
			memcpy(sector, d + 8, 8);
			memcpy(sector + 8, sec + 8, LOG_SECTOR - 12);
			memcpy(sector + LOG_SECTOR - 4, d + 4, 4);
			ret = bfile_pwrite(c->bs->file, off, sector,
					   LOG_SECTOR);
		}
	}
	free(sector);
	return ret;
}

static int by_seq_desc(const void *a, const void *b, void *arg)
{
	const uint64_t *seqs = arg;
	uint64_t x = seqs[*(const uint64_t *)a], y = seqs[*(const uint64_t *)b];

	return x < y ? 1 : x > y ? -1 : 0;
}

int vhdx_log_open(struct blk *bs, struct err *e)
{
	struct vhdx *s = bs->opaque;
	const uint8_t *h = s->hdr[s->cur];
	static const uint8_t zero[16];
	struct log_ctx c = { bs, h + 48, ld_le64(h + 72), ld_le32(h + 68) };
	struct log_entry le, head = { 0 };
	uint64_t pos, nsec, steps, nvalid = 0, start = 0;
	uint64_t *seqs = NULL, *order = NULL;
	uint32_t *lens = NULL;
	uint8_t *data, *first = NULL;
	int ret;

	if (!memcmp(c.guid, zero, 16))
		return 0;
	if (!c.len || c.len % VHDX_MIB || c.off % VHDX_MIB ||
	    c.off < VHDX_MIB || c.off > VHDX_MAX_FILE - c.len ||
	    c.len > VHDX_MAX_LOG) {
		return vhdx_fail(bs, e, -EINVAL);
	}
	/* One pass over the log: which sectors start a valid entry. */
	nsec = c.len / LOG_SECTOR;
	ret = blk_meta_alloc(bs, nsec * (2 * sizeof(*seqs) + sizeof(*lens) +
					 sizeof(*first)), "VHDX log index", e);
	if (ret < 0)
		return ret;
	blk_meta_free(bs, nsec * (2 * sizeof(*seqs) + sizeof(*lens) +
				  sizeof(*first)));
	seqs = calloc(nsec, sizeof(*seqs));
	lens = calloc(nsec, sizeof(*lens));
	first = calloc(nsec, sizeof(*first));
	order = calloc(nsec, sizeof(*order));
	if (!seqs || !lens || !first || !order) {
		ret = vhdx_fail(bs, e, -ENOMEM);
		goto out;
	}
	for (pos = 0; pos < c.len; pos += LOG_SECTOR) {
		ret = log_entry_at(&c, pos, &le, &data);
		if (ret < 0) {
			vhdx_fail(bs, e, ret);
			goto out;
		}
		free(data);
		if (!ret)
			continue;
		seqs[pos / LOG_SECTOR] = le.seq;
		lens[pos / LOG_SECTOR] = le.len;
		order[nvalid++] = pos / LOG_SECTOR;
		if (le.seq > head.seq)
			head = le;
	}
	ret = 0;
	if (!head.seq)
		goto out;	/* nothing was logged: nothing to replay */
	if (!(bs->flags & BLK_O_RDWR)) {
		err_set(e, "VHDX image file '%s' opened read-only, but "
			"contains a log that needs to be replayed\nTo replay "
			"the log, run:\n" QEMU_IMG_CMD " check -r all '%s'",
			bs->filename, bs->filename);
		ret = -EPERM;
		goto out;
	}
	/* The active sequence ends at the head: walking down the sequence
	 * numbers, each entry whose successor (the entry right after it,
	 * one sequence number up) is in the head's run joins it; the run's
	 * first entry is where replay starts. Sequence numbers grow along a
	 * run, so sorting by them settles successors first. */
	qsort_r(order, nvalid, sizeof(*order), by_seq_desc, seqs);
	for (uint64_t k = 0; k < nvalid; k++) {
		uint64_t i = order[k];
		uint64_t nx = (i * LOG_SECTOR + lens[i]) % c.len / LOG_SECTOR;

		if (i * LOG_SECTOR == head.pos)
			first[i] = 1;
		else if (seqs[nx] && seqs[nx] == seqs[i] + 1 && first[nx])
			first[i] = 1;
		if (first[i])
			start = i * LOG_SECTOR;	/* lowest sequence so far */
	}
	/* MS-VHDX: replay starts at the tail the head names; entries before
	 * it were applied already. A tail outside the run is ignored, as
	 * QEMU does, and the whole run is replayed (in order, which leaves
	 * the same result). */
	if (first[head.tail / LOG_SECTOR])
		start = head.tail;
	pos = start;
	ret = log_entry_at(&c, pos, &le, &data);
	if (ret <= 0) {
		vhdx_fail(bs, e, ret < 0 ? ret : -EINVAL);
		ret = ret < 0 ? ret : -EINVAL;
		goto out;
	}
	for (steps = 0; ; steps++) {
		uint64_t seq = le.seq, next;

		ret = log_apply(&c, &le, data);
		free(data);
		if (ret < 0) {
			err_set(e, "Could not replay VHDX log: %s",
				strerror(-ret));
			goto out;
		}
		if (le.pos == head.pos && seq == head.seq)
			break;
		next = (le.pos + le.len) % c.len;
		ret = steps > nsec ? 0 : log_entry_at(&c, next, &le, &data);
		if (ret <= 0 || le.seq != seq + 1) {
			if (ret > 0)
				free(data);
			ret = vhdx_fail(bs, e, ret < 0 ? ret : -EINVAL);
			goto out;
		}
	}
	/* the file must be as long as the newest entry says it was */
	if (head.last > s->file_size && head.last <= VHDX_MAX_FILE) {
		ret = bfile_truncate(bs->file, head.last, PREALLOC_OFF, e);
		if (ret < 0)
			goto out;
		s->file_size = head.last;
	}
	ret = bfile_flush(bs->file);
	if (ret == 0) {
		int64_t fsize = bfile_size(bs->file);
		if (fsize < 0) {
			ret = vhdx_fail(bs, e, (int)fsize);
			goto out;
		}
		s->file_size = (uint64_t)fsize;
		ret = vhdx_update_headers(bs, true);
	}
	if (ret < 0) {
		err_set(e, "Could not update VHDX headers after log replay: "
			"%s", strerror(-ret));
		goto out;
	}
	s->log_replayed = true;
out:
	free(seqs);
	free(lens);
	free(first);
	free(order);
	return ret;
}
