/* vpc.c - Virtual PC / Hyper-V virtual hard disks (VHD): a 512-byte
 * big-endian footer at the end of the file, and for dynamic disks a copy of
 * it at offset 0, a dynamic header and a block allocation table (BAT). */
//config:config FORMAT_VPC
//config:	bool "vpc"
//config:	default y
//config:	help
//config:	  VHD images of Virtual PC, Hyper-V and others (qemu's "vpc"):
//config:	  fixed disks (raw data followed by a footer) and dynamic disks
//config:	  (blocks allocated on first write). The virtual size follows
//config:	  qemu's rules (CHS geometry or the footer's current size).
//format:FORMAT(vpc)

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/random.h>
#include "fmt.h"

/* Footer (VHD specification, "Hard Disk Footer Format"), big-endian. */
#define FT_COOKIE		0	/* "conectix" */
#define FT_FEATURES		8
#define FT_VERSION		12
#define FT_DATA_OFFSET		16	/* 64: to the dyn. header */
#define FT_TIMESTAMP		24	/* seconds since 2000-01-01 UTC */
#define FT_CREATOR_APP		28
#define FT_CREATOR_VER		32
#define FT_CREATOR_OS		36
#define FT_ORIG_SIZE		40	/* 64 */
#define FT_CUR_SIZE		48	/* 64 */
#define FT_CYLS			56	/* 16 */
#define FT_HEADS		58	/* 8 */
#define FT_SECS			59	/* 8 */
#define FT_TYPE			60
#define FT_CHECKSUM		64
#define FT_UUID			68	/* 16 */
#define FT_LEN			512

/* Dynamic disk header ("Dynamic Disk Header Format"), big-endian. */
#define DH_COOKIE		0	/* "cxsparse" */
#define DH_DATA_OFFSET		8	/* 64, unused: ~0 */
#define DH_TABLE_OFFSET		16	/* 64: the BAT */
#define DH_VERSION		24
#define DH_MAX_ENTRIES		28
#define DH_BLOCK_SIZE		32
#define DH_CHECKSUM		36
#define DH_LEN			1024

#define VHD_FIXED		2
#define VHD_DYNAMIC		3
#define VHD_UNALLOCATED		0xffffffffu
#define VHD_BLOCK_DEFAULT	(2u << 20)
/* The largest CHS geometry: 65535 cylinders, 16 heads, 255 sectors. */
#define VHD_MAX_GEOMETRY	(65535ull * 16 * 255)
/* qemu's size limit, 2040 GiB, in sectors. */
#define VHD_MAX_SECTORS		0xff000000ull
/* qemu's own limit on table entries, and our memory cap for the BAT. */
#define VHD_MAX_ENTRIES		0x1fffffffu
#define VHD_MAX_BAT		(256u << 20)
/* Reads qemu's block layer refuses: beyond its largest offset, or longer
 * than its largest request. */
#define VHD_MAX_IO_OFF		((uint64_t)INT64_MAX & ~0x7fffffffull)
#define VHD_MAX_IO_LEN		0x7ffffe00ull
/* Seconds from 1970-01-01 to 2000-01-01, the VHD epoch. */
#define VHD_EPOCH		946684800

struct vpc_state {
	const struct fmt_map *map;	/* first: fmt_map_* find it here */
	uint8_t footer[FT_LEN];		/* moved as blocks grow */
	bool fixed;
	uint32_t block_size, bitmap_size, entries;
	uint64_t bat_off;
	uint64_t free_off;		/* where the next block goes */
	uint32_t *bat;			/* host-endian, sectors */
	bool overlap;			/* blocks or BAT over metadata */
};

static const struct optdesc vpc_create_opts[] = {
	FMT_OPT_SIZE,
	{ "subformat", OPT_STRING, "Type of virtual hard disk format. "
	  "Supported formats are {dynamic (default) | fixed} ", NULL, false },
	{ "force_size", OPT_BOOL, "Force disk size calculation to use the "
	  "actual size specified, rather than using the nearest CHS-based "
	  "calculation", NULL, false },
	FMT_OPT_FILE
};

static const struct fmt_map vpc_map;

/* Only images with the footer copy at the start can be recognised from
 * the first sector; a fixed disk looks like raw data there. */
static int vpc_probe(const uint8_t *buf, size_t len, const char *filename)
{
	(void)filename;
	if (len >= 8 && !memcmp(buf, "conectix", 8))
		return 100;
	return 0;
}

/* One's complement of the byte sum, the checksum field counted as 0. */
static uint32_t vpc_checksum(const uint8_t *p, size_t len, size_t skip)
{
	uint32_t sum = 0;

	for (size_t i = 0; i < len; i++)
		if (i < skip || i >= skip + 4)
			sum += p[i];
	return ~sum;
}

/* Virtual size in sectors. Virtual PC (and qemu's own "qemu" images) use
 * the CHS geometry; Hyper-V, Disk2vhd, XenServer, XenConverter and qemu's
 * force_size images ("qem2") use the current size, as does any image whose
 * geometry is the largest one (the geometry would truncate it). */
static uint64_t vpc_sectors(const uint8_t *ft)
{
	static const char *const by_size[] = { "win ", "qem2", "d2v ",
					       "CTXS" };
	const uint8_t *app = ft + FT_CREATOR_APP;
	uint64_t chs = (uint64_t)ld_be16(ft + FT_CYLS) * ft[FT_HEADS] *
		       ft[FT_SECS];
	bool use_size = !memcmp(app, "tap\0", 4);

	for (size_t i = 0; i < ARRAY_SIZE(by_size); i++)
		if (!memcmp(app, by_size[i], 4))
			use_size = true;
	if (use_size || chs == VHD_MAX_GEOMETRY)
		return ld_be64(ft + FT_CUR_SIZE) / 512;
	return chs;
}

static bool ranges_meet(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
	return a < b + blen && b < a + alen;
}

static int vpc_open_dynamic(struct blk *bs, uint64_t sectors,
			    uint64_t fsize, struct err *e)
{
	struct vpc_state *s = bs->opaque;
	uint8_t dh[DH_LEN];
	uint64_t hoff = ld_be64(s->footer + FT_DATA_OFFSET), bat_len, room;
	int ret;

	memset(dh, 0, sizeof(dh));
	if (hoff > VHD_MAX_IO_OFF - DH_LEN) {
		err_set(e, "Error reading dynamic VHD header");
		return -EINVAL;
	}
	if (hoff < fsize) {
		ret = bfile_pread(bs->file, hoff, dh, sizeof(dh));
		if (ret < 0) {
			err_set(e, "Could not read VHD dynamic header: %s",
				strerror(-ret));
			return ret;
		}
	}
	if (memcmp(dh + DH_COOKIE, "cxsparse", 8)) {
		err_set(e, "Invalid header magic");
		return -EINVAL;
	}
	s->block_size = ld_be32(dh + DH_BLOCK_SIZE);
	if (s->block_size < 512 || (s->block_size & (s->block_size - 1))) {
		err_set(e, "Invalid block size %" PRIu32, s->block_size);
		return -EINVAL;
	}
	/* One bit per sector, in whole sectors; like qemu, blocks under
	 * 4 KiB get no bitmap sector at all. */
	s->bitmap_size = (uint32_t)ALIGN_UP(s->block_size / 4096, 512);
	s->entries = ld_be32(dh + DH_MAX_ENTRIES);
	if (s->entries > VHD_MAX_ENTRIES) {
		err_set(e, "Max Table Entries too large (%" PRIu32 ")",
			s->entries);
		return -EINVAL;
	}
	room = (uint64_t)s->entries * s->block_size;	/* < 2^63 */
	if (room < sectors * 512) {
		err_set(e, "Page table too small");
		return -EINVAL;
	}
	bat_len = (uint64_t)s->entries * 4;
	s->bat_off = ld_be64(dh + DH_TABLE_OFFSET);
	/* Reads qemu refuses, then tables that do not fit the file (qemu
	 * reads zeroes there and finds its end beyond the file). */
	if (bat_len > VHD_MAX_IO_LEN ||
	    s->bat_off > VHD_MAX_IO_OFF - bat_len) {
		err_set(e, "Error reading pagetable");
		return -EINVAL;
	}
	if (s->bat_off > fsize || bat_len > fsize - s->bat_off)
		goto truncated;
	if (bat_len > VHD_MAX_BAT) {
		err_set(e, "VHD block allocation table of %" PRIu64
			" bytes is too large", bat_len);
		return -EFBIG;
	}
	ret = blk_meta_alloc(bs, bat_len, "VHD block allocation table", e);
	if (ret < 0)
		return ret;
	s->bat = malloc(bat_len ? bat_len : 1);
	if (!s->bat) {
		err_set(e, "Could not allocate the VHD block allocation table");
		return -ENOMEM;
	}
	ret = bfile_pread(bs->file, s->bat_off, s->bat, bat_len);
	if (ret < 0) {
		err_set(e, "Could not read VHD block allocation table: %s",
			strerror(-ret));
		goto fail;
	}
	/* New blocks go after the table and after the last block. */
	s->free_off = ALIGN_UP(s->bat_off + bat_len, 512);
	for (uint32_t i = 0; i < s->entries; i++) {
		uint64_t start, end;

		s->bat[i] = ld_be32(&s->bat[i]);
		if (s->bat[i] == VHD_UNALLOCATED)
			continue;
		start = (uint64_t)s->bat[i] * 512;
		end = start + s->bitmap_size + s->block_size;
		if (end > s->free_off)
			s->free_off = end;
		/* qemu reads such images; writing them would destroy
		 * metadata. */
		if (ranges_meet(start, end - start, 0, FT_LEN) ||
		    ranges_meet(start, end - start, hoff, DH_LEN) ||
		    ranges_meet(start, end - start, s->bat_off, bat_len))
			s->overlap = true;
	}
	if (ranges_meet(s->bat_off, bat_len, 0, FT_LEN) ||
	    ranges_meet(s->bat_off, bat_len, hoff, DH_LEN))
		s->overlap = true;
	if (s->free_off > fsize)
		goto truncated;
	return 0;
truncated:
	err_set(e, "block-vpc: free_data_block_offset points after the end "
		"of file. The image has been truncated.");
	ret = -EINVAL;
	goto fail;
fail:
	free(s->bat);
	s->bat = NULL;
	return ret;
}

static int vpc_open(struct blk *bs, struct err *e)
{
	struct vpc_state *s = bs->opaque;
	int64_t fsize = fmt_read_header(bs, s->footer, FT_LEN, "VHD footer",
					e);
	uint64_t sectors;
	int ret;

	if (fsize < 0)
		return (int)fsize;
	if (memcmp(s->footer + FT_COOKIE, "conectix", 8)) {
		/* A fixed disk has its footer only at the end. */
		if (fsize < FT_LEN)
			return fmt_err(e, -EINVAL, "File too small for a VHD "
				       "header");
		ret = bfile_pread(bs->file, (uint64_t)fsize - FT_LEN,
				  s->footer, FT_LEN);
		if (ret < 0)
			return fmt_err(e, ret, "Could not read VHD footer: %s",
				       strerror(-ret));
		if (memcmp(s->footer + FT_COOKIE, "conectix", 8) ||
		    ld_be32(s->footer + FT_TYPE) != VHD_FIXED)
			return fmt_err(e, -EINVAL, "invalid VPC image");
	}
	if (ld_be32(s->footer + FT_CHECKSUM) !=
	    vpc_checksum(s->footer, FT_LEN, FT_CHECKSUM))
		return fmt_err(e, -EINVAL, "Incorrect header checksum");
	sectors = vpc_sectors(s->footer);
	if (sectors > VHD_MAX_SECTORS)
		return fmt_err(e, -EFBIG, "Could not open '%s': %s",
			       bs->filename, strerror(EFBIG));
	s->fixed = ld_be32(s->footer + FT_TYPE) == VHD_FIXED;
	if (!s->fixed) {
		ret = vpc_open_dynamic(bs, sectors, (uint64_t)fsize, e);
		if (ret < 0)
			return ret;
	}
	bs->size = sectors * 512;
	s->map = &vpc_map;
	return 0;
}

static void vpc_close(struct blk *bs)
{
	struct vpc_state *s = bs->opaque;

	free(s->bat);
	s->bat = NULL;
}

/* A fixed disk is the file, its holes read as zeroes; a dynamic disk
 * goes a block at a time and its blocks are data without asking the
 * file, as qemu reports them. */
static int vpc_lookup(struct blk *bs, uint64_t off, uint64_t len,
		      enum fmt_op op, struct fmt_run *r)
{
	struct vpc_state *s = bs->opaque;
	uint64_t idx, in;
	uint32_t entry;

	r->len = len;
	r->kind = FMT_DATA_FILE;
	r->host = off;
	if (s->fixed)
		return 0;
	if (op == FMT_WRITE && s->overlap) {
		snprintf(bs->errmsg, sizeof(bs->errmsg), "VHD blocks or "
			 "block allocation table overlap the headers");
		return -EIO;
	}
	idx = off / s->block_size;
	in = off % s->block_size;
	entry = idx < s->entries ? s->bat[idx] : VHD_UNALLOCATED;
	if (op == FMT_WRITE && idx >= s->entries)
		return -EINVAL;
	r->len = MIN(len, s->block_size - in);
	r->entry = idx;
	r->kind = entry == VHD_UNALLOCATED ? FMT_ZERO : FMT_DATA;
	r->host = (uint64_t)entry * 512 + s->bitmap_size + in;
	return 0;
}

/* Give block idx space at the end of the file: its sector bitmap (all
 * sectors present, as qemu writes it), then the footer moved past the new
 * block, then the BAT entry; then the data of the run. */
static int vpc_allocate(struct blk *bs, uint64_t off, const uint8_t *buf,
			struct fmt_run *r)
{
	struct vpc_state *s = bs->opaque;
	uint64_t at = s->free_off, end = at + s->bitmap_size + s->block_size;
	uint64_t idx = r->entry;
	uint8_t be[4], *bm;
	int ret;

	if (at / 512 >= VHD_UNALLOCATED)
		return -EFBIG;
	if (s->bitmap_size) {	/* none for blocks under 4 KiB */
		bm = malloc(s->bitmap_size);
		if (!bm)
			return -ENOMEM;
		memset(bm, 0xff, s->bitmap_size);
		ret = bfile_pwrite(bs->file, at, bm, s->bitmap_size);
		free(bm);
		if (ret < 0)
			return ret;
	}
	ret = bfile_pwrite(bs->file, end, s->footer, FT_LEN);
	if (ret < 0)
		return ret;
	st_be32(be, (uint32_t)(at / 512));
	ret = bfile_pwrite(bs->file, s->bat_off + idx * 4, be, 4);
	if (ret < 0)
		return ret;
	s->bat[idx] = (uint32_t)(at / 512);
	s->free_off = end;
	return bfile_pwrite(bs->file, at + s->bitmap_size +
			    off % s->block_size, buf, (size_t)r->len);
}

static const struct fmt_map vpc_map = {
	.lookup = vpc_lookup,
	.alloc_write = vpc_allocate,
};

static int vpc_get_info(struct blk *bs, struct blk_info *bi)
{
	struct vpc_state *s = bs->opaque;

	if (!s->fixed)
		bi->cluster_size = s->block_size;
	return 0;
}

/* The CHS geometry for a number of sectors, as the VHD specification's
 * appendix computes it. */
static void vpc_geometry(uint64_t sectors, unsigned *c, unsigned *h,
			 unsigned *spt)
{
	uint64_t cth;

	if (sectors > VHD_MAX_GEOMETRY)
		sectors = VHD_MAX_GEOMETRY;
	if (sectors >= 65535ull * 16 * 63) {
		*spt = 255;
		*h = 16;
		cth = sectors / *spt;
	} else {
		*spt = 17;
		cth = sectors / *spt;
		*h = (unsigned)MAX(DIV_ROUND_UP(cth, 1024), 4);
		if (cth >= *h * 1024ull || *h > 16) {
			*spt = 31;
			*h = 16;
			cth = sectors / *spt;
		}
		if (cth >= *h * 1024ull) {
			*spt = 63;
			*h = 16;
			cth = sectors / *spt;
		}
	}
	*c = (unsigned)(cth / *h);
}

static int vpc_create(const char *filename, const struct optlist *opts,
		      struct err *e)
{
	const char *sub = optlist_get(opts, "subformat");
	uint64_t size = 0, sectors, entries = 0, bat_len = 0, dsize;
	unsigned c = 0, h = 0, spt = 0;
	bool force = false, fixed = false;
	uint8_t ft[FT_LEN], dh[DH_LEN], *bat = NULL;
	struct bfile *f;
	int prealloc, ret;

	if (optlist_get_size(opts, "size", &size, e) < 0 ||
	    optlist_get_bool(opts, "force_size", &force, e) < 0)
		return -EINVAL;
	/* The mode is the protocol's, checked before the file exists, and
	 * like QEMU we create the file without preallocating. */
	ret = fmt_no_backing(opts, "vpc", e);
	if (ret == 0)
		ret = fmt_opt_prealloc(opts, &prealloc, e);
	if (ret == 0)
		ret = fmt_create_file(&f, filename, e);
	if (ret < 0)
		return ret;
	if (sub && !strcmp(sub, "fixed")) {
		fixed = true;
	} else if (sub && strcmp(sub, "dynamic")) {
		ret = fmt_err(e, -EINVAL, "Parameter 'subformat' does not "
			      "accept value '%s'", sub);
		goto out;
	}
	sectors = DIV_ROUND_UP(MIN(size, (uint64_t)INT64_MAX), 512);
	if (force) {
		c = 65535;
		h = 16;
		spt = 255;
	} else {
		/* The smallest geometry that holds the size, found by
		 * asking for one more sector at a time (a cylinder is at
		 * most 16 * 255 sectors, so this ends soon), or the
		 * largest one. */
		for (uint64_t i = 0; sectors > (uint64_t)c * h * spt &&
		     (uint64_t)c * h * spt != VHD_MAX_GEOMETRY; i++)
			vpc_geometry(sectors + i, &c, &h, &spt);
		if ((uint64_t)c * h * spt != VHD_MAX_GEOMETRY)
			sectors = (uint64_t)c * h * spt;
	}
	if (sectors > VHD_MAX_SECTORS) {
		ret = fmt_err(e, -EFBIG, "The image size is too large for "
			      "file format 'vpc'");
		goto out;
	}
	dsize = sectors * 512;

	memset(ft, 0, sizeof(ft));
	memcpy(ft + FT_COOKIE, "conectix", 8);
	st_be32(ft + FT_FEATURES, 2);
	st_be32(ft + FT_VERSION, 0x00010000);
	st_be64(ft + FT_DATA_OFFSET, fixed ? UINT64_MAX : FT_LEN);
	st_be32(ft + FT_TIMESTAMP, (uint32_t)(time(NULL) - VHD_EPOCH));
	memcpy(ft + FT_CREATOR_APP, force ? "qem2" : "qemu", 4);
	st_be32(ft + FT_CREATOR_VER, 0x00050003);
	memcpy(ft + FT_CREATOR_OS, "Wi2k", 4);
	st_be64(ft + FT_ORIG_SIZE, dsize);
	st_be64(ft + FT_CUR_SIZE, dsize);
	st_be16(ft + FT_CYLS, (uint16_t)c);
	ft[FT_HEADS] = (uint8_t)h;
	ft[FT_SECS] = (uint8_t)spt;
	st_be32(ft + FT_TYPE, fixed ? VHD_FIXED : VHD_DYNAMIC);
	if (getrandom(ft + FT_UUID, 16, 0) != 16)
		for (int i = 0; i < 16; i++)
			ft[FT_UUID + i] = (uint8_t)rand();
	st_be32(ft + FT_CHECKSUM, vpc_checksum(ft, FT_LEN, FT_CHECKSUM));

	if (fixed) {
		ret = bfile_truncate(f, dsize, PREALLOC_OFF, e);
		if (ret < 0)
			goto out;
		ret = bfile_pwrite(f, dsize, ft, FT_LEN);
		goto out;
	}
	entries = DIV_ROUND_UP(dsize, VHD_BLOCK_DEFAULT);
	bat_len = ALIGN_UP(entries * 4, 512);
	memset(dh, 0, sizeof(dh));
	memcpy(dh + DH_COOKIE, "cxsparse", 8);
	st_be64(dh + DH_DATA_OFFSET, UINT64_MAX);
	st_be64(dh + DH_TABLE_OFFSET, FT_LEN + DH_LEN);
	st_be32(dh + DH_VERSION, 0x00010000);
	st_be32(dh + DH_MAX_ENTRIES, (uint32_t)entries);
	st_be32(dh + DH_BLOCK_SIZE, VHD_BLOCK_DEFAULT);
	st_be32(dh + DH_CHECKSUM, vpc_checksum(dh, DH_LEN, DH_CHECKSUM));
	/* The table (~0 entries, padding included) at most 8 MiB. */
	bat = malloc(bat_len ? bat_len : 1);
	if (!bat) {
		ret = -ENOMEM;
		goto out;
	}
	memset(bat, 0xff, bat_len);
	ret = bfile_pwrite(f, 0, ft, FT_LEN);
	if (!ret)
		ret = bfile_pwrite(f, FT_LEN, dh, DH_LEN);
	if (!ret)
		ret = bfile_pwrite(f, FT_LEN + DH_LEN, bat, bat_len);
	if (!ret)
		ret = bfile_pwrite(f, FT_LEN + DH_LEN + bat_len, ft, FT_LEN);
out:
	free(bat);
	return fmt_create_end(f, ret, "Could not write to the new file", e);
}

const struct blk_driver vpc_driver = {
	FMT_DRIVER(vpc, struct vpc_state),
	.caps = BLK_CAP_CREATE | BLK_CAP_WRITE | BLK_CAP_ZERO_INIT,
	FMT_MAPPED_IO,
};
