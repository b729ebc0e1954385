/* ops.c - the registry queries and the maintenance operations behind
 * blk.h (check, amend, measure, snapshots, backing change): each asks the
 * driver's capability, enforces read-only and takes the image lock for
 * drivers that are not thread-safe, so applets never see a driver. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "blk_driver.h"

const char *blk_format_at(int i)
{
	for (int k = 0; blk_drivers[k]; k++)
		if (k == i)
			return blk_drivers[k]->name;
	return NULL;
}

bool blk_format_exists(const char *fmt)
{
	return fmt && blk_find_driver(fmt);
}

bool blk_format_can(const char *fmt, unsigned cap)
{
	const struct blk_driver *drv = fmt ? blk_find_driver(fmt) : NULL;

	return drv && (drv->caps & cap) == cap;
}

const struct optdesc *blk_format_create_opts(const char *fmt)
{
	const struct blk_driver *drv = fmt ? blk_find_driver(fmt) : NULL;

	return drv ? drv->create_opts : NULL;
}

const struct optdesc *blk_format_amend_opts(const char *fmt)
{
	const struct blk_driver *drv = fmt ? blk_find_driver(fmt) : NULL;

	if (!drv || !drv->amend || !(drv->caps & BLK_CAP_AMEND))
		return NULL;
	return drv->amend_opts;
}

const char *blk_format(const struct blk *bs)
{
	return bs->drv->name;
}

bool blk_can(const struct blk *bs, unsigned cap)
{
	return (bs->drv->caps & cap) == cap;
}

/* Maintenance operations change metadata in ways no other caller may
 * overlap, thread-safe driver or not: they always hold the image lock. */
#define EXCLUSIVE(bs, call) ({					\
	__typeof__(call) r_;						\
	pthread_mutex_lock(&(bs)->lock);				\
	r_ = (call);							\
	pthread_mutex_unlock(&(bs)->lock);				\
	r_; })

int64_t blk_allocated_size(struct blk *bs)
{
	if (!bs->drv->allocated_size)
		return bfile_allocated(bs->file);
	return EXCLUSIVE(bs, bs->drv->allocated_size(bs));
}

int blk_check(struct blk *bs, struct check_result *res, int fix)
{
	if (!bs->drv->check || !(bs->drv->caps & BLK_CAP_CHECK))
		return -ENOTSUP;
	if (fix && !(bs->flags & BLK_O_RDWR))
		return -EBADF;
	return EXCLUSIVE(bs, bs->drv->check(bs, res, fix));
}

int blk_amend(struct blk *bs, const struct optlist *opts, bool force,
	      struct err *e)
{
	int ret;

	if (!blk_format_amend_opts(bs->drv->name)) {
		err_set(e, "Format driver '%s' does not support option "
			"amendment", bs->drv->name);
		return -ENOTSUP;
	}
	if (!(bs->flags & BLK_O_RDWR)) {
		err_set(e, "Image is read-only");
		return -EBADF;
	}
	ret = optlist_validate(opts, bs->drv->amend_opts, bs->drv->name, e);
	if (ret < 0)
		return ret;
	return EXCLUSIVE(bs, bs->drv->amend(bs, opts, force, e));
}

int blk_measure(const char *fmt, const struct optlist *opts, struct blk *in,
		uint64_t size, struct measure_info *mi, struct err *e)
{
	const struct blk_driver *drv = blk_find_driver(fmt);

	if (!drv) {
		err_set(e, "Unknown file format '%s'", fmt);
		return -EINVAL;
	}
	if (!(drv->caps & BLK_CAP_MEASURE) || !drv->measure) {
		err_set(e, "Block driver '%s' does not support size "
			"measurement", fmt);
		return -ENOTSUP;
	}
	if (!in)
		return drv->measure(opts, in, size, mi, e);
	return EXCLUSIVE(in, drv->measure(opts, in, size, mi, e));
}

int blk_snapshot_list(struct blk *bs, struct snapshot_info **list, int *n)
{
	*list = NULL;
	*n = 0;
	if (!bs->drv->snapshot_list)
		return 0;
	return EXCLUSIVE(bs, bs->drv->snapshot_list(bs, list, n));
}

static int snapshot_writable(struct blk *bs, bool has, struct err *e)
{
	if (!has)
		return -ENOTSUP;
	if (!(bs->flags & BLK_O_RDWR)) {
		err_set(e, "Image is read-only");
		return -EBADF;
	}
	return 0;
}

int blk_snapshot_create(struct blk *bs, const struct snapshot_info *sn,
			struct err *e)
{
	int ret = snapshot_writable(bs, bs->drv->snapshot_create != NULL, e);

	if (ret < 0)
		return ret;
	return EXCLUSIVE(bs, bs->drv->snapshot_create(bs, sn, e));
}

int blk_snapshot_apply(struct blk *bs, const char *id_or_name,
		       struct err *e)
{
	int ret = snapshot_writable(bs, bs->drv->snapshot_apply != NULL, e);

	if (ret < 0)
		return ret;
	return EXCLUSIVE(bs, bs->drv->snapshot_apply(bs, id_or_name, e));
}

int blk_snapshot_delete(struct blk *bs, const char *id, const char *name,
			struct err *e)
{
	int ret = snapshot_writable(bs, bs->drv->snapshot_delete != NULL, e);

	if (ret < 0)
		return ret;
	return EXCLUSIVE(bs, bs->drv->snapshot_delete(bs, id, name, e));
}

bool blk_can_load_snapshot(const struct blk *bs)
{
	return bs->drv->snapshot_load_tmp != NULL;
}

int blk_snapshot_load_tmp(struct blk *bs, const char *id, const char *name,
			  struct err *e)
{
	if (!bs->drv->snapshot_load_tmp)
		return -ENOTSUP;
	if (bs->flags & BLK_O_RDWR)
		return -EBADF;
	return EXCLUSIVE(bs, bs->drv->snapshot_load_tmp(bs, id, name, e));
}

int blk_change_backing(struct blk *bs, const char *file, const char *fmt,
		       struct err *e)
{
	if (!bs->drv->change_backing || !(bs->drv->caps & BLK_CAP_BACKING))
		return -ENOTSUP;
	if (!(bs->flags & BLK_O_RDWR))
		return -EBADF;
	return EXCLUSIVE(bs, bs->drv->change_backing(bs, file, fmt, e));
}

int blk_make_empty(struct blk *bs)
{
	if (!bs->drv->make_empty)
		return -ENOTSUP;
	if (!(bs->flags & BLK_O_RDWR))
		return -EBADF;
	return EXCLUSIVE(bs, bs->drv->make_empty(bs));
}
