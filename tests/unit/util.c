/* util.c - unit tests for block/util.c and block/value.c: sizes, option
 * lists, zero detection, check report lines, JSON layout. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "blk.h"
#include "unit.h"

static void test_sizes(void)
{
	uint64_t v = 0;

	CHECK(parse_size("0", &v) == 0 && v == 0);
	CHECK(parse_size("1024", &v) == 0 && v == 1024);
	CHECK(parse_size("1k", &v) == 0 && v == 1024);
	CHECK(parse_size("1K", &v) == 0 && v == 1024);
	CHECK(parse_size("1M", &v) == 0 && v == 1 << 20);
	CHECK(parse_size("1.5M", &v) == 0 && v == 3 << 19);
	CHECK(parse_size("2G", &v) == 0 && v == 2ULL << 30);
	CHECK(parse_size("1T", &v) == 0 && v == 1ULL << 40);
	CHECK(parse_size("1P", &v) == 0 && v == 1ULL << 50);
	CHECK(parse_size("1E", &v) == 0 && v == 1ULL << 60);
	CHECK(parse_size("512b", &v) == 0 && v == 512);
	CHECK(parse_size("0x100", &v) == 0 && v == 256);
	CHECK(parse_size("16E", &v) == -ERANGE);
	CHECK(parse_size("99999999999999999999", &v) == -ERANGE);
	CHECK(parse_size("1.5", &v) == -EINVAL);
	CHECK(parse_size("-1", &v) == -EINVAL);
	CHECK(parse_size("", &v) == -EINVAL);
	CHECK(parse_size("1x", &v) == -EINVAL);
	CHECK(parse_size("1kB", &v) == -EINVAL);
	CHECK(parse_size("1M ", &v) == -EINVAL);
	CHECK(parse_size(NULL, &v) == -EINVAL);
}

static void test_optlist(void)
{
	struct optlist l = { 0 };
	struct err e = { "" };
	uint64_t sz;
	bool b;
	static const struct optdesc desc[] = {
		{ "size", OPT_SIZE, "", NULL, false },
		{ "lazy", OPT_BOOL, "", NULL, false },
		{ "name", OPT_STRING, "", NULL, false },
		{ NULL, 0, NULL, NULL, false },
	};

	CHECK(optlist_parse(&l, "size=1M,lazy=on,name=a,,b", &e) == 0);
	CHECK(l.n == 3);
	CHECK(optlist_get_size(&l, "size", &sz, &e) == 1 && sz == 1 << 20);
	CHECK(optlist_get_bool(&l, "lazy", &b, &e) == 1 && b);
	CHECK(!strcmp(optlist_get(&l, "name"), "a,b"));
	CHECK(optlist_validate(&l, desc, "x", &e) == 0);
	CHECK(optlist_parse(&l, "size=2M", &e) == 0 && l.n == 3);
	CHECK(optlist_get_size(&l, "size", &sz, &e) == 1 && sz == 2 << 20);
	CHECK(optlist_parse(&l, "bogus=1", &e) == 0);
	CHECK(optlist_validate(&l, desc, "x", &e) < 0 &&
	      strstr(e.msg, "Invalid parameter 'bogus'"));
	optlist_del(&l, "bogus");
	CHECK(optlist_get(&l, "bogus") == NULL);
	CHECK(optlist_parse(&l, "lazy=maybe", &e) == 0);
	CHECK(optlist_validate(&l, desc, "x", &e) < 0);
	optlist_free(&l);
	CHECK(optlist_parse(&l, "help", &e) == 0 &&
	      !strcmp(optlist_get(&l, "help"), "on"));
	optlist_free(&l);
	CHECK(optlist_parse(&l, "", &e) < 0);
	optlist_free(&l);
}

static void test_zero(void)
{
	static unsigned char buf[4096 + 64];
	int bad = 0;

	/* every alignment and length around the word loop's edges */
	for (size_t off = 0; off < 16; off++)
		for (size_t len = 0; len < 200; len += 7) {
			bad += !buffer_is_zero(buf + off, len);
			if (len) {
				buf[off + len - 1] = 1;
				bad += buffer_is_zero(buf + off, len);
				buf[off + len - 1] = 0;
				buf[off] = 1;
				bad += buffer_is_zero(buf + off, len);
				buf[off] = 0;
			}
		}
	CHECK(bad == 0);
	buf[4000] = 0x80;
	CHECK(!buffer_is_zero(buf, 4096));
	CHECK(buffer_is_zero(buf, 4000));
}

static void test_json(void)
{
	struct val *o = val_obj(), *d;
	char *text = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&text, &len);

	val_add_uint(o, "virtual-size", 1048576);
	val_add_str(o, "filename", "a\"b\xc3\xbc");
	val_add_str(o, "format", "raw");
	val_add_bool(o, "dirty-flag", false);
	d = val_add_obj(o, "format-specific");
	val_add_str(d, "type", "x");
	val_print_json(f, o, 0);
	fclose(f);
	CHECK(!strcmp(text,
		      "{\n"
		      "    \"virtual-size\": 1048576,\n"
		      "    \"filename\": \"a\\\"b\\u00FC\",\n"
		      "    \"format\": \"raw\",\n"
		      "    \"format-specific\": {\n"
		      "        \"type\": \"x\"\n"
		      "    },\n"
		      "    \"dirty-flag\": false\n"
		      "}"));
	free(text);
	val_free(o);
}

struct sink {
	int calls, kind;
	size_t len;
	char first[16];
};

static void sink_line(void *opaque, int kind, const char *line)
{
	struct sink *k = opaque;

	k->calls++;
	k->kind = kind;
	k->len = strlen(line);
	snprintf(k->first, sizeof(k->first), "%s", line);
}

/* A check's lines reach the caller's sink whole (however long), one call
 * each; without a sink they are dropped. */
static void test_check_report(void)
{
	struct check_result r = { 0 };
	struct sink k = { 0 };
	char name[1000];

	check_report(&r, CHECK_LINE, "ERROR %d", 1);	/* no sink: dropped */
	check_report(NULL, CHECK_LINE, "x");
	r.report = sink_line;
	r.report_opaque = &k;
	check_report(&r, CHECK_LINE, "ERROR cluster %d", 5);
	CHECK(k.calls == 1 && k.kind == CHECK_LINE && k.len == 15 &&
	      !strcmp(k.first, "ERROR cluster 5"));
	memset(name, 'n', sizeof(name) - 1);
	name[sizeof(name) - 1] = 0;
	check_report(&r, CHECK_ERROR, "snapshot %s (%s)", name, name);
	CHECK(k.calls == 2 && k.kind == CHECK_ERROR &&
	      k.len == 9 + 999 + 2 + 999 + 1 &&
	      !strcmp(k.first, "snapshot nnnnnn"));
}

int main(void)
{
	test_sizes();
	test_optlist();
	test_zero();
	test_check_report();
	test_json();
	return unit_done();
}
