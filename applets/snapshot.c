/* snapshot.c - img-snapshot: list, create, apply and delete the internal
 * snapshots of an image (qcow2). */
//config:config APPLET_SNAPSHOT
//config:	bool "img-snapshot"
//config:	default y
//config:	help
//config:	  usage: img-snapshot [--object objectdef] [--image-opts] [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename
//config:
//config:	  List, create, apply or delete the internal snapshots of
//config:	  FILENAME. Apply takes an ID or a name; delete takes a name.
//config:
//config:	  -l        list the snapshots
//config:	  -c NAME   create snapshot NAME of the current content
//config:	  -a SNAP   revert the image to snapshot SNAP (ID or name)
//config:	  -d NAME   delete snapshot NAME
//config:	  -f FMT    image format (default: probe)
//config:	  -U        open read-only without locking (-l only)
//config:	  -q        quiet
//applet:APPLET(snapshot, "img-snapshot", "la:c:d:qUf:", "object:*,image-opts,force-share=U,format:=f")

#define FOR_snapshot
#include <sys/time.h>
#include "imgbox.h"

/* qemu-img refuses a second action while it parses; getopt keeps only
 * the last argument of a repeated option, so count them on argv. */
static int count_actions(int argc, char **argv)
{
	int n = 0;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];

		if (!strcmp(a, "--"))
			break;
		if (a[0] != '-' || !a[1])
			continue;
		if (a[1] == '-') {
			if (!strcmp(a, "--object") || !strcmp(a, "--format"))
				i++;
			continue;
		}
		for (const char *p = a + 1; *p; p++) {
			if (*p == 'l') {
				n++;
				continue;
			}
			if (strchr("acdf", *p)) {
				n += *p != 'f';
				if (!p[1])
					i++;
				break;
			}
		}
	}
	return n;
}

int snapshot_main(int argc, char **argv)
{
	const char *fmt, *filename, *name = NULL;
	struct snapshot_info *list = NULL;
	struct err e = { "" };
	struct blk *bs;
	unsigned flags = BLK_O_NO_BACKING;
	int i, n = 0, ret = 0;

	if (argc == 2 && (!strcmp(argv[1], "--help") ||
			  !strcmp(argv[1], "-h"))) {
		print_usage(cur_applet, stdout);
		return 0;
	}
	i = opts_parse(argc, argv);
	if (count_actions(argc, argv) > 1)
		die_usage("Cannot mix '-l', '-a', '-c', '-d'");
	if (i != argc - 1)
		die_usage("Expecting one image file name");
	filename = argv[i];
	if (HAS(image_opts))
		die("--image-opts is not supported");
	fmt = HAS(f) ? ARG(f) : NULL;
	if (HAS(a))
		name = ARG(a);
	else if (HAS(c))
		name = ARG(c);
	else if (HAS(d))
		name = ARG(d);
	if (!HAS(l))
		flags |= BLK_O_RDWR;
	if (HAS(U))
		flags |= BLK_O_SHARE;	/* blk_open refuses it with RDWR */
	bs = open_image(filename, fmt, flags, CACHE_WRITEBACK);

	if (HAS(l)) {
		if (blk_snapshot_list(bs, &list, &n) == 0 && n > 0) {
			printf("Snapshot list:\n");
			print_snapshot_table(list, n);
		}
	} else if (HAS(c)) {
		struct snapshot_info sn;
		struct timeval tv;

		memset(&sn, 0, sizeof(sn));
		snprintf(sn.name, sizeof(sn.name), "%s", name);
		gettimeofday(&tv, NULL);
		sn.date_sec = (uint32_t)tv.tv_sec;
		sn.date_nsec = (uint32_t)tv.tv_usec * 1000;
		/* qemu-img records an icount of 0 */
		sn.icount_valid = 1;
		ret = blk_snapshot_create(bs, &sn, &e);
		if (!ret)
			ret = blk_flush(bs);
		if (ret < 0)
			msg("Could not create snapshot '%s': %d (%s)", name,
			    ret, strerror(-ret));
	} else if (HAS(a)) {
		if (!blk_can(bs, BLK_CAP_SNAPSHOTS)) {
			/* qemu reopens the format layer after asking the
			 * protocol layer, so a probed raw image warns twice */
			warn_probed_raw(bs);
			ret = -ENOTSUP;
			msg("Could not apply snapshot '%s': Block driver does "
			    "not support snapshots", name);
		} else {
			ret = blk_snapshot_apply(bs, name, &e);
			if (!ret)
				ret = blk_flush(bs);
			if (ret < 0)
				msg("Could not apply snapshot '%s': Failed to "
				    "load snapshot: %s", name, strerror(-ret));
		}
	} else if (HAS(d)) {
		int k = -1;

		/* qemu-img 7.2 looks the snapshot up by name only */
		if (blk_snapshot_list(bs, &list, &n) == 0)
			for (k = 0; k < n && strcmp(list[k].name, name); k++)
				;
		if (k < 0 || k >= n) {
			ret = -ENOENT;
			msg("Could not delete snapshot '%s': snapshot not "
			    "found", name);
		} else {
			ret = blk_snapshot_delete(bs, list[k].id, name, &e);
			if (!ret)
				ret = blk_flush(bs);
			if (ret < 0 && e.msg[0])
				msg("Could not delete snapshot '%s': %s: %s",
				    name, e.msg, strerror(-ret));
			else if (ret < 0)
				msg("Could not delete snapshot '%s': %s", name,
				    strerror(-ret));
		}
	}
	free(list);
	blk_close(bs);
	return ret < 0;
}
