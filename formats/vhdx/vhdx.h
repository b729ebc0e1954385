/* vhdx.h - shared between vhdx.c (image, BAT, create) and log.c
 * (log replay). Layout constants from MS-VHDX v1.0. */
#ifndef IMGBOX_VHDX_H
#define IMGBOX_VHDX_H

#include <stdbool.h>
#include <stdint.h>
#include "blk_driver.h"

#define VHDX_MIB		(1ULL << 20)
#define VHDX_MIB_MASK		(VHDX_MIB - 1)
#define VHDX_HEADER1_OFF	(64 * 1024)
#define VHDX_HEADER2_OFF	(128 * 1024)
#define VHDX_HEADER_SIZE	4096
#define VHDX_REGION1_OFF	(192 * 1024)
#define VHDX_REGION2_OFF	(256 * 1024)
#define VHDX_REGION_SIZE	(64 * 1024)
#define VHDX_METADATA_TABLE_SIZE (64 * 1024)
#define VHDX_MAX_ENTRIES	2047
#define VHDX_MAX_BLOCK		(256 * VHDX_MIB)
#define VHDX_MAX_SIZE		(64ULL << 40)		/* 64 TiB */
#define VHDX_MAX_FILE		(1ULL << 62)
/* Memory cap for the BAT: 64 TiB in 1 MiB blocks is 512 MiB of entries;
 * 256 MiB still covers 32 TiB at 1 MiB and far more with larger blocks. */
#define VHDX_MAX_BAT_BYTES	(256ULL << 20)
/* Log replay cap: the log itself is read a 4 KiB sector at a time. */
#define VHDX_MAX_LOG		(1ULL << 32)

/* BAT payload block states (MS-VHDX 2.5.1.1) */
#define VHDX_BAT_NOT_PRESENT		0
#define VHDX_BAT_UNDEFINED		1
#define VHDX_BAT_ZERO			2
#define VHDX_BAT_UNMAPPED		3
#define VHDX_BAT_FULLY_PRESENT		6
#define VHDX_BAT_PARTIALLY_PRESENT	7

struct fmt_map;

struct vhdx {
	const struct fmt_map *map;	/* first: fmt_map_* find it here */
	uint8_t hdr[2][VHDX_HEADER_SIZE];
	int cur;			/* current header */
	uint64_t file_size;
	uint64_t bat_off, bat_len, meta_off, meta_len;
	uint32_t block_size, logical_sector, physical_sector;
	bool has_parent;
	uint64_t disk_size;
	uint64_t chunk_ratio, blocks, bat_entries;
	uint64_t *bat;
	bool log_replayed;
};


uint32_t vhdx_crc32c(uint32_t crc, const void *buf, size_t len);
uint32_t vhdx_checksum(const uint8_t *buf, size_t len, size_t csum_off);
void vhdx_guid_random(uint8_t *g);
int vhdx_update_headers(struct blk *bs, bool clear_log);
/* "Could not open 'FILE': strerror(-ret)" in e; returns ret. */
int vhdx_fail(struct blk *bs, struct err *e, int ret);
/* Finds the active log sequence; replays it when the image is writable,
 * refuses a read-only open that would need it (log.c). */
int vhdx_log_open(struct blk *bs, struct err *e);

#endif
