/* The nested-VFIO boot workload: an L1 guest's VFIO maps "L2 RAM" for a passed-through device
 * through the virtio-iommu, one MAP per physically contiguous run, as Linux's vfio_iommu_type1
 * does for pinned memory.
 *
 * cmdline: ep=N (endpoint id of the VFIO device, its BDF), mib=N (L2 RAM size, default 64),
 *          mode=scatter|contig|huge (default scatter), base=GPA (L2 RAM start, default 64 MiB)
 *   scatter: 4 KiB runs at scattered guest-physical pages (a fixed pseudo-random page order, as
 *            a fragmented L1 page allocator gives): IOVA page i -> GPA page perm(i)
 *   contig:  4 KiB runs, IOVA page i -> GPA page i (what batching can coalesce)
 *   huge:    2 MiB runs (L2 RAM in guest huge pages, hugepagesz=2M)
 * Requests go in batches of up to 32 per kick. Then the boot timer, a summary line, reset:
 *   MAPB done mode <m> mib <n> requests <r> errors <e> first_error <status>
 */
#include "guest.h"
#include "virtio.h"

#define T_ATTACH 1
#define T_MAP 3
#define MAP_F_READ 1
#define MAP_F_WRITE 2
#define BATCH 32

struct attach_req { uint8_t type, rsv[3]; uint32_t domain, endpoint, flags; uint8_t rsv2[4]; } __attribute__((packed));
struct map_req {
    uint8_t type, rsv[3];
    uint32_t domain;
    uint64_t virt_start, virt_end, phys_start;
    uint32_t flags;
} __attribute__((packed));
struct tail { uint8_t status, rsv[3]; };

static struct map_req reqs[BATCH];
static struct tail tails[BATCH];

void guest_main(const struct boot_info *bi)
{
    const char *cl = bi->cmdline;
    uint32_t ep = (uint32_t)cmdline_u64(cl, "ep", 0x10);
    uint64_t mib = cmdline_u64(cl, "mib", 64);
    uint64_t base = cmdline_u64(cl, "base", 64ull << 20);
    const char *m = "scatter";
    size_t ml = 7;
    cmdline_get(cl, "mode", &m, &ml);
    int mode = (ml == 6 && !strncmp(m, "contig", 6)) ? 1 : (ml == 4 && !strncmp(m, "huge", 4)) ? 2 : 0;
    uint64_t run = mode == 2 ? (2ull << 20) : 4096;
    uint64_t nruns = (mib << 20) / run;   /* a power of two for the permutation below */
    const uint64_t iova_base = 1ull << 32;

    struct virtio_dev d;
    virtio_init(&d, "MAPB", VIRTIO_TYPE_IOMMU, (1ull << 0) | (1ull << 1) | (1ull << 2), cl);
    struct virtq *q = virtio_setup_queue(&d, 0);
    virtio_driver_ok(&d);

    static struct attach_req at;
    static struct tail att;
    at.type = T_ATTACH;
    at.domain = 1;
    at.endpoint = ep;
    struct vbuf ab[2] = {{&at, sizeof at, false}, {&att, sizeof att, true}};
    virtq_transfer(&d, q, ab, 2);
    if (att.status) {
        print("MAPB attach failed status ");
        print_dec(att.status);
        putchar('\n');
        reset();
    }

    uint64_t errors = 0, requests = 0;
    int first_error = 0;
    for (uint64_t i = 0; i < nruns;) {
        int n = 0;
        for (; n < BATCH && i < nruns; n++, i++) {
            /* x -> (a*x + c) mod 2^k with odd a is a bijection: a fixed scattered page order. */
            uint64_t page = mode == 0 ? ((i * 0x9E3779B1ull + 12345) & (nruns - 1)) : i;
            struct map_req *r = &reqs[n];
            r->type = T_MAP;
            r->domain = 1;
            r->virt_start = iova_base + i * run;
            r->virt_end = r->virt_start + run - 1;
            r->phys_start = base + page * run;
            r->flags = MAP_F_READ | MAP_F_WRITE;
            tails[n].status = 0xff;
            struct vbuf b[2] = {{r, sizeof *r, false}, {&tails[n], sizeof tails[n], true}};
            if (virtq_add(q, b, 2) < 0)
                virtio_fail(&d, "queue full");
        }
        virtq_kick(&d, q);
        for (int k = 0; k < n; k++) {
            uint32_t id, len;
            if (!virtq_wait(&d, q, d.timeout_ms, &id, &len))
                virtio_fail(&d, "MAP timed out");
        }
        for (int k = 0; k < n; k++) {
            requests++;
            if (tails[k].status) {
                if (!errors)
                    first_error = tails[k].status;
                errors++;
            }
        }
    }
    boot_timer();
    print("MAPB done mode ");
    print(mode == 0 ? "scatter" : mode == 1 ? "contig" : "huge");
    print(" mib ");
    print_dec(mib);
    print(" requests ");
    print_dec(requests);
    print(" errors ");
    print_dec(errors);
    print(" first_error ");
    print_dec((uint64_t)first_error);
    putchar('\n');
    reset();
}
