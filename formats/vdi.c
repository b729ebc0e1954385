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
#include "blk_driver.h"

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
	uint32_t *bmap;			/* host-endian block map */
	uint32_t blocks;		/* entries in the map */
	uint32_t allocated;		/* blocks_allocated of the header */
	uint32_t bmap_off, data_off;
	uint64_t disk_size;
	bool overlap;			/* data area over header or map */
};

static const struct optdesc vdi_create_opts[] = {
	{ "size", OPT_SIZE, "Virtual disk size", NULL, false },
	{ "static", OPT_BOOL, "VDI static (pre-allocated) image", "off",
	  false },
	{ "preallocation", OPT_STRING,
	  "Preallocation mode (allowed values: off, falloc, full)", NULL,
	  true },
	{ "nocow", OPT_BOOL, "Turn off copy-on-write (valid only on btrfs)",
	  NULL, true },
	{ "extent_size_hint", OPT_SIZE,
	  "Extent size hint for the image file, 0 to disable", NULL, true },
	{ NULL, 0, NULL, NULL, false }
};

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
	int64_t fsize = bfile_size(bs->file);
	int ret;

	if (fsize < 0) {
		err_set(e, "Could not get the size of '%s': %s", bs->filename,
			strerror((int)-fsize));
		return (int)fsize;
	}
	/* A short file reads as zero-padded, as qemu reads it. */
	ret = bfile_pread(bs->file, 0, h, sizeof(h));
	if (ret < 0) {
		err_set(e, "Could not read VDI header: %s", strerror(-ret));
		return ret;
	}
	v = ld_le32(h + VDI_SIGNATURE);
	if (v != VDI_MAGIC) {
		err_set(e, "Image not in VDI format (bad signature %08" PRIx32
			")", v);
		return -EINVAL;
	}
	v = ld_le32(h + VDI_VERSION);
	if (v != VDI_VERSION_1_1) {
		err_set(e, "unsupported VDI image (version %" PRIu32 ".%"
			PRIu32 ")", v >> 16, v & 0xffff);
		return -ENOTSUP;
	}
	s->bmap_off = ld_le32(h + VDI_OFFSET_BMAP);
	s->data_off = ld_le32(h + VDI_OFFSET_DATA);
	ssize = ld_le32(h + VDI_SECTOR_SIZE);
	bsize = ld_le32(h + VDI_BLOCK_SIZE);
	s->disk_size = ld_le64(h + VDI_DISK_SIZE);
	s->blocks = ld_le32(h + VDI_BLOCKS);
	s->allocated = ld_le32(h + VDI_BLOCKS_ALLOCATED);
	if (s->bmap_off % 512) {
		err_set(e, "unsupported VDI image (unaligned block map offset "
			"0x%" PRIx32 ")", s->bmap_off);
		return -ENOTSUP;
	}
	if (s->data_off % 512) {
		err_set(e, "unsupported VDI image (unaligned data offset 0x%"
			PRIx32 ")", s->data_off);
		return -ENOTSUP;
	}
	if (ssize != 512) {
		err_set(e, "unsupported VDI image (sector size %" PRIu32
			" is not 512)", ssize);
		return -ENOTSUP;
	}
	if (bsize != VDI_BLOCK) {
		err_set(e, "unsupported VDI image (block size %" PRIu32
			" is not %u)", bsize, VDI_BLOCK);
		return -ENOTSUP;
	}
	/* Sizes that are not whole sectors (VirtualBox makes them) are
	 * rounded up, as qemu does; the room check below catches a wrap. */
	if (s->disk_size % 512 && s->disk_size < UINT64_MAX - 511)
		s->disk_size = ALIGN_UP(s->disk_size, 512);
	room = (uint64_t)s->blocks * VDI_BLOCK;
	if (s->disk_size > room) {
		err_set(e, "unsupported VDI image (disk size %" PRIu64
			", image bitmap has room for %" PRIu64 ")",
			s->disk_size, room);
		return -ENOTSUP;
	}
	if (s->blocks > VDI_MAX_BLOCKS) {
		err_set(e, "unsupported VDI image (too many blocks %" PRIu32
			", max is %u)", s->blocks, VDI_MAX_BLOCKS);
		return -ENOTSUP;
	}
	if (!uuid_is_null(h + VDI_UUID_LINK)) {
		err_set(e, "unsupported VDI image (non-NULL link UUID)");
		return -ENOTSUP;
	}
	if (!uuid_is_null(h + VDI_UUID_PARENT)) {
		err_set(e, "unsupported VDI image (non-NULL parent UUID)");
		return -ENOTSUP;
	}
	/* Our own limits: the map is read whole, so it must fit the memory
	 * cap and lie inside the file (every writer places it there). */
	bmap_len = (uint64_t)s->blocks * 4;
	if (bmap_len > VDI_MAX_BMAP) {
		err_set(e, "unsupported VDI image (block map of %" PRIu64
			" bytes is too large)", bmap_len);
		return -EFBIG;
	}
	if ((uint64_t)s->bmap_off + bmap_len > (uint64_t)fsize) {
		err_set(e, "VDI block map is beyond the end of the file");
		return -EINVAL;
	}
	s->bmap = malloc(bmap_len ? bmap_len : 1);
	if (!s->bmap) {
		err_set(e, "Could not allocate the VDI block map");
		return -ENOMEM;
	}
	ret = bfile_pread(bs->file, s->bmap_off, s->bmap, bmap_len);
	if (ret < 0) {
		err_set(e, "Could not read VDI block map: %s", strerror(-ret));
		/* close is not called after a failed open */
		free(s->bmap);
		s->bmap = NULL;
		return ret;
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

static int vdi_pread(struct blk *bs, uint64_t off, void *buf, size_t len)
{
	struct vdi_state *s = bs->opaque;
	uint8_t *p = buf;

	while (len) {
		uint64_t idx = off / VDI_BLOCK, in = off % VDI_BLOCK;
		size_t n = (size_t)MIN((uint64_t)len, VDI_BLOCK - in);
		uint32_t entry = idx < s->blocks ? s->bmap[idx]
						  : VDI_UNALLOCATED;
		int ret = 0;

		if (entry >= VDI_FIRST_FREE)
			memset(p, 0, n);
		else
			ret = bfile_pread(bs->file, vdi_host(s, entry) + in, p,
					  n);
		if (ret < 0)
			return ret;
		p += n;
		off += n;
		len -= n;
	}
	return 0;
}

/* Give block idx a data block at the end of the data area: the whole
 * block is written (zeroes around the new data) before the map entry and
 * the header's allocation count point at it. */
static int vdi_allocate(struct blk *bs, uint64_t idx, uint64_t in,
			const void *data, size_t n)
{
	struct vdi_state *s = bs->opaque;
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
	st_le32(le, entry);
	ret = bfile_pwrite(bs->file, s->bmap_off + idx * 4, le, 4);
	if (ret < 0)
		return ret;
	s->bmap[idx] = entry;
	s->allocated = entry + 1;
	st_le32(le, s->allocated);
	return bfile_pwrite(bs->file, VDI_BLOCKS_ALLOCATED, le, 4);
}

static int vdi_pwrite(struct blk *bs, uint64_t off, const void *buf,
		      size_t len)
{
	struct vdi_state *s = bs->opaque;
	const uint8_t *p = buf;

	if (s->overlap) {
		snprintf(bs->errmsg, sizeof(bs->errmsg), "VDI data area "
			 "overlaps the header or the block map");
		return -EIO;
	}
	while (len) {
		uint64_t idx = off / VDI_BLOCK, in = off % VDI_BLOCK;
		size_t n = (size_t)MIN((uint64_t)len, VDI_BLOCK - in);
		uint32_t entry;
		int ret;

		if (idx >= s->blocks)
			return -EINVAL;
		entry = s->bmap[idx];
		if (entry >= VDI_FIRST_FREE)
			ret = vdi_allocate(bs, idx, in, p, n);
		else if (entry >= s->blocks)
			ret = -EIO;	/* corrupt map: check reports it */
		else
			ret = bfile_pwrite(bs->file, vdi_host(s, entry) + in,
					   p, n);
		if (ret < 0)
			return ret;
		p += n;
		off += n;
		len -= n;
	}
	return 0;
}

static int vdi_block_status(struct blk *bs, uint64_t off, uint64_t len,
			    uint64_t *pnum, uint64_t *map,
			    struct bfile **mfile)
{
	struct vdi_state *s = bs->opaque;
	uint64_t idx = off / VDI_BLOCK, in = off % VDI_BLOCK, fnum;
	uint32_t entry = idx < s->blocks ? s->bmap[idx] : VDI_UNALLOCATED;
	int st;

	*pnum = MIN(len, VDI_BLOCK - in);
	if (entry >= VDI_FIRST_FREE)
		return BLK_STAT_ZERO | BLK_STAT_ALLOCATED;
	*map = vdi_host(s, entry) + in;
	*mfile = bs->file;
	/* Holes in the file (a static image is sparse) read as zeroes. */
	st = bfile_block_status(bs->file, *map, *pnum, &fnum);
	if (st < 0)
		return st;
	if (fnum && fnum < *pnum)
		*pnum = fnum;
	return BLK_STAT_DATA | BLK_STAT_ALLOCATED | BLK_STAT_OFFSET |
	       (st & BLK_STAT_ZERO);
}

static int vdi_flush(struct blk *bs)
{
	return bfile_flush(bs->file);
}

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
	const char *p = optlist_get(opts, "preallocation");
	uint8_t h[VDI_HDR_LEN], *buf = NULL;
	struct bfile *f;
	int prealloc = PREALLOC_OFF, ret;
	size_t chunk = 64 << 10;

	if (optlist_get_size(opts, "size", &size, e) < 0 ||
	    optlist_get_bool(opts, "static", &is_static, e) < 0)
		return -EINVAL;
	if (p && blk_parse_prealloc(p, &prealloc) < 0) {
		err_set(e, "invalid parameter value: %s", p);
		return -EINVAL;
	}
	if (optlist_get(opts, "backing_file")) {
		err_set(e, "Backing file not supported for file format 'vdi'");
		return -ENOTSUP;
	}
	/* Like QEMU, the file exists (empty) when the size is refused. */
	ret = bfile_open(&f, filename, BFILE_CREATE | BFILE_RDWR,
			 CACHE_WRITEBACK, e);
	if (ret < 0)
		return ret;
	size = ALIGN_UP(MIN(size, (uint64_t)INT64_MAX), 512);
	if (size > (uint64_t)VDI_MAX_BLOCKS * VDI_BLOCK) {
		err_set(e, "Unsupported VDI image size (size is 0x%" PRIx64
			", max supported is 0x%" PRIx64 ")", size,
			(uint64_t)VDI_MAX_BLOCKS * VDI_BLOCK);
		ret = -ENOTSUP;
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
		goto werr;
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
			goto werr;
	}
	if (is_static) {
		/* QEMU leaves the data area sparse whatever the
		 * preallocation mode (it only applies to the empty file). */
		ret = bfile_truncate(f, data_off + blocks * VDI_BLOCK,
				     PREALLOC_OFF, e);
		if (ret < 0)
			goto out;
	}
	ret = bfile_flush(f);
	if (ret < 0)
		goto werr;
	goto out;
werr:
	err_set(e, "Could not write to the new file: %s", strerror(-ret));
out:
	free(buf);
	bfile_close(f);
	return ret;
}

const struct blk_driver vdi_driver = {
	.name = "vdi",
	.caps = BLK_CAP_CREATE | BLK_CAP_WRITE | BLK_CAP_ZERO_INIT |
		BLK_CAP_CHECK,
	.state_size = sizeof(struct vdi_state),
	.create_opts = vdi_create_opts,
	.probe = vdi_probe,
	.open = vdi_open,
	.close = vdi_close,
	.pread = vdi_pread,
	.pwrite = vdi_pwrite,
	.block_status = vdi_block_status,
	.flush = vdi_flush,
	.create = vdi_create,
	.get_info = vdi_get_info,
	.check = vdi_check,
};
