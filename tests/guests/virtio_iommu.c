/* virtio-iommu (virtio 1.2 section 5.13, PCI device id 0x1057) with a virtio-blk endpoint
 * behind it (VIRTIO_F_ACCESS_PLATFORM), found through the ACPI VIOT table (ACPI 6.4+ 5.2.32).
 *
 * 1. VIOT: RSDP from the PVH start_info (else a scan of 0xE0000-0xFFFFF), XSDT or RSDT, VIOT.
 * 2. The IOMMU: features INPUT_RANGE, DOMAIN_RANGE, MAP_UNMAP, PROBE, BYPASS_CONFIG (those
 *    offered), its config, request queue 0, event queue 1 (EVENT_BUFS buffers posted).
 * 3. Requests, each answered by its tail's status (names as printed):
 *      detach_unattached  DETACH blk endpoint from domain 1 before any ATTACH
 *      attach             ATTACH blk endpoint to domain 1
 *      probe              PROBE blk endpoint (probe_size bytes of properties)
 *      map                MAP [IOVA, IOVA+64K-1] -> the 64 KiB window's GPA, READ|WRITE
 *      map_overlap        MAP [IOVA+32K, IOVA+96K-1] (overlaps the first)
 *      unmap_split        UNMAP [IOVA, IOVA+32K-1] (half of the mapping)
 *      map_outside        MAP one page just past input_range (skipped: input range is all)
 *      attach_noent       ATTACH an endpoint id whose bus-0 slot has no function
 *      attach_domain_range ATTACH blk to domain_range.end+1 (skipped: range is all 32 bits)
 *      unknown_type       request type 0x7f (head only)
 *      truncated          ATTACH with only head+domain (8 of 16 bytes)
 * 4. virtio-blk with rings and buffers inside the window, given to the device as IOVAs: read
 *    sector 0, write the pattern to sector 1, read it back. UNMAP the window, submit one more
 *    read: the device must fault; the event queue is read for up to 2 s.
 *
 * Output (parsed by tests/iommu_expect.py):
 *   VIOT missing | VIOT nodes <n>
 *   VIOT virtio-pci iommu <seg> <bb:dd.f>
 *   VIOT endpoints <seg_start>-<seg_end> <bb:dd.f>-<bb:dd.f> id <endpoint_start> -> iommu|node <off>
 *   IOMMU pci/caps/features ... (virtio.c, info)
 *   IOMMU page_size_mask 0x.. | input_range 0x..-0x.. | domain_range <s>-<e> | probe_size <n> |
 *         bypass <b>                                  (each only when its feature is negotiated)
 *   IOMMU endpoint <id> blk <bb:dd.f>
 *   IOMMU <name> status <n> | IOMMU <name> skipped    (reattach: only if attach_domain_range was 0)
 *   IOMMU probe resv 0x<start>-0x<end> subtype <n>    (after "probe status", each RESV_MEM)
 *   IOMMU probe property <type> len <n>               (any other property)
 *   BLK pci/caps/features ... (virtio.c, info); BLK capacity <n>
 *   BLK read 0 status <s> data <16 bytes hex> sum <fnv1a32>
 *   BLK write 1 status <s> / BLK readback 1 status <s> data .. sum .. / BLK write 1 OK|MISMATCH
 *   IOMMU unmap status <n>
 *   BLK unmapped read submitted
 *   IOMMU fault reason <r> flags 0x<f> endpoint <e> address 0x<a>   (each event, in order)
 *   IOMMU no fault event
 *   BLK unmapped read completed status <s> | BLK unmapped read pending
 *   IOMMU isr 0x<ISR> (virtio.c, info), IOMMU done; then the i8042 reset.
 */
#include "virtio.h"

#if !defined(HYPERPY_NO_UAPI) && __has_include(<linux/virtio_iommu.h>)
#include <linux/virtio_iommu.h>
#else /* the spec's names (virtio 1.2 5.13), little-endian */
#define VIRTIO_IOMMU_F_INPUT_RANGE 0
#define VIRTIO_IOMMU_F_DOMAIN_RANGE 1
#define VIRTIO_IOMMU_F_MAP_UNMAP 2
#define VIRTIO_IOMMU_F_PROBE 4
#define VIRTIO_IOMMU_F_BYPASS_CONFIG 6
struct virtio_iommu_config {
    uint64_t page_size_mask;
    struct { uint64_t start, end; } input_range;
    struct { uint32_t start, end; } domain_range;
    uint32_t probe_size;
    uint8_t bypass;
    uint8_t reserved[3];
};
#define VIRTIO_IOMMU_T_ATTACH 1
#define VIRTIO_IOMMU_T_DETACH 2
#define VIRTIO_IOMMU_T_MAP 3
#define VIRTIO_IOMMU_T_UNMAP 4
#define VIRTIO_IOMMU_T_PROBE 5
#define VIRTIO_IOMMU_MAP_F_READ 1
#define VIRTIO_IOMMU_MAP_F_WRITE 2
#define VIRTIO_IOMMU_PROBE_T_NONE 0
#define VIRTIO_IOMMU_PROBE_T_RESV_MEM 1
#define VIRTIO_IOMMU_PROBE_T_MASK 0xfff
struct virtio_iommu_fault {
    uint8_t reason;
    uint8_t reserved[3];
    uint32_t flags;
    uint32_t endpoint;
    uint8_t reserved2[4];
    uint64_t address;
};
#endif

#define PCI_DEVICE_IOMMU (VIRTIO_PCI_MODERN_DEVICE_BASE + VIRTIO_TYPE_IOMMU)
#define IOVA 0x40000000ull    /* the window's IO virtual address: 1 GiB, not its GPA */
#define WIN_SIZE 0x10000ull
#define DOMAIN 1
#define EVENT_BUFS 4
#define SECTOR 512
#define PATTERN_TEXT "hyperpy-blk-write"

/* ---- Output: say("...%d %D %x %b %s...", ...): %d u32 decimal, %D u64 decimal, %x u64
 * 0x-hex, %b u32 PCI bdf as bb:dd.f, %s string. Every argument is fetched as 64 bits (one
 * va_arg site keeps this small); 32-bit ones are truncated back (x86-64 SysV passes each in
 * its own 8-byte register or stack slot). ---- */

static void say(const char *fmt, ...)
{
    __builtin_va_list ap;
    __builtin_va_start(ap, fmt);
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            putchar(*fmt);
            continue;
        }
        uint64_t v = __builtin_va_arg(ap, uint64_t);
        char c = *++fmt;
        if (c == 'd')
            print_dec((uint32_t)v);
        else if (c == 'D')
            print_dec(v);
        else if (c == 'x')
            print_hex(v);
        else if (c == 's')
            print((const char *)v);
        else /* 'b' */
            pci_print_addr(&(struct pci_dev){.bus = (uint8_t)(v >> 8), .dev = (uint8_t)(v >> 3 & 31),
                                             .fn = v & 7});
    }
    __builtin_va_end(ap);
}

/* ---- ACPI VIOT ---- */

/* Little-endian fields at any alignment (x86 loads them as they are). */
typedef uint16_t u16u __attribute__((aligned(1), may_alias));
typedef uint32_t u32u __attribute__((aligned(1), may_alias));
typedef uint64_t u64u __attribute__((aligned(1), may_alias));
#define rd16(p) (*(const u16u *)(p))
#define rd32(p) (*(const u32u *)(p))
#define rd64(p) (*(const u64u *)(p))

static const uint8_t *find_viot(const struct boot_info *bi)
{
    uint64_t addr = bi->entry == BOOT_ENTRY_PVH ? rd64((const uint8_t *)bi->boot_struct + 32) : 0;
    for (uint64_t a = 0xe0000; !addr && a < 0x100000; a += 16)
        if (memcmp((const void *)a, "RSD PTR ", 8) == 0)
            addr = a;
    if (!addr || addr >> 32)
        return NULL;
    const uint8_t *rsdp = (const uint8_t *)addr;
    uint64_t root = rsdp[15] >= 2 ? rd64(rsdp + 24) : 0;
    unsigned width = 8;
    if (!root || root >> 32) {
        root = rd32(rsdp + 16);
        width = 4;
    }
    const uint8_t *r = (const uint8_t *)root;
    for (uint32_t off = 36; root && off + width <= rd32(r + 4); off += width) {
        uint64_t t = width == 8 ? rd64(r + off) : rd32(r + off);
        if (t && !(t >> 32) && memcmp((const void *)t, "VIOT", 4) == 0)
            return (const uint8_t *)t;
    }
    return NULL;
}

/* Prints the VIOT's nodes; returns the endpoint id of `bdf` (segment 0), or bdf itself. */
static uint32_t viot_endpoint(const uint8_t *viot, uint16_t bdf)
{
    uint32_t ep = bdf;
    if (!viot) {
        puts("VIOT missing");
        return ep;
    }
    uint32_t len = rd32(viot + 4);
    uint16_t count = rd16(viot + 36), off = rd16(viot + 38);
    say("VIOT nodes %d\n", count);
    for (uint16_t i = 0; i < count && off + 4u <= len; i++) {
        const uint8_t *n = viot + off;
        uint16_t nlen = rd16(n + 2);
        if (nlen < 4 || off + nlen > len)
            break;
        if (n[0] == 3 && nlen >= 16) { /* virtio-pci IOMMU */
            say("VIOT virtio-pci iommu %d %b\n", rd16(n + 4), rd16(n + 6));
        } else if (n[0] == 1 && nlen >= 24) { /* PCI range */
            uint32_t start = rd32(n + 4);
            uint16_t b0 = rd16(n + 12), b1 = rd16(n + 14), out = rd16(n + 16);
            say("VIOT endpoints %d-%d %b-%b id %d -> ", rd16(n + 8), rd16(n + 10), b0, b1, start);
            if (out + 4u <= len && viot[out] == 3)
                puts("iommu");
            else
                say("node %d\n", out);
            if (rd16(n + 8) == 0 && bdf >= b0 && bdf <= b1)
                ep = start + (bdf - b0);
        } else {
            say("VIOT node type %d\n", n[0]);
        }
        off = (uint16_t)(off + nlen);
    }
    return ep;
}

/* ---- virtio-iommu requests ---- */

static struct virtio_dev iommu, blk;
static uint8_t req[64] __attribute__((aligned(16)));
static uint8_t resp[512 + 4] __attribute__((aligned(16))); /* probe properties + tail */
static struct virtio_iommu_fault events[EVENT_BUFS];
static uint8_t win[WIN_SIZE] __attribute__((aligned(4096)));

/* Sends req[0..len) with type `type` (the caller filled the rest of req) and `in` device-
 * writable bytes (the tail last); prints "IOMMU <name> status <s>"; returns the status. */
static uint8_t send(const char *name, uint8_t type, uint32_t len, uint32_t in)
{
    req[0] = type;
    memset(resp, 0xff, in);
    struct vbuf bufs[2] = {{req, len, false}, {resp, in, true}};
    virtq_transfer(&iommu, &iommu.vq[0], bufs, 2);
    uint8_t s = resp[in - 4];
    say("IOMMU %s status %d\n", name, s);
    memset(req, 0, sizeof(req));
    return s;
}

static void put32(uint32_t off, uint32_t v) { memcpy(req + off, &v, 4); }
static void put64(uint32_t off, uint64_t v) { memcpy(req + off, &v, 8); }

static uint8_t attach_detach(const char *name, uint8_t type, uint32_t domain, uint32_t ep)
{
    put32(4, domain);
    put32(8, ep);
    return send(name, type, 20, 4); /* head, domain, endpoint, flags/reserved, reserved[8] */
}

/* MAP (phys != 0) or UNMAP (phys == 0) of [start, end] in DOMAIN. */
static uint8_t map(const char *name, uint64_t start, uint64_t end, uint64_t phys)
{
    put32(4, DOMAIN);
    put64(8, start);
    put64(16, end);
    if (!phys)
        return send(name, VIRTIO_IOMMU_T_UNMAP, 28, 4); /* ... reserved[4] */
    put64(24, phys);
    put32(32, VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE);
    return send(name, VIRTIO_IOMMU_T_MAP, 36, 4);
}

static void probe(uint32_t ep, uint32_t probe_size)
{
    if (probe_size > sizeof(resp) - 4)
        probe_size = sizeof(resp) - 4;
    put32(4, ep);
    if (send("probe", VIRTIO_IOMMU_T_PROBE, 72, probe_size + 4) != 0) /* head, ep, reserved[64] */
        return;
    for (uint32_t off = 0; off + 4 <= probe_size;) {
        const uint8_t *p = resp + off;
        uint16_t type = rd16(p) & VIRTIO_IOMMU_PROBE_T_MASK, len = rd16(p + 2);
        if (type == VIRTIO_IOMMU_PROBE_T_NONE || off + 4 + len > probe_size)
            break;
        if (type == VIRTIO_IOMMU_PROBE_T_RESV_MEM && len >= 20)
            say("IOMMU probe resv %x-%x subtype %d\n", rd64(p + 8), rd64(p + 16), p[4]);
        else
            say("IOMMU probe property %d len %d\n", type, len);
        off += 4 + len;
    }
}

#define CFG(field) offsetof(struct virtio_iommu_config, field)

/* ---- virtio-blk through the window ---- */

static struct virtio_blk_outhdr *const hdr = (struct virtio_blk_outhdr *)(win + 0x1000);
static volatile uint8_t *const bstatus = win + 0x1010;
static uint8_t *const data = win + 0x2000;

static void blk_submit(uint32_t type, uint64_t sector)
{
    hdr->type = type;
    hdr->ioprio = 0;
    hdr->sector = sector;
    *bstatus = 0xff;
    struct vbuf bufs[3] = {{hdr, sizeof(*hdr), false},
                           {data, SECTOR, type != VIRTIO_BLK_T_OUT},
                           {(const void *)bstatus, 1, true}};
    virtq_add(&blk.vq[0], bufs, 3);
    virtq_kick(&blk, &blk.vq[0]);
}

static uint8_t blk_request(uint32_t type, uint64_t sector)
{
    blk_submit(type, sector);
    if (!virtq_wait(&blk, &blk.vq[0], blk.timeout_ms, NULL, NULL))
        virtio_fail(&blk, "timeout waiting for the used ring");
    return *bstatus;
}

static void fill_pattern(uint8_t *p, uint64_t sector)
{
    size_t t = sizeof(PATTERN_TEXT) - 1;
    memcpy(p, PATTERN_TEXT, t);
    for (size_t i = t; i < SECTOR; i++)
        p[i] = (uint8_t)(i * 13 + sector);
}

static void blk_read(const char *what, uint32_t sector)
{
    memset(data, 0, SECTOR);
    uint8_t s = blk_request(VIRTIO_BLK_T_IN, sector);
    say("BLK %s %d status %d", what, sector, s);
    if (s == VIRTIO_BLK_S_OK) {
        print(" data ");
        print_hex_bytes(data, 16);
        print(" sum ");
        print_hex_fixed(fnv1a32(data, SECTOR), 8);
    }
    putchar('\n');
}

/* ---- main ---- */

void guest_main(const struct boot_info *bi)
{
    struct pci_dev bdev;
    blk.prefix = "BLK";
    if (!pci_find(VIRTIO_PCI_VENDOR, VIRTIO_PCI_MODERN_DEVICE_BASE + VIRTIO_TYPE_BLOCK, &bdev))
        virtio_fail(&blk, "no blk device");
    uint16_t bbdf = (uint16_t)(bdev.dev << 3 | bdev.fn);
    uint32_t ep = viot_endpoint(find_viot(bi), bbdf);

    uint64_t wanted = 1ull << VIRTIO_IOMMU_F_INPUT_RANGE | 1ull << VIRTIO_IOMMU_F_DOMAIN_RANGE |
                      1ull << VIRTIO_IOMMU_F_MAP_UNMAP | 1ull << VIRTIO_IOMMU_F_PROBE |
                      1ull << VIRTIO_IOMMU_F_BYPASS_CONFIG;
    virtio_init(&iommu, "IOMMU", VIRTIO_TYPE_IOMMU, wanted, bi->cmdline);
    uint64_t in_end = ~0ull;
    uint32_t dom_end = ~0u, probe_size = 0;
    say("IOMMU page_size_mask %x\n", virtio_cfg64(&iommu, CFG(page_size_mask)));
    if (virtio_has(&iommu, VIRTIO_IOMMU_F_INPUT_RANGE)) {
        in_end = virtio_cfg64(&iommu, CFG(input_range.end));
        say("IOMMU input_range %x-%x\n", virtio_cfg64(&iommu, CFG(input_range.start)), in_end);
    }
    if (virtio_has(&iommu, VIRTIO_IOMMU_F_DOMAIN_RANGE)) {
        dom_end = virtio_cfg32(&iommu, CFG(domain_range.end));
        say("IOMMU domain_range %d-%d\n", virtio_cfg32(&iommu, CFG(domain_range.start)), dom_end);
    }
    if (virtio_has(&iommu, VIRTIO_IOMMU_F_PROBE)) {
        probe_size = virtio_cfg32(&iommu, CFG(probe_size));
        say("IOMMU probe_size %d\n", probe_size);
    }
    if (virtio_has(&iommu, VIRTIO_IOMMU_F_BYPASS_CONFIG))
        say("IOMMU bypass %d\n", virtio_cfg8(&iommu, CFG(bypass)));
    virtio_setup_queue(&iommu, 0);
    struct virtq *evq = virtio_setup_queue(&iommu, 1);
    virtio_driver_ok(&iommu);
    for (int i = 0; i < EVENT_BUFS; i++) {
        struct vbuf b = {&events[i], sizeof(events[i]), true};
        virtq_add(evq, &b, 1);
    }
    virtq_kick(&iommu, evq);
    say("IOMMU endpoint %d blk %b\n", ep, bbdf);

    attach_detach("detach_unattached", VIRTIO_IOMMU_T_DETACH, DOMAIN, ep);
    attach_detach("attach", VIRTIO_IOMMU_T_ATTACH, DOMAIN, ep);
    if (probe_size)
        probe(ep, probe_size);
    uint64_t gpa = (uint64_t)win;
    map("map", IOVA, IOVA + WIN_SIZE - 1, gpa);
    map("map_overlap", IOVA + WIN_SIZE / 2, IOVA + WIN_SIZE * 3 / 2 - 1, gpa);
    map("unmap_split", IOVA, IOVA + WIN_SIZE / 2 - 1, 0);
    if (in_end < ~0ull - 0x2000) {
        uint64_t a = (in_end + 0x1000) & ~0xfffull;
        map("map_outside", a, a + 0xfff, gpa);
    } else {
        puts("IOMMU map_outside skipped");
    }
    /* An endpoint id that names no PCI function: the highest empty bus-0 slot. */
    uint32_t bogus = 0xf8;
    for (struct pci_dev d = {0}; bogus > 8; bogus -= 8) {
        d.dev = (uint8_t)(bogus >> 3);
        if ((uint16_t)pci_read32(&d, PCI_VENDOR_ID) == 0xffff)
            break;
    }
    attach_detach("attach_noent", VIRTIO_IOMMU_T_ATTACH, DOMAIN, bogus);
    if (dom_end != ~0u) {
        if (attach_detach("attach_domain_range", VIRTIO_IOMMU_T_ATTACH, dom_end + 1, ep) == 0)
            attach_detach("reattach", VIRTIO_IOMMU_T_ATTACH, DOMAIN, ep);
    } else {
        puts("IOMMU attach_domain_range skipped");
    }
    send("unknown_type", 0x7f, 4, 4);
    put32(4, DOMAIN);
    send("truncated", VIRTIO_IOMMU_T_ATTACH, 8, 4);

    /* virtio-blk: rings (page 0), header/status (page 1), data (page 2) in the window. */
    virtio_init(&blk, "BLK", VIRTIO_TYPE_BLOCK, 0, bi->cmdline);
    blk.ring_mem = win;
    blk.dma_offset = IOVA - gpa;
    virtio_setup_queue(&blk, 0);
    virtio_driver_ok(&blk);
    say("BLK capacity %D\n", virtio_cfg64(&blk, offsetof(struct virtio_blk_config, capacity)));
    blk_read("read", 0);
    fill_pattern(data, 1);
    say("BLK write 1 status %d\n", blk_request(VIRTIO_BLK_T_OUT, 1));
    blk_read("readback", 1);
    static uint8_t want[SECTOR];
    fill_pattern(want, 1);
    say("BLK write 1 %s\n", *bstatus == VIRTIO_BLK_S_OK && memcmp(want, data, SECTOR) == 0 ? "OK" : "MISMATCH");

    /* Unmap the window; the next request's ring and buffers no longer translate. */
    map("unmap", IOVA, IOVA + WIN_SIZE - 1, 0);
    blk_submit(VIRTIO_BLK_T_IN, 0);
    puts("BLK unmapped read submitted");
    uint32_t faults = 0, id;
    while (virtq_wait(&iommu, evq, faults ? 200 : 2000, &id, NULL)) {
        const struct virtio_iommu_fault *f = &events[id % EVENT_BUFS];
        say("IOMMU fault reason %d flags %x endpoint %d address %x\n", f->reason,
            (uint64_t)f->flags, f->endpoint, f->address);
        faults++;
    }
    if (!faults)
        puts("IOMMU no fault event");
    if (virtq_get_used(&blk.vq[0], NULL, NULL))
        say("BLK unmapped read completed status %d\n", *bstatus);
    else
        puts("BLK unmapped read pending");
    virtio_reset(&blk);
    virtio_finish(&iommu);
    reset();
}
