/* blkio: a tiny fio stand-in for the Linux benchmark guest (built with gcc -static, runs from
 * the busybox initramfs).  One thread, queue depth 1, O_DIRECT, so every operation is exactly
 * one virtio-blk request.
 *
 *   blkio DEVICE read|write seq|rand BLOCK_SIZE COUNT REGION_OFFSET REGION_BYTES
 *
 * prints:  BLKIO ops=N bytes=B ns=T
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc != 8) {
        fprintf(stderr, "usage: blkio DEV read|write seq|rand BS COUNT OFFSET BYTES\n");
        return 2;
    }
    int writing = strcmp(argv[2], "write") == 0;
    int random_ = strcmp(argv[3], "rand") == 0;
    uint64_t bs = strtoull(argv[4], NULL, 0), count = strtoull(argv[5], NULL, 0);
    uint64_t base = strtoull(argv[6], NULL, 0), bytes = strtoull(argv[7], NULL, 0);
    uint64_t blocks = bytes / bs, seed = 0x9E3779B97F4A7C15ull;
    int fd = open(argv[1], (writing ? O_WRONLY : O_RDONLY) | O_DIRECT);
    void *buf;
    if (fd < 0 || blocks == 0 || posix_memalign(&buf, 4096, bs) != 0) {
        perror("blkio");
        return 1;
    }
    memset(buf, 0x5A, bs);
    uint64_t t0 = now_ns(), done = 0;
    for (uint64_t i = 0; i < count; i++) {
        uint64_t blk;
        if (random_) {
            seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;   /* xorshift64 */
            blk = seed % blocks;
        } else {
            blk = i % blocks;
        }
        off_t off = (off_t)(base + blk * bs);
        ssize_t n = writing ? pwrite(fd, buf, bs, off) : pread(fd, buf, bs, off);
        if (n != (ssize_t)bs) {
            perror("blkio: short I/O");
            return 1;
        }
        done++;
    }
    uint64_t t1 = now_ns();
    printf("BLKIO ops=%llu bytes=%llu ns=%llu\n", (unsigned long long)done,
           (unsigned long long)(done * bs), (unsigned long long)(t1 - t0));
    return 0;
}
