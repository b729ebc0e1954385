/* snapshot.c - internal snapshots: create, apply (goto) and delete
 * (qcow2.txt, "Snapshots").
 *
 * A snapshot is a copy of the active L1 table plus an entry in the
 * snapshot table. Every L1 table that reaches a cluster counts once in
 * its refcount (an L2 table shared by two L1 tables makes its data
 * clusters count twice), which is how QEMU's check counts them.
 *
 * Ordering: references are added before anything points to them and
 * dropped only after nothing does, so an interruption leaves leaks. The
 * snapshot table is rewritten into new clusters and switched by one
 * header write of nb_snapshots and snapshots_offset (bytes 60..71, one
 * sector). The OFLAG_COPIED flags of the active tables follow the
 * refcounts; they are written right after the refcount blocks. */
//format:PART(qcow2)

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "qcow2.h"


#define SN_EXTRA	24	/* vm_state_size_large, disk_size, icount */
#define SN_MAX_EXTRA	1024

/* One entry of the on-disk table, as found (raw points into the copy of
 * the whole table). */
struct sn_raw {
	const uint8_t *raw;
	uint32_t extra, idl, nml;
	uint64_t l1_offset;
	uint32_t l1_size;
};

struct sn_table {
	uint8_t *buf;		/* the table as on disk */
	uint64_t len;		/* bytes, entries 8-byte aligned */
	uint32_t n;
	struct sn_raw *ent;
};

static void table_free(struct sn_table *t)
{
	free(t->buf);
	free(t->ent);
	memset(t, 0, sizeof(*t));
}

/* Reads the snapshot table the header points to, entry by entry, with
 * the same limits as open. */
static int table_read(struct blk *bs, struct sn_table *t)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t pos = 0;
	int ret;

	memset(t, 0, sizeof(*t));
	if (!s->nb_snapshots)
		return 0;
	t->ent = calloc(s->nb_snapshots, sizeof(*t->ent));
	if (!t->ent)
		return -ENOMEM;
	for (uint32_t i = 0; i < s->nb_snapshots; i++) {
		uint8_t h[40], *nb;
		uint32_t extra, idl, nml;
		uint64_t len;

		ret = bfile_pread(bs->file, s->snapshots_offset + pos, h, 40);
		if (ret < 0)
			return ret;
		idl = ld_be16(h + 12);
		nml = ld_be16(h + 14);
		extra = ld_be32(h + 36);
		if (extra > SN_MAX_EXTRA)
			return qcow2_set_errmsg(bs, -EFBIG, "Too much extra "
						"metadata in snapshot table "
						"entry %u", i);
		len = ALIGN_UP(40ULL + extra + idl + nml, 8);
		if (pos + len > QCOW2_MAX_SN_TABLE)
			return qcow2_set_errmsg(bs, -EFBIG, "Snapshot table "
						"too large");
		nb = realloc(t->buf, pos + len);
		if (!nb)
			return -ENOMEM;
		t->buf = nb;
		memcpy(nb + pos, h, 40);
		ret = bfile_pread(bs->file, s->snapshots_offset + pos + 40,
				  nb + pos + 40, len - 40);
		if (ret < 0)
			return ret;
		t->ent[i].extra = extra;
		t->ent[i].idl = idl;
		t->ent[i].nml = nml;
		t->ent[i].l1_offset = ld_be64(h);
		t->ent[i].l1_size = ld_be32(h + 8);
		pos += len;
	}
	t->len = pos;
	t->n = s->nb_snapshots;
	/* pointers only once the buffer stops moving */
	pos = 0;
	for (uint32_t i = 0; i < t->n; i++) {
		t->ent[i].raw = t->buf + pos;
		pos += ALIGN_UP(40ULL + t->ent[i].extra + t->ent[i].idl +
				t->ent[i].nml, 8);
	}
	return 0;
}

static const char *ent_id(const struct sn_raw *r)
{
	return (const char *)r->raw + 40 + r->extra;
}

static const char *ent_name(const struct sn_raw *r)
{
	return (const char *)r->raw + 40 + r->extra + r->idl;
}

static bool str_is(const char *s, uint32_t len, const char *want)
{
	return strlen(want) == len && !memcmp(s, want, len);
}

/* Index of the first entry matching id and/or name (NULL: any), or -1. */
static int find(const struct sn_table *t, const char *id, const char *name)
{
	for (uint32_t i = 0; i < t->n; i++) {
		const struct sn_raw *r = &t->ent[i];
		if (id && !str_is(ent_id(r), r->idl, id))
			continue;
		if (name && !str_is(ent_name(r), r->nml, name))
			continue;
		return (int)i;
	}
	return -1;
}

/* For apply and delete: the table of a writable image, read into t, and
 * the index of the entry (apply: id_or_name as an id, then as a name). */
static int table_find(struct blk *bs, struct sn_table *t, const char *id,
		      const char *name, bool either)
{
	int ret, i;

	memset(t, 0, sizeof(*t));
	if (qcow2_state(bs)->read_only)
		return -EACCES;
	ret = table_read(bs, t);
	if (ret < 0)
		return ret;
	i = find(t, id, name);
	if (i < 0 && either)
		i = find(t, NULL, id);
	return i < 0 ? -ENOENT : i;
}

/* Bytes one entry takes when written by emit(). */
static uint64_t emit_len(const struct sn_raw *r)
{
	return ALIGN_UP(40ULL + MAX(r->extra, SN_EXTRA) + r->idl + r->nml, 8);
}

/* Writes entry r at out the way QEMU rewrites its table: the extra data
 * is at least vm_state_size_large, disk_size and icount (filled in for
 * entries that lack them), anything after those is kept. */
static void emit(uint8_t *out, const struct sn_raw *r, uint64_t cur_size)
{
	uint32_t ex = MAX(r->extra, SN_EXTRA);
	uint8_t *x = out + 40;
	const uint8_t *ox = r->raw + 40;

	memset(out, 0, emit_len(r));
	memcpy(out, r->raw, 40);
	st_be32(out + 36, ex);
	st_be64(x, r->extra >= 8 ? ld_be64(ox) : ld_be32(r->raw + 32));
	st_be64(x + 8, r->extra >= 16 ? ld_be64(ox + 8) : cur_size);
	st_be64(x + 16, r->extra >= 24 ? ld_be64(ox + 16) : UINT64_MAX);
	if (r->extra > SN_EXTRA)
		memcpy(x + SN_EXTRA, ox + SN_EXTRA, r->extra - SN_EXTRA);
	memcpy(x + ex, ox + r->extra, r->idl + r->nml);
}

/* Rebuilds the in-memory list (used by info and list) from table t. */
static int refresh_list(struct blk *bs, const struct sn_table *t)
{
	struct qcow2 *s = qcow2_state(bs);
	struct qcow2_snapshot *sn = NULL;

	if (t->n) {
		sn = calloc(t->n, sizeof(*sn));
		if (!sn)
			return -ENOMEM;
	}
	for (uint32_t i = 0; i < t->n; i++) {
		const struct sn_raw *r = &t->ent[i];
		const uint8_t *h = r->raw, *x = h + 40;
		struct snapshot_info *in = &sn[i].info;

		sn[i].l1_offset = r->l1_offset;
		sn[i].l1_size = r->l1_size;
		in->date_sec = ld_be32(h + 16);
		in->date_nsec = ld_be32(h + 20);
		in->vm_clock_nsec = ld_be64(h + 24);
		in->vm_state_size = r->extra >= 8 ? ld_be64(x) :
				    ld_be32(h + 32);
		sn[i].disk_size = r->extra >= 16 ? ld_be64(x + 8) : bs->size;
		if (r->extra >= 24 && ld_be64(x + 16) != UINT64_MAX) {
			in->icount_valid = 1;
			in->icount = ld_be64(x + 16);
		}
		snprintf(in->id, sizeof(in->id), "%.*s",
			 (int)MIN(r->idl, sizeof(in->id) - 1), ent_id(r));
		snprintf(in->name, sizeof(in->name), "%.*s",
			 (int)MIN(r->nml, sizeof(in->name) - 1), ent_name(r));
	}
	free(s->sn);
	s->sn = sn;
	s->nb_snapshots = t->n;
	return 0;
}

/* Writes a new snapshot table: the entries of t except skip (-1: none),
 * then add (NULL: none), into fresh clusters; the header is switched to
 * it in one write, then the old table's clusters are released. On
 * success t describes the new table. */
static int table_write(struct blk *bs, struct sn_table *t, int skip,
		       const struct sn_raw *add)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t len = 0, pos = 0, old_off = s->snapshots_offset;
	uint64_t old_len = t->len;
	uint32_t n = 0;
	uint8_t *buf = NULL, hdr[12];
	int64_t off = 0;
	struct sn_table nt = { 0 };
	int ret;

	for (uint32_t i = 0; i < t->n; i++)
		if ((int)i != skip)
			len += emit_len(&t->ent[i]);
	if (add)
		len += emit_len(add);
	if (len > QCOW2_MAX_SN_TABLE)
		return qcow2_set_errmsg(bs, -EFBIG, "Snapshot table too "
					"large");
	if (len) {
		buf = calloc(1, ALIGN_UP(len, s->cluster_size));
		if (!buf)
			return -ENOMEM;
	}
	for (uint32_t i = 0; i <= t->n; i++) {
		const struct sn_raw *r = i < t->n ? &t->ent[i] : add;
		if (!r || (int)i == skip)
			continue;
		emit(buf + pos, r, bs->size);
		pos += emit_len(r);
		n++;
	}
	if (len) {
		off = qcow2_alloc_clusters(bs, DIV_ROUND_UP(len,
							    s->cluster_size));
		if (off < 0) {
			ret = (int)off;
			goto out;
		}
		ret = bfile_pwrite(bs->file, (uint64_t)off, buf, len);
		if (ret < 0)
			goto out;
	}
	/* the table and its refcounts are on disk before the header */
	ret = qcow2_cache_flush_all(bs);
	if (!ret)
		ret = bfile_flush(bs->file);
	if (ret < 0)
		goto out;
	st_be32(hdr, n);
	st_be64(hdr + 4, (uint64_t)off);
	ret = qcow2_write_header_field(bs, QH_NB_SNAPSHOTS, hdr, 12);
	if (!ret)
		ret = bfile_flush(bs->file);
	if (ret < 0)
		goto out;
	s->snapshots_offset = (uint64_t)off;
	s->nb_snapshots = n;
	if (old_len)
		qcow2_free_clusters(bs, old_off, old_len);
	off = 0;	/* in use now */
	/* describe the new table */
	nt.buf = buf;
	nt.len = len;
	buf = NULL;
	table_free(t);
	*t = nt;
	if (n) {
		t->ent = calloc(n, sizeof(*t->ent));
		if (!t->ent) {
			ret = -ENOMEM;
			goto out;
		}
	}
	pos = 0;
	for (uint32_t i = 0; i < n; i++) {
		struct sn_raw *r = &t->ent[i];
		r->raw = t->buf + pos;
		r->extra = ld_be32(r->raw + 36);
		r->idl = ld_be16(r->raw + 12);
		r->nml = ld_be16(r->raw + 14);
		r->l1_offset = ld_be64(r->raw);
		r->l1_size = ld_be32(r->raw + 8);
		pos += emit_len(r);
	}
	t->n = n;
	ret = refresh_list(bs, t);
out:
	if (ret < 0 && off > 0)
		qcow2_free_clusters(bs, (uint64_t)off, len);
	free(buf);
	return ret;
}

/* ---- walking a tree ---- */

static int bad_table(struct blk *bs, const char *what, uint64_t v)
{
	return qcow2_set_errmsg(bs, -EIO, "Image is corrupt: %s %#llx", what,
				(unsigned long long)v);
}

/* Position in a tree walk: L1 index i, L2 index j (j == entries per
 * table: the L2 table itself). */
struct walk_pos {
	uint32_t i;
	unsigned j;
};

static bool before(struct walk_pos a, const struct walk_pos *stop)
{
	return !stop || a.i < stop->i || (a.i == stop->i && a.j < stop->j);
}

/* One reference more (addend 1) or less (-1) on the clusters of
 * [off, off+len); a refcount that would overflow is -EINVAL, as QEMU
 * reports it. */
static int add_ref(struct blk *bs, uint64_t off, uint64_t len, int addend)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t rc;
	int ret;

	if (addend > 0) {
		for (uint64_t c = off >> s->cluster_bits;
		     c <= (off + len - 1) >> s->cluster_bits; c++) {
			ret = qcow2_rc_get(bs, c, &rc);
			if (ret < 0)
				return ret;
			if (rc >= s->rc_max)
				return qcow2_set_errmsg(bs, -EINVAL, "Refcount "
							"overflow");
		}
	}
	return qcow2_rc_update(bs, off, len, addend);
}

/* Adds addend (+1, -1 or 0) to the refcount of every L2 table and every
 * cluster the L1 table l1 (n entries, host order) reaches, up to (not
 * including) *stop if stop is given, and sets OFLAG_COPIED in the
 * entries of l1 and of its L2 tables exactly where the refcount is now
 * 1. The L2 tables go back through the cache; the caller writes l1 if
 * *changed. On failure *at is where it stopped. */
static int walk_tree(struct blk *bs, uint64_t *l1, uint32_t n, int addend,
		     bool *changed, const struct walk_pos *stop,
		     struct walk_pos *at)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t cs = s->cluster_size, rc;
	unsigned per = 1u << s->l2_bits;
	uint8_t *copy = malloc(cs), *t;
	struct walk_pos pos = { 0, 0 };
	int ret = 0;

	if (!copy)
		return -ENOMEM;
	for (pos.i = 0; pos.i < n; pos.i++) {
		uint64_t l2off = l1[pos.i] & QCOW2_OFFSET_MASK, ne;
		bool dirty = false;

		pos.j = 0;
		if (!before(pos, stop))
			break;
		if (!l2off)
			continue;
		if (l2off & (cs - 1)) {
			ret = bad_table(bs, "L2 table offset unaligned",
					l2off);
			goto out;
		}
		ret = qcow2_cache_get(bs, &s->l2c, l2off, false, &t);
		if (ret < 0)
			goto out;
		memcpy(copy, t, cs);
		for (pos.j = 0; pos.j < per && before(pos, stop); pos.j++) {
			uint8_t *p = copy + (size_t)pos.j * s->l2_esize;
			uint64_t en = ld_be64(p), off, len;

			if (en & QCOW2_OFLAG_COMPRESSED) {
				if (!addend)
					continue;
				qcow2_compressed_range(s, en, &off, &len);
				ret = add_ref(bs, off, len, addend);
				if (ret < 0)
					goto out;
				continue;
			}
			off = en & QCOW2_OFFSET_MASK;
			if (!off)
				continue;
			if (off & (cs - 1)) {
				ret = bad_table(bs, "data cluster offset "
						"unaligned", off);
				goto out;
			}
			if (addend) {
				ret = add_ref(bs, off, cs, addend);
				if (ret < 0)
					goto out;
			}
			ret = qcow2_rc_get(bs, off >> s->cluster_bits, &rc);
			if (ret < 0)
				goto out;
			ne = rc == 1 ? en | QCOW2_OFLAG_COPIED :
			     en & ~QCOW2_OFLAG_COPIED;
			if (ne != en) {
				st_be64(p, ne);
				dirty = true;
			}
		}
		if (!before(pos, stop))
			break;
		if (addend) {
			ret = add_ref(bs, l2off, cs, addend);
			if (ret < 0)
				goto out;
		}
		ret = qcow2_rc_get(bs, l2off >> s->cluster_bits, &rc);
		if (ret < 0)
			goto out;
		/* a table nothing references any more is not written */
		if (dirty && rc) {
			ret = qcow2_cache_get(bs, &s->l2c, l2off, false, &t);
			if (ret < 0)
				goto out;
			memcpy(t, copy, cs);
			qcow2_cache_dirty(&s->l2c, t);
		}
		ne = rc == 1 ? l1[pos.i] | QCOW2_OFLAG_COPIED :
		     l1[pos.i] & ~QCOW2_OFLAG_COPIED;
		if (ne != l1[pos.i]) {
			l1[pos.i] = ne;
			*changed = true;
		}
	}
out:
	if (at)
		*at = pos;
	free(copy);
	return ret;
}

/* walk_tree over the whole table; a failure of an increment takes back
 * the references it had added, so that a refused snapshot (refcount
 * overflow) leaves the refcounts as they were. */
static int update_tree(struct blk *bs, uint64_t *l1, uint32_t n, int addend,
		       bool *changed)
{
	struct walk_pos at;
	int ret = walk_tree(bs, l1, n, addend, changed, NULL, &at);

	if (ret < 0 && addend > 0)
		(void)walk_tree(bs, l1, n, -addend, changed, &at, NULL);
	return ret;
}

/* Writes n entries of l1 (host order) at off, zeroes up to total. */
static int write_l1(struct blk *bs, uint64_t off, const uint64_t *l1,
		    uint32_t n, uint32_t total)
{
	uint8_t *b = calloc(total ? total : 1, 8);
	int ret;

	if (!b)
		return -ENOMEM;
	for (uint32_t i = 0; i < n; i++)
		st_be64(b + (size_t)i * 8, l1[i]);
	ret = bfile_pwrite(bs->file, off, b, (size_t)total * 8);
	free(b);
	return ret;
}

/* The active L1 and its tables: refcounts to disk first, then the L2
 * tables, then the L1 table. */
static int flush_active(struct blk *bs, bool l1_changed)
{
	struct qcow2 *s = qcow2_state(bs);
	int ret = qcow2_cache_flush_all(bs);

	if (!ret && l1_changed)
		ret = write_l1(bs, s->l1_offset, s->l1, s->l1_size,
			       s->l1_size);
	if (!ret)
		ret = bfile_flush(bs->file);
	return ret;
}

/* ---- create ---- */

/* Next free numeric id: one more than the largest id that is a number. */
static void new_id(const struct sn_table *t, char *id, size_t len)
{
	unsigned long max = 0;

	for (uint32_t i = 0; i < t->n; i++) {
		char buf[32];
		const struct sn_raw *r = &t->ent[i];
		unsigned long v;

		snprintf(buf, sizeof(buf), "%.*s", (int)MIN(r->idl, 31),
			 ent_id(r));
		v = strtoul(buf, NULL, 10);
		if (v > max)
			max = v;
	}
	snprintf(id, len, "%lu", max + 1);
}

/* OFLAG_COPIED set again wherever the active tree is the only referrer,
 * then the active tables written. */
static int settle_copied(struct blk *bs)
{
	struct qcow2 *s = qcow2_state(bs);
	bool changed = false;
	int ret = update_tree(bs, s->l1, s->l1_size, 0, &changed);

	return ret ? ret : flush_active(bs, changed);
}

int qcow2_snapshot_create(struct blk *bs, const struct snapshot_info *sn,
			  struct err *e)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t cs = s->cluster_size, l1bytes = (uint64_t)s->l1_size * 8;
	struct sn_table t;
	struct sn_raw add = { 0 };
	uint8_t *ent = NULL;
	char id[128];
	size_t idl, nml;
	int64_t l1off = 0;
	bool changed = false;
	int ret;

	if (s->read_only)
		return -EACCES;
	ret = table_read(bs, &t);
	if (ret < 0)
		goto out;
	if (sn->id[0]) {
		snprintf(id, sizeof(id), "%s", sn->id);
		if (find(&t, id, NULL) >= 0) {
			ret = -EEXIST;
			goto out;
		}
	} else {
		new_id(&t, id, sizeof(id));
	}
	if (t.n >= QCOW2_MAX_SNAPSHOTS) {
		err_set(e, "Too many snapshots");
		ret = -EFBIG;
		goto out;
	}
	idl = strlen(id);
	nml = strlen(sn->name);
	ent = calloc(1, 40 + SN_EXTRA + idl + nml);
	if (!ent) {
		ret = -ENOMEM;
		goto out;
	}

	/* 1. the copy of the active L1 table (referenced by nothing yet) */
	if (l1bytes) {
		l1off = qcow2_alloc_clusters(bs, DIV_ROUND_UP(l1bytes, cs));
		if (l1off < 0) {
			ret = (int)l1off;
			l1off = 0;
			goto out;
		}
		ret = write_l1(bs, (uint64_t)l1off, s->l1, s->l1_size,
			       s->l1_size);
		if (ret < 0)
			goto out;
	}
	/* 2. one more reference for everything the active table reaches */
	ret = update_tree(bs, s->l1, s->l1_size, 1, &changed);
	if (!ret)
		ret = flush_active(bs, changed);
	if (ret < 0)
		goto out;

	/* 3. the table entry, in a new table */
	st_be64(ent, (uint64_t)l1off);
	st_be32(ent + 8, s->l1_size);
	st_be16(ent + 12, (uint16_t)idl);
	st_be16(ent + 14, (uint16_t)nml);
	st_be32(ent + 16, sn->date_sec);
	st_be32(ent + 20, sn->date_nsec);
	st_be64(ent + 24, sn->vm_clock_nsec);
	st_be32(ent + 32, (uint32_t)MIN(sn->vm_state_size, UINT32_MAX));
	st_be32(ent + 36, SN_EXTRA);
	st_be64(ent + 40, sn->vm_state_size);
	st_be64(ent + 48, bs->size);
	st_be64(ent + 56, sn->icount_valid ? sn->icount : UINT64_MAX);
	memcpy(ent + 40 + SN_EXTRA, id, idl);
	memcpy(ent + 40 + SN_EXTRA + idl, sn->name, nml);
	add.raw = ent;
	add.extra = SN_EXTRA;
	add.idl = (uint32_t)idl;
	add.nml = (uint32_t)nml;
	ret = table_write(bs, &t, -1, &add);
	if (ret < 0)
		goto out;
	l1off = 0;
out:
	/* before the entry exists, its L1 copy is referenced by nothing */
	if (ret < 0 && l1off > 0) {
		qcow2_free_clusters(bs, (uint64_t)l1off,
				    ALIGN_UP(l1bytes, cs));
		(void)qcow2_cache_flush_all(bs);
	}
	if (ret == -EEXIST)
		err_set(e, "Could not create snapshot '%s': %s", sn->name,
			strerror(EEXIST));
	else if (ret < 0 && !e->msg[0])
		err_set(e, "%s", bs->errmsg[0] ? bs->errmsg : strerror(-ret));
	free(ent);
	table_free(&t);
	return ret;
}

/* ---- apply ---- */

static int read_l1(struct blk *bs, uint64_t off, uint32_t n, uint64_t **out)
{
	struct qcow2 *s = qcow2_state(bs);
	uint8_t *b;
	uint64_t *l1;
	int ret;

	*out = NULL;
	if ((uint64_t)n * 8 > QCOW2_MAX_L1_BYTES)
		return qcow2_set_errmsg(bs, -EFBIG, "Snapshot L1 table too "
					"large");
	/* transient: it must fit in what the image has left */
	if (blk_meta_alloc(bs, (uint64_t)n * 8, "snapshot L1 table",
			   NULL) < 0)
		return -EFBIG;
	blk_meta_free(bs, (uint64_t)n * 8);
	if (n && (off & (s->cluster_size - 1) || !off))
		return qcow2_set_errmsg(bs, -EINVAL, "Snapshot L1 table "
					"offset invalid");
	l1 = calloc(n ? n : 1, 8);
	b = malloc(n ? (size_t)n * 8 : 1);
	if (!l1 || !b) {
		free(l1);
		free(b);
		return -ENOMEM;
	}
	ret = bfile_pread(bs->file, off, b, (size_t)n * 8);
	for (uint32_t i = 0; i < n; i++)
		l1[i] = ld_be64(b + (size_t)i * 8);
	free(b);
	if (ret < 0) {
		free(l1);
		return ret;
	}
	*out = l1;
	return 0;
}

/* A larger active L1 table in new clusters; the header points to it
 * once it is written. */
static int grow_active_l1(struct blk *bs, uint32_t need)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t cs = s->cluster_size, *nl1;
	uint8_t hdr[12];
	int64_t off;
	int ret;

	nl1 = calloc(need, 8);
	if (!nl1)
		return -ENOMEM;
	memcpy(nl1, s->l1, (size_t)s->l1_size * 8);
	off = qcow2_alloc_clusters(bs, DIV_ROUND_UP((uint64_t)need * 8, cs));
	if (off < 0) {
		free(nl1);
		return (int)off;
	}
	ret = write_l1(bs, (uint64_t)off, nl1, need, need);
	if (!ret)
		ret = qcow2_cache_flush_all(bs);
	if (!ret)
		ret = bfile_flush(bs->file);
	if (ret < 0) {
		free(nl1);
		return ret;
	}
	st_be32(hdr, need);
	st_be64(hdr + 4, (uint64_t)off);
	ret = qcow2_write_header_field(bs, QH_L1_SIZE, hdr, 12);
	if (ret < 0) {
		free(nl1);
		return ret;
	}
	if (s->l1_size)
		qcow2_free_clusters(bs, s->l1_offset,
				    ALIGN_UP((uint64_t)s->l1_size * 8, cs));
	free(s->l1);
	s->l1 = nl1;
	s->l1_size = need;
	s->l1_offset = (uint64_t)off;
	return 0;
}

int qcow2_snapshot_apply(struct blk *bs, const char *id_or_name,
			 struct err *e)
{
	struct qcow2 *s = qcow2_state(bs);
	struct sn_table t;
	uint64_t *snl1 = NULL, *old = NULL, dsize;
	uint32_t snn, oldn;
	bool changed = false;
	int i, ret;

	i = ret = table_find(bs, &t, id_or_name, NULL, true);
	if (ret < 0)
		goto out;
	snn = t.ent[i].l1_size;
	dsize = t.ent[i].extra >= 16 ? ld_be64(t.ent[i].raw + 48) : bs->size;
	if (dsize > INT64_MAX || DIV_ROUND_UP(dsize, s->cluster_size <<
					      s->l2_bits) > snn) {
		ret = qcow2_set_errmsg(bs, -EINVAL, "Snapshot L1 table too "
				       "small for its disk size");
		goto out;
	}
	ret = read_l1(bs, t.ent[i].l1_offset, snn, &snl1);
	if (ret < 0)
		goto out;
	if (snn > s->l1_size) {
		ret = grow_active_l1(bs, snn);
		if (ret < 0)
			goto out;
	}
	/* 1. the snapshot's tree gains the active table as a referrer */
	ret = update_tree(bs, snl1, snn, 1, &changed);
	if (!ret)
		ret = qcow2_cache_flush_all(bs);
	if (!ret)
		ret = bfile_flush(bs->file);
	if (ret < 0)
		goto out;
	/* 2. the active table becomes the snapshot's, then the size */
	oldn = s->l1_size;
	old = s->l1;
	s->l1 = calloc(oldn ? oldn : 1, 8);
	if (!s->l1) {
		s->l1 = old;
		old = NULL;
		ret = -ENOMEM;
		goto out;
	}
	memcpy(s->l1, snl1, (size_t)snn * 8);
	ret = write_l1(bs, s->l1_offset, s->l1, oldn, oldn);
	if (!ret)
		ret = bfile_flush(bs->file);
	if (ret < 0)
		goto out;
	if (dsize != bs->size) {
		uint8_t b[8];

		st_be64(b, dsize);
		ret = qcow2_write_header_field(bs, QH_SIZE, b, 8);
		if (!ret)
			ret = bfile_flush(bs->file);
		if (ret < 0)
			goto out;
		bs->size = dsize;
	}
	/* 3. the old active tree loses that referrer */
	changed = false;
	ret = update_tree(bs, old, oldn, -1, &changed);
	if (ret < 0)
		goto out;
	/* 4. OFLAG_COPIED where the active table is now the only one */
	ret = settle_copied(bs);
out:
	if (ret < 0 && !e->msg[0] && ret != -ENOENT)
		err_set(e, "%s", bs->errmsg[0] ? bs->errmsg : strerror(-ret));
	free(snl1);
	free(old);
	table_free(&t);
	return ret;
}

/* ---- delete ---- */

int qcow2_snapshot_delete(struct blk *bs, const char *id, const char *name,
			  struct err *e)
{
	struct qcow2 *s = qcow2_state(bs);
	struct sn_table t;
	uint64_t *l1 = NULL, l1off;
	uint32_t n;
	bool changed = false;
	int i, ret;

	i = ret = table_find(bs, &t, id, name, false);
	if (ret < 0)
		goto out;
	l1off = t.ent[i].l1_offset;
	n = t.ent[i].l1_size;
	ret = read_l1(bs, l1off, n, &l1);
	if (ret < 0)
		goto out;
	/* 1. the entry goes; its tree is then referenced by nothing */
	ret = table_write(bs, &t, i, NULL);
	if (ret < 0) {
		err_set(e, "Failed to remove snapshot from snapshot list");
		goto out;
	}
	/* 2. its references go */
	ret = update_tree(bs, l1, n, -1, &changed);
	if (ret < 0) {
		err_set(e, "Failed to free the cluster and L1 table");
		goto out;
	}
	if (n)
		qcow2_free_clusters(bs, l1off, ALIGN_UP((uint64_t)n * 8,
							s->cluster_size));
	/* 3. OFLAG_COPIED where the active table is now the only one */
	ret = settle_copied(bs);
	if (ret < 0)
		err_set(e, "Failed to update snapshot status in disk");
out:
	free(l1);
	table_free(&t);
	return ret;
}

/* ---- for amend ---- */

/* compat=1.1 requires the 64-bit VM state size and the disk size in
 * every entry: the table is rewritten if one lacks them. */
int qcow2_snapshot_table_upgrade(struct blk *bs)
{
	struct sn_table t;
	bool need = false;
	int ret = table_read(bs, &t);

	for (uint32_t i = 0; !ret && i < t.n; i++)
		if (t.ent[i].extra < 16)
			need = true;
	if (!ret && need)
		ret = table_write(bs, &t, -1, NULL);
	table_free(&t);
	return ret;
}
