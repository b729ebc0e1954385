/* measure.c - how large a qcow2 image will be (the measure command):
 * the size a fully allocated image takes, and the size needed for the
 * data an input image really holds, with QEMU's numbers.
 *
 * The metadata of a fully allocated image (docs/interop/qcow2.txt): one
 * header cluster, L2 tables for every cluster, an L1 table for every L2
 * table, and refcount blocks plus a refcount table covering all of that,
 * themselves included. */
//format:PART(qcow2)

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "../fmt.h"
#include "qcow2.h"

#define MAX_L1_BYTES		(32u << 20)	/* qcow2.txt: L1 limit */
#define BITMAP_EXT		0x23852875u
#define BITMAP_DIR_MAX		(64u << 20)	/* memory cap on the directory */

/* Clusters of refcount blocks and refcount table needed so that `data`
 * clusters plus the refcount structures themselves all have a refcount:
 * iterate until the count no longer grows (a fixed point). */
static uint64_t refcount_meta_bytes(uint64_t data, uint64_t csize,
				    unsigned refcount_order)
{
	uint64_t per_block = csize * 8 >> refcount_order;
	uint64_t per_table = csize / 8;
	uint64_t blocks = 0, table = 0, total = 0, prev;

	do {
		prev = total;
		blocks = DIV_ROUND_UP(data + blocks + table, per_block);
		table = DIV_ROUND_UP(blocks, per_table);
		total = data + blocks + table;
	} while (total != prev);
	return (blocks + table) * csize;
}

/* File size of an image with every cluster of `vsize` allocated. */
static uint64_t full_size(uint64_t vsize, uint64_t csize,
			  unsigned refcount_order, unsigned l2_esize)
{
	uint64_t data = ALIGN_UP(vsize, csize);
	uint64_t l2_entries, l1_entries, meta = csize;	/* header */

	l2_entries = ALIGN_UP(data / csize, csize / l2_esize);
	meta += l2_entries * l2_esize;
	l1_entries = ALIGN_UP(l2_entries * l2_esize / csize, csize / 8);
	meta += l1_entries * 8;
	meta += refcount_meta_bytes((meta + data) / csize, csize,
				    refcount_order);
	return meta + data;
}

/* qcow2 version of an input image; 0 if unreadable. */
static uint32_t input_version(struct blk *in)
{
	uint8_t h[8];

	if (bfile_pread(in->file, 0, h, sizeof(h)) < 0)
		return 0;
	return ld_be32(h + 4);
}

static bool pow2(uint64_t x)
{
	return x && !(x & (x - 1));
}

/* Bytes the persistent bitmaps of a qcow2 v3 input take in the output
 * (bitmaps extension, qcow2.txt "Bitmaps"): each bitmap's data clusters
 * and its bitmap table, plus the directory. Unreadable or hostile
 * metadata counts as no bitmaps. */
static uint64_t input_bitmaps_bytes(struct blk *in, uint64_t csize)
{
	uint8_t h[112], ext[8], d[24];
	uint64_t off, end, dir_off = 0, dir_size = 0, total = 0, dir_bytes = 0;
	uint32_t hlen, nb = 0;
	uint8_t *dir = NULL;

	if (bfile_pread(in->file, 0, h, sizeof(h)) < 0 ||
	    ld_be32(h + 4) < 3 || !(ld_be64(h + 88) & 1))
		return 0;
	hlen = ld_be32(h + 100);
	off = hlen;
	end = (uint64_t)1 << ld_be32(h + 20);	/* header cluster */
	if (ld_be32(h + 20) < 9 || ld_be32(h + 20) > 21 || hlen < 104)
		return 0;
	while (off + 8 <= end) {
		uint32_t type, len;

		if (bfile_pread(in->file, off, ext, 8) < 0)
			return 0;
		type = ld_be32(ext);
		len = ld_be32(ext + 4);
		if (!type || len > end - off - 8)
			break;
		if (type == BITMAP_EXT && len >= 24) {
			if (bfile_pread(in->file, off + 8, d, 24) < 0)
				return 0;
			nb = ld_be32(d);
			dir_size = ld_be64(d + 8);
			dir_off = ld_be64(d + 16);
			break;
		}
		off += 8 + ALIGN_UP((uint64_t)len, 8);
	}
	if (!nb || !dir_size || dir_size > BITMAP_DIR_MAX)
		return 0;
	dir = malloc(dir_size);
	if (!dir || bfile_pread(in->file, dir_off, dir, dir_size) < 0) {
		free(dir);
		return 0;
	}
	off = 0;
	for (uint32_t i = 0; i < nb && off + 24 <= dir_size; i++) {
		unsigned gbits = dir[off + 17];
		uint64_t name_len = ld_be16(dir + off + 18);
		uint64_t extra = ld_be32(dir + off + 20);
		uint64_t ent = ALIGN_UP(24 + name_len + extra, 8);
		uint64_t bits, bytes, clusters;

		if (gbits > 63 || ent > dir_size - off)
			break;
		bits = DIV_ROUND_UP(in->size, (uint64_t)1 << gbits);
		bytes = DIV_ROUND_UP(bits, 8);
		clusters = DIV_ROUND_UP(bytes, csize);
		/* all data clusters, and the table of their offsets */
		total += clusters * csize + ALIGN_UP(clusters * 8, csize);
		/* directory entry without the extra data (not copied) */
		dir_bytes += ALIGN_UP(24 + name_len, 8);
		off += ent;
	}
	free(dir);
	return total + ALIGN_UP(dir_bytes, csize);
}

/* Bytes of data clusters the input needs: clusters holding data, counted
 * the way QEMU does (a run is extended to the end of its last cluster
 * and the part of its first cluster before it is added). */
static int input_data_bytes(struct blk *in, uint64_t csize, uint64_t *out,
			    struct err *e)
{
	uint64_t off = 0, n, map, req = 0;
	struct bfile *mf;
	int depth, st;

	while (off < in->size) {
		st = blk_block_status_above(in, NULL, off, in->size - off, &n,
					    &map, &mf, &depth);
		if (st < 0) {
			err_set(e, "Unable to get block status: %s",
				strerror(-st));
			return st;
		}
		if (!(st & BLK_STAT_ZERO) && (st & BLK_STAT_DATA) &&
		    (st & BLK_STAT_ALLOCATED)) {
			n = ALIGN_UP(off + n, csize) - off;
			req += off % csize + n;
		}
		off += n;
	}
	*out = req;
	return 0;
}

int qcow2_measure(const struct optlist *opts, struct blk *in, uint64_t size,
		  struct measure_info *mi, struct err *e)
{
	uint64_t csize = 65536, refbits = 16, vsize, required = 0, full;
	unsigned version = 3, order = 0, l2_esize = 8;
	bool ext_l2 = false, full_prealloc = false;
	const char *s;
	int ret;

	if (optlist_get_bool(opts, "extended_l2", &ext_l2, e) < 0)
		return -EINVAL;
	if (ext_l2)
		l2_esize = 16;
	if (optlist_get_size(opts, "cluster_size", &csize, e) < 0)
		return -EINVAL;
	if (!pow2(csize) || csize < 512 || csize > (2u << 20))
		return fmt_err(e, -EINVAL, "Cluster size must be a power of "
			       "two between 512 and 2048k");
	if (ext_l2 && csize < 16384)
		return fmt_err(e, -EINVAL, "Extended L2 entries are only "
			       "supported with cluster sizes of at least "
			       "16384 bytes");
	s = optlist_get(opts, "compat");
	if (s && !strcmp(s, "0.10"))
		version = 2;
	else if (s && strcmp(s, "1.1"))
		return fmt_err(e, -EINVAL, "Invalid compatibility level: '%s'",
			       s);
	if (optlist_get_size(opts, "refcount_bits", &refbits, e) < 0)
		return -EINVAL;
	if (!pow2(refbits) || refbits > 64)
		return fmt_err(e, -EINVAL, "Refcount width must be a power of "
			       "two and may not exceed 64 bits");
	if (version < 3 && refbits != 16)
		return fmt_err(e, -EINVAL, "Different refcount widths than 16 "
			       "bits require compatibility level 1.1 or above "
			       "(use compat=1.1 or greater)");
	while (((uint64_t)1 << order) < refbits)
		order++;
	s = optlist_get(opts, "preallocation");
	if (s) {
		int mode;
		if (blk_parse_prealloc(s, &mode) < 0)
			return fmt_err(e, -EINVAL, "invalid parameter value: "
				       "%s", s);
		full_prealloc = mode == PREALLOC_FALLOC ||
				mode == PREALLOC_FULL;
	}
	s = optlist_get(opts, "encrypt.format");
	if (s && !strcmp(s, "luks")) {
		/* the LUKS header size depends on secrets we cannot take */
		err_set(e, "Parameter 'encrypt.key-secret' is required for "
			"cipher");
		return -EINVAL;
	}

	if (in)
		size = 0;
	if (size > UINT64_MAX - csize)
		return fmt_err(e, -EFBIG, "The image size is too large (try "
			       "using a larger cluster size)");
	vsize = ALIGN_UP(size, csize);
	/* L1 entries needed for vsize must fit qcow2's L1 size limit */
	if (DIV_ROUND_UP(vsize / csize, csize / l2_esize) * 8 > MAX_L1_BYTES)
		return fmt_err(e, -EFBIG, "The image size is too large (try "
			       "using a larger cluster size)");
	if (in) {
		if (in->size > UINT64_MAX - csize)
			return -EFBIG;
		vsize = ALIGN_UP(in->size, csize);
		if (optlist_get(opts, "backing_file")) {
			/* the new backing file may share nothing with the
			 * input: every cluster may have to be written */
			required = vsize;
		} else {
			ret = input_data_bytes(in, csize, &required, e);
			if (ret < 0)
				return ret;
		}
	}
	if (full_prealloc)
		required = vsize;

	full = full_size(vsize, csize, order, l2_esize);
	mi->fully_allocated = full;
	/* The metadata is counted in full even when the data is not. */
	mi->required = full - vsize + required;
	mi->has_bitmaps = version >= 3 && in && in->drv &&
			  in->drv == &qcow2_driver &&
			  input_version(in) >= 3;
	mi->bitmaps = mi->has_bitmaps ? input_bitmaps_bytes(in, csize) : 0;
	return 0;
}
