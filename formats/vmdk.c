/* vmdk.c - VMware virtual disks: hosted sparse extents (grain directory,
 * grain tables, redundant directory, zeroed-grain entries), stream-optimized
 * extents (deflated grains behind grain markers, footer), flat extents, and
 * descriptor files that list extents relative to their own directory.
 * Written from VMware's "Virtual Disk Format 5.0" technical note; the
 * behaviour (messages, create layout) follows QEMU 7.2. */
//config:config FORMAT_VMDK
//config:	bool "vmdk"
//config:	default y
//config:	help
//config:	  VMware VMDK images: monolithicSparse (the default),
//config:	  streamOptimized (compressed, for OVF appliances),
//config:	  monolithicFlat and the twoGbMaxExtent split variants, with
//config:	  parentFileNameHint backing files and zeroed-grain entries.
//format:FORMAT(vmdk)

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/random.h>
#include <zlib.h>
#include "fmt.h"

extern const struct blk_driver vmdk_driver;

#define SECTOR		512
#define KDMV_MAGIC	0x4b444d56u	/* "KDMV", sparse extent header */
#define COWD_MAGIC	0x434f5744u	/* "COWD", ESX 2 sparse (unsupported) */
#define FLAG_NL_DETECT	(1u << 0)
#define FLAG_RGD	(1u << 1)
#define FLAG_ZERO_GRAIN	(1u << 2)
#define FLAG_COMPRESS	(1u << 16)
#define FLAG_MARKER	(1u << 17)
#define GD_AT_END	UINT64_MAX	/* header says: read the footer */
#define COMPRESS_DEFLATE 1
#define GTE_ZEROED	1		/* grain table entry of a zero grain */
#define MARKER_EOS	0
#define MARKER_FOOTER	3

/* The descriptor window qemu reads and rewrites (CID, parent hint). */
#define DESC_SIZE	(20 * SECTOR)
/* At most this much of a descriptor file is parsed. */
#define DESC_READ_MAX	((1 << 20) - 1)
/* Limits: a grain of 1 GiB is already absurd; 32M directory entries are
 * 128 MiB of metadata; a compressed grain must fit a small buffer. */
#define MAX_GRAIN_SECTORS	0x200000u
#define MAX_GD_ENTRIES		(32u << 20)
#define MAX_ZGRAIN		(16u << 20)
#define MAX_WGRAIN		(64u << 20)	/* grains we allocate */
#define MAX_EXTENTS		1024
#define MAX_CAPACITY		(1ULL << 54)	/* sectors: 8 EiB */
#define EXTENT_MAX_SECTORS	(1ULL << 32)	/* grain entries are 32 bit */
#define GT_CACHE		16

/* Header field offsets (sparse extent header, little endian). */
enum {
	H_VERSION = 4, H_FLAGS = 8, H_CAPACITY = 12, H_GRAIN = 20,
	H_DESC_OFF = 28, H_DESC_SIZE = 36, H_NUM_GTES = 44, H_RGD = 48,
	H_GD = 56, H_OVERHEAD = 64, H_UNCLEAN = 72, H_CHECK = 73,
	H_COMPRESS = 77,
};

struct vmdk_extent {
	struct bfile *file;
	bool own_file;			/* false: this is bs->file */
	bool flat, compressed, has_marker, zero_grain;
	char type[12];			/* descriptor type, "" if embedded */
	uint64_t start;			/* first virtual byte */
	uint64_t sectors;		/* virtual length in sectors */
	uint64_t flat_off;		/* flat: byte offset in the file */
	uint64_t grain;			/* sparse: grain size in bytes */
	uint32_t gt_entries;
	uint64_t gt_cover;		/* bytes one grain table maps */
	uint32_t gd_n;			/* directory entries */
	uint32_t gd_avail, rgd_avail;	/* entries inside the file */
	uint32_t *gd, *rgd;		/* sectors of the grain tables */
	uint64_t next_sector;		/* where the next grain goes */
	bool appended;			/* compressed data written */
	uint32_t cache_sec[GT_CACHE];
	uint32_t *cache[GT_CACHE];
	int cache_next;
};

struct vmdk_state {
	struct vmdk_extent *ext;
	int n;
	uint64_t desc_offset;		/* 0x200 embedded, 0 descriptor file */
	uint64_t desc_area;		/* bytes CID updates may rewrite */
	uint32_t cid, parent_cid;
	char create_type[128];
	bool cid_updated, cid_checked;
	/* last decompressed grain (sequential reads of streamOptimized) */
	uint8_t *zcache;
	uint64_t zcache_host;
	size_t zcache_len;
	struct bfile *zcache_file;
};

static uint64_t ext_end(const struct vmdk_extent *x)
{
	return x->start + x->sectors * SECTOR;
}

static uint32_t random_u32(void)
{
	uint32_t v;

	if (getrandom(&v, sizeof(v), 0) == sizeof(v))
		return v;
	return (uint32_t)time(NULL) ^ (uint32_t)getpid() << 16;
}

/* ---- probing ---- */

/* A sparse header, or a descriptor file: blank lines and comments, then
 * "version=N" (N = 1..3). */
static int vmdk_probe(const uint8_t *buf, size_t len, const char *filename)
{
	const char *p = (const char *)buf, *end = p + len;

	(void)filename;
	if (len < 4)
		return 0;
	if (ld_be32(buf) == KDMV_MAGIC || ld_be32(buf) == COWD_MAGIC)
		return 100;
	while (p < end) {
		if (*p == '#') {
			while (p < end && *p != '\n')
				p++;
			p++;
			continue;
		}
		if (*p == ' ') {
			while (p < end && *p == ' ')
				p++;
			if (p < end && *p == '\r')
				p++;
			if (p == end || *p != '\n')
				return 0;
			p++;
			continue;
		}
		if (end - p >= 10 && !strncmp(p, "version=", 8) &&
		    p[8] >= '1' && p[8] <= '3' && p[9] == '\n')
			return 100;
		if (end - p >= 11 && !strncmp(p, "version=", 8) &&
		    p[8] >= '1' && p[8] <= '3' && p[9] == '\r' &&
		    p[10] == '\n')
			return 100;
		return 0;
	}
	return 0;
}

/* ---- grain tables ---- */

static void extent_free(struct vmdk_extent *x)
{
	free(x->gd);
	free(x->rgd);
	for (int i = 0; i < GT_CACHE; i++)
		free(x->cache[i]);
	if (x->own_file)
		bfile_close(x->file);
}

/* The grain table at sector sec, in host byte order, from the cache. */
static int gt_get(struct vmdk_extent *x, uint32_t sec, uint32_t **out)
{
	size_t bytes = (size_t)x->gt_entries * 4;
	uint8_t *raw;
	uint32_t *t;
	int i, ret;

	for (i = 0; i < GT_CACHE; i++)
		if (x->cache[i] && x->cache_sec[i] == sec) {
			*out = x->cache[i];
			return 0;
		}
	i = x->cache_next;
	x->cache_next = (i + 1) % GT_CACHE;
	if (!x->cache[i] && !(x->cache[i] = malloc(bytes)))
		return -ENOMEM;
	t = x->cache[i];
	x->cache_sec[i] = 0;
	raw = (uint8_t *)t;
	ret = bfile_pread(x->file, (uint64_t)sec * SECTOR, raw, bytes);
	if (ret < 0) {
		free(x->cache[i]);
		x->cache[i] = NULL;
		return ret;
	}
	for (uint32_t k = 0; k < x->gt_entries; k++)
		t[k] = ld_le32(raw + 4 * k);
	x->cache_sec[i] = sec;
	*out = t;
	return 0;
}

enum { G_UNALLOC, G_ZERO, G_DATA };

struct grain_ref {
	uint32_t gdi, gti;		/* directory and table index */
	uint64_t host;			/* byte offset of the grain (G_DATA) */
};

/* Looks up the grain holding extent-relative byte rel. Returns G_* or
 * -errno (-EIO: outside the directory). */
static int grain_lookup(struct vmdk_extent *x, uint64_t rel,
			struct grain_ref *g)
{
	uint64_t gdi = rel / x->gt_cover;
	uint32_t *gt, e;
	int ret;

	if (gdi >= x->gd_n)
		return -EIO;
	g->gdi = (uint32_t)gdi;
	g->gti = (uint32_t)((rel / x->grain) % x->gt_entries);
	g->host = 0;
	if (gdi >= x->gd_avail || !x->gd[gdi])
		return G_UNALLOC;
	ret = gt_get(x, x->gd[gdi], &gt);
	if (ret < 0)
		return ret;
	e = gt[g->gti];
	if (x->zero_grain && e == GTE_ZEROED)
		return G_ZERO;
	if (!e)
		return G_UNALLOC;
	g->host = (uint64_t)e * SECTOR;
	return G_DATA;
}

/* Points grain table entry g at sector val, in both grain tables. */
static int gt_set(struct vmdk_extent *x, const struct grain_ref *g,
		  uint32_t val)
{
	uint8_t le[4];
	uint32_t sec;
	int ret;

	if (g->gdi >= x->gd_avail || !x->gd[g->gdi])
		return -EIO;	/* no grain table to record it in */
	sec = x->gd[g->gdi];
	st_le32(le, val);
	ret = bfile_pwrite(x->file, (uint64_t)sec * SECTOR + 4ULL * g->gti,
			   le, 4);
	if (ret < 0)
		return ret;
	if (x->rgd && g->gdi < x->rgd_avail && x->rgd[g->gdi]) {
		ret = bfile_pwrite(x->file, (uint64_t)x->rgd[g->gdi] * SECTOR +
				   4ULL * g->gti, le, 4);
		if (ret < 0)
			return ret;
	}
	for (int i = 0; i < GT_CACHE; i++)
		if (x->cache[i] && x->cache_sec[i] == sec)
			x->cache[i][g->gti] = val;
	return 0;
}

/* ---- opening ---- */

static int add_extent(struct vmdk_state *s, struct vmdk_extent **out,
		      struct err *e)
{
	struct vmdk_extent *n;

	if (s->n >= MAX_EXTENTS) {
		err_set(e, "Too many extents (more than %d)", MAX_EXTENTS);
		return -EFBIG;
	}
	n = realloc(s->ext, (size_t)(s->n + 1) * sizeof(*n));
	if (!n)
		return -ENOMEM;
	s->ext = n;
	memset(&n[s->n], 0, sizeof(*n));
	n[s->n].start = s->n ? ext_end(&n[s->n - 1]) : 0;
	*out = &n[s->n];
	return 0;
}

static int read_table(struct bfile *f, uint64_t off, uint32_t n,
		      uint32_t **out)
{
	uint8_t *raw = malloc((size_t)n * 4 + 1);
	uint32_t *t = malloc((size_t)n * 4 + 1);
	int ret;

	if (!raw || !t) {
		free(raw);
		free(t);
		return -ENOMEM;
	}
	ret = bfile_pread(f, off, raw, (size_t)n * 4);
	if (ret < 0) {
		free(raw);
		free(t);
		return ret;
	}
	for (uint32_t i = 0; i < n; i++)
		t[i] = ld_le32(raw + 4 * i);
	free(raw);
	*out = t;
	return 0;
}

/* How many of n 4-byte entries at off start inside a file of fsize. */
static uint32_t table_avail(uint64_t off, uint32_t n, uint64_t fsize)
{
	if (off >= fsize)
		return 0;
	return (uint32_t)MIN((uint64_t)n, DIV_ROUND_UP(fsize - off, 4));
}

static int open_desc(struct blk *bs, char *buf, struct err *e);

/* Reads the start of a file (a descriptor file, or the bytes at off). */
static int read_desc(struct bfile *f, uint64_t off, char **out,
		     struct err *e)
{
	int64_t size = bfile_size(f);
	char *buf;
	int ret;

	if (size < 0) {
		err_set(e, "Could not access file: %s", strerror((int)-size));
		return (int)size;
	}
	/* qemu sees files in whole sectors: only an empty one is small */
	size = (int64_t)ALIGN_UP((uint64_t)size, SECTOR);
	if (size < 4) {
		err_set(e, "File is too small, not a valid image");
		return -EINVAL;
	}
	if (size > DESC_READ_MAX)
		size = DESC_READ_MAX;
	buf = malloc((size_t)size + 1);
	if (!buf)
		return -ENOMEM;
	ret = bfile_pread(f, off, buf, (size_t)size);
	if (ret < 0) {
		err_set(e, "Could not read from file: %s", strerror(-ret));
		free(buf);
		return ret;
	}
	buf[size] = 0;
	*out = buf;
	return 0;
}

/* A hosted sparse extent ("KDMV" header) in file f. */
static int open_sparse(struct blk *bs, struct bfile *f, bool own,
		       const char *type, bool top, struct err *e)
{
	struct vmdk_state *s = bs->opaque;
	struct vmdk_extent *x;
	uint8_t hb[SECTOR], *h = hb;
	uint8_t *foot = NULL;
	uint64_t cap, gran, gd, rgd = 0, over, entry, gd_n, fsec;
	uint32_t version, flags, ngtes;
	int64_t fsize = bfile_size(f);
	bool compressed;
	int ret;

	if (fsize < 0)
		return (int)fsize;
	ret = bfile_pread(f, 0, hb, SECTOR);
	if (ret < 0) {
		err_set(e, "Could not read header from file '%s': %s",
			f->name, strerror(-ret));
		return -EINVAL;
	}
	if (ld_be32(hb) == COWD_MAGIC) {
		err_set(e, "Unsupported VMDK extent type (COWD) in '%s'",
			f->name);
		return -ENOTSUP;
	}
	if (ld_be32(hb) != KDMV_MAGIC) {
		err_set(e, "Image not in VMDK format");
		return -EINVAL;
	}
	/* A zero-capacity sparse file may carry a descriptor instead. */
	if (top && ld_le64(h + H_CAPACITY) == 0 && ld_le64(h + H_DESC_OFF)) {
		uint64_t doff = ld_le64(h + H_DESC_OFF);
		char *buf;

		if (doff > (UINT64_MAX >> 9)) {
			err_set(e, "Invalid descriptor offset");
			return -EINVAL;
		}
		ret = read_desc(f, doff << 9, &buf, e);
		if (ret < 0)
			return -EINVAL;
		ret = open_desc(bs, buf, e);
		free(buf);
		return ret;
	}
	if (!s->create_type[0])
		snprintf(s->create_type, sizeof(s->create_type), "%s",
			 "monolithicSparse");
	fsec = DIV_ROUND_UP((uint64_t)fsize, SECTOR);

	if (ld_le64(h + H_GD) == GD_AT_END) {
		/* stream-optimized: the footer, a copy of the header with
		 * the real directory offset, sits between a footer marker
		 * and the end-of-stream marker at the end of the file. */
		foot = malloc(3 * SECTOR);
		if (!foot)
			return -ENOMEM;
		if (fsec < 3 || (ret = bfile_pread(f, fsec * SECTOR -
						   3 * SECTOR, foot,
						   3 * SECTOR)) < 0 ||
		    ld_be32(foot + SECTOR) != KDMV_MAGIC ||
		    ld_le32(foot + 8) != 0 ||
		    ld_le32(foot + 12) != MARKER_FOOTER ||
		    ld_le64(foot + 2 * SECTOR) != 0 ||
		    ld_le32(foot + 2 * SECTOR + 8) != 0 ||
		    ld_le32(foot + 2 * SECTOR + 12) != MARKER_EOS) {
			free(foot);
			err_set(e, "Invalid footer");
			return -EINVAL;
		}
		h = foot + SECTOR;
	}
	version = ld_le32(h + H_VERSION);
	flags = ld_le32(h + H_FLAGS);
	cap = ld_le64(h + H_CAPACITY);
	gran = ld_le64(h + H_GRAIN);
	ngtes = ld_le32(h + H_NUM_GTES);
	gd = ld_le64(h + H_GD);
	over = ld_le64(h + H_OVERHEAD);
	compressed = ld_le16(h + H_COMPRESS) == COMPRESS_DEFLATE;
	if (flags & FLAG_RGD)
		rgd = ld_le64(h + H_RGD);
	free(foot);

	if (version > 3) {
		err_set(e, "Unsupported VMDK version %" PRIu32, version);
		return -ENOTSUP;
	}
	if (version == 3 && (bs->flags & BLK_O_RDWR) && !compressed) {
		err_set(e, "VMDK version 3 must be read only");
		return -EINVAL;
	}
	if (ngtes > 512) {
		err_set(e, "L2 table size too big");
		return -EINVAL;
	}
	if (!ngtes || !gran) {
		err_set(e, "L1 entry size is invalid");
		return -EINVAL;
	}
	if (fsec < over) {
		err_set(e, "File truncated, expecting at least %" PRId64
			" bytes", (int64_t)(over * SECTOR));
		return -EINVAL;
	}
	if (gran > MAX_GRAIN_SECTORS) {
		err_set(e, "Invalid granularity, image may be corrupt");
		return -EFBIG;
	}
	if (cap > MAX_CAPACITY) {
		err_set(e, "Could not refresh total sector count: %s",
			strerror(EFBIG));
		return -EFBIG;
	}
	entry = (uint64_t)ngtes * gran;
	gd_n = DIV_ROUND_UP(cap, entry);
	if (gd_n > MAX_GD_ENTRIES) {
		err_set(e, "L1 size too big");
		return -EFBIG;
	}
	/* Directory entries past the end of the file read as zero, as
	 * they do for qemu; only those inside the file take memory, so a
	 * tiny hostile file cannot make us allocate 128 MiB. */
	if (gd > (UINT64_MAX >> 10) || rgd > (UINT64_MAX >> 10)) {
		err_set(e, "Could not read l1 table from extent '%s': %s",
			f->name, strerror(EIO));
		return -EIO;
	}
	if (bs->size / SECTOR + cap > MAX_CAPACITY) {
		err_set(e, "Image too large");
		return -EFBIG;
	}
	ret = blk_meta_alloc(bs, 4ULL * (table_avail(gd * SECTOR,
				(uint32_t)gd_n, (uint64_t)fsize) +
				(rgd ? table_avail(rgd * SECTOR, (uint32_t)gd_n,
						   (uint64_t)fsize) : 0)),
			     "grain directory", e);
	if (ret < 0)
		return ret;

	ret = add_extent(s, &x, e);
	if (ret < 0)
		return ret;
	x->file = f;
	x->own_file = own;
	snprintf(x->type, sizeof(x->type), "%s", type);
	x->sectors = cap;
	x->grain = gran * SECTOR;
	x->gt_entries = ngtes;
	x->gt_cover = entry * SECTOR;
	x->gd_n = (uint32_t)gd_n;
	x->compressed = compressed;
	x->has_marker = flags & FLAG_MARKER;
	x->zero_grain = flags & FLAG_ZERO_GRAIN;
	x->next_sector = DIV_ROUND_UP(fsec, gran) * gran;
	x->gd_avail = table_avail(gd * SECTOR, x->gd_n, (uint64_t)fsize);
	ret = read_table(f, gd * SECTOR, x->gd_avail, &x->gd);
	if (!ret && rgd) {
		x->rgd_avail = table_avail(rgd * SECTOR, x->gd_n,
					   (uint64_t)fsize);
		ret = read_table(f, rgd * SECTOR, x->rgd_avail, &x->rgd);
	}
	if (ret < 0) {
		err_set(e, "Could not read l1 table from extent '%s': %s",
			f->name, strerror(-ret));
		x->own_file = false;
		extent_free(x);
		return ret;
	}
	if (compressed) {
		snprintf(s->create_type, sizeof(s->create_type), "%s",
			 "streamOptimized");
		if (x->grain > MAX_ZGRAIN) {
			err_set(e, "Compressed grains of %" PRIu64 " bytes "
				"are not supported", x->grain);
			x->own_file = false;
			extent_free(x);
			return -ENOTSUP;
		}
	}
	s->n++;
	bs->size = ext_end(x);
	return 0;
}

/* "key=\"value\"" anywhere in the descriptor (qemu looks the key up with
 * a plain substring search and skips the two characters after it). */
static int desc_value(const char *desc, const char *key, char *out,
		      size_t outlen)
{
	const char *p = strstr(desc, key), *q, *end = desc + strlen(desc);

	if (!p)
		return -1;
	p += strlen(key) + 2;
	if (p >= end)
		return -1;
	for (q = p; q < end && *q != '"'; q++)
		;
	if (q == end || outlen < (size_t)(q - p) + 1)
		return -1;
	memcpy(out, p, (size_t)(q - p));
	out[q - p] = 0;
	return 0;
}

static const char *next_line(const char *p)
{
	const char *nl = strchr(p, '\n');

	return nl ? nl + 1 : p + strlen(p);
}

/* Extent lines: ACCESS SECTORS TYPE "FILE" [OFFSET] (VMDK 5.0 technote,
 * "Extent Descriptions"). Lines that are not read-write extents of a
 * known type are skipped, as qemu does. */
static int parse_extents(struct blk *bs, const char *desc, struct err *e)
{
	struct vmdk_state *s = bs->opaque;

	for (const char *p = desc; *p; p = next_line(p)) {
		char access[11], type[11], fname[512], *path;
		int64_t sectors = 0, off = -1;
		struct blk_ref ref;
		struct bfile *f;
		struct vmdk_extent *x;
		bool flat;
		int m, ret;

		m = sscanf(p, "%10s %" SCNd64 " %10s \"%511[^\n\r\"]\" %"
			   SCNd64, access, &sectors, type, fname, &off);
		if (m < 4 || strcmp(access, "RW"))
			continue;
		if (!strcmp(type, "FLAT")) {
			if (m != 5 || off < 0)
				goto invalid;
		} else if (!strcmp(type, "VMFS")) {
			if (m != 4)
				goto invalid;
			off = 0;
		} else if (m != 4) {
			goto invalid;
		}
		if (sectors <= 0 || (strcmp(type, "FLAT") &&
		    strcmp(type, "SPARSE") && strcmp(type, "VMFS") &&
		    strcmp(type, "VMFSSPARSE") && strcmp(type, "SESPARSE")))
			continue;
		ret = blk_ref_check(bs, "extent", fname, &ref, e);
		if (ret < 0)
			return ret;
		path = blk_relative_path(bs->filename, fname);
		if (!path)
			return -ENOMEM;
		ret = bfile_open(&f, path,
				 (bs->flags & BLK_O_RDWR) ? BFILE_RDWR : 0,
				 bs->cache, e);
		free(path);
		if (ret < 0)
			return ret;
		flat = !strcmp(type, "FLAT") || !strcmp(type, "VMFS");
		ret = blk_ref_opened(bs, "extent", fname, &ref, f, e);
		if (!ret)
			ret = blk_lock_file(bs, f, !flat, e);
		if (ret < 0) {
			bfile_close(f);
			return ret;
		}
		if (flat) {
			if ((uint64_t)sectors > MAX_CAPACITY ||
			    (uint64_t)off > MAX_CAPACITY ||
			    bs->size / SECTOR + (uint64_t)sectors >
			    MAX_CAPACITY) {
				bfile_close(f);
				err_set(e, "Image too large");
				return -EFBIG;
			}
			ret = add_extent(s, &x, e);
			if (ret < 0) {
				bfile_close(f);
				return ret;
			}
			x->file = f;
			x->own_file = true;
			x->flat = true;
			x->sectors = (uint64_t)sectors;
			x->flat_off = (uint64_t)off * SECTOR;
			snprintf(x->type, sizeof(x->type), "%s", type);
			s->n++;
			bs->size = ext_end(x);
		} else if (!strcmp(type, "SESPARSE")) {
			bfile_close(f);
			err_set(e, "Unsupported extent type '%s'", type);
			return -ENOTSUP;
		} else {
			char *buf;

			ret = read_desc(f, 0, &buf, e);
			if (ret == 0) {
				free(buf);
				ret = open_sparse(bs, f, true, type, false, e);
			} else {
				ret = -EINVAL;
			}
			if (ret < 0) {
				bfile_close(f);
				return ret;
			}
		}
		continue;
invalid:
		{
			const char *np = next_line(p);
			if (np > p && np[-1] == '\n')
				np--;
			err_set(e, "Invalid extent line: %.*s", (int)(np - p),
				p);
			return -EINVAL;
		}
	}
	return 0;
}

static int open_desc(struct blk *bs, char *buf, struct err *e)
{
	static const char *const types[] = {
		"monolithicFlat", "vmfs", "vmfsSparse", "seSparse",
		"twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
	};
	struct vmdk_state *s = bs->opaque;
	char ct[128];
	size_t i;

	if (desc_value(buf, "createType", ct, sizeof(ct))) {
		err_set(e, "invalid VMDK image descriptor");
		return -EINVAL;
	}
	for (i = 0; i < ARRAY_SIZE(types); i++)
		if (!strcmp(ct, types[i]))
			break;
	if (i == ARRAY_SIZE(types)) {
		err_set(e, "Unsupported image type '%s'", ct);
		return -ENOTSUP;
	}
	snprintf(s->create_type, sizeof(s->create_type), "%s", ct);
	s->desc_offset = 0;
	return parse_extents(bs, buf, e);
}

/* The DESC_SIZE window at desc_offset, NUL-terminated. */
static int read_window(struct blk *bs, char **out)
{
	struct vmdk_state *s = bs->opaque;
	char *d = calloc(1, DESC_SIZE + 1);
	int ret;

	if (!d)
		return -ENOMEM;
	ret = bfile_pread(bs->file, s->desc_offset, d, DESC_SIZE);
	if (ret < 0) {
		free(d);
		return ret;
	}
	d[DESC_SIZE - 1] = 0;
	*out = d;
	return 0;
}

static int read_cid(const char *d, const char *key, uint32_t *cid)
{
	const char *p = strstr(d, key);

	if (!p || sscanf(p + strlen(key) + 1, "%" SCNx32, cid) != 1)
		return -EINVAL;
	return 0;
}

/* parentFileNameHint="NAME" names the backing file (always vmdk). */
static int parent_hint(struct blk *bs, const char *d)
{
	static const char key[] = "parentFileNameHint";
	const char *p = strstr(d, key), *end;

	if (!p)
		return 0;
	p += sizeof(key) + 1;
	end = strchr(p, '"');
	if (!end || end - p > 4095)
		return -EINVAL;
	bs->backing_file = strndup(p, (size_t)(end - p));
	bs->backing_fmt = strdup("vmdk");
	if (!bs->backing_file || !bs->backing_fmt)
		return -ENOMEM;
	return 0;
}

static void vmdk_close(struct blk *bs)
{
	struct vmdk_state *s = bs->opaque;

	if (!s)
		return;
	for (int i = 0; i < s->n; i++) {
		struct vmdk_extent *x = &s->ext[i];
		int64_t sz;

		/* QEMU's convert ends a stream with a sector-aligned
		 * file; do it for every compressed extent we appended to. */
		if (x->appended && (sz = bfile_size(x->file)) > 0 &&
		    sz % SECTOR)
			bfile_truncate(x->file, ALIGN_UP((uint64_t)sz, SECTOR),
				       PREALLOC_OFF, NULL);
		extent_free(x);
	}
	free(s->ext);
	free(s->zcache);
	s->ext = NULL;
	s->n = 0;
}

static int vmdk_open(struct blk *bs, struct err *e)
{
	struct vmdk_state *s = bs->opaque;
	char *buf = NULL, *d = NULL;
	int ret;

	ret = read_desc(bs->file, 0, &buf, e);
	if (ret < 0)
		return -EINVAL;
	bs->size = 0;
	if (ld_be32(buf) == KDMV_MAGIC || ld_be32(buf) == COWD_MAGIC) {
		ret = open_sparse(bs, bs->file, false, "", true, e);
		s->desc_offset = 0x200;
	} else {
		ret = open_desc(bs, buf, e);
	}
	free(buf);
	if (ret < 0)
		goto fail;
	/* How much of the file the embedded descriptor owns. */
	s->desc_area = DESC_SIZE;
	if (s->desc_offset) {
		uint8_t h[SECTOR];
		ret = bfile_pread(bs->file, 0, h, SECTOR);
		if (ret < 0)
			goto fail;
		if (ld_le64(h + H_DESC_OFF) != 1)
			s->desc_area = 0;
		else if (ld_le64(h + H_DESC_SIZE) < DESC_SIZE / SECTOR)
			s->desc_area = ld_le64(h + H_DESC_SIZE) * SECTOR;
	}
	ret = read_window(bs, &d);
	if (ret < 0)
		goto fail;
	ret = parent_hint(bs, d);
	if (!ret)
		ret = read_cid(d, "CID", &s->cid);
	if (!ret)
		ret = read_cid(d, "parentCID", &s->parent_cid);
	free(d);
	if (ret < 0) {
		err_set(e, "Could not open '%s': %s", bs->filename,
			strerror(-ret));
		goto fail;
	}
	return 0;
fail:
	vmdk_close(bs);
	return ret;
}

/* ---- reading ---- */

static struct vmdk_extent *find_extent(struct vmdk_state *s, uint64_t off)
{
	for (int i = 0; i < s->n; i++)
		if (off < ext_end(&s->ext[i]))
			return &s->ext[i];
	return NULL;
}

/* qemu reads through a vmdk backing file only while the parent's CID is
 * the one this image recorded when it was made. */
static int cid_valid(struct blk *bs)
{
	struct vmdk_state *s = bs->opaque;
	struct blk *b = bs->backing;

	if (s->cid_checked || !b)
		return 1;
	if (b->drv != bs->drv)
		return 0;
	if (((struct vmdk_state *)b->opaque)->cid != s->parent_cid)
		return 0;
	s->cid_checked = true;
	return 1;
}

static int read_backing(struct blk *bs, uint64_t off, void *buf, size_t n)
{
	if (!bs->backing) {
		memset(buf, 0, n);
		return 0;
	}
	if (!cid_valid(bs))
		return -EINVAL;
	return blk_read_backing(bs, off, buf, n);
}

/* Inflates the grain at host offset host into the grain cache. */
static int load_zgrain(struct vmdk_state *s, struct vmdk_extent *x,
		       uint64_t host)
{
	size_t gb = (size_t)x->grain, inlen = 2 * gb, dlen, hdr = 0;
	uint8_t *in;
	uLongf outlen = gb;
	int ret;

	if (s->zcache && s->zcache_file == x->file && s->zcache_host == host)
		return 0;
	if (!s->zcache || s->zcache_len < gb) {
		free(s->zcache);
		s->zcache = malloc(gb);
		s->zcache_len = s->zcache ? gb : 0;
		if (!s->zcache)
			return -ENOMEM;
	}
	s->zcache_file = NULL;
	in = malloc(inlen);
	if (!in)
		return -ENOMEM;
	ret = bfile_pread(x->file, host, in, inlen);
	if (ret < 0)
		goto out;
	dlen = gb;
	if (x->has_marker) {
		/* grain marker: LBA (8), compressed size (4), data */
		dlen = ld_le32(in + 8);
		hdr = 12;
	}
	ret = -EINVAL;
	if (!dlen || dlen > inlen - hdr)
		goto out;
	if (uncompress(s->zcache, &outlen, in + hdr, (uLong)dlen) != Z_OK)
		goto out;
	s->zcache_file = x->file;
	s->zcache_host = host;
	s->zcache_len = gb;
	/* remember how much came out: reads past it are errors */
	s->zcache_len = outlen;
	ret = 0;
out:
	free(in);
	return ret;
}

/* One grain's part of a read: st is what grain_lookup said of it. */
static int read_grain(struct blk *bs, struct vmdk_extent *x,
		      const struct grain_ref *g, int st, uint64_t off,
		      uint64_t in, uint8_t *p, size_t n)
{
	struct vmdk_state *s = bs->opaque;
	int ret;

	if (st == G_UNALLOC)
		return read_backing(bs, off, p, n);
	if (st == G_ZERO) {
		memset(p, 0, n);
		return 0;
	}
	if (!x->compressed)
		return bfile_pread(x->file, g->host + in, p, n);
	ret = load_zgrain(s, x, g->host);
	if (!ret && in + n > s->zcache_len)
		ret = -EINVAL;
	if (!ret)
		memcpy(p, s->zcache + in, n);
	return ret;
}

static int vmdk_block_status(struct blk *bs, uint64_t off, uint64_t len,
			     uint64_t *pnum, uint64_t *map,
			     struct bfile **mfile)
{
	struct vmdk_state *s = bs->opaque;
	struct vmdk_extent *x = find_extent(s, off);
	struct grain_ref g, g2;
	uint64_t rel, in, n;
	int st;

	if (!x)
		return -EIO;
	rel = off - x->start;
	len = MIN(len, ext_end(x) - off);
	if (x->flat) {
		/* qemu looks through a flat extent into its file: holes
		 * there read as zero data */
		int fst = bfile_block_status(x->file, x->flat_off + rel, len,
					     pnum);
		if (fst < 0)
			return fst;
		*map = x->flat_off + rel;
		*mfile = x->file;
		return BLK_STAT_DATA | BLK_STAT_ALLOCATED | BLK_STAT_OFFSET |
		       (fst & BLK_STAT_ZERO);
	}
	in = rel % x->grain;
	n = MIN(len, x->grain - in);
	st = grain_lookup(x, rel, &g);
	if (st < 0)
		return st;
	/* Merge following grains with the same status (and contiguous
	 * host offsets for uncompressed data). */
	while (n < len) {
		uint64_t r = rel + n, gdi = r / x->gt_cover;
		int st2;

		/* a missing grain table: its whole span in one step */
		if (st == G_UNALLOC && gdi < x->gd_n &&
		    (gdi >= x->gd_avail || !x->gd[gdi])) {
			n += MIN(len - n, x->gt_cover - r % x->gt_cover);
			continue;
		}
		st2 = grain_lookup(x, r, &g2);
		if (st2 != st || (st == G_DATA && (x->compressed ||
		    g2.host != g.host + in + n)))
			break;
		n += MIN(len - n, x->grain - r % x->grain);
	}
	*pnum = n;
	if (st == G_UNALLOC)
		return 0;
	if (st == G_ZERO)
		return BLK_STAT_ZERO | BLK_STAT_ALLOCATED;
	*mfile = x->file;
	if (x->compressed)
		return BLK_STAT_DATA | BLK_STAT_ALLOCATED |
		       BLK_STAT_COMPRESSED;
	*map = g.host + in;
	return BLK_STAT_DATA | BLK_STAT_ALLOCATED | BLK_STAT_OFFSET;
}

/* ---- writing ---- */

/* A new CID on the first write after opening, as VMware and qemu do, so
 * that images made on top of this one notice it changed. */
static int update_cid(struct blk *bs)
{
	struct vmdk_state *s = bs->opaque;
	char *d, *tail = NULL, *p;
	size_t len, wlen;
	uint32_t cid = random_u32();
	int ret;

	s->cid_updated = true;
	if (s->desc_offset && !s->desc_area)
		return 0;
	ret = read_window(bs, &d);
	if (ret < 0)
		return ret;
	ret = -EINVAL;
	p = strstr(d, "parentCID");
	if (!p || !(tail = strdup(p)))
		goto out;
	p = strstr(d, "CID");
	if (p) {
		p += 4;
		snprintf(p, (size_t)(DESC_SIZE - (p - d)), "%" PRIx32 "\n",
			 cid);
		len = strlen(d);
		snprintf(d + len, DESC_SIZE - len, "%s", tail);
	}
	len = strlen(d);
	memset(d + len, 0, DESC_SIZE - len);
	if (s->desc_offset)
		wlen = (size_t)s->desc_area;
	else
		wlen = ALIGN_UP(len, SECTOR);
	ret = bfile_pwrite(bs->file, s->desc_offset, d, MIN(wlen, DESC_SIZE));
	if (!ret)
		s->cid = cid;
out:
	free(tail);
	free(d);
	return ret;
}

/* Appends one compressed grain behind a grain marker (streamOptimized):
 * only whole grains, or the tail of the last one. */
static int write_zgrain(struct blk *bs, struct vmdk_extent *x,
			const struct grain_ref *g, uint64_t off,
			const uint8_t *buf, size_t n)
{
	struct vmdk_state *s = bs->opaque;
	uLongf clen = compressBound((uLong)n);
	uint8_t *out;
	uint64_t at, end;
	int ret;

	if (off % x->grain || (n < x->grain && off + n != ext_end(x)) ||
	    !x->has_marker)
		return -EINVAL;
	if (x->next_sector >= EXTENT_MAX_SECTORS)
		return -ENOSPC;
	out = malloc(12 + clen);
	if (!out)
		return -ENOMEM;
	if (compress(out + 12, &clen, buf, (uLong)n) != Z_OK || !clen) {
		free(out);
		return -EINVAL;
	}
	st_le64(out, off / SECTOR);
	st_le32(out + 8, (uint32_t)clen);
	at = x->next_sector * SECTOR;
	ret = bfile_pwrite(x->file, at, out, 12 + clen);
	free(out);
	if (ret < 0)
		return ret;
	end = at + 12 + clen;
	x->next_sector = DIV_ROUND_UP(end, SECTOR);
	x->appended = true;
	if (s->zcache_file == x->file)
		s->zcache_file = NULL;
	return gt_set(x, g, (uint32_t)(at / SECTOR));
}

/* Allocates a grain for a write of n bytes at in inside it: the rest of
 * the grain comes from the backing file (unless it was a zero grain) or
 * is zero. */
static int alloc_grain(struct blk *bs, struct vmdk_extent *x,
		       const struct grain_ref *g, int st, uint64_t off,
		       uint64_t in, const uint8_t *buf, size_t n)
{
	size_t gb = (size_t)x->grain;
	uint64_t gstart = off - in;
	uint8_t *tmp;
	int ret;

	if (g->gdi >= x->gd_avail || !x->gd[g->gdi])
		return -EIO;	/* no grain table to record it in */
	if (gb > MAX_WGRAIN)
		return -EFBIG;
	if (x->next_sector >= EXTENT_MAX_SECTORS)
		return -ENOSPC;
	tmp = blk_alloc_buf(gb);
	if (!tmp)
		return -ENOMEM;
	if (bs->backing && st != G_ZERO) {
		if (!cid_valid(bs)) {
			free(tmp);
			return -EINVAL;
		}
		ret = blk_read_backing(bs, gstart, tmp, gb);
		if (ret < 0) {
			free(tmp);
			return ret;
		}
	} else {
		memset(tmp, 0, gb);
	}
	memcpy(tmp + in, buf, n);
	ret = bfile_pwrite(x->file, x->next_sector * SECTOR, tmp, gb);
	free(tmp);
	if (ret < 0)
		return ret;
	ret = gt_set(x, g, (uint32_t)x->next_sector);
	if (ret < 0)
		return ret;
	x->next_sector += gb / SECTOR;
	return 0;
}

/* One grain's part of a write. */
static int write_grain(struct blk *bs, struct vmdk_extent *x,
		       struct grain_ref *g, int st, uint64_t off, uint64_t rel,
		       uint64_t in, const uint8_t *p, size_t n)
{
	if (x->compressed) {
		/* streamOptimized grains are written once */
		if (st == G_DATA)
			return -EIO;
		return write_zgrain(bs, x, g, rel, p, n);
	}
	if (st == G_DATA)
		return bfile_pwrite(x->file, g->host + in, p, n);
	return alloc_grain(bs, x, g, st, off, in, p, n);
}

/* Reads and writes walk the extents and grains alike; a write also
 * updates the descriptor's CID once. */
static int vmdk_rw(struct blk *bs, uint64_t off, uint8_t *p, size_t len,
		   bool write)
{
	struct vmdk_state *s = bs->opaque;

	while (len) {
		struct vmdk_extent *x = find_extent(s, off);
		struct grain_ref g;
		uint64_t rel, in;
		size_t n;
		int st, ret;

		if (!x)
			return -EIO;
		rel = off - x->start;
		n = (size_t)MIN((uint64_t)len, ext_end(x) - off);
		if (x->flat) {
			ret = write ? bfile_pwrite(x->file, x->flat_off + rel, p, n)
				    : bfile_pread(x->file, x->flat_off + rel, p, n);
		} else {
			in = rel % x->grain;
			n = (size_t)MIN((uint64_t)n, x->grain - in);
			st = grain_lookup(x, rel, &g);
			if (st < 0)
				return write ? -EINVAL : st;
			ret = write ? write_grain(bs, x, &g, st, off, rel, in, p, n)
				    : read_grain(bs, x, &g, st, off, in, p, n);
		}
		if (ret < 0)
			return ret;
		if (write && !s->cid_updated) {
			ret = update_cid(bs);
			if (ret < 0)
				return ret;
		}
		p += n;
		off += n;
		len -= n;
	}
	return 0;
}

static int vmdk_pread(struct blk *bs, uint64_t off, void *buf, size_t len)
{
	return vmdk_rw(bs, off, buf, len, false);
}

/* vmdk_rw only reads from p when it writes */
static int vmdk_pwrite(struct blk *bs, uint64_t off, const void *buf,
		       size_t len)
{
	return vmdk_rw(bs, off, (uint8_t *)buf, len, true);
}

/* Zeroed-grain entries for whole grains of extents that have the
 * feature; the unaligned head and tail are written as zero data, like
 * qemu's block layer does around a driver's zero write. */
static int vmdk_pwrite_zeroes(struct blk *bs, uint64_t off, uint64_t len,
			      unsigned flags)
{
	struct vmdk_state *s = bs->opaque;
	uint64_t o, end = off + len;
	static const uint8_t zero[SECTOR];

	(void)flags;
	/* dry run: every extent touched must support zeroed grains */
	for (o = off; o < end;) {
		struct vmdk_extent *x = find_extent(s, o);
		if (!x || x->flat || !x->zero_grain || x->compressed)
			return -ENOTSUP;
		o = ext_end(x);
	}
	while (off < end) {
		struct vmdk_extent *x = find_extent(s, off);
		uint64_t rel = off - x->start, in = rel % x->grain;
		uint64_t n = MIN(end, ext_end(x)) - off;
		struct grain_ref g;
		int st, ret = 0;

		n = MIN(n, x->grain - in);
		if (in || n < x->grain) {
			/* partial grain: ordinary zero data */
			for (uint64_t k = 0; k < n && !ret; k += SECTOR)
				ret = vmdk_pwrite(bs, off + k, zero,
						  (size_t)MIN(n - k, SECTOR));
			if (ret < 0)
				return ret;
		} else {
			st = grain_lookup(x, rel, &g);
			if (st < 0)
				return -EINVAL;
			if (st != G_ZERO) {
				if (g.gdi >= x->gd_avail || !x->gd[g.gdi])
					return -EIO;
				ret = gt_set(x, &g, GTE_ZEROED);
				if (ret < 0)
					return ret;
			}
			if (!s->cid_updated) {
				ret = update_cid(bs);
				if (ret < 0)
					return ret;
			}
		}
		off += n;
	}
	return 0;
}

static int vmdk_write_compressed(struct blk *bs, uint64_t off,
				 const void *buf, size_t len)
{
	return vmdk_pwrite(bs, off, buf, len);
}

static int vmdk_flush(struct blk *bs)
{
	struct vmdk_state *s = bs->opaque;
	int ret = bfile_flush(bs->file);

	for (int i = 0; i < s->n && !ret; i++)
		if (s->ext[i].file != bs->file)
			ret = bfile_flush(s->ext[i].file);
	return ret;
}

/* ---- info and check ---- */

static int vmdk_get_info(struct blk *bs, struct blk_info *bi)
{
	struct vmdk_state *s = bs->opaque;
	struct val *spec, *data, *arr;
	bool same = s->n > 0;

	for (int i = 1; i < s->n; i++) {
		const struct vmdk_extent *a = &s->ext[0], *b = &s->ext[i];
		if (a->flat != b->flat || a->compressed != b->compressed ||
		    (!a->flat && a->grain != b->grain))
			same = false;
	}
	if (same && !s->ext[0].flat)
		bi->cluster_size = s->ext[0].grain;
	if (same)
		bi->needs_compressed_writes = s->ext[0].compressed;
	spec = val_obj();
	if (!spec)
		return -ENOMEM;
	val_add_str(spec, "type", "vmdk");
	data = val_add_obj(spec, "data");
	val_add_uint(data, "cid", s->cid);
	val_add_uint(data, "parent-cid", s->parent_cid);
	val_add_str(data, "create-type", s->create_type);
	arr = val_add_arr(data, "extents");
	for (int i = 0; i < s->n; i++) {
		const struct vmdk_extent *x = &s->ext[i];
		struct val *o = val_add_obj(arr, NULL);

		if (x->compressed)
			val_add_bool(o, "compressed", true);
		val_add_uint(o, "virtual-size", x->sectors * SECTOR);
		val_add_str(o, "filename", x->file->name);
		if (!x->flat)
			val_add_uint(o, "cluster-size", x->grain);
		val_add_str(o, "format", x->type);
	}
	bi->specific = spec;
	return 0;
}

static int64_t vmdk_allocated_size(struct blk *bs)
{
	struct vmdk_state *s = bs->opaque;
	int64_t sum = bfile_allocated(bs->file), r;

	for (int i = 0; i < s->n && sum >= 0; i++) {
		if (s->ext[i].file == bs->file)
			continue;
		r = bfile_allocated(s->ext[i].file);
		if (r < 0)
			return r;
		sum += r;
	}
	return sum;
}

/* qemu's check: every allocated grain (and every flat extent) must start
 * inside its file; the first one that does not is reported and ends the
 * check. */
static int vmdk_check(struct blk *bs, struct check_result *res, int fix)
{
	struct vmdk_state *s = bs->opaque;
	uint64_t off = 0;

	if (fix)
		return -ENOTSUP;
	while (off < bs->size) {
		struct vmdk_extent *x = find_extent(s, off);
		struct grain_ref g;
		uint64_t host;
		int64_t flen;
		int st;

		if (!x) {
			check_report(res, CHECK_LINE, "ERROR: could not find "
				     "extent for sector %" PRIu64,
				     off / SECTOR);
			res->corruptions++;
			return -EINVAL;
		}
		if (x->flat) {
			st = G_DATA;
			host = x->flat_off;
		} else {
			uint64_t rel = off - x->start, gdi = rel / x->gt_cover;

			if (gdi < x->gd_n && (gdi >= x->gd_avail ||
					      !x->gd[gdi])) {
				/* no grain table: nothing allocated here */
				off = MIN(ext_end(x), off - rel % x->gt_cover +
					  x->gt_cover);
				continue;
			}
			st = grain_lookup(x, rel, &g);
			host = g.host;
		}
		if (st < 0) {
			check_report(res, CHECK_LINE, "ERROR: could not get "
				     "cluster_offset for sector %" PRIu64,
				     off / SECTOR);
			res->corruptions++;
			return -EPERM;
		}
		if (st == G_DATA) {
			flen = bfile_size(x->file);
			if (flen < 0) {
				check_report(res, CHECK_LINE, "ERROR: could "
					     "not get extent file length for "
					     "sector %" PRIu64, off / SECTOR);
				res->corruptions++;
				return (int)flen;
			}
			if (host >= (uint64_t)flen) {
				check_report(res, CHECK_LINE, "ERROR: cluster "
					     "offset for sector %" PRIu64
					     " points after EOF", off / SECTOR);
				res->corruptions++;
				return -EINVAL;
			}
		}
		off += x->flat ? x->sectors * SECTOR : x->grain;
	}
	return 0;
}

/* ---- create ---- */

static const struct optdesc vmdk_create_opts[] = {
	FMT_OPT_SIZE,
	{ "adapter_type", OPT_STRING, "Virtual adapter type, can be one of "
	  "ide (default), lsilogic, buslogic or legacyESX", NULL, false },
	FMT_OPT_BACKING_FILE,
	FMT_OPT_BACKING_FMT("Must be 'vmdk' if present"),
	{ "compat6", OPT_BOOL, "VMDK version 6 image", "off", false },
	{ "hwversion", OPT_STRING, "VMDK hardware version", "undefined",
	  false },
	{ "toolsversion", OPT_STRING, "VMware guest tools version", NULL,
	  false },
	{ "subformat", OPT_STRING, "VMDK flat extent format, can be one of "
	  "{monolithicSparse (default) | monolithicFlat | "
	  "twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} ",
	  NULL, false },
	{ "zeroed_grain", OPT_BOOL, "Enable efficient zero writes using the "
	  "zeroed-grain GTE feature", NULL, false },
	FMT_OPT_FILE
};

enum { SUB_SPARSE, SUB_FLAT, SUB_2G_SPARSE, SUB_2G_FLAT, SUB_STREAM };
static const char *const subformats[] = {
	"monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
	"twoGbMaxExtentFlat", "streamOptimized",
};
static const char *const adapters[] = {
	"ide", "buslogic", "lsilogic", "legacyESX",
};

static int lookup(const char *v, const char *const *names, int n)
{
	for (int i = 0; i < n; i++)
		if (!strcmp(v, names[i]))
			return i;
	return -1;
}

/* Writes a new extent file: flat (sparse file of the right size) or a
 * hosted sparse extent laid out as qemu does: header, descriptor room
 * (20 sectors), redundant directory and tables, directory and tables,
 * then grains from the next grain boundary. */
static int init_extent(struct bfile *f, uint64_t size, bool flat,
		       bool compress, bool zeroed, struct err *e)
{
	uint8_t h[SECTOR] = { 0 };
	uint64_t cap = size / SECTOR, grains, gt_count, gd_sec, gt_sec;
	uint64_t rgd, gd, over;
	uint8_t *gdb;
	int ret;

	if (flat) {
		static const uint8_t z[4096];

		ret = bfile_truncate(f, size, PREALLOC_OFF, e);
		/* the first block is allocated, as qemu's file layer does */
		if (!ret && size)
			ret = bfile_pwrite(f, 0, z, size < 4096 ? SECTOR :
					   sizeof(z));
		return ret;
	}
	grains = DIV_ROUND_UP(cap, 128);
	gt_sec = DIV_ROUND_UP(512 * 4, SECTOR);
	gt_count = DIV_ROUND_UP(grains, 512);
	gd_sec = DIV_ROUND_UP(gt_count * 4, SECTOR);
	rgd = 1 + 20;
	gd = rgd + gd_sec + gt_sec * gt_count;
	over = ALIGN_UP(gd + gd_sec + gt_sec * gt_count, 128);
	if (gd_sec > (256u << 20) / SECTOR) {
		err_set(e, "Image size too large for VMDK");
		return -EFBIG;
	}
	st_be32(h, KDMV_MAGIC);
	st_le32(h + H_VERSION, compress ? 3 : zeroed ? 2 : 1);
	st_le32(h + H_FLAGS, FLAG_RGD | FLAG_NL_DETECT |
		(compress ? FLAG_COMPRESS | FLAG_MARKER : 0) |
		(zeroed ? FLAG_ZERO_GRAIN : 0));
	st_le64(h + H_CAPACITY, cap);
	st_le64(h + H_GRAIN, 128);
	st_le64(h + H_DESC_OFF, 1);
	st_le64(h + H_DESC_SIZE, 20);
	st_le32(h + H_NUM_GTES, 512);
	st_le64(h + H_RGD, rgd);
	st_le64(h + H_GD, gd);
	st_le64(h + H_OVERHEAD, over);
	h[H_CHECK] = '\n';
	h[H_CHECK + 1] = ' ';
	h[H_CHECK + 2] = '\r';
	h[H_CHECK + 3] = '\n';
	st_le16(h + H_COMPRESS, compress ? COMPRESS_DEFLATE : 0);
	/* qemu writes the used part of the header only */
	ret = bfile_pwrite(f, 0, h, H_COMPRESS + 2);
	if (ret < 0)
		goto ioerr;
	ret = bfile_truncate(f, over * SECTOR, PREALLOC_OFF, e);
	if (ret < 0)
		return ret;
	gdb = calloc(1, gd_sec * SECTOR);
	if (!gdb)
		return -ENOMEM;
	for (uint64_t i = 0; i < gt_count; i++)
		st_le32(gdb + 4 * i, (uint32_t)(rgd + gd_sec + i * gt_sec));
	ret = bfile_pwrite(f, rgd * SECTOR, gdb, gd_sec * SECTOR);
	for (uint64_t i = 0; i < gt_count && !ret; i++)
		st_le32(gdb + 4 * i, (uint32_t)(gd + gd_sec + i * gt_sec));
	if (!ret)
		ret = bfile_pwrite(f, gd * SECTOR, gdb, gd_sec * SECTOR);
	free(gdb);
	if (ret < 0)
		goto ioerr;
	return 0;
ioerr:
	err_set(e, "%s", strerror(-ret));
	return ret;
}

static int create_file(const char *name, struct bfile **f, struct err *e)
{
	return bfile_open(f, name, BFILE_CREATE | BFILE_RDWR,
			  CACHE_WRITEBACK, e);
}

/* The CID of the vmdk image a new one is made on. */
static int parent_cid_of(const char *filename, const char *backing,
			 uint32_t *cid, struct err *e)
{
	char *path = blk_relative_path(filename, backing);
	struct blk *b;
	struct err be = { "" };
	int ret;

	if (!path)
		return -ENOMEM;
	ret = blk_open(&b, path, NULL, BLK_O_NO_BACKING, CACHE_WRITEBACK,
		       &be);
	if (ret < 0) {
		err_set(e, "Could not open '%s': %s", path,
			be.msg[0] ? be.msg : strerror(-ret));
		free(path);
		return -EIO;
	}
	free(path);
	if (b->drv != &vmdk_driver) {
		err_set(e, "Invalid backing file format: %s. Must be vmdk",
			b->drv->name);
		blk_close(b);
		return -EINVAL;
	}
	*cid = ((struct vmdk_state *)b->opaque)->cid;
	blk_close(b);
	return 0;
}

static int vmdk_create(const char *filename, const struct optlist *opts,
		       struct err *e)
{
	const char *adapter = optlist_get(opts, "adapter_type");
	const char *backing = optlist_get(opts, "backing_file");
	const char *bfmt = optlist_get(opts, "backing_fmt");
	const char *hw = optlist_get(opts, "hwversion");
	const char *tools = optlist_get(opts, "toolsversion");
	const char *sub = optlist_get(opts, "subformat");
	const char *base, *dot;
	char *dir = NULL, *prefix = NULL, *postfix = NULL, *name = NULL;
	char *lines = NULL, *desc = NULL, parent_line[4200] = "";
	size_t lines_len = 0;
	uint64_t size = 0, created = 0, extent_size;
	uint32_t parent_cid = 0xffffffff, heads = 16;
	bool compat6 = false, zeroed = false, flat, split, compress;
	struct bfile *df = NULL;
	int sf = SUB_SPARSE, ad = 0, idx, ret;

	if (bfmt && blk_find_driver(bfmt) != &vmdk_driver) {
		err_set(e, "backing_file must be a vmdk image");
		return -EINVAL;
	}
	if (!filename[0]) {
		err_set(e, "No filename provided");
		return -EINVAL;
	}
	if (optlist_get_size(opts, "size", &size, e) < 0 ||
	    optlist_get_bool(opts, "compat6", &compat6, e) < 0 ||
	    optlist_get_bool(opts, "zeroed_grain", &zeroed, e) < 0)
		return -EINVAL;
	if (size > INT64_MAX - (SECTOR - 1)) {
		err_set(e, "Image size too large for VMDK");
		return -EFBIG;
	}
	size = ALIGN_UP(size, SECTOR);
	if (hw && !strcmp(hw, "undefined"))
		hw = NULL;
	if (adapter && (ad = lookup(adapter, adapters, 4)) < 0) {
		err_set(e, "invalid parameter value: %s", adapter);
		return -EINVAL;
	}
	if (sub && (sf = lookup(sub, subformats, 5)) < 0) {
		err_set(e, "invalid parameter value: %s", sub);
		return -EINVAL;
	}
	if (compat6) {
		if (hw) {
			err_set(e, "compat6 cannot be enabled with hwversion "
				"set");
			return -EINVAL;
		}
		hw = "6";
	}
	if (!hw)
		hw = "4";
	if (!tools)
		tools = "2147483647";
	if (ad != 0)
		heads = 255;	/* what VMware uses for SCSI adapters */
	split = sf == SUB_2G_SPARSE || sf == SUB_2G_FLAT;
	flat = sf == SUB_FLAT || sf == SUB_2G_FLAT;
	compress = sf == SUB_STREAM;
	if (flat && backing) {
		err_set(e, "Flat image can't have backing file");
		return -ENOTSUP;
	}
	if (flat && zeroed) {
		err_set(e, "Flat image can't enable zeroed grain");
		return -ENOTSUP;
	}

	/* path/prefix.postfix, for the names of the extent files */
	base = strrchr(filename, '/');
	base = base ? base + 1 : filename;
	dot = strrchr(base, '.');
	dir = strndup(filename, (size_t)(base - filename));
	prefix = strndup(base, dot ? (size_t)(dot - base) : strlen(base));
	postfix = strdup(dot ? dot : "");
	name = malloc(strlen(filename) + 32);
	lines = calloc(1, 1);
	ret = -ENOMEM;
	if (!dir || !prefix || !postfix || !name || !lines)
		goto out;

	extent_size = split ? 0x80000000ULL : size;
	created = (!split && !flat) ? extent_size : 0;
	ret = create_file(filename, &df, e);
	if (ret < 0)
		goto out;
	ret = init_extent(df, created, flat, compress, zeroed, e);
	if (ret < 0)
		goto out;
	if (!split && !flat) {
		char line[600];
		int l = snprintf(line, sizeof(line), "RW %" PRIu64
				 " SPARSE \"%s\"\n", created / SECTOR, base);
		char *nl = realloc(lines, lines_len + (size_t)l + 1);
		if (!nl)
			goto out;
		lines = nl;
		memcpy(lines + lines_len, line, (size_t)l + 1);
		lines_len += (size_t)l;
	}
	if (backing) {
		ret = parent_cid_of(filename, backing, &parent_cid, e);
		if (ret < 0)
			goto out;
		snprintf(parent_line, sizeof(parent_line),
			 "parentFileNameHint=\"%s\"\n", backing);
	}
	for (idx = 1; created < size; idx++) {
		uint64_t cur = MIN(size - created, extent_size);
		struct bfile *xf;
		char line[600], *nl;
		const char *xb;
		int l;

		if (split)
			sprintf(name, "%s%s-%c%03d%s", dir, prefix,
				flat ? 'f' : 's', idx, postfix);
		else
			sprintf(name, "%s%s-flat%s", dir, prefix, postfix);
		ret = create_file(name, &xf, e);
		if (ret < 0)
			goto out;
		ret = init_extent(xf, cur, flat, compress, zeroed, e);
		bfile_close(xf);
		if (ret < 0)
			goto out;
		xb = strrchr(name, '/');
		xb = xb ? xb + 1 : name;
		if (flat)
			l = snprintf(line, sizeof(line), "RW %" PRIu64
				     " FLAT \"%s\" 0\n", cur / SECTOR, xb);
		else
			l = snprintf(line, sizeof(line), "RW %" PRIu64
				     " SPARSE \"%s\"\n", cur / SECTOR, xb);
		ret = -ENOMEM;
		nl = realloc(lines, lines_len + (size_t)l + 1);
		if (!nl)
			goto out;
		lines = nl;
		memcpy(lines + lines_len, line, (size_t)l + 1);
		lines_len += (size_t)l;
		created += cur;
	}

	{
		size_t cap = lines_len + strlen(parent_line) + strlen(hw) +
			     strlen(tools) + 1024;
		int l;

		ret = -ENOMEM;
		desc = malloc(cap);
		if (!desc)
			goto out;
		l = snprintf(desc, cap,
			"# Disk DescriptorFile\n"
			"version=1\n"
			"CID=%" PRIx32 "\n"
			"parentCID=%" PRIx32 "\n"
			"createType=\"%s\"\n"
			"%s"
			"\n"
			"# Extent description\n"
			"%s"
			"\n"
			"# The Disk Data Base\n"
			"#DDB\n"
			"\n"
			"ddb.virtualHWVersion = \"%s\"\n"
			"ddb.geometry.cylinders = \"%" PRId64 "\"\n"
			"ddb.geometry.heads = \"%" PRIu32 "\"\n"
			"ddb.geometry.sectors = \"63\"\n"
			"ddb.adapterType = \"%s\"\n"
			"ddb.toolsVersion = \"%s\"\n",
			random_u32(), parent_cid, subformats[sf], parent_line,
			lines, hw,
			(int64_t)(size / (63ULL * heads * SECTOR)), heads,
			adapters[ad], tools);
		if (!split && !flat) {
			if ((size_t)l > DESC_SIZE) {
				err_set(e, "Descriptor too long");
				ret = -EINVAL;
				goto out;
			}
			ret = bfile_pwrite(df, 0x200, desc, (size_t)l);
		} else {
			ret = bfile_pwrite(df, 0, desc, (size_t)l);
			if (!ret)
				ret = bfile_truncate(df, (uint64_t)l,
						     PREALLOC_OFF, e);
		}
		if (ret < 0) {
			err_set(e, "Could not write description: %s",
				strerror(-ret));
			goto out;
		}
	}
	ret = bfile_flush(df);
out:
	if (df)
		bfile_close(df);
	free(dir);
	free(prefix);
	free(postfix);
	free(name);
	free(lines);
	free(desc);
	return ret;
}

const struct blk_driver vmdk_driver = {
	FMT_DRIVER(vmdk, struct vmdk_state),
	.caps = BLK_CAP_CREATE | BLK_CAP_WRITE | BLK_CAP_BACKING |
		BLK_CAP_COMPRESS | BLK_CAP_ZERO_INIT | BLK_CAP_CHECK,
	.pread = vmdk_pread,
	.pwrite = vmdk_pwrite,
	.pwrite_zeroes = vmdk_pwrite_zeroes,
	.block_status = vmdk_block_status,
	.write_compressed = vmdk_write_compressed,
	.flush = vmdk_flush,
	.allocated_size = vmdk_allocated_size,
	.check = vmdk_check,
};
