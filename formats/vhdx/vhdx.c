/* vhdx.c - Microsoft VHDX (MS-VHDX v1.0): a file identifier, two headers
 * and two region tables protected by CRC-32C, a metadata region (block
 * size, disk size, sector sizes) and the block allocation table (BAT) in
 * which a sector-bitmap entry follows every chunk_ratio payload entries.
 * The log is replayed by log.c before anything else is read. */
//config:config FORMAT_VHDX
//config:	bool "vhdx"
//config:	default y
//config:	help
//config:	  Microsoft Hyper-V VHDX images, dynamic and fixed: read,
//config:	  write, create, log replay and check. Differencing images
//config:	  (with a parent) are refused, as QEMU does.
//format:FORMAT(vhdx)

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include "../fmt.h"
#include "vhdx.h"

static const struct optdesc vhdx_create_opts[] = {
	FMT_OPT("size", OPT_SIZE, "Virtual disk size; max of 64TB."),
	{ "log_size", OPT_SIZE, "Log size; min 1MB.", "1048576", false },
	{ "block_size", OPT_SIZE, "Block Size; min 1MB, max 256MB. 0 means "
	  "auto-calculate based on image size.", "0", false },
	{ "subformat", OPT_STRING, "VHDX format type, can be either "
	  "'dynamic' or 'fixed'. Default is 'dynamic'.", NULL, false },
	{ "block_state_zero", OPT_BOOL, "Force use of payload blocks of type "
	  "'ZERO'. Non-standard, but default.  Do not set to 'off' when "
	  "using '" QEMU_IMG_CMD " convert' with subformat=dynamic.", NULL,
	  false },
	FMT_OPT_FILE
};

static const struct fmt_map vhdx_map;

/* MS-VHDX 2.2.2 / 2.2.3 GUIDs, in their on-disk byte order.  The metadata
 * items from G_FILE_PARAMS on are the ones this driver knows. */
enum {
	G_BAT, G_METADATA, G_FILE_PARAMS, G_DISK_SIZE, G_PAGE83,
	G_LOGICAL_SECTOR, G_PHYSICAL_SECTOR, G_PARENT_LOCATOR, G_COUNT
};
static const char guids[G_COUNT][17] = {
	[G_BAT] = "\x66\x77\xc2\x2d\x23\xf6\x00\x42\x9d\x64\x11\x5e\x9b\xfd\x4a\x08",
	[G_METADATA] = "\x06\xa2\x7c\x8b\x90\x47\x9a\x4b\xb8\xfe\x57\x5f\x05\x0f\x88\x6e",
	[G_FILE_PARAMS] = "\x37\x67\xa1\xca\x36\xfa\x43\x4d\xb3\xb6\x33\xf0\xaa\x44\xe7\x6b",
	[G_DISK_SIZE] = "\x24\x42\xa5\x2f\x1b\xcd\x76\x48\xb2\x11\x5d\xbe\xd8\x3b\xf4\xb8",
	[G_PAGE83] = "\xab\x12\xca\xbe\xe6\xb2\x23\x45\x93\xef\xc3\x09\xe0\x00\xc7\x46",
	[G_LOGICAL_SECTOR] = "\x1d\xbf\x41\x81\x6f\xa9\x09\x47\xba\x47\xf2\x33\xa8\xfa\xab\x5f",
	[G_PHYSICAL_SECTOR] = "\xc7\x48\xa3\xcd\x5d\x44\x71\x44\x9c\xc9\xe9\x88\x52\x51\xc5\x56",
	[G_PARENT_LOCATOR] = "\x2d\x5f\xd3\xa8\x0b\xb3\x4d\x45\xab\xf7\xd3\xd8\x48\x34\xab\x0c",
};

/* CRC-32C (Castagnoli), reflected, as MS-VHDX requires for headers,
 * region tables and log entries. */
uint32_t vhdx_crc32c(uint32_t crc, const void *buf, size_t len)
{
	static uint32_t table[256];
	static int ready;
	const uint8_t *p = buf;

	if (!__atomic_load_n(&ready, __ATOMIC_ACQUIRE)) {
		for (uint32_t i = 0; i < 256; i++) {
			uint32_t c = i;
			for (int k = 0; k < 8; k++)
				c = c & 1 ? (c >> 1) ^ 0x82f63b78u : c >> 1;
			table[i] = c;
		}
		__atomic_store_n(&ready, 1, __ATOMIC_RELEASE);
	}
	crc = ~crc;
	while (len--)
		crc = table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return ~crc;
}

/* CRC of a structure whose checksum field at csum_off counts as zero. */
uint32_t vhdx_checksum(const uint8_t *buf, size_t len, size_t csum_off)
{
	static const uint8_t zero[4];
	uint32_t c = vhdx_crc32c(0, buf, csum_off);

	c = vhdx_crc32c(c, zero, 4);
	return vhdx_crc32c(c, buf + csum_off + 4, len - csum_off - 4);
}

void vhdx_guid_random(uint8_t *g)
{
	size_t got = 0;

	while (got < 16) {
		ssize_t n = getrandom(g + got, 16 - got, 0);
		if (n <= 0) {
			/* no entropy source: time and address are unique
			 * enough for a write GUID */
			uint64_t t = (uint64_t)time(NULL) ^ (uintptr_t)g;
			for (; got < 16; got++, t = t * 6364136223846793005ULL + 1)
				g[got] = (uint8_t)(t >> 56);
			break;
		}
		got += (size_t)n;
	}
	g[7] = (uint8_t)((g[7] & 0x0f) | 0x40);	/* version 4 */
	g[8] = (uint8_t)((g[8] & 0x3f) | 0x80);	/* variant */
}

/* Most malformed structures get no message of their own in QEMU, only
 * its block layer's generic "Could not open 'FILE': strerror". */
int vhdx_fail(struct blk *bs, struct err *e, int ret)
{
	err_set(e, "Could not open '%s': %s", bs->filename, strerror(-ret));
	return ret;
}

static bool guid_eq(const void *a, const void *b)
{
	return !memcmp(a, b, 16);
}

static int vhdx_probe(const uint8_t *buf, size_t len, const char *filename)
{
	(void)filename;
	if (len >= 8 && !memcmp(buf, "vhdxfile", 8))
		return 100;
	return 0;
}

/* A header is valid when its signature, checksum and version are. */
static bool header_valid(const uint8_t *h)
{
	return !memcmp(h, "head", 4) &&
	       ld_le32(h + 4) == vhdx_checksum(h, VHDX_HEADER_SIZE, 4) &&
	       ld_le16(h + 66) == 1;
}

static int vhdx_read_headers(struct blk *bs, struct err *e)
{
	struct vhdx *s = bs->opaque;
	uint8_t *h1 = s->hdr[0], *h2 = s->hdr[1];
	bool v1, v2;
	int ret;

	ret = bfile_pread(bs->file, VHDX_HEADER1_OFF, h1, VHDX_HEADER_SIZE);
	if (ret == 0)
		ret = bfile_pread(bs->file, VHDX_HEADER2_OFF, h2,
				  VHDX_HEADER_SIZE);
	if (ret < 0) {
		err_set(e, "Could not read VHDX headers: %s", strerror(-ret));
		return ret;
	}
	v1 = header_valid(h1);
	v2 = header_valid(h2);
	if (v1 && v2) {
		uint64_t s1 = ld_le64(h1 + 8), s2 = ld_le64(h2 + 8);
		if (s1 > s2)
			s->cur = 0;
		else if (s2 > s1)
			s->cur = 1;
		else if (!memcmp(h1, h2, VHDX_HEADER_SIZE))
			s->cur = 0;	/* identical copies (some tools) */
		else
			v1 = v2 = false;
	} else if (v1) {
		s->cur = 0;
	} else if (v2) {
		s->cur = 1;
	}
	if (!v1 && !v2) {
		err_set(e, "No valid VHDX header found");
		return -EINVAL;
	}
	/* only log version 0 exists; the log starts on a MiB (its length
	 * is not checked, as in QEMU) */
	if (ld_le16(s->hdr[s->cur] + 64) != 0 ||
	    !IS_ALIGNED(ld_le64(s->hdr[s->cur] + 72), VHDX_MIB))
		return vhdx_fail(bs, e, -EINVAL);
	return 0;
}

/* QEMU's test, with its message: [start, end) overlaps [rs, re) unless
 * it lies wholly on one side (so even an empty log can be overlapped). */
static bool region_overlaps(uint64_t start, uint64_t end, uint64_t rs,
			    uint64_t re)
{
	struct check_result r = { .report = check_default_report };

	if (start >= re || end <= rs)
		return false;
	check_report(&r, CHECK_ERROR, "VHDX region %" PRIu64 "-%" PRIu64
		     " overlaps with region %" PRIu64 "-%" PRIu64, start, end,
		     rs, re);
	return true;
}

/* Regions must lie past the 1 MiB header area, be 1 MiB aligned and
 * overlap neither the log (even an empty one) nor each other: checked
 * first, as QEMU does, the latest region first. */
static int vhdx_read_regions(struct blk *bs, struct err *e)
{
	struct vhdx *s = bs->opaque;
	uint8_t *rt = malloc(VHDX_REGION_SIZE);
	uint64_t starts[VHDX_MAX_ENTRIES], ends[VHDX_MAX_ENTRIES];
	const uint8_t *h = s->hdr[s->cur];
	uint64_t log_off = ld_le64(h + 72), log_end;
	uint32_t n;
	bool have[2] = { false, false };	/* G_BAT, G_METADATA */
	int ret;

	if (!rt)
		return -ENOMEM;
	if (add_overflow_u64(log_off, ld_le32(h + 68), &log_end))
		log_end = UINT64_MAX;
	ret = bfile_pread(bs->file, VHDX_REGION1_OFF, rt, VHDX_REGION_SIZE);
	if (ret < 0) {
		err_set(e, "Could not read region table: %s", strerror(-ret));
		goto out;
	}
	ret = -EINVAL;
	/* like QEMU, the second copy is not consulted */
	if (memcmp(rt, "regi", 4) ||
	    ld_le32(rt + 4) != vhdx_checksum(rt, VHDX_REGION_SIZE, 4))
		goto bad;
	n = ld_le32(rt + 8);
	if (n > VHDX_MAX_ENTRIES)
		goto bad;
	for (uint32_t i = 0; i < n; i++) {
		const uint8_t *r = rt + 16 + i * 32;
		uint64_t off = ld_le64(r + 16);
		uint32_t len = ld_le32(r + 24), flags = ld_le32(r + 28);
		bool clash = off > UINT64_MAX - len;
		int w;

		for (uint32_t k = i; k-- > 0 && !clash;)
			clash = region_overlaps(off, off + len, starts[k],
						ends[k]);
		if (clash || region_overlaps(off, off + len, log_off, log_end) ||
		    !IS_ALIGNED(off, VHDX_MIB) || !IS_ALIGNED(len, VHDX_MIB) ||
		    off < VHDX_MIB)
			goto bad;
		starts[i] = off;
		ends[i] = off + len;
		if (guid_eq(r, guids[G_BAT]))
			w = G_BAT;
		else if (guid_eq(r, guids[G_METADATA]))
			w = G_METADATA;
		else if (flags & 1) {
			ret = -ENOTSUP;
			goto bad;
		} else
			continue;
		if (have[w])
			goto bad;
		have[w] = true;
		if (w == G_BAT) {
			s->bat_off = off;
			s->bat_len = len;
		} else {
			s->meta_off = off;
			s->meta_len = len;
		}
	}
	if (have[G_BAT] && have[G_METADATA])
		ret = 0;
bad:
	if (ret < 0)
		vhdx_fail(bs, e, ret);
out:
	free(rt);
	return ret;
}

/* Reads the first len bytes of one metadata item into out. */
static int meta_item(struct blk *bs, const uint8_t *tab, uint32_t n,
		     const char *guid, void *out, uint32_t len, bool *found)
{
	struct vhdx *s = bs->opaque;

	*found = false;
	for (uint32_t i = 0; i < n; i++) {
		const uint8_t *m = tab + 32 + i * 32;
		uint32_t off = ld_le32(m + 16), mlen = ld_le32(m + 20);

		if (!guid_eq(m, guid))
			continue;
		/* QEMU reads the field whatever length the entry claims */
		(void)mlen;
		if (off < VHDX_METADATA_TABLE_SIZE ||
		    (uint64_t)off + len > s->meta_len)
			return -EINVAL;
		*found = true;
		return bfile_pread(bs->file, s->meta_off + off, out, len);
	}
	return 0;
}

static int vhdx_read_metadata(struct blk *bs, struct err *e)
{
	struct vhdx *s = bs->opaque;
	uint8_t *tab = malloc(VHDX_METADATA_TABLE_SIZE);
	uint8_t fp[8], sz[8], ls[4], ps[4], p83[16];
	bool f1, f2, f3, f4, f5;
	uint32_t n;
	int ret;

	if (!tab)
		return -ENOMEM;
	if (s->meta_len < VHDX_METADATA_TABLE_SIZE) {
		vhdx_fail(bs, e, -EINVAL);
		ret = -EINVAL;
		goto out;
	}
	ret = bfile_pread(bs->file, s->meta_off, tab,
			  VHDX_METADATA_TABLE_SIZE);
	if (ret < 0) {
		err_set(e, "Could not read metadata: %s", strerror(-ret));
		goto out;
	}
	ret = -EINVAL;
	n = ld_le16(tab + 10);
	if (memcmp(tab, "metadata", 8) || n > VHDX_MAX_ENTRIES) {
		vhdx_fail(bs, e, -EINVAL);
		goto out;
	}
	/* Unknown required items make the image unreadable (MS-VHDX
	 * 2.6.1.2, IsRequired). */
	for (uint32_t i = 0; i < n; i++) {
		const uint8_t *m = tab + 32 + i * 32;
		bool k = false;

		for (int j = G_FILE_PARAMS; j < G_COUNT; j++)
			k |= guid_eq(m, guids[j]);
		if (!k && (ld_le32(m + 24) & 4)) {
			ret = vhdx_fail(bs, e, -ENOTSUP);
			goto out;
		}
	}
	if (meta_item(bs, tab, n, guids[G_FILE_PARAMS], fp, 8, &f1) < 0 ||
	    meta_item(bs, tab, n, guids[G_DISK_SIZE], sz, 8, &f2) < 0 ||
	    meta_item(bs, tab, n, guids[G_PAGE83], p83, 16, &f3) < 0 ||
	    meta_item(bs, tab, n, guids[G_LOGICAL_SECTOR], ls, 4, &f4) < 0 ||
	    meta_item(bs, tab, n, guids[G_PHYSICAL_SECTOR], ps, 4, &f5) < 0) {
		vhdx_fail(bs, e, -EINVAL);
		goto out;
	}
	if (!f1 || !f2 || !f3 || !f4 || !f5) {
		ret = vhdx_fail(bs, e, -ENOTSUP);
		goto out;
	}
	s->block_size = ld_le32(fp);
	s->has_parent = (ld_le32(fp + 4) & 2) != 0;
	s->disk_size = ld_le64(sz);
	s->logical_sector = ld_le32(ls);
	s->physical_sector = ld_le32(ps);
	if (s->has_parent) {
		/* without a parent locator the image is malformed; with one
		 * it is a differencing image, which QEMU does not open */
		uint8_t pl[20];
		bool f6;
		ret = meta_item(bs, tab, n, guids[G_PARENT_LOCATOR], pl, 20, &f6);
		ret = vhdx_fail(bs, e, ret < 0 || !f6 ? -EINVAL : -ENOTSUP);
		goto out;
	}
	if (s->block_size < VHDX_MIB || s->block_size > VHDX_MAX_BLOCK ||
	    (s->block_size & (s->block_size - 1))) {
		vhdx_fail(bs, e, -EINVAL);
		goto out;
	}
	/* like QEMU, only 512-byte logical sectors are supported; the
	 * physical sector size is advisory */
	if (s->logical_sector != 512) {
		ret = vhdx_fail(bs, e, -ENOTSUP);
		goto out;
	}
	if (!s->disk_size || s->disk_size > VHDX_MAX_SIZE) {
		vhdx_fail(bs, e, -EINVAL);
		goto out;
	}
	ret = 0;
out:
	free(tab);
	return ret;
}

static int vhdx_read_bat(struct blk *bs, struct err *e)
{
	struct vhdx *s = bs->opaque;
	uint64_t ratio = ((uint64_t)1 << 23) * s->logical_sector /
			 s->block_size;
	uint64_t blocks = DIV_ROUND_UP(s->disk_size, s->block_size);
	int ret;

	s->chunk_ratio = ratio;
	s->blocks = blocks;
	/* payload entries with a sector bitmap entry after each chunk */
	s->bat_entries = blocks ? blocks + (blocks - 1) / ratio : 0;
	if (s->bat_entries > s->bat_len / 8) {
		return vhdx_fail(bs, e, -EINVAL);
	}
	if (s->bat_entries * 8 > VHDX_MAX_BAT_BYTES) {
		err_set(e, "VHDX BAT is too large");
		return -EFBIG;
	}
	ret = blk_meta_alloc(bs, s->bat_entries * 8, "VHDX BAT", e);
	if (ret < 0)
		return ret;
	s->bat = malloc(s->bat_entries ? s->bat_entries * 8 : 8);
	if (!s->bat)
		return -ENOMEM;
	ret = bfile_pread(bs->file, s->bat_off, s->bat, s->bat_entries * 8);
	if (ret < 0) {
		err_set(e, "Could not read BAT: %s", strerror(-ret));
		return ret;
	}
	for (uint64_t i = 0; i < s->bat_entries; i++)
		s->bat[i] = ld_le64(&s->bat[i]);
	/* Present blocks must lie inside the file (the last block only as
	 * far as the disk goes). */
	for (uint64_t b = 0; b < blocks && !(bs->flags & BLK_O_CHECK); b++) {
		uint64_t v = s->bat[b + b / ratio], off = v & ~VHDX_MIB_MASK;
		uint64_t len = MIN((uint64_t)s->block_size,
				   s->disk_size - b * s->block_size);

		if ((v & 7) != VHDX_BAT_FULLY_PRESENT &&
		    (v & 7) != VHDX_BAT_PARTIALLY_PRESENT)
			continue;
		if (off >= s->file_size || len > s->file_size - off) {
			snprintf(bs->errmsg, sizeof(bs->errmsg),
				 "VHDX BAT entry %llu %s offset %llu points "
				 "after end of file (%llu). Image has probably "
				 "been truncated.", (unsigned long long)b,
				 off >= s->file_size ? "start" : "end",
				 (unsigned long long)(off >= s->file_size ?
				 off : off + len - 1),
				 (unsigned long long)s->file_size);
			return vhdx_fail(bs, e, -EINVAL);
		}
	}
	return 0;
}

/* Writes the current header into the other slot with a new sequence
 * number and fresh write GUIDs, twice, so both copies end up current
 * (MS-VHDX 2.2.2.1: update the non-current header, then the other). */
int vhdx_update_headers(struct blk *bs, bool clear_log)
{
	struct vhdx *s = bs->opaque;
	uint8_t *h = s->hdr[s->cur];
	int ret;

	vhdx_guid_random(h + 16);	/* FileWriteGuid */
	vhdx_guid_random(h + 32);	/* DataWriteGuid */
	if (clear_log)
		memset(h + 48, 0, 16);
	for (int i = 0; i < 2; i++) {
		int slot = !s->cur;
		uint8_t *d = s->hdr[slot];

		memcpy(d, h, VHDX_HEADER_SIZE);
		st_le64(d + 8, ld_le64(h + 8) + 1);
		st_le32(d + 4, vhdx_checksum(d, VHDX_HEADER_SIZE, 4));
		ret = bfile_pwrite(bs->file, slot ? VHDX_HEADER2_OFF :
				   VHDX_HEADER1_OFF, d, VHDX_HEADER_SIZE);
		if (ret < 0)
			return ret;
		ret = bfile_flush(bs->file);
		if (ret < 0)
			return ret;
		s->cur = slot;
		h = d;
	}
	return 0;
}

static int vhdx_do_open(struct blk *bs, struct err *e)
{
	/* in this order: the log is replayed before metadata and BAT are
	 * read */
	static int (*const step[])(struct blk *, struct err *) = {
		vhdx_read_headers, vhdx_read_regions, vhdx_log_open,
		vhdx_read_metadata, vhdx_read_bat,
	};
	struct vhdx *s = bs->opaque;
	uint8_t sig[8];
	int64_t fsize = fmt_file_size(bs, e);
	int ret;

	if (fsize < 0)
		return (int)fsize;
	s->file_size = (uint64_t)fsize;
	ret = bfile_pread(bs->file, 0, sig, 8);
	if (ret < 0)
		return ret;
	if (memcmp(sig, "vhdxfile", 8))
		return vhdx_fail(bs, e, -EINVAL);
	for (size_t i = 0; i < ARRAY_SIZE(step); i++) {
		ret = step[i](bs, e);
		if (ret < 0)
			return ret;
	}
	/* QEMU counts whole 512-byte sectors */
	bs->size = ALIGN_DOWN(s->disk_size, 512);
	s->map = &vhdx_map;
	if (bs->flags & BLK_O_RDWR) {
		ret = vhdx_update_headers(bs, false);
		if (ret < 0) {
			err_set(e, "Could not update VHDX headers: %s",
				strerror(-ret));
			return ret;
		}
	}
	return 0;
}

static void vhdx_close(struct blk *bs)
{
	struct vhdx *s = bs->opaque;

	free(s->bat);
	s->bat = NULL;
}

static int vhdx_open(struct blk *bs, struct err *e)
{
	return fmt_open(bs, e, vhdx_do_open, vhdx_close);
}

static uint64_t bat_index(const struct vhdx *s, uint64_t block)
{
	return block + block / s->chunk_ratio;
}

/* Host offset of a fully present block; 0 if the block reads as zero;
 * -errno for states a disk without parent cannot have. */
static int vhdx_block(struct blk *bs, uint64_t block, uint64_t *host)
{
	struct vhdx *s = bs->opaque;
	uint64_t e = s->bat[bat_index(s, block)], off = e & ~VHDX_MIB_MASK;

	*host = 0;
	switch (e & 7) {
	case VHDX_BAT_NOT_PRESENT:
	case VHDX_BAT_UNDEFINED:
	case VHDX_BAT_ZERO:
	case VHDX_BAT_UNMAPPED:
		return 0;
	case VHDX_BAT_FULLY_PRESENT:
		if (!off || off > UINT64_MAX - s->block_size ||
		    off + s->block_size > VHDX_MAX_FILE)
			return -EINVAL;
		*host = off;
		return 0;
	case VHDX_BAT_PARTIALLY_PRESENT:
		return -ENOTSUP;
	default:
		return -EINVAL;
	}
}

/* One block at a time; blocks that are not present read as zeroes (the
 * disk has no parent). */
static int vhdx_lookup(struct blk *bs, uint64_t off, uint64_t len,
		       enum fmt_op op, struct fmt_run *r)
{
	struct vhdx *s = bs->opaque;
	uint64_t block = off / s->block_size, in = off % s->block_size;
	int ret = vhdx_block(bs, block, &r->host);

	(void)op;
	if (ret < 0)
		return ret;
	r->len = MIN(len, s->block_size - in);
	r->entry = block;
	r->kind = r->host ? FMT_DATA : FMT_ZERO;
	r->host += in;
	return 0;
}

static int vhdx_set_bat(struct blk *bs, uint64_t block, uint64_t entry)
{
	struct vhdx *s = bs->opaque;
	uint64_t i = bat_index(s, block);
	uint8_t raw[8];

	s->bat[i] = entry;
	st_le64(raw, entry);
	return bfile_pwrite(bs->file, s->bat_off + i * 8, raw, 8);
}

/* A new block goes to the end of the file, 1 MiB aligned; the file is
 * extended first so that the block reads as zeroes around the data. */
static int vhdx_alloc_block(struct blk *bs, uint64_t *host)
{
	struct vhdx *s = bs->opaque;
	int64_t fsize = bfile_size(bs->file);
	uint64_t off;
	struct err e;

	if (fsize < 0)
		return (int)fsize;
	off = ALIGN_UP((uint64_t)fsize, VHDX_MIB);
	if (off > VHDX_MAX_FILE - s->block_size)
		return -EFBIG;
	*host = off;
	return bfile_truncate(bs->file, off + s->block_size, PREALLOC_OFF, &e);
}

/* A new block for the run: data before the table entry that points to
 * it. */
static int vhdx_alloc_write(struct blk *bs, uint64_t off, const uint8_t *buf,
			    struct fmt_run *r)
{
	struct vhdx *s = bs->opaque;
	uint64_t host;
	int ret = vhdx_alloc_block(bs, &host);

	if (ret == 0)
		ret = bfile_pwrite(bs->file, host + off % s->block_size, buf,
				   (size_t)r->len);
	if (ret == 0)
		ret = bfile_flush(bs->file);
	if (ret == 0)
		ret = vhdx_set_bat(bs, r->entry,
				   host | VHDX_BAT_FULLY_PRESENT);
	return ret;
}

static const struct fmt_map vhdx_map = {
	.lookup = vhdx_lookup,
	.alloc_write = vhdx_alloc_write,
};

/* Blocks that are not present already read as zeroes (no parent). */
static int vhdx_pwrite_zeroes(struct blk *bs, uint64_t off, uint64_t len,
			      unsigned flags)
{
	(void)flags;
	while (len) {
		struct fmt_run r;
		int ret = vhdx_lookup(bs, off, len, FMT_WRITE, &r);

		if (ret == 0 && r.kind == FMT_DATA)
			ret = bfile_zero(bs->file, r.host, r.len, false);
		if (ret < 0)
			return ret;
		off += r.len;
		len -= r.len;
	}
	return 0;
}

static int vhdx_get_info(struct blk *bs, struct blk_info *bi)
{
	struct vhdx *s = bs->opaque;

	bi->cluster_size = s->block_size;
	return 0;
}

/* The check of VHDX: present blocks must lie inside the file (the check
 * open skips that test so that it is reported here, as an error line like
 * QEMU's); a log replayed on open counts as a fixed corruption. QEMU
 * 7.2 does not look for overlapping blocks, and neither do we. */
static int vhdx_check(struct blk *bs, struct check_result *res, int fix)
{
	struct vhdx *s = bs->opaque;
	int64_t fsize = bfile_size(bs->file);

	(void)fix;
	if (fsize < 0)
		return (int)fsize;
	if (s->log_replayed)
		res->corruptions_fixed++;
	for (uint64_t b = 0; b < s->blocks; b++) {
		uint64_t e = s->bat[bat_index(s, b)];
		uint64_t off = e & ~VHDX_MIB_MASK;
		uint64_t len = MIN((uint64_t)s->block_size,
				   s->disk_size - b * s->block_size);

		if ((e & 7) != VHDX_BAT_FULLY_PRESENT &&
		    (e & 7) != VHDX_BAT_PARTIALLY_PRESENT)
			continue;
		if (off < (uint64_t)fsize && len <= (uint64_t)fsize - off)
			continue;
		check_report(res, CHECK_ERROR, "VHDX BAT entry %" PRIu64
			     " %s offset %" PRIu64 " points after end of file "
			     "(%" PRId64 "). Image has probably been "
			     "truncated.", b,
			     off >= (uint64_t)fsize ? "start" : "end",
			     off >= (uint64_t)fsize ? off : off + len - 1,
			     fsize);
		res->corruptions++;
	}
	return 0;
}

/* ---- create ---- */

static void put_meta_entry(uint8_t *tab, int i, const char *guid,
			   uint32_t off, uint32_t len, uint32_t flags)
{
	uint8_t *m = tab + 32 + i * 32;

	memcpy(m, guid, 16);
	st_le32(m + 16, off);
	st_le32(m + 20, len);
	st_le32(m + 24, flags);
}

static int vhdx_create(const char *filename, const struct optlist *opts,
		       struct err *e)
{
	uint64_t size = 0, log_size = VHDX_MIB, block_size = 0;
	const char *sub = optlist_get(opts, "subformat");
	bool fixed = false, bsz = true;
	uint64_t blocks, ratio, bat_entries, bat_off, bat_len, meta_off;
	uint64_t data_off, end;
	uint8_t *buf = NULL;
	struct bfile *f;
	int ret;

	/* QEMU creates the file first; refused options leave it empty. */
	ret = fmt_create_file(&f, filename, e);
	if (ret < 0)
		return ret;
	ret = -EINVAL;
	if (optlist_get_size(opts, "size", &size, e) < 0 ||
	    optlist_get_size(opts, "log_size", &log_size, e) < 0 ||
	    optlist_get_size(opts, "block_size", &block_size, e) < 0 ||
	    optlist_get_bool(opts, "block_state_zero", &bsz, e) < 0)
		goto out;
	if (sub && !strcmp(sub, "fixed"))
		fixed = true;
	else if (sub && strcmp(sub, "dynamic")) {
		err_set(e, "Parameter 'subformat' does not accept value '%s'",
			sub);
		goto out;
	}
	if (size > VHDX_MAX_SIZE) {
		err_set(e, "Image size too large; max of 64TB");
		goto out;
	}
	size = ALIGN_UP(size, 512);
	if (log_size > UINT32_MAX)
		log_size = UINT32_MAX;
	log_size = ALIGN_UP(log_size, VHDX_MIB);
	if (!log_size || log_size > UINT32_MAX) {
		err_set(e, "Log size must be a multiple of 1 MB");
		goto out;
	}
	if (!block_size) {
		if (size > 32ULL << 40)
			block_size = 64 * VHDX_MIB;
		else if (size > 100ULL << 30)
			block_size = 32 * VHDX_MIB;
		else if (size > 1ULL << 30)
			block_size = 16 * VHDX_MIB;
		else
			block_size = 8 * VHDX_MIB;
	}
	if (block_size > VHDX_MAX_BLOCK)
		block_size = VHDX_MAX_BLOCK;
	block_size = ALIGN_UP(block_size, VHDX_MIB);
	if (block_size & (block_size - 1)) {
		err_set(e, "Block size must be a power of two");
		goto out;
	}
	(void)bsz;	/* new blocks are NOT_PRESENT, which reads as zero */

	blocks = DIV_ROUND_UP(size, block_size);
	ratio = (1ULL << 23) * 512 / block_size;
	bat_entries = blocks ? blocks + (blocks - 1) / ratio : 0;
	bat_off = VHDX_MIB + log_size;
	bat_len = ALIGN_UP(MAX(bat_entries * 8, 1), VHDX_MIB);
	meta_off = bat_off + bat_len;
	data_off = meta_off + VHDX_MIB;
	end = fixed ? data_off + blocks * block_size : data_off;
	if (bat_entries * 8 > VHDX_MAX_BAT_BYTES || bat_len > UINT32_MAX) {
		err_set(e, "Image size too large");
		ret = -EFBIG;
		goto out;
	}
	buf = calloc(1, VHDX_REGION_SIZE);
	if (!buf) {
		ret = -ENOMEM;
		goto out;
	}
	ret = bfile_truncate(f, end, PREALLOC_OFF, e);
	if (ret < 0)
		goto out;

	/* file type identifier: signature and UTF-16 creator */
	{
		const char *creator = "imgbox";
		memcpy(buf, "vhdxfile", 8);
		for (size_t i = 0; creator[i]; i++)
			st_le16(buf + 8 + 2 * i, (uint16_t)creator[i]);
		ret = bfile_pwrite(f, 0, buf, 512);
		if (ret < 0)
			goto out;
	}
	/* headers: sequence 0 and 1, no log */
	for (int i = 0; i < 2; i++) {
		uint8_t *h = buf;

		memset(h, 0, VHDX_HEADER_SIZE);
		memcpy(h, "head", 4);
		st_le64(h + 8, (uint64_t)i);
		vhdx_guid_random(h + 16);
		vhdx_guid_random(h + 32);
		st_le16(h + 64, 0);
		st_le16(h + 66, 1);
		st_le32(h + 68, (uint32_t)log_size);
		st_le64(h + 72, VHDX_MIB);
		st_le32(h + 4, vhdx_checksum(h, VHDX_HEADER_SIZE, 4));
		ret = bfile_pwrite(f, i ? VHDX_HEADER2_OFF : VHDX_HEADER1_OFF,
				   h, VHDX_HEADER_SIZE);
		if (ret < 0)
			goto out;
	}
	/* region tables (both copies identical) */
	memset(buf, 0, VHDX_REGION_SIZE);
	memcpy(buf, "regi", 4);
	st_le32(buf + 8, 2);
	memcpy(buf + 16, guids[G_BAT], 16);
	st_le64(buf + 32, bat_off);
	st_le32(buf + 40, (uint32_t)bat_len);
	st_le32(buf + 44, 1);	/* required */
	memcpy(buf + 48, guids[G_METADATA], 16);
	st_le64(buf + 64, meta_off);
	st_le32(buf + 72, VHDX_MIB);
	st_le32(buf + 76, 1);
	st_le32(buf + 4, vhdx_checksum(buf, VHDX_REGION_SIZE, 4));
	ret = bfile_pwrite(f, VHDX_REGION1_OFF, buf, VHDX_REGION_SIZE);
	if (ret == 0)
		ret = bfile_pwrite(f, VHDX_REGION2_OFF, buf, VHDX_REGION_SIZE);
	if (ret < 0)
		goto out;
	/* metadata table and items */
	memset(buf, 0, VHDX_REGION_SIZE);
	memcpy(buf, "metadata", 8);
	st_le16(buf + 10, 5);
	put_meta_entry(buf, 0, guids[G_FILE_PARAMS], 0x10000, 8, 4);
	put_meta_entry(buf, 1, guids[G_DISK_SIZE], 0x10008, 8, 6);
	put_meta_entry(buf, 2, guids[G_PAGE83], 0x10010, 16, 6);
	put_meta_entry(buf, 3, guids[G_LOGICAL_SECTOR], 0x10020, 4, 6);
	put_meta_entry(buf, 4, guids[G_PHYSICAL_SECTOR], 0x10024, 4, 6);
	ret = bfile_pwrite(f, meta_off, buf, VHDX_METADATA_TABLE_SIZE);
	if (ret < 0)
		goto out;
	memset(buf, 0, 64);
	st_le32(buf, (uint32_t)block_size);
	st_le32(buf + 4, 0);		/* leave allocated: 0, no parent */
	st_le64(buf + 8, size);
	vhdx_guid_random(buf + 16);
	st_le32(buf + 32, 512);
	st_le32(buf + 36, 512);
	ret = bfile_pwrite(f, meta_off + 0x10000, buf, 40);
	if (ret < 0)
		goto out;
	/* BAT: fixed images map every block in order */
	if (fixed && blocks) {
		uint64_t chunk = VHDX_REGION_SIZE / 8, i = 0, b = 0;

		while (i < bat_entries) {
			uint64_t k = 0;

			memset(buf, 0, VHDX_REGION_SIZE);
			for (; k < chunk && i < bat_entries; k++, i++) {
				if ((i + 1) % (ratio + 1) == 0)
					continue;	/* bitmap entry */
				st_le64(buf + k * 8, (data_off +
					b * block_size) |
					VHDX_BAT_FULLY_PRESENT);
				b++;
			}
			ret = bfile_pwrite(f, bat_off + (i - k) * 8, buf,
					   (size_t)(k * 8));
			if (ret < 0)
				goto out;
		}
	}
out:
	free(buf);
	return fmt_create_end(f, ret, "Could not write the image", e);
}

const struct blk_driver vhdx_driver = {
	FMT_DRIVER(vhdx, struct vhdx),
	.caps = BLK_CAP_CREATE | BLK_CAP_WRITE | BLK_CAP_ZERO_INIT |
		BLK_CAP_CHECK,
	FMT_MAPPED_RW,
	.pwrite_zeroes = vhdx_pwrite_zeroes,
	.check = vhdx_check,
};
