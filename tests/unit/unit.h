/* unit.h - the counters and the CHECK macro shared by the unit tests. Each
 * test program ends with unit_done(), whose "N passed, M failed" line is
 * what tests/check.sh adds up. */
#ifndef IMGBOX_UNIT_H
#define IMGBOX_UNIT_H

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static int pass, fail;

static void unit_check(int ok, const char *file, int line,
		       const char *what, const char *fmt, ...)
{
	va_list ap;

	if (ok) {
		pass++;
		return;
	}
	fail++;
	printf("FAIL: %s:%d: %s", file, line, what);
	if (*fmt) {
		printf(": ");
		va_start(ap, fmt);
		vprintf(fmt, ap);
		va_end(ap);
	}
	printf("\n");
}

/* CHECK(cond) or CHECK(cond, "format", args...) */
#define CHECK(cond, ...) \
	unit_check(!!(cond), __FILE__, __LINE__, #cond, "" __VA_ARGS__)

/* Runs a shell command line; its exit status, -1 if it could not run. */
static UNUSED int sh(const char *fmt, ...) PRINTF(1, 2);
static int sh(const char *fmt, ...)
{
	char cmd[1024];
	va_list ap;
	int r;

	va_start(ap, fmt);
	vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	r = system(cmd);
	return r == -1 ? -1 : WEXITSTATUS(r);
}

/* A fresh /tmp/NAME.XXXXXX (its path in dir) as the working directory,
 * and the real qemu-img on PATH: -1 go on, otherwise the exit code, with
 * the result line printed. */
static UNUSED int unit_scratch(char *dir, size_t len, const char *name)
{
	snprintf(dir, len, "/tmp/%s.XXXXXX", name);
	if (!mkdtemp(dir)) {
		printf("mkdtemp failed\n0 passed, 1 failed\n");
		return 1;
	}
	if (chdir(dir) < 0)
		return 1;
	if (sh("qemu-img --version >/dev/null 2>&1") != 0) {
		printf("qemu-img not found: skipped\n0 passed, 0 failed\n");
		return 0;
	}
	return -1;
}

static int unit_done(void)
{
	printf("%d passed, %d failed\n", pass, fail);
	return fail != 0;
}

#endif
