/* qemu_img.c - the qemu-img applet: "qemu-img COMMAND ARGS" runs the
 * img-COMMAND applet with the same arguments, messages prefixed
 * "qemu-img:", as the real qemu-img's command line expects. */
//config:config APPLET_QEMU_IMG
//config:	bool "qemu-img"
//config:	default y
//config:	help
//config:	  usage: qemu-img [standard options] command [command options]
//config:	  Disk image tool with qemu-img's command line (imgbox).
//config:
//config:	    -h, --help      this text
//config:	    -V, --version   the qemu-img version this imgbox follows
//config:	    -T, --trace     QEMU's tracing switch: accepted, no effect
//config:	    --untrusted     every image may be hostile (imgbox; also
//config:	                    after the command, see its --help)
//config:
//config:	  Commands are the img-* applets without their prefix;
//config:	  'qemu-img COMMAND --help' describes one.
//applet:APPLET(qemu_img, "qemu-img", "", "")

#include "imgbox.h"

void qemu_img_help(void)
{

	printf("qemu-img version %s (imgbox %s)\n"
	       "usage: qemu-img [standard options] command [command options]\n"
	       "Disk image tool with qemu-img's command line (imgbox).\n\n"
	       "    -h, --help      this text\n"
	       "    -V, --version   the qemu-img version this imgbox follows\n"
	       "    -T, --trace     QEMU's tracing switch: accepted, no "
	       "effect\n"
	       "    --untrusted     every image may be hostile (imgbox; also "
	       "after the command,\n"
	       "                    see its --help)\n\n"
	       "Command syntax:\n", QEMU_COMPAT_VERSION, IMGBOX_VERSION);
	for (int i = 0; i < applet_count; i++) {
		const char *u = applets[i].usage, *nl;
		if (strncmp(applets[i].name, "img-", 4))
			continue;
		/* first usage line: "usage: img-NAME ARGS" */
		if (!strncmp(u, "usage: ", 7))
			u += 7;
		if (!strncmp(u, "img-", 4))
			u += 4;
		nl = strchr(u, '\n');
		printf("  %.*s\n", nl ? (int)(nl - u) : (int)strlen(u), u);
	}
	printf("\nSupported formats:");
	for (int i = 0; blk_format_at(i); i++)
		printf(" %s", blk_format_at(i));
	printf("\n\nimgbox applets also answer to img-COMMAND; "
	       "'qemu-img COMMAND --help' describes one command.\n");
}

int qemu_img_main(int argc, char **argv)
{
	const struct applet *a;
	char name[64];
	int i = 1;

	progname = "qemu-img";
	for (; i < argc && argv[i][0] == '-'; i++) {
		const char *o = argv[i];
		if (!strcmp(o, "-h") || !strcmp(o, "--help")) {
			qemu_img_help();
			return 0;
		}
		if (!strcmp(o, "-V") || !strcmp(o, "--version")) {
			printf("qemu-img version %s (imgbox %s)\n"
			       "imgbox: qemu-img's command line in a multi-call "
			       "binary\n",
			       QEMU_COMPAT_VERSION, IMGBOX_VERSION);
			return 0;
		}
		if (!strcmp(o, "--untrusted")) {
			untrusted_from_env();
			blk_set_untrusted(true);
			continue;
		}
		if (!strcmp(o, "-T") || !strcmp(o, "--trace")) {
			if (++i >= argc)
				die_usage("missing argument for option '%s'",
					  o);
			continue;
		}
		if (!strncmp(o, "--trace=", 8) || !strncmp(o, "-T", 2))
			continue;
		die_usage("unrecognized option '%s'", o);
	}
	if (i >= argc)
		die_usage("Not enough arguments");
	snprintf(name, sizeof(name), "img-%s", argv[i]);
	a = applet_find(name);
	if (!a)
		die_usage("Command not found: %s", argv[i]);
	cur_applet = a;
	argv[i] = (char *)"qemu-img";
	return a->main(argc - i, argv + i);
}
