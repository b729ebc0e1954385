/* json.c - prints value trees (include/value.h) as JSON or as the human
 * "key: value" layout of format-specific data, byte for byte as qemu-img
 * prints them. Not an applet: every applet that shows a tree uses it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <inttypes.h>
#include "value.h"

/* Decodes one UTF-8 sequence; returns its length, or 0 if invalid. */
static int utf8_decode(const unsigned char *s, uint32_t *cp)
{
	int n;
	uint32_t c;

	if (s[0] < 0x80) {
		*cp = s[0];
		return 1;
	} else if ((s[0] & 0xe0) == 0xc0) {
		n = 2;
		c = s[0] & 0x1f;
	} else if ((s[0] & 0xf0) == 0xe0) {
		n = 3;
		c = s[0] & 0x0f;
	} else if ((s[0] & 0xf8) == 0xf0) {
		n = 4;
		c = s[0] & 0x07;
	} else
		return 0;
	for (int i = 1; i < n; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		c = c << 6 | (s[i] & 0x3f);
	}
	if ((n == 2 && c < 0x80) || (n == 3 && c < 0x800) ||
	    (n == 4 && (c < 0x10000 || c > 0x10ffff)) ||
	    (c >= 0xd800 && c <= 0xdfff))
		return 0;
	*cp = c;
	return n;
}

void json_print_str(FILE *f, const char *str)
{
	const unsigned char *s = (const unsigned char *)str;

	fputc('"', f);
	while (*s) {
		uint32_t cp;
		int n = utf8_decode(s, &cp);

		if (!n) {
			cp = 0xfffd;
			n = 1;
		}
		s += n;
		switch (cp) {
		case '"': fputs("\\\"", f); continue;
		case '\\': fputs("\\\\", f); continue;
		case '\b': fputs("\\b", f); continue;
		case '\f': fputs("\\f", f); continue;
		case '\n': fputs("\\n", f); continue;
		case '\r': fputs("\\r", f); continue;
		case '\t': fputs("\\t", f); continue;
		}
		if (cp >= 0x20 && cp < 0x7f)
			fputc((int)cp, f);
		else if (cp >= 0x10000) {
			cp -= 0x10000;
			fprintf(f, "\\u%04X\\u%04X", 0xd800 + (cp >> 10),
				0xdc00 + (cp & 0x3ff));
		} else
			fprintf(f, "\\u%04X", cp);
	}
	fputc('"', f);
}

/* qemu-img prints objects in the iteration order of QEMU's QDict: by hash
 * bucket (512 buckets), newest first within a bucket. Scripts should not
 * care, but tests diff text, so we reproduce it. */
static unsigned key_bucket(const char *k)
{
	uint32_t v = 0x238F13AFu * (uint32_t)strlen(k);

	for (unsigned i = 0; k[i]; i++)
		v += (uint32_t)(unsigned char)k[i] << (i * 5 % 24);
	return (1103515243u * v + 12345u) % 512;
}

/* Children of v in print order; caller frees. NULL for no children. */
static const struct val **ordered(const struct val *v, int *count)
{
	const struct val **a;
	int n = 0, i = 0;

	for (const struct val *c = v->first; c; c = c->next)
		n++;
	*count = n;
	if (!n || !(a = malloc((size_t)n * sizeof(*a))))
		return NULL;
	for (const struct val *c = v->first; c; c = c->next)
		a[i++] = c;
	if (v->type == VAL_OBJ) {
		/* insertion sort; reverse insertion order within a bucket */
		unsigned *b = malloc((size_t)n * sizeof(*b));
		if (!b) {
			free(a);
			return NULL;
		}
		for (i = 0; i < n; i++)
			b[i] = key_bucket(a[i]->key ? a[i]->key : "");
		for (i = 1; i < n; i++) {
			const struct val *x = a[i];
			unsigned bx = b[i];
			int j = i - 1;
			while (j >= 0 && b[j] >= bx) {
				a[j + 1] = a[j];
				b[j + 1] = b[j];
				j--;
			}
			a[j + 1] = x;
			b[j + 1] = bx;
		}
		free(b);
	}
	return a;
}

static void json_scalar(FILE *f, const struct val *v)
{
	switch (v->type) {
	case VAL_NULL: fputs("null", f); break;
	case VAL_BOOL: fputs(v->b ? "true" : "false", f); break;
	case VAL_INT: fprintf(f, "%" PRId64, v->i); break;
	case VAL_UINT: fprintf(f, "%" PRIu64, v->u); break;
	case VAL_STR: json_print_str(f, v->s); break;
	default: break;
	}
}

void val_print_json(FILE *f, const struct val *v, int indent)
{
	if (v->type != VAL_OBJ && v->type != VAL_ARR) {
		json_scalar(f, v);
		return;
	}
	int n;
	const struct val **kids = ordered(v, &n);

	fputc(v->type == VAL_OBJ ? '{' : '[', f);
	for (int k = 0; k < n; k++) {
		const struct val *c = kids[k];
		if (k)
			fputc(',', f);
		fprintf(f, "\n%*s", 4 * (indent + 1), "");
		if (v->type == VAL_OBJ) {
			json_print_str(f, c->key ? c->key : "");
			fputs(": ", f);
		}
		val_print_json(f, c, indent + 1);
	}
	free(kids);
	fprintf(f, "\n%*s%c", 4 * indent, "", v->type == VAL_OBJ ? '}' : ']');
}

void val_print_human(FILE *f, const struct val *v, int indent)
{
	int n;
	const struct val **kids;

	if (v->type != VAL_OBJ && v->type != VAL_ARR) {
		if (v->type == VAL_STR)
			fputs(v->s, f);
		else
			json_scalar(f, v);
		fputc('\n', f);
		return;
	}
	kids = ordered(v, &n);
	for (int i = 0; i < n; i++) {
		const struct val *c = kids[i];
		int composite = c->type == VAL_OBJ || c->type == VAL_ARR;

		if (v->type == VAL_OBJ) {
			fprintf(f, "%*s", 4 * indent, "");
			for (const char *k = c->key ? c->key : ""; *k; k++)
				fputc(*k == '-' ? ' ' : *k, f);
			fputc(':', f);
		} else
			fprintf(f, "%*s[%d]:", 4 * indent, "", i);
		fputc(composite ? '\n' : ' ', f);
		val_print_human(f, c, indent + 1);
	}
	free(kids);
}
