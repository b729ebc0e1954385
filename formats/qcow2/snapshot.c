/* snapshot.c - internal snapshots: create, apply (goto) and delete
 * (qcow2.txt, "Snapshots").
 *
 * A snapshot is a copy of the active L1 table plus an entry in the
 * snapshot table. Every L1 table that reaches a cluster counts once in
 * its refcount (an L2 table shared by two L1 tables makes its data
 * clusters count twice), which is how QEMU's check counts them.
 *
 * Create, apply and delete change refcounts and OFLAG_COPIED flags all
 * over the image; each is one transaction (txn.c) that writes the new
 * tables as copies and switches to them in one header write, so that a
 * kill at any moment leaves the old image or the new one. */
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
/* r describes the entry at raw; returns the bytes it takes. */
static uint64_t ent_parse(struct sn_raw *r, const uint8_t *raw)
{
	r->raw = raw;
	r->l1_offset = ld_be64(raw);
	r->l1_size = ld_be32(raw + 8);
	r->idl = ld_be16(raw + 12);
	r->nml = ld_be16(raw + 14);
	r->extra = ld_be32(raw + 36);
	return ALIGN_UP(40ULL + r->extra + r->idl + r->nml, 8);
}

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
		pos += len;
	}
	t->len = pos;
	t->n = s->nb_snapshots;
	/* pointers only once the buffer stops moving */
	pos = 0;
	for (uint32_t i = 0; i < t->n; i++)
		pos += ent_parse(&t->ent[i], t->buf + pos);
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

/* The L1 table of n entries at off, in host order, in *out. */
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

/* For apply and delete: the table of a writable image, read into t, the
 * index of the entry (apply: id_or_name as an id, then as a name) and its
 * L1 table in *l1. */
static int table_find(struct blk *bs, struct sn_table *t, const char *id,
		      const char *name, bool either, uint64_t **l1)
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
	if (i < 0)
		return -ENOENT;
	ret = read_l1(bs, t->ent[i].l1_offset, t->ent[i].l1_size, l1);
	return ret < 0 ? ret : i;
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

/* The entries of t except skip (-1: none), then add (NULL: none), as a
 * new table in *pbuf (whole clusters, zero-padded): *plen bytes, *pn
 * entries. */
static int table_emit(struct blk *bs, const struct sn_table *t, int skip,
		      const struct sn_raw *add, uint8_t **pbuf,
		      uint64_t *plen, uint32_t *pn)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t len = 0, pos = 0;
	uint32_t n = 0;
	uint8_t *buf = NULL;

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
	*pbuf = buf;
	*plen = len;
	*pn = n;
	return 0;
}

/* t becomes the table of n entries in buf (which it takes), as written;
 * the list that info shows follows. */
static int table_adopt(struct blk *bs, struct sn_table *t, uint8_t *buf,
		       uint64_t len, uint32_t n)
{
	uint64_t pos = 0;

	table_free(t);
	t->buf = buf;
	t->len = len;
	if (n) {
		t->ent = calloc(n, sizeof(*t->ent));
		if (!t->ent)
			return -ENOMEM;
	}
	for (uint32_t i = 0; i < n; i++)
		pos += ent_parse(&t->ent[i], t->buf + pos);
	t->n = n;
	return refresh_list(bs, t);
}

/* Writes the table of t rewritten (table_emit) into fresh clusters; the
 * header is switched to it in one write, then the old table's clusters
 * are released. On success t describes the new table. */
static int table_write(struct blk *bs, struct sn_table *t)
{
	struct qcow2 *s = qcow2_state(bs);
	uint64_t len, old_off = s->snapshots_offset, old_len = t->len;
	uint32_t n;
	uint8_t *buf, hdr[12];
	int64_t off = 0;
	int ret = table_emit(bs, t, -1, NULL, &buf, &len, &n);

	if (ret < 0)
		return ret;
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
	ret = table_adopt(bs, t, buf, len, n);
	buf = NULL;
	off = 0;	/* in use now */
out:
	if (ret < 0 && off > 0)
		qcow2_free_clusters(bs, (uint64_t)off, len);
	free(buf);
	return ret;
}

/* The same inside a transaction: the new table in new clusters, the old
 * one's reference dropped, the header fields set in x. *pbuf holds the
 * new table for table_adopt once x is committed. */
static int table_stage(struct qcow2_txn *x, const struct sn_table *t,
		       int skip, const struct sn_raw *add, uint8_t **pbuf,
		       uint64_t *plen)
{
	struct blk *bs = x->bs;
	uint32_t n;
	int64_t off = 0;
	int ret = table_emit(bs, t, skip, add, pbuf, plen, &n);

	if (ret < 0)
		return ret;
	if (*plen) {
		off = qcow2_txn_alloc(x, *plen);
		ret = off < 0 ? (int)off :
		      bfile_pwrite(bs->file, (uint64_t)off, *pbuf, *plen);
	}
	if (!ret && t->len)
		ret = qcow2_txn_ref(x, qcow2_state(bs)->snapshots_offset,
				    t->len, -1);
	x->nb_snapshots = n;
	x->snapshots_offset = (uint64_t)MAX(off, 0);
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

/* The table entry of a new snapshot whose L1 table is at l1off. */
static uint8_t *new_entry(struct blk *bs, const struct snapshot_info *sn,
			  const char *id, uint64_t l1off, struct sn_raw *add)
{
	struct qcow2 *s = qcow2_state(bs);
	size_t idl = strlen(id), nml = strlen(sn->name);
	uint8_t *ent = calloc(1, 40 + SN_EXTRA + idl + nml);

	if (!ent)
		return NULL;
	st_be64(ent, l1off);
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
	add->raw = ent;
	add->extra = SN_EXTRA;
	add->idl = (uint32_t)idl;
	add->nml = (uint32_t)nml;
	return ent;
}

/* The snapshot takes the active L1 table where it is, with the L2 tables
 * it reaches, and every cluster they reach gains a reference. The active
 * tree continues in new copies: a new L1 table, and new L2 tables where
 * OFLAG_COPIED must now be clear (see txn.c). */
int qcow2_snapshot_create(struct blk *bs, const struct snapshot_info *sn,
			  struct err *e)
{
	struct qcow2 *s = qcow2_state(bs);
	struct qcow2_txn x = { 0 };
	struct sn_table t;
	struct sn_raw add = { 0 };
	uint8_t *ent = NULL, *nbuf = NULL;
	uint64_t nlen = 0;
	char id[128];
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
	ent = new_entry(bs, sn, id, s->l1_offset, &add);
	if (!ent) {
		ret = -ENOMEM;
		goto out;
	}
	ret = qcow2_txn_begin(bs, &x);
	if (!ret)
		ret = qcow2_txn_ref_tree(&x, s->l1, s->l1_size, 1);
	if (!ret)
		ret = qcow2_txn_write_l1(&x, false);
	if (!ret)
		ret = table_stage(&x, &t, -1, &add, &nbuf, &nlen);
	if (!ret)
		ret = qcow2_txn_commit(&x);
	if (!ret) {
		ret = table_adopt(bs, &t, nbuf, nlen, s->nb_snapshots);
		nbuf = NULL;
	}
out:
	if (ret == -EEXIST)
		err_set(e, "Could not create snapshot '%s': %s", sn->name,
			strerror(EEXIST));
	else if (ret < 0 && !e->msg[0])
		err_set(e, "%s", bs->errmsg[0] ? bs->errmsg : strerror(-ret));
	qcow2_txn_free(&x);
	free(nbuf);
	free(ent);
	table_free(&t);
	return ret;
}

/* ---- apply ---- */

/* The active tree becomes a new copy of the snapshot's L1 table (the
 * larger of the two sizes), the snapshot's tree gains a reference and
 * the old active tree loses one. */
int qcow2_snapshot_apply(struct blk *bs, const char *id_or_name,
			 struct err *e)
{
	struct qcow2 *s = qcow2_state(bs);
	struct qcow2_txn x = { 0 };
	struct sn_table t;
	uint64_t *snl1 = NULL, dsize;
	uint32_t snn;
	int i, ret;

	i = ret = table_find(bs, &t, id_or_name, NULL, true, &snl1);
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
	ret = qcow2_txn_begin(bs, &x);
	if (ret < 0)
		goto out;
	if (snn > x.l1_size) {
		uint64_t *p = realloc(x.l1, (size_t)snn * 8);

		if (!p) {
			ret = -ENOMEM;
			goto out;
		}
		x.l1 = p;
		x.l1_size = snn;
	}
	memset(x.l1, 0, (size_t)x.l1_size * 8);
	memcpy(x.l1, snl1, (size_t)snn * 8);
	x.size = dsize;
	ret = qcow2_txn_ref_tree(&x, snl1, snn, 1);
	if (!ret)
		ret = qcow2_txn_ref_tree(&x, s->l1, s->l1_size, -1);
	if (!ret)
		ret = qcow2_txn_write_l1(&x, true);
	if (!ret)
		ret = qcow2_txn_commit(&x);
out:
	if (ret < 0 && !e->msg[0] && ret != -ENOENT)
		err_set(e, "%s", bs->errmsg[0] ? bs->errmsg : strerror(-ret));
	qcow2_txn_free(&x);
	free(snl1);
	table_free(&t);
	return ret;
}

/* ---- delete ---- */

/* The entry and its L1 table go, and everything its tree reaches loses
 * a reference; the active tree is settled in new copies. */
int qcow2_snapshot_delete(struct blk *bs, const char *id, const char *name,
			  struct err *e)
{
	struct qcow2_txn x = { 0 };
	struct sn_table t;
	uint64_t *l1 = NULL, l1off, nlen = 0;
	uint8_t *nbuf = NULL;
	uint32_t n;
	int i, ret;

	i = ret = table_find(bs, &t, id, name, false, &l1);
	if (ret < 0)
		goto out;
	l1off = t.ent[i].l1_offset;
	n = t.ent[i].l1_size;
	ret = qcow2_txn_begin(bs, &x);
	if (!ret)
		ret = qcow2_txn_ref_tree(&x, l1, n, -1);
	if (!ret)
		ret = qcow2_txn_ref(&x, l1off, (uint64_t)n * 8, -1);
	if (ret < 0) {
		err_set(e, "Failed to free the cluster and L1 table");
		goto out;
	}
	ret = qcow2_txn_write_l1(&x, true);
	if (!ret)
		ret = table_stage(&x, &t, i, NULL, &nbuf, &nlen);
	if (!ret)
		ret = qcow2_txn_commit(&x);
	if (ret < 0) {
		err_set(e, "Failed to remove snapshot from snapshot list");
		goto out;
	}
	ret = table_adopt(bs, &t, nbuf, nlen, x.nb_snapshots);
	nbuf = NULL;
out:
	qcow2_txn_free(&x);
	free(nbuf);
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
		ret = table_write(bs, &t);
	table_free(&t);
	return ret;
}
