/* vdi.c - VirtualBox Disk Images (VDI 1.1): a 512-byte header, a block
 * map of little-endian 32-bit block numbers and 1 MiB data blocks. */
//config:config FORMAT_VDI
//config:	bool "vdi"
//config:	default y
//config:	help
//config:	  VirtualBox disk images (version 1.1), dynamic (blocks
//config:	  allocated on first write) and static (all blocks allocated at
//config:	  creation). Reads, writes, creates and checks them as QEMU
//config:	  does (1 MiB blocks only).
//format:FORMAT(vdi)

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include "fmt.h"

/* Header layout, byte offsets (VirtualBox VDIHEADER1 after the 64-byte
 * text pre-header). All fields are little-endian. */
#define VDI_TEXT		0x000	/* 64 bytes of text */
#define VDI_SIGNATURE		0x040
#define VDI_VERSION		0x044
#define VDI_HEADER_SIZE		0x048
#define VDI_IMAGE_TYPE		0x04c
#define VDI_IMAGE_FLAGS		0x050
#define VDI_DESCRIPTION		0x054	/* 256 bytes */
#define VDI_OFFSET_BMAP		0x154
#define VDI_OFFSET_DATA		0x158
#define VDI_CYLINDERS		0x15c
#define VDI_HEADS		0x160
#define VDI_SECTORS		0x164
#define VDI_SECTOR_SIZE		0x168
#define VDI_DISK_SIZE		0x170	/* 64 bits */
#define VDI_BLOCK_SIZE		0x178
#define VDI_BLOCK_EXTRA		0x17c
#define VDI_BLOCKS		0x180	/* blocks in image */
#define VDI_BLOCKS_ALLOCATED	0x184
#define VDI_UUID_IMAGE		0x188
#define VDI_UUID_LAST_SNAP	0x198
#define VDI_UUID_LINK		0x1a8
#define VDI_UUID_PARENT		0x1b8
#define VDI_HDR_LEN		512

#define VDI_MAGIC		0xbeda107fu
#define VDI_VERSION_1_1		0x00010001u
#define VDI_TYPE_DYNAMIC	1
#define VDI_TYPE_STATIC		2
#define VDI_BLOCK		(1u << 20)
/* Block map entries at or above this value are not allocated: ~0 is
 * "never written", ~0-1 is "discarded"; both read as zeroes. */
#define VDI_FIRST_FREE		0xfffffffeu
#define VDI_UNALLOCATED		0xffffffffu
/* The largest image QEMU accepts, in blocks (its limit, kept so that
 * the same images are refused). */
#define VDI_MAX_BLOCKS		0x1fffff80u
/* Memory cap for the block map (4 bytes per MiB: 64 TiB of disk). */
#define VDI_MAX_BMAP		(256u << 20)

struct vdi_state {
	const struct fmt_map *map;	/* first: fmt_map_* find it here */
	uint32_t *bmap;			/* host-endian block map */
	uint32_t blocks;		/* entries in the map */
	uint32_t allocated;		/* blocks_allocated of the header */
	uint32_t bmap_off, data_off;
	uint64_t disk_size;
	bool overlap;			/* data area over header or map */
};

static const struct optdesc vdi_create_opts[] = {
	FMT_OPT_SIZE,
	{ "static", OPT_BOOL, "VDI static (pre-allocated) image", "off",
	  false },
	FMT_OPT_FILE
};

static const struct fmt_map vdi_map;

static int vdi_probe(const uint8_t *buf, size_t len, const char *filename)
{
	(void)filename;
	if (len < VDI_SIGNATURE + 4 ||
	    ld_le32(buf + VDI_SIGNATURE) != VDI_MAGIC)
		return 0;
	return 100;
}

static int uuid_is_null(const uint8_t *u)
{
	return buffer_is_zero(u, 16);
}

static int vdi_open(struct blk *bs, struct err *e)
{
	struct vdi_state *s = bs->opaque;
	uint8_t h[VDI_HDR_LEN];
	uint32_t v, bsize, ssize;
	uint64_t bmap_len, room;
	/* A short file reads as zero-padded, as qemu reads it. */
	int64_t fsize = fmt_read_header(bs, h, sizeof(h), "VDI header", e);
	int ret;

	if (fsize < 0)
		return (int)fsize;
	v = ld_le32(h + VDI_SIGNATURE);
	if (v != VDI_MAGIC)
		return fmt_err(e, -EINVAL, "Image not in VDI format (bad "
			       "signature %08" PRIx32 ")", v);
	v = ld_le32(h + VDI_VERSION);
	if (v != VDI_VERSION_1_1)
		return fmt_err(e, -ENOTSUP, "unsupported VDI image (version "
			       "%" PRIu32 ".%" PRIu32 ")", v >> 16, v & 0xffff);
	s->bmap_off = ld_le32(h + VDI_OFFSET_BMAP);
	s->data_off = ld_le32(h + VDI_OFFSET_DATA);
	ssize = ld_le32(h + VDI_SECTOR_SIZE);
	bsize = ld_le32(h + VDI_BLOCK_SIZE);
	s->disk_size = ld_le64(h + VDI_DISK_SIZE);
	s->blocks = ld_le32(h + VDI_BLOCKS);
	s->allocated = ld_le32(h + VDI_BLOCKS_ALLOCATED);
	if (s->bmap_off % 512)
		return fmt_err(e, -ENOTSUP, "unsupported VDI image (unaligned "
			       "block map offset 0x%" PRIx32 ")", s->bmap_off);
	if (s->data_off % 512)
		return fmt_err(e, -ENOTSUP, "unsupported VDI image (unaligned "
			       "data offset 0x%" PRIx32 ")", s->data_off);
	if (ssize != 512)
		return fmt_err(e, -ENOTSUP, "unsupported VDI image (sector "
			       "size %" PRIu32 " is not 512)", ssize);
	if (bsize != VDI_BLOCK)
		return fmt_err(e, -ENOTSUP, "unsupported VDI image (block "
			       "size %" PRIu32 " is not %u)", bsize, VDI_BLOCK);
	/* Sizes that are not whole sectors (VirtualBox makes them) are
	 * rounded up, as qemu does; the room check below catches a wrap. */
	if (s->disk_size % 512 && s->disk_size < UINT64_MAX - 511)
		s->disk_size = ALIGN_UP(s->disk_size, 512);
	room = (uint64_t)s->blocks * VDI_BLOCK;
	if (s->disk_size > room)
		return fmt_err(e, -ENOTSUP, "unsupported VDI image (disk size "
			       "%" PRIu64 ", image bitmap has room for %" PRIu64
			       ")", s->disk_size, room);
	if (s->blocks > VDI_MAX_BLOCKS)
		return fmt_err(e, -ENOTSUP, "unsupported VDI image (too many "
			       "blocks %" PRIu32 ", max is %u)", s->blocks,
			       VDI_MAX_BLOCKS);
	if (!uuid_is_null(h + VDI_UUID_LINK))
		return fmt_err(e, -ENOTSUP, "unsupported VDI image (non-NULL "
			       "link UUID)");
	if (!uuid_is_null(h + VDI_UUID_PARENT))
		return fmt_err(e, -ENOTSUP, "unsupported VDI image (non-NULL "
			       "parent UUID)");
	/* Our own limits: the map is read whole, so it must fit the memory
	 * cap and lie inside the file (every writer places it there). */
	bmap_len = (uint64_t)s->blocks * 4;
	if (bmap_len > VDI_MAX_BMAP)
		return fmt_err(e, -EFBIG, "unsupported VDI image (block map of "
			       "%" PRIu64 " bytes is too large)", bmap_len);
	if ((uint64_t)s->bmap_off + bmap_len > (uint64_t)fsize)
		return fmt_err(e, -EINVAL, "VDI block map is beyond the end "
			       "of the file");
	if (blk_meta_alloc(bs, bmap_len, "VDI block map", e) < 0)
		return -EFBIG;
	s->bmap = malloc(bmap_len ? bmap_len : 1);
	if (!s->bmap)
		return fmt_err(e, -ENOMEM, "Could not allocate the VDI block "
			       "map");
	ret = bfile_pread(bs->file, s->bmap_off, s->bmap, bmap_len);
	if (ret < 0) {
		/* close is not called after a failed open */
		free(s->bmap);
		s->bmap = NULL;
		return fmt_err(e, ret, "Could not read VDI block map: %s",
			       strerror(-ret));
	}
	for (uint32_t i = 0; i < s->blocks; i++)
		s->bmap[i] = ld_le32(&s->bmap[i]);
	/* qemu reads such images; writing them would destroy metadata. */
	{
		uint64_t d0 = s->data_off, d1 = d0 + room;

		s->overlap = d0 < VDI_HDR_LEN ||
			     (bmap_len && d0 < s->bmap_off + bmap_len &&
			      s->bmap_off < d1);
	}
	bs->size = s->disk_size;
	s->map = &vdi_map;
	return 0;
}

static void vdi_close(struct blk *bs)
{
	struct vdi_state *s = bs->opaque;

	free(s->bmap);
	s->bmap = NULL;
}

/* Host offset of the data of block idx (allocated entries only). */
static uint64_t vdi_host(const struct vdi_state *s, uint32_t entry)
{
	return s->data_off + (uint64_t)entry * VDI_BLOCK;
}

/* One block at a time: free blocks read as zeroes, and the holes of a
 * (sparse) static image too. */
static int vdi_lookup(struct blk *bs, uint64_t off, uint64_t len,
		      enum fmt_op op, struct fmt_run *r)
{
	struct vdi_state *s = bs->opaque;
	uint64_t idx = off / VDI_BLOCK, in = off % VDI_BLOCK;
	uint32_t entry = idx < s->blocks ? s->bmap[idx] : VDI_UNALLOCATED;

	if (op == FMT_WRITE) {
		if (s->overlap) {
			snprintf(bs->errmsg, sizeof(bs->errmsg), "VDI data "
				 "area overlaps the header or the block map");
			return -EIO;
		}
		if (idx >= s->blocks)
			return -EINVAL;
		if (entry < VDI_FIRST_FREE && entry >= s->blocks)
			return -EIO;	/* corrupt map: check reports it */
	}
	r->len = MIN(len, VDI_BLOCK - in);
	r->entry = idx;
	r->kind = entry >= VDI_FIRST_FREE ? FMT_ZERO : FMT_DATA_FILE;
	r->host = vdi_host(s, entry) + in;
	return 0;
}

/* Give block idx a data block at the end of the data area: the whole
 * block is written (zeroes around the new data), then the header's
 * allocation count, then the map entry. A failure between the last two
 * leaves a block counted but unused (check calls it a mismatch); the
 * other order would hand the block out again after a reopen. */
static int vdi_allocate(struct blk *bs, uint64_t off, const uint8_t *data,
			struct fmt_run *r)
{
	struct vdi_state *s = bs->opaque;
	uint64_t idx = r->entry, in = off % VDI_BLOCK;
	size_t n = (size_t)r->len;
	uint8_t le[4], *blk;
	uint32_t entry = s->allocated;
	int ret;

	if (entry >= s->blocks || entry >= VDI_FIRST_FREE)
		return -ENOSPC;	/* the header's count is corrupt */
	if (n == VDI_BLOCK) {
		ret = bfile_pwrite(bs->file, vdi_host(s, entry), data, n);
	} else {
		blk = blk_alloc_buf(VDI_BLOCK);
		if (!blk)
			return -ENOMEM;
		memset(blk, 0, VDI_BLOCK);
		memcpy(blk + in, data, n);
		ret = bfile_pwrite(bs->file, vdi_host(s, entry), blk,
				   VDI_BLOCK);
		free(blk);
	}
	if (ret < 0)
		return ret;
	st_le32(le, entry + 1);
	ret = bfile_pwrite(bs->file, VDI_BLOCKS_ALLOCATED, le, 4);
	if (ret < 0)
		return ret;
	s->allocated = entry + 1;
	st_le32(le, entry);
	ret = bfile_pwrite(bs->file, s->bmap_off + idx * 4, le, 4);
	if (ret < 0)
		return ret;
	s->bmap[idx] = entry;
	return 0;
}

static const struct fmt_map vdi_map = {
	.lookup = vdi_lookup,
	.alloc_write = vdi_allocate,
};

static int vdi_get_info(struct blk *bs, struct blk_info *bi)
{
	(void)bs;
	bi->cluster_size = VDI_BLOCK;
	return 0;
}

/* Every allocated block number must be inside the image and used once,
 * and the header's count must match; the messages are QEMU's. */
static int vdi_check(struct blk *bs, struct check_result *res, int fix)
{
	struct vdi_state *s = bs->opaque;
	uint32_t *owner, used = 0;

	if (fix)
		return -ENOTSUP;	/* as qemu: checking only */
	owner = malloc(((size_t)s->blocks ? s->blocks : 1) * sizeof(*owner));
	if (!owner)
		return -ENOMEM;
	for (uint32_t i = 0; i < s->blocks; i++)
		owner[i] = VDI_UNALLOCATED;
	for (uint32_t i = 0; i < s->blocks; i++) {
		uint32_t entry = s->bmap[i];

		if (entry >= VDI_FIRST_FREE)
			continue;
		if (entry >= s->blocks) {
			check_report(res, CHECK_LINE, "ERROR: block index %"
				     PRIu32 " too large, is %" PRIu32, i,
				     entry);
			res->corruptions++;
			continue;
		}
		used++;
		if (owner[entry] != VDI_UNALLOCATED) {
			/* QEMU names the block number twice */
			check_report(res, CHECK_LINE, "ERROR: block index %"
				     PRIu32 " also used by %" PRIu32, entry,
				     entry);
			res->corruptions++;
		} else {
			owner[entry] = i;
		}
	}
	free(owner);
	if (used != s->allocated) {
		check_report(res, CHECK_LINE, "ERROR: allocated blocks "
			     "mismatch, is %" PRIu32 ", should be %" PRIu32,
			     used, s->allocated);
		res->corruptions++;
	}
	return 0;
}

static int vdi_create(const char *filename, const struct optlist *opts,
		      struct err *e)
{
	uint64_t size = 0, blocks, bmap_len, data_off, off;
	bool is_static = false;
	uint8_t h[VDI_HDR_LEN], *buf = NULL;
	struct bfile *f;
	int prealloc, ret;
	size_t chunk = 64 << 10;

	if (optlist_get_size(opts, "size", &size, e) < 0 ||
	    optlist_get_bool(opts, "static", &is_static, e) < 0)
		return -EINVAL;
	ret = fmt_opt_prealloc(opts, &prealloc, e);
	if (ret == 0)
		ret = fmt_no_backing(opts, "vdi", e);
	/* Like QEMU, the file exists (empty) when the size is refused. */
	if (ret == 0)
		ret = fmt_create_file(&f, filename, e);
	if (ret < 0)
		return ret;
	size = ALIGN_UP(MIN(size, (uint64_t)INT64_MAX), 512);
	if (size > (uint64_t)VDI_MAX_BLOCKS * VDI_BLOCK) {
		ret = fmt_err(e, -ENOTSUP, "Unsupported VDI image size (size "
			      "is 0x%" PRIx64 ", max supported is 0x%" PRIx64
			      ")", size, (uint64_t)VDI_MAX_BLOCKS * VDI_BLOCK);
		goto out;
	}
	blocks = DIV_ROUND_UP(size, VDI_BLOCK);
	bmap_len = ALIGN_UP(blocks * 4, 512);
	data_off = 512 + bmap_len;

	memset(h, 0, sizeof(h));
	snprintf((char *)h + VDI_TEXT, 64, "%s",
		 "<<< QEMU VM Virtual Disk Image >>>\n");
	st_le32(h + VDI_SIGNATURE, VDI_MAGIC);
	st_le32(h + VDI_VERSION, VDI_VERSION_1_1);
	st_le32(h + VDI_HEADER_SIZE, 0x180);
	st_le32(h + VDI_IMAGE_TYPE, is_static ? VDI_TYPE_STATIC
					      : VDI_TYPE_DYNAMIC);
	st_le32(h + VDI_OFFSET_BMAP, 512);
	st_le32(h + VDI_OFFSET_DATA, (uint32_t)data_off);
	st_le32(h + VDI_SECTOR_SIZE, 512);
	st_le64(h + VDI_DISK_SIZE, size);
	st_le32(h + VDI_BLOCK_SIZE, VDI_BLOCK);
	st_le32(h + VDI_BLOCKS, (uint32_t)blocks);
	st_le32(h + VDI_BLOCKS_ALLOCATED, is_static ? (uint32_t)blocks : 0);
	/* Random (version 4) UUIDs for the image and its last change. */
	if (getrandom(h + VDI_UUID_IMAGE, 32, 0) != 32) {
		for (int i = 0; i < 32; i++)
			h[VDI_UUID_IMAGE + i] = (uint8_t)rand();
	}
	for (int u = VDI_UUID_IMAGE; u <= VDI_UUID_LAST_SNAP; u += 16) {
		h[u + 7] = (uint8_t)((h[u + 7] & 0x0f) | 0x40);
		h[u + 8] = (uint8_t)((h[u + 8] & 0x3f) | 0x80);
	}

	ret = bfile_pwrite(f, 0, h, sizeof(h));
	if (ret < 0)
		goto out;
	buf = malloc(chunk);
	if (!buf) {
		ret = -ENOMEM;
		goto out;
	}
	/* The map: "never written" everywhere, or block i at data block i
	 * in a static image; the tail of its last sector is zero. */
	for (off = 0; off < bmap_len; off += chunk) {
		size_t n = (size_t)MIN((uint64_t)chunk, bmap_len - off);

		memset(buf, 0, n);
		for (size_t i = 0; i < n / 4; i++) {
			uint64_t b = off / 4 + i;
			uint32_t v = is_static ? (uint32_t)b : VDI_UNALLOCATED;

			if (b < blocks)
				st_le32(buf + i * 4, v);
		}
		ret = bfile_pwrite(f, 512 + off, buf, n);
		if (ret < 0)
			goto out;
	}
	/* QEMU leaves the data area of a static image sparse whatever
	 * the preallocation mode (it only applies to the empty file). */
	if (is_static)
		ret = bfile_truncate(f, data_off + blocks * VDI_BLOCK,
				     PREALLOC_OFF, e);
out:
	free(buf);
	return fmt_create_end(f, ret, "Could not write to the new file", e);
}

const struct blk_driver vdi_driver = {
	FMT_DRIVER(vdi, struct vdi_state),
	.caps = BLK_CAP_CREATE | BLK_CAP_WRITE | BLK_CAP_ZERO_INIT |
		BLK_CAP_CHECK,
	FMT_MAPPED_IO,
	.check = vdi_check,
};
