/* value.c - typed value trees that formats fill in for info, check and
 * measure. Printing them is the applets' business (applets/json.c). */
#include <stdlib.h>
#include <string.h>
#include <inttypes.h>
#include "value.h"

static struct val *val_new(enum val_type t)
{
	struct val *v = calloc(1, sizeof(*v));

	if (v)
		v->type = t;
	return v;
}

struct val *val_obj(void) { return val_new(VAL_OBJ); }
struct val *val_arr(void) { return val_new(VAL_ARR); }

static struct val *val_attach(struct val *parent, const char *key,
			      struct val *v)
{
	if (!v)
		return NULL;
	if (!parent)
		return v;
	if (key && parent->type == VAL_OBJ) {
		v->key = strdup(key);
		if (!v->key) {
			free(v);
			return NULL;
		}
	}
	if (parent->last)
		parent->last->next = v;
	else
		parent->first = v;
	parent->last = v;
	return v;
}

struct val *val_add_obj(struct val *p, const char *key)
{
	return val_attach(p, key, val_new(VAL_OBJ));
}

struct val *val_add_arr(struct val *p, const char *key)
{
	return val_attach(p, key, val_new(VAL_ARR));
}

struct val *val_add_str(struct val *p, const char *key, const char *s)
{
	struct val *v = val_new(VAL_STR);

	if (!v)
		return NULL;
	v->s = strdup(s ? s : "");
	if (!v->s) {
		free(v);
		return NULL;
	}
	return val_attach(p, key, v);
}

/* A number or truth value: int and uint share the union's bits. */
static struct val *add_scalar(struct val *p, const char *key,
			      enum val_type t, uint64_t bits)
{
	struct val *v = val_new(t);

	if (v && t == VAL_BOOL)
		v->b = bits != 0;
	else if (v)
		v->u = bits;
	return val_attach(p, key, v);
}

struct val *val_add_int(struct val *p, const char *key, int64_t i)
{
	return add_scalar(p, key, VAL_INT, (uint64_t)i);
}

struct val *val_add_uint(struct val *p, const char *key, uint64_t u)
{
	return add_scalar(p, key, VAL_UINT, u);
}

struct val *val_add_bool(struct val *p, const char *key, bool b)
{
	return add_scalar(p, key, VAL_BOOL, b);
}

struct val *val_get(const struct val *obj, const char *key)
{
	for (struct val *c = obj ? obj->first : NULL; c; c = c->next)
		if (c->key && !strcmp(c->key, key))
			return c;
	return NULL;
}

void val_free(struct val *v)
{
	while (v) {
		struct val *next = v->next;
		val_free(v->first);
		free(v->key);
		if (v->type == VAL_STR)
			free(v->s);
		free(v);
		v = next;
	}
}
