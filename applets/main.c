/* main.c - multi-call dispatch: run the applet named by basename(argv[0]),
 * or by the first argument of "imgbox APPLET ...". */
#include <libgen.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>
#include "imgbox.h"
#include <generated/applets.h>

const struct applet applets[] = { APPLET_TABLE };
const int applet_count = ARRAY_SIZE(applets);

static void imgbox_usage(FILE *f)
{
	fprintf(f,
		"imgbox %s: qemu-img as a multi-call binary\n\n"
		"Usage: imgbox APPLET [ARGS...]  or  APPLET [ARGS...] "
		"(through a link)\n"
		"       imgbox --list | --install [-s] DIR | --help [APPLET] "
		"| --version\n\nApplets:\n", IMGBOX_VERSION);
	for (int i = 0; i < applet_count; i++)
		fprintf(f, "%s%s", i % 6 ? ", " : (i ? ",\n\t" : "\t"),
			applets[i].name);
	fputc('\n', f);
}

static int install(int argc, char **argv)
{
	int sym = 0, i = 0, ret = 0;
	char self[PATH_MAX];
	ssize_t n;
	const char *dir;

	if (i < argc && !strcmp(argv[i], "-s")) {
		sym = 1;
		i++;
	}
	if (i >= argc) {
		fprintf(stderr, "imgbox: --install needs a directory\n");
		return 1;
	}
	dir = argv[i];
	n = readlink("/proc/self/exe", self, sizeof(self) - 1);
	if (n < 0) {
		perror("imgbox: /proc/self/exe");
		return 1;
	}
	self[n] = 0;
	if (mkdir(dir, 0755) < 0 && errno != EEXIST) {
		fprintf(stderr, "imgbox: %s: %s\n", dir, strerror(errno));
		return 1;
	}
	for (int k = 0; k < applet_count; k++) {
		char path[PATH_MAX];
		snprintf(path, sizeof(path), "%s/%s", dir, applets[k].name);
		unlink(path);
		if ((sym ? symlink(self, path) : link(self, path)) < 0) {
			fprintf(stderr, "imgbox: %s: %s\n", path,
				strerror(errno));
			ret = 1;
		}
	}
	return ret;
}

int main(int argc, char **argv)
{
	const char *name = argc > 0 ? argv[0] : "imgbox";
	const struct applet *a;
	char *slash = strrchr(name, '/');

	if (slash)
		name = slash + 1;
	if (!strncmp(name, "imgbox", 6)) {
		if (argc < 2) {
			imgbox_usage(stderr);
			return 1;
		}
		if (!strcmp(argv[1], "--list")) {
			for (int i = 0; i < applet_count; i++)
				puts(applets[i].name);
			return 0;
		}
		if (!strcmp(argv[1], "--install"))
			return install(argc - 2, argv + 2);
		if (!strcmp(argv[1], "--version")) {
			/* the qemu-img applet's --version says the same
			 * in qemu-img's form */
			printf("imgbox %s (qemu-img %s compatible)\n"
			       "imgbox: qemu-img's command line in a "
			       "multi-call binary\n",
			       IMGBOX_VERSION, QEMU_COMPAT_VERSION);
			return 0;
		}
		if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
			if (argc > 2) {
				a = applet_find(argv[2]);
				if (!a) {
					fprintf(stderr, "imgbox: %s: applet "
						"not found\n", argv[2]);
					return 127;
				}
				print_usage(a, stdout);
				return 0;
			}
			imgbox_usage(stdout);
			return 0;
		}
		argv++;
		argc--;
		name = argv[0];
		slash = strrchr(name, '/');
		if (slash)
			name = slash + 1;
	}
	a = applet_find(name);
	if (!a && strncmp(name, "img-", 4)) {
		/* "imgbox info x.img" means img-info */
		char full[64];
		snprintf(full, sizeof(full), "img-%s", name);
		a = applet_find(full);
	}
	if (!a) {
		fprintf(stderr, "%s: applet not found\n", name);
		return 127;
	}
	cur_applet = a;
	progname = a->name;
	check_default_report = check_print_line;
	return a->main(argc, argv);
}
