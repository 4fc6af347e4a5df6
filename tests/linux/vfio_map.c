/* vfio_map: maps one buffer for DMA with VFIO_IOMMU_MAP_DMA, the way a nested VMM's VFIO
 * does for its guest's RAM, and reports how long the kernel took.  Built static, it runs in
 * hyperpy's test initramfs (busybox, no libc of its own).
 *
 *   vfio_map GROUP MIB 4k              anonymous memory in 4 KiB pages
 *   vfio_map GROUP MIB 4kfrag          the same, from a fragmented memory: a filler of 2*MIB+32
 *                                      MiB is touched page by page and every other page freed
 *                                      first, so the buffer's pages come from the holes
 *   vfio_map GROUP MIB huge HUGETLBFS  a file on hugetlbfs (2 MiB pages)
 *
 * The kernel's vfio_iommu_type1 pins the buffer and maps each physically contiguous run with
 * the IOMMU (here a virtio-iommu: one MAP request a run), so 4 KiB pages cost up to 512x the
 * requests of 2 MiB pages.  Prints one line:
 *   VFIOMAP mode <4k|4kfrag|huge> mib <n> map_us <t> unmap_us <t> unmapped <bytes> rc 0 runs <r>
 * where runs is the number of physically contiguous runs in the buffer (from
 * /proc/self/pagemap): what type1 should send as MAP requests.
 * or "VFIOMAP error <step>: <strerror>" and exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static void die(const char *step)
{
    printf("VFIOMAP error %s: %s\n", step, strerror(errno));
    fflush(stdout);
    exit(1);
}

/* Physically contiguous runs of [buf, buf + size), or 0 when pagemap gives no frame numbers. */
static uint64_t phys_runs(const char *buf, size_t size)
{
    int fd = open("/proc/self/pagemap", O_RDONLY);
    if (fd < 0)
        return 0;
    uint64_t runs = 0, prev = 0, chunk[512];
    size_t pages = size >> 12, first = (uintptr_t)buf >> 12;
    for (size_t i = 0; i < pages; i += 512) {
        size_t n = pages - i < 512 ? pages - i : 512;
        if (pread(fd, chunk, n * 8, (off_t)((first + i) * 8)) != (ssize_t)(n * 8)) {
            close(fd);
            return 0;
        }
        for (size_t j = 0; j < n; j++) {
            uint64_t pfn = chunk[j] & ((1ull << 55) - 1);
            if (!(chunk[j] >> 63) || pfn == 0) {
                close(fd);
                return 0;
            }
            if (i + j == 0 || pfn != prev + 1)
                runs++;
            prev = pfn;
        }
    }
    close(fd);
    return runs;
}

static uint64_t now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000u + (uint64_t)t.tv_nsec / 1000u;
}

int main(int argc, char **argv)
{
    if (argc < 4 || (strcmp(argv[3], "4k") && strcmp(argv[3], "4kfrag") && strcmp(argv[3], "huge")) ||
        (!strcmp(argv[3], "huge") && argc < 5)) {
        fprintf(stderr, "usage: %s GROUP MIB 4k|4kfrag | GROUP MIB huge HUGETLBFS_DIR\n", argv[0]);
        return 2;
    }
    int huge = !strcmp(argv[3], "huge"), frag = !strcmp(argv[3], "4kfrag");
    size_t size = (size_t)strtoul(argv[2], NULL, 0) << 20;
    char path[256];

    int container = open("/dev/vfio/vfio", O_RDWR);
    if (container < 0)
        die("open /dev/vfio/vfio");
    if (ioctl(container, VFIO_GET_API_VERSION) != VFIO_API_VERSION)
        die("VFIO_GET_API_VERSION");
    if (ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) != 1)
        die("VFIO_CHECK_EXTENSION TYPE1v2");
    snprintf(path, sizeof path, "/dev/vfio/%s", argv[1]);
    int group = open(path, O_RDWR);
    if (group < 0)
        die("open group");
    struct vfio_group_status st = {.argsz = sizeof st};
    if (ioctl(group, VFIO_GROUP_GET_STATUS, &st) < 0)
        die("VFIO_GROUP_GET_STATUS");
    if (!(st.flags & VFIO_GROUP_FLAGS_VIABLE)) {
        errno = EBUSY;
        die("group not viable");
    }
    if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container) < 0)
        die("VFIO_GROUP_SET_CONTAINER");
    if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU) < 0)
        die("VFIO_SET_IOMMU");

    void *buf;
    if (huge) {
        snprintf(path, sizeof path, "%s/vfio_map.buf", argv[4]);
        int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
        if (fd < 0)
            die("open hugetlbfs file");
        unlink(path);
        if (ftruncate(fd, (off_t)size) < 0)
            die("ftruncate hugetlbfs file");
        buf = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    } else {
        if (frag) {
            /* Every other page of a touched filler goes back to the allocator: those holes
             * cannot merge (their buddies stay allocated), so the buffer below is built from
             * them, one physical run per page, as in a long-running fragmented L1. */
            size_t fill = 2 * size + (32u << 20);
            char *f = mmap(NULL, fill, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (f == MAP_FAILED)
                die("mmap filler");
            if (madvise(f, fill, MADV_NOHUGEPAGE) < 0)
                die("madvise filler");
            for (size_t off = 0; off < fill; off += 4096)
                f[off] = 1;
            for (size_t off = 0; off < fill; off += 8192)
                if (madvise(f + off, 4096, MADV_DONTNEED) < 0)
                    die("madvise MADV_DONTNEED");
        }
        /* 4 KiB pages for real: no transparent huge page may back this buffer. */
        buf = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (buf != MAP_FAILED && madvise(buf, size, MADV_NOHUGEPAGE) < 0)
            die("madvise MADV_NOHUGEPAGE");
    }
    if (buf == MAP_FAILED)
        die("mmap buffer");
    memset(buf, 0x5a, size);

    uint64_t runs = phys_runs(buf, size);

    struct vfio_iommu_type1_dma_map map = {
        .argsz = sizeof map,
        .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        .vaddr = (uint64_t)(uintptr_t)buf,
        .iova = 1ull << 32,
        .size = size,
    };
    uint64_t t0 = now_us();
    if (ioctl(container, VFIO_IOMMU_MAP_DMA, &map) < 0)
        die("VFIO_IOMMU_MAP_DMA");
    uint64_t t1 = now_us();
    struct vfio_iommu_type1_dma_unmap unmap = {.argsz = sizeof unmap, .iova = map.iova, .size = size};
    if (ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap) < 0)
        die("VFIO_IOMMU_UNMAP_DMA");
    uint64_t t2 = now_us();
    printf("VFIOMAP mode %s mib %zu map_us %llu unmap_us %llu unmapped %llu rc 0 runs %llu\n",
           argv[3], size >> 20, (unsigned long long)(t1 - t0), (unsigned long long)(t2 - t1),
           (unsigned long long)unmap.size, (unsigned long long)runs);
    fflush(stdout);
    return 0;
}
