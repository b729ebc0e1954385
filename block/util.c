/* util.c - error strings, sizes, -o option lists, cache/prealloc names,
 * zero detection. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ctype.h>
#include "blk.h"

#undef strerror
char *imgbox_strerror(int errnum)
{
	static const struct { int no; const char *text; } tab[] = {
		{ EPERM, "Operation not permitted" },
		{ ENOENT, "No such file or directory" },
		{ EINTR, "Interrupted system call" },
		{ EIO, "Input/output error" },
		{ ENXIO, "No such device or address" },
		{ E2BIG, "Argument list too long" },
		{ EBADF, "Bad file descriptor" },
		{ EAGAIN, "Resource temporarily unavailable" },
		{ ENOMEM, "Cannot allocate memory" },
		{ EACCES, "Permission denied" },
		{ EFAULT, "Bad address" },
		{ ENOTBLK, "Block device required" },
		{ EBUSY, "Device or resource busy" },
		{ EEXIST, "File exists" },
		{ EXDEV, "Invalid cross-device link" },
		{ ENODEV, "No such device" },
		{ ENOTDIR, "Not a directory" },
		{ EISDIR, "Is a directory" },
		{ EINVAL, "Invalid argument" },
		{ ENFILE, "Too many open files in system" },
		{ EMFILE, "Too many open files" },
		{ ENOTTY, "Inappropriate ioctl for device" },
		{ ETXTBSY, "Text file busy" },
		{ EFBIG, "File too large" },
		{ ENOSPC, "No space left on device" },
		{ ESPIPE, "Illegal seek" },
		{ EROFS, "Read-only file system" },
		{ EMLINK, "Too many links" },
		{ EPIPE, "Broken pipe" },
		{ EDOM, "Numerical argument out of domain" },
		{ ERANGE, "Numerical result out of range" },
		{ EDEADLK, "Resource deadlock avoided" },
		{ ENAMETOOLONG, "File name too long" },
		{ ENOLCK, "No locks available" },
		{ ENOSYS, "Function not implemented" },
		{ ENOTEMPTY, "Directory not empty" },
		{ ELOOP, "Too many levels of symbolic links" },
		{ ENOMSG, "No message of desired type" },
		{ ENODATA, "No data available" },
		{ EPROTO, "Protocol error" },
		{ EBADMSG, "Bad message" },
		{ EOVERFLOW, "Value too large for defined data type" },
		{ EILSEQ, "Invalid or incomplete multibyte or wide character" },
		{ EOPNOTSUPP, "Operation not supported" },
		{ ETIMEDOUT, "Connection timed out" },
		{ ECONNREFUSED, "Connection refused" },
		{ EUCLEAN, "Structure needs cleaning" },
		{ EDQUOT, "Disk quota exceeded" },
		{ ENOMEDIUM, "No medium found" },
		{ EMEDIUMTYPE, "Wrong medium type" },
		{ ECANCELED, "Operation canceled" },
	};
	static __thread char unknown[32];

	for (size_t i = 0; i < ARRAY_SIZE(tab); i++)
		if (tab[i].no == errnum)
			return (char *)tab[i].text;
	snprintf(unknown, sizeof(unknown), "Unknown error %d", errnum);
	return unknown;
}

void err_set(struct err *e, const char *fmt, ...)
{
	va_list ap;

	if (!e)
		return;
	va_start(ap, fmt);
	vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
	va_end(ap);
}

void err_prefix(struct err *e, const char *fmt, ...)
{
	char old[sizeof(e->msg)];
	va_list ap;
	int n;

	if (!e)
		return;
	memcpy(old, e->msg, sizeof(old));
	va_start(ap, fmt);
	n = vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= sizeof(e->msg) - 3)
		return;
	e->msg[n++] = ':';
	e->msg[n++] = ' ';
	memcpy(e->msg + n, old, sizeof(e->msg) - (size_t)n - 1);
	e->msg[sizeof(e->msg) - 1] = 0;
}

void (*check_default_report)(void *opaque, int kind, const char *line);

void check_vreport(struct check_result *r, int kind, const char *fmt,
		   va_list ap)
{
	char buf[256], *line = buf;
	va_list again;
	int n;

	if (!r || !r->report)
		return;
	va_copy(again, ap);
	n = vsnprintf(buf, sizeof(buf), fmt, ap);
	/* Long lines (snapshot names, file names) are rare: they get a
	 * buffer of their own, or are cut short when memory is tight. */
	if (n >= 0 && (size_t)n >= sizeof(buf)) {
		char *big = malloc((size_t)n + 1);

		if (big) {
			vsnprintf(big, (size_t)n + 1, fmt, again);
			line = big;
		}
	}
	va_end(again);
	if (n >= 0)
		r->report(r->report_opaque, kind, line);
	if (line != buf)
		free(line);
}

void check_report(struct check_result *r, int kind, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	check_vreport(r, kind, fmt, ap);
	va_end(ap);
}

int buffer_is_zero(const void *buf, size_t len)
{
	const unsigned char *p = buf;
	const uint64_t *w;
	size_t n;

	while (len && ((uintptr_t)p & 7)) {
		if (*p++)
			return 0;
		len--;
	}
	w = (const uint64_t *)(const void *)p;
	for (n = len / 32; n; n--, w += 4)
		if (w[0] | w[1] | w[2] | w[3])
			return 0;
	p = (const unsigned char *)w;
	for (len &= 31; len; len--)
		if (*p++)
			return 0;
	return 1;
}

/* QEMU accepts "1.5G": a decimal fraction needs a unit above bytes. */
int parse_size(const char *s, uint64_t *out)
{
	const char *p = s;
	uint64_t ival = 0, mul = 1;
	double frac = 0;
	int has_frac = 0, digits = 0;

	if (!s)
		return -EINVAL;
	while (isspace((unsigned char)*p))
		p++;
	if (*p == '-' || *p == '+')
		return -EINVAL;
	if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
		p += 2;
		if (!isxdigit((unsigned char)*p))
			return -EINVAL;
		for (; isxdigit((unsigned char)*p); p++) {
			unsigned d = isdigit((unsigned char)*p) ? *p - '0' :
				     (tolower((unsigned char)*p) - 'a' + 10);
			if (ival >> 60)
				return -ERANGE;
			ival = ival * 16 + d;
		}
		if (*p == '.')
			return -EINVAL;
	} else {
		for (; isdigit((unsigned char)*p); p++, digits++) {
			if (mul_overflow_u64(ival, 10, &ival) ||
			    add_overflow_u64(ival, (uint64_t)(*p - '0'), &ival))
				return -ERANGE;
		}
		if (*p == '.') {
			double scale = 0.1;
			p++;
			has_frac = 1;
			for (; isdigit((unsigned char)*p); p++, digits++) {
				frac += (*p - '0') * scale;
				scale /= 10;
			}
		}
		if (!digits)
			return -EINVAL;
	}
	switch (*p) {
	case 'b': case 'B': mul = 1; p++; break;
	case 'k': case 'K': mul = 1ULL << 10; p++; break;
	case 'm': case 'M': mul = 1ULL << 20; p++; break;
	case 'g': case 'G': mul = 1ULL << 30; p++; break;
	case 't': case 'T': mul = 1ULL << 40; p++; break;
	case 'p': case 'P': mul = 1ULL << 50; p++; break;
	case 'e': case 'E': mul = 1ULL << 60; p++; break;
	case '\0': break;
	default: return -EINVAL;
	}
	if (*p)
		return -EINVAL;
	if (has_frac && mul == 1 && frac != 0)
		return -EINVAL;
	if (mul_overflow_u64(ival, mul, &ival))
		return -ERANGE;
	if (has_frac) {
		double f = frac * (double)mul;
		if (f >= 18446744073709551616.0 - (double)ival)
			return -ERANGE;
		if (add_overflow_u64(ival, (uint64_t)f, &ival))
			return -ERANGE;
	}
	*out = ival;
	return 0;
}

int blk_parse_cache(const char *s, int *mode)
{
	static const char *const names[] = {
		[CACHE_WRITEBACK] = "writeback", [CACHE_UNSAFE] = "unsafe",
		[CACHE_NONE] = "none", [CACHE_DIRECTSYNC] = "directsync",
		[CACHE_WRITETHROUGH] = "writethrough",
	};
	for (int i = 0; i < (int)ARRAY_SIZE(names); i++)
		if (!strcmp(s, names[i])) {
			*mode = i;
			return 0;
		}
	if (!strcmp(s, "off")) {	/* qemu's old spelling of none */
		*mode = CACHE_NONE;
		return 0;
	}
	return -EINVAL;
}

const char *const prealloc_names[] = { "off", "metadata", "falloc", "full",
				       NULL };

int blk_parse_prealloc(const char *s, int *mode)
{
	for (int i = 0; prealloc_names[i]; i++)
		if (!strcmp(s, prealloc_names[i])) {
			*mode = i;
			return 0;
		}
	return -EINVAL;
}

/* ---- option lists ---- */

int optlist_set(struct optlist *l, const char *name, const char *value)
{
	char *n, *v;
	void *nv;

	for (int i = 0; i < l->n; i++)
		if (!strcmp(l->v[i].name, name)) {
			v = strdup(value);
			if (!v)
				return -ENOMEM;
			free(l->v[i].value);
			l->v[i].value = v;
			return 0;
		}
	nv = realloc(l->v, (size_t)(l->n + 1) * sizeof(*l->v));
	if (!nv)
		return -ENOMEM;
	l->v = nv;
	n = strdup(name);
	v = strdup(value);
	if (!n || !v) {
		free(n);
		free(v);
		return -ENOMEM;
	}
	l->v[l->n].name = n;
	l->v[l->n].value = v;
	l->n++;
	return 0;
}

void optlist_del(struct optlist *l, const char *name)
{
	for (int i = 0; i < l->n; i++)
		if (!strcmp(l->v[i].name, name)) {
			free(l->v[i].name);
			free(l->v[i].value);
			memmove(&l->v[i], &l->v[i + 1],
				(size_t)(l->n - i - 1) * sizeof(*l->v));
			l->n--;
			return;
		}
}

const char *optlist_get(const struct optlist *l, const char *name)
{
	for (int i = 0; i < l->n; i++)
		if (!strcmp(l->v[i].name, name))
			return l->v[i].value;
	return NULL;
}

/* Copies one item up to an unescaped ',' (",," is a literal comma) or stop
 * character; returns the position after it. */
static const char *opt_token(const char *p, char *out, size_t outlen,
			     char stop)
{
	size_t n = 0;

	while (*p) {
		if (*p == ',') {
			if (p[1] == ',') {
				p++;
			} else
				break;
		} else if (stop && *p == stop)
			break;
		if (n + 1 < outlen)
			out[n++] = *p;
		p++;
	}
	out[n] = 0;
	return p;
}

int optlist_parse(struct optlist *l, const char *s, struct err *e)
{
	char name[256], *value = NULL;
	const char *p = s;
	size_t vlen = strlen(s) + 3;	/* room for "on" */
	int ret = 0;

	if (!*s) {
		err_set(e, "Invalid option list: ");
		return -EINVAL;
	}
	value = malloc(vlen);
	if (!value)
		return -ENOMEM;
	while (*p) {
		p = opt_token(p, name, sizeof(name), '=');
		if (*p == '=') {
			p = opt_token(p + 1, value, vlen, 0);
		} else {
			strcpy(value, "on");
		}
		if (*p == ',')
			p++;
		if (!name[0]) {
			err_set(e, "Invalid option list: empty parameter name");
			ret = -EINVAL;
			break;
		}
		ret = optlist_set(l, name, value);
		if (ret < 0)
			break;
	}
	free(value);
	return ret;
}

int optlist_get_size(const struct optlist *l, const char *name,
		     uint64_t *out, struct err *e)
{
	const char *v = optlist_get(l, name);

	if (!v)
		return 0;
	if (parse_size(v, out) == -ERANGE) {
		err_set(e, "Value '%s' is out of range for parameter '%s'", v,
			name);
		return -EINVAL;
	}
	if (parse_size(v, out) < 0) {
		err_set(e, "Parameter '%s' expects a non-negative number below "
			"2^64\nOptional suffix k, M, G, T, P or E means kilo-, "
			"mega-, giga-, tera-, peta-\nand exabytes, respectively.",
			name);
		return -EINVAL;
	}
	return 1;
}

int optlist_get_bool(const struct optlist *l, const char *name, bool *out,
		     struct err *e)
{
	const char *v = optlist_get(l, name);

	if (!v)
		return 0;
	if (!strcmp(v, "on") || !strcmp(v, "yes") || !strcmp(v, "true"))
		*out = true;
	else if (!strcmp(v, "off") || !strcmp(v, "no") ||
		 !strcmp(v, "false"))
		*out = false;
	else {
		err_set(e, "Parameter '%s' expects 'on' or 'off'", name);
		return -EINVAL;
	}
	return 1;
}

int optlist_validate(const struct optlist *l, const struct optdesc *desc,
		     const char *fmt, struct err *e)
{
	(void)fmt;
	for (int i = 0; i < l->n; i++) {
		const struct optdesc *d;
		for (d = desc; d && d->name; d++)
			if (!strcmp(d->name, l->v[i].name))
				break;
		if (!d || !d->name) {
			err_set(e, "Invalid parameter '%s'", l->v[i].name);
			return -EINVAL;
		}
		if (d->type == OPT_SIZE) {
			uint64_t x;
			if (optlist_get_size(l, d->name, &x, e) < 0)
				return -EINVAL;
		} else if (d->type == OPT_BOOL) {
			bool b;
			if (optlist_get_bool(l, d->name, &b, e) < 0)
				return -EINVAL;
		} else if (d->type == OPT_NUMBER) {
			const char *v = l->v[i].value;
			char *end;
			errno = 0;
			strtoull(v, &end, 0);
			if (!*v || *end || errno || *v == '-') {
				err_set(e, "Parameter '%s' expects a number",
					d->name);
				return -EINVAL;
			}
		}
	}
	return 0;
}

void optlist_free(struct optlist *l)
{
	for (int i = 0; i < l->n; i++) {
		free(l->v[i].name);
		free(l->v[i].value);
	}
	free(l->v);
	l->v = NULL;
	l->n = 0;
}
