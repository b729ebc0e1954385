/* snapload.c - read an internal snapshot in place of the image
 * (measure -l): a read-only image swaps its active L1 table for
 * the snapshot's (qcow2.txt "Snapshots": each snapshot has its own L1
 * table; the L2 tables and data clusters are shared). QEMU keeps the
 * image's current virtual size, and so do we. */
//format:PART(qcow2)

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "qcow2.h"

int qcow2_snapshot_load_tmp(struct blk *bs, const char *id, const char *name,
			    struct err *e)
{
	struct qcow2 *s = qcow2_state(bs);
	const struct qcow2_snapshot *sn = NULL;
	uint64_t *l1, bytes, end;
	uint8_t *raw;
	int ret;

	if (bs->flags & BLK_O_RDWR) {
		err_set(e, "Device '' is writable, cannot load internal "
			"snapshot");
		return -EINVAL;
	}
	for (uint32_t i = 0; i < s->nb_snapshots && s->sn; i++) {
		const struct snapshot_info *in = &s->sn[i].info;
		if ((!id || !strcmp(in->id, id)) &&
		    (!name || !strcmp(in->name, name))) {
			sn = &s->sn[i];
			break;
		}
	}
	if (!sn || (!id && !name)) {
		err_set(e, "Can't find snapshot");
		return -ENOENT;
	}
	bytes = (uint64_t)sn->l1_size * 8;
	if (bytes > QCOW2_MAX_L1_BYTES) {
		err_set(e, "Snapshot L1 table too large");
		return -EFBIG;
	}
	if ((sn->l1_offset & (s->cluster_size - 1)) ||
	    add_overflow_u64(sn->l1_offset, bytes, &end) || end > INT64_MAX) {
		err_set(e, "Snapshot L1 table offset invalid");
		return -EINVAL;
	}
	l1 = calloc(sn->l1_size ? sn->l1_size : 1, 8);
	raw = malloc(bytes ? bytes : 1);
	if (!l1 || !raw) {
		free(l1);
		free(raw);
		return -ENOMEM;
	}
	ret = bytes ? bfile_pread(bs->file, sn->l1_offset, raw, bytes) : 0;
	if (ret < 0) {
		free(l1);
		free(raw);
		err_set(e, "Could not read the snapshot L1 table: %s",
			strerror(-ret));
		return ret;
	}
	for (uint32_t i = 0; i < sn->l1_size; i++)
		l1[i] = ld_be64(raw + (size_t)i * 8);
	free(raw);
	free(s->l1);
	s->l1 = l1;
	s->l1_size = sn->l1_size;
	s->l1_offset = sn->l1_offset;
	/* like QEMU, the image keeps its current size: what the snapshot's
	 * L1 table does not cover reads as zero */
	return 0;
}
