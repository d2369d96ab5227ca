#include "pattern.h"
#include "util.h"

void sector_pattern(uint8_t *buf, const char *tag, uint32_t disk,
		    uint64_t lba)
{
	size_t n = strlen(tag);
	uint8_t v;

	memset(buf, ' ', PATTERN_TAG_LEN);
	memcpy(buf, tag, n < PATTERN_TAG_LEN ? n : PATTERN_TAG_LEN);
	for (unsigned i = 0; i < 4; i++)
		buf[16 + i] = (uint8_t)(disk >> (8 * i));
	for (unsigned i = 0; i < 8; i++)
		buf[20 + i] = (uint8_t)(lba >> (8 * i));
	v = (uint8_t)(28 + 7 * disk + 13 * lba);
	for (unsigned i = 28; i < SECTOR_SIZE; i++)
		buf[i] = v++;
}

uint32_t fnv32_words(uint32_t h, const void *buf, size_t len)
{
	const uint32_t *w = buf;

	for (size_t i = 0; i < len / 4; i++)
		h = (h ^ w[i]) * FNV32_PRIME;
	return h;
}

void iostress_sector(uint8_t *buf, uint32_t disk, uint32_t iter)
{
	uint32_t *w = (uint32_t *)buf;
	uint32_t x = (iter * 2 + disk + 1) * IOSTRESS_SEED_MUL;

	memcpy(buf, "IOSTRESS", 8);
	w[2] = iter;
	w[3] = disk;
	if (x == 0)
		x = 1;
	for (unsigned k = 4; k < SECTOR_SIZE / 4; k++) {
		x ^= x << 13;
		x ^= x >> 17;
		x ^= x << 5;
		w[k] = x;
	}
}
