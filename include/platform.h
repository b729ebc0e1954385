/* platform.h - endian helpers, compiler hints, small portability glue. */
#ifndef IMGBOX_PLATFORM_H
#define IMGBOX_PLATFORM_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>

#define likely(x)   __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)
#define NORETURN    __attribute__((noreturn))
#define PRINTF(a, b) __attribute__((format(printf, a, b)))
#define UNUSED      __attribute__((unused))
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* The command that hints in messages tell the user to run ("To replay the
 * log, run: ... check -r all"). imgbox follows QEMU's qemu-img 7.2 and its
 * qemu-img applet takes the same command lines, so the hint works with
 * either program, and the bytes stay those of qemu-img, which the tests
 * compare. block/ and formats/ spell the name only through this macro. */
#define QEMU_IMG_CMD "qemu-img"

#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define DIV_ROUND_UP(n, d) (((n) + (d) - 1) / (d))
/* Power-of-two alignment only. */
#define ALIGN_UP(n, a)   (((n) + (a) - 1) & ~((uint64_t)(a) - 1))
#define ALIGN_DOWN(n, a) ((n) & ~((uint64_t)(a) - 1))
#define IS_ALIGNED(n, a) (((n) & ((uint64_t)(a) - 1)) == 0)

/* Unaligned, explicit-endian loads and stores: every on-disk integer goes
 * through one of these, never through a cast struct. */
static inline uint16_t ld_le16(const void *p)
{
	const uint8_t *b = p;
	return (uint16_t)(b[0] | b[1] << 8);
}
static inline uint32_t ld_le32(const void *p)
{
	const uint8_t *b = p;
	return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 |
	       (uint32_t)b[3] << 24;
}
static inline uint64_t ld_le64(const void *p)
{
	const uint8_t *b = p;
	return (uint64_t)ld_le32(b) | (uint64_t)ld_le32(b + 4) << 32;
}
static inline uint16_t ld_be16(const void *p)
{
	const uint8_t *b = p;
	return (uint16_t)(b[0] << 8 | b[1]);
}
static inline uint32_t ld_be32(const void *p)
{
	const uint8_t *b = p;
	return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 |
	       (uint32_t)b[2] << 8 | (uint32_t)b[3];
}
static inline uint64_t ld_be64(const void *p)
{
	const uint8_t *b = p;
	return (uint64_t)ld_be32(b) << 32 | ld_be32(b + 4);
}
static inline void st_le16(void *p, uint16_t v)
{
	uint8_t *b = p;
	b[0] = (uint8_t)v;
	b[1] = (uint8_t)(v >> 8);
}
static inline void st_le32(void *p, uint32_t v)
{
	uint8_t *b = p;
	b[0] = (uint8_t)v;
	b[1] = (uint8_t)(v >> 8);
	b[2] = (uint8_t)(v >> 16);
	b[3] = (uint8_t)(v >> 24);
}
static inline void st_le64(void *p, uint64_t v)
{
	st_le32(p, (uint32_t)v);
	st_le32((uint8_t *)p + 4, (uint32_t)(v >> 32));
}
static inline void st_be16(void *p, uint16_t v)
{
	uint8_t *b = p;
	b[0] = (uint8_t)(v >> 8);
	b[1] = (uint8_t)v;
}
static inline void st_be32(void *p, uint32_t v)
{
	uint8_t *b = p;
	b[0] = (uint8_t)(v >> 24);
	b[1] = (uint8_t)(v >> 16);
	b[2] = (uint8_t)(v >> 8);
	b[3] = (uint8_t)v;
}
static inline void st_be64(void *p, uint64_t v)
{
	st_be32(p, (uint32_t)(v >> 32));
	st_be32((uint8_t *)p + 4, (uint32_t)v);
}

/* Overflow-checked arithmetic for values that come from disk. */
static inline int add_overflow_u64(uint64_t a, uint64_t b, uint64_t *r)
{
	return __builtin_add_overflow(a, b, r);
}
static inline int mul_overflow_u64(uint64_t a, uint64_t b, uint64_t *r)
{
	return __builtin_mul_overflow(a, b, r);
}

/* strerror() with the GNU C library's texts whatever libc we link: qemu-img
 * prints glibc's messages ("Input/output error") and scripts and tests
 * match them, while musl words some differently ("I/O error"). */
char *imgbox_strerror(int errnum);
#define strerror(e) imgbox_strerror(e)

/* True if the whole buffer is zero; word at a time after a byte prologue. */
int buffer_is_zero(const void *buf, size_t len);

#endif
