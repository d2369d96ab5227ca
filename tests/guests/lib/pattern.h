/*
 * Data patterns and checksums that host tests recompute (see README.md,
 * disk_patterns.py and iostress_model.py).  No I/O here: the unit tests
 * build this file for the host and compare it with the Python models.
 */
#ifndef GUEST_PATTERN_H
#define GUEST_PATTERN_H

#include "io.h"

#define SECTOR_SIZE	512
#define PATTERN_TAG_LEN	16

/*
 * The test sector of disk DISK at LBA: TAG padded with spaces to 16
 * bytes, DISK as le32, LBA as le64, then bytes 28-511 equal to
 * (offset + 7 * DISK + 13 * LBA) mod 256.
 */
void sector_pattern(uint8_t *buf, const char *tag, uint32_t disk,
		    uint64_t lba);

/*
 * FNV-1a (32-bit) over little-endian 32-bit words rather than bytes: a
 * quarter of the instructions, which matters where each costs a
 * microsecond.  LEN must be a multiple of 4.
 */
#define FNV32_INIT	0x811c9dc5u
#define FNV32_PRIME	0x01000193u
uint32_t fnv32_words(uint32_t h, const void *buf, size_t len);

/*
 * Sector DISK of iteration ITER of iostress.c: "IOSTRESS", ITER and DISK
 * as le32, then 124 le32 words of xorshift32 (13, 17, 5) seeded with
 * (2 * ITER + DISK + 1) * 0x9E3779B1 (1 if that is 0).
 */
#define IOSTRESS_SEED_MUL	0x9e3779b1u
void iostress_sector(uint8_t *buf, uint32_t disk, uint32_t iter);

#endif
