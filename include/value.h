/* value.h - a small tree of typed values (null, bool, int, string, object,
 * array) that formats fill in for info/check/measure and that applets print
 * as qemu-img's JSON or human text. */
#ifndef IMGBOX_VALUE_H
#define IMGBOX_VALUE_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

enum val_type { VAL_NULL, VAL_BOOL, VAL_INT, VAL_UINT, VAL_STR, VAL_OBJ,
		VAL_ARR };

struct val {
	enum val_type type;
	char *key;		/* member name when inside an object */
	union {
		bool b;
		int64_t i;
		uint64_t u;
		char *s;
	};
	struct val *first, *last;	/* children of objects and arrays */
	struct val *next;
};

struct val *val_obj(void);
struct val *val_arr(void);
/* Adders return the new child (so objects can be nested) or NULL on ENOMEM;
 * key is ignored for arrays. */
struct val *val_add_obj(struct val *parent, const char *key);
struct val *val_add_arr(struct val *parent, const char *key);
struct val *val_add_str(struct val *parent, const char *key, const char *s);
struct val *val_add_int(struct val *parent, const char *key, int64_t i);
struct val *val_add_uint(struct val *parent, const char *key, uint64_t u);
struct val *val_add_bool(struct val *parent, const char *key, bool b);
struct val *val_get(const struct val *obj, const char *key);
void val_free(struct val *v);

/* The printers live with the applets (applets/json.c): block/ and formats/
 * build trees but never print. */

/* JSON in qemu's pretty layout (4-space indent, "key": value). indent is
 * the starting depth. */
void val_print_json(FILE *f, const struct val *v, int indent);
/* qemu's human layout for format-specific data: "key: value" with dashes in
 * keys turned into spaces, nested objects indented by 4. */
void val_print_human(FILE *f, const struct val *v, int indent);
/* JSON string literal with qemu's escaping. */
void json_print_str(FILE *f, const char *s);

#endif
