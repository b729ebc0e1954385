/* resize.c - img-resize: grow or shrink an image's virtual disk. */
//config:config APPLET_RESIZE
//config:	bool "img-resize"
//config:	default y
//config:	help
//config:	  usage: img-resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size
//config:
//config:	  Change the virtual size of FILENAME to SIZE, or by +SIZE or
//config:	  -SIZE (suffixes k, M, G, T, P, E). A negative SIZE is not an
//config:	  option: the last argument is always the size.
//config:
//config:	  -f FMT            image format (default: probe)
//config:	  --preallocation   off, metadata, falloc or full for the new part
//config:	  --shrink          allow making the image smaller (data past
//config:	                    the new end is lost)
//config:	  -q                quiet
//applet:APPLET(resize, "img-resize", "f:q", "object:*,image-opts,preallocation:,shrink,format:=f")

#define FOR_resize
#include "imgbox.h"

int resize_main(int argc, char **argv)
{
	const char *fmt, *size, *filename;
	int i, relative = 0, prealloc = PREALLOC_OFF, ret;
	uint64_t n, cur, total;
	struct err e = { "" };
	struct blk *bs;

	if (argc == 2 && (!strcmp(argv[1], "--help") ||
			  !strcmp(argv[1], "-h"))) {
		print_usage(cur_applet, stdout);
		return 0;
	}
	/* The size comes off the end before option parsing, so that "-1G"
	 * is a size and not an option (as in qemu-img). */
	if (argc < 3)
		die_usage("Not enough arguments");
	size = argv[--argc];
	i = opts_parse(argc, argv);
	fmt = HAS(f) ? ARG(f) : NULL;
	if (HAS(preallocation) &&
	    blk_parse_prealloc(ARG(preallocation), &prealloc) < 0)
		die("Invalid preallocation mode '%s'", ARG(preallocation));
	if (i != argc - 1)
		die_usage("Expecting image file name and size");
	filename = argv[i];
	if (HAS(image_opts))
		die("--image-opts is not supported");

	if (size[0] == '+' || size[0] == '-')
		relative = *size++ == '+' ? 1 : -1;
	ret = parse_size(size, &n);
	if (ret == -ERANGE)
		die("Value '%s' is out of range for parameter 'size'", size);
	if (ret < 0)
		die("Parameter 'size' expects a non-negative number below "
		    "2^64\nOptional suffix k, M, G, T, P or E means kilo-, "
		    "mega-, giga-, tera-, peta-\nand exabytes, respectively.");

	bs = open_image(filename, fmt, BLK_O_RDWR | BLK_O_RESIZE,
			CACHE_WRITEBACK);

	/* qemu-img computes in int64_t: a size of 8E or more is negative. */
	cur = bs->size;
	if (relative > 0)
		total = cur + n;
	else if (relative < 0)
		total = cur - n;
	else
		total = n;
	ret = -1;
	if ((int64_t)total <= 0) {
		msg("New image size must be positive");
		goto out;
	}
	if (total <= cur && prealloc != PREALLOC_OFF) {
		msg("Preallocation can only be used for growing images");
		goto out;
	}
	if (total < cur && !HAS(shrink)) {
		msg("Use the --shrink option to perform a shrink operation.");
		msg("warning: Shrinking an image will delete all data beyond "
		    "the shrunken image's end. Before performing such an "
		    "operation, make sure there is no important data there.");
		goto out;
	}
	ret = blk_truncate(bs, total, prealloc, total < cur, &e);
	if (ret < 0) {
		msg("%s", e.msg[0] ? e.msg : strerror(-ret));
		goto out;
	}
	if (!HAS(q))
		printf("Image resized.\n");
out:
	blk_close(bs);
	return ret < 0;
}
