/* untrusted.c - the untrusted-image policy (--untrusted, IMGBOX_UNTRUSTED,
 * CONFIG_UNTRUSTED_DEFAULT): which files an image may make us open, and
 * how much memory its tables may make us allocate. Every name an image
 * records (backing file, data file, extent) and every table a driver sizes
 * from the image goes through here; without BLK_O_UNTRUSTED both answer
 * yes, and the drivers' own qemu-like limits are all that applies. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include "blk_driver.h"

static bool untrusted_default;

void blk_set_untrusted(bool on)
{
	untrusted_default = on;
}

unsigned blk_default_flags(void)
{
	return untrusted_default ? BLK_O_UNTRUSTED : 0;
}

static int refuse(const struct blk *bs, const char *what, const char *name,
		  const char *why, struct err *e)
{
	err_set(e, "Untrusted image '%s' refers to %s '%s': %s", bs->filename,
		what, name, why);
	return -EPERM;
}

/* A name that is a protocol, json: or a path that may leave the image's
 * directory by its spelling alone. */
static const char *bad_spelling(const char *name)
{
	const char *colon = strchr(name, ':');
	const char *slash = strchr(name, '/');
	const char *p;

	if (!strncmp(name, "json:", 5))
		return "json: file names are refused";
	if (colon && (!slash || colon < slash) && strncmp(name, "file:", 5))
		return "protocols are refused";
	if (!strncmp(name, "file:", 5))
		name += 5;
	if (name[0] == '/')
		return "absolute paths are refused";
	for (p = name; *p; p += strcspn(p, "/")) {
		p += strspn(p, "/");
		if (!strncmp(p, "..", 2) && (p[2] == '/' || !p[2]))
			return "'..' is refused";
	}
	return NULL;
}

/* Directory part of an image name, "." when it has none. */
static char *dir_of(const char *image)
{
	const char *slash = strrchr(image, '/');

	if (!slash)
		return strdup(".");
	if (slash == image)
		return strdup("/");
	return strndup(image, (size_t)(slash - image));
}

/* real is dir itself or below it. */
static bool inside(const char *real, const char *dir)
{
	size_t n = strlen(dir);

	if (!strcmp(dir, "/"))
		return true;
	return !strncmp(real, dir, n) && (real[n] == '/' || !real[n]);
}

int blk_ref_check(const struct blk *bs, const char *what, const char *name,
		  struct blk_ref *ref, struct err *e)
{
	char *dir, *path = NULL, rdir[PATH_MAX], real[PATH_MAX];
	const char *why;
	struct stat st;
	int ret = 0;

	memset(ref, 0, sizeof(*ref));
	if (!(bs->flags & BLK_O_UNTRUSTED))
		return 0;
	why = bad_spelling(name);
	if (why)
		return refuse(bs, what, name, why, e);
	dir = dir_of(bs->filename);
	path = blk_relative_path(bs->filename, strncmp(name, "file:", 5) ?
				 name : name + 5);
	if (!dir || !path) {
		ret = -ENOMEM;
		goto out;
	}
	/* a name that does not resolve fails to open as in plain mode; it
	 * cannot appear later either, the open is checked again */
	if (!realpath(dir, rdir) || !realpath(path, real) ||
	    stat(real, &st) < 0)
		goto out;
	if (!inside(real, rdir))
		ret = refuse(bs, what, name, "it resolves outside the "
			     "image's directory", e);
	else if (!S_ISREG(st.st_mode))
		ret = refuse(bs, what, name, "not a regular file", e);
	ref->dev = st.st_dev;
	ref->ino = st.st_ino;
	ref->checked = true;
out:
	free(dir);
	free(path);
	return ret;
}

int blk_ref_opened(const struct blk *bs, const char *what, const char *name,
		   const struct blk_ref *ref, const struct bfile *f,
		   struct err *e)
{
	if (!(bs->flags & BLK_O_UNTRUSTED))
		return 0;
	if (!ref->checked || f->is_blockdev || f->dev != ref->dev ||
	    f->ino != ref->ino)
		return refuse(bs, what, name, "it changed while it was "
			      "checked", e);
	return 0;
}

int blk_meta_alloc(struct blk *bs, uint64_t bytes, const char *what,
		   struct err *e)
{
	char buf[sizeof(bs->errmsg)];
	const char *fmt;
	uint64_t cap;

	if (!(bs->flags & BLK_O_UNTRUSTED))
		return 0;
	if (bytes > BLK_UNTRUSTED_TABLE) {
		fmt = "per table";
		cap = BLK_UNTRUSTED_TABLE;
	} else if (bytes > BLK_UNTRUSTED_TOTAL - bs->meta_bytes) {
		fmt = "per image";
		cap = BLK_UNTRUSTED_TOTAL;
	} else {
		bs->meta_bytes += bytes;
		return 0;
	}
	snprintf(buf, sizeof(buf), "Untrusted image '%s': %s of %llu bytes "
		 "is over the limit of %llu MiB %s", bs->filename, what,
		 (unsigned long long)bytes, (unsigned long long)(cap >> 20),
		 fmt);
	if (e)
		err_set(e, "%s", buf);
	else
		snprintf(bs->errmsg, sizeof(bs->errmsg), "%s", buf);
	return -EFBIG;
}

void blk_meta_free(struct blk *bs, uint64_t bytes)
{
	if (bs->flags & BLK_O_UNTRUSTED)
		bs->meta_bytes -= MIN(bytes, bs->meta_bytes);
}

int blk_backing_allowed(const struct blk *bs, struct err *e)
{
	struct blk_ref ref;

	if (!bs->backing_file || !bs->backing_file[0])
		return 0;
	return blk_ref_check(bs, "backing file", bs->backing_file, &ref, e);
}
