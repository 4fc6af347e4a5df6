/* virtio-pci modern transport and split virtqueues for the device guests (see virtio.h). */
#include "virtio.h"

#define IO_TAG (1ull << 63) /* a structure in an I/O BAR: the low 16 bits are the port */

volatile uint32_t virtio_irq_counts[VIRTIO_MSIX_MAX];

static uint8_t r8(uint64_t a) { return a & IO_TAG ? inb((uint16_t)a) : mmio_read8(a); }
static uint16_t r16(uint64_t a) { return a & IO_TAG ? inw((uint16_t)a) : mmio_read16(a); }
static uint32_t r32(uint64_t a) { return a & IO_TAG ? inl((uint16_t)a) : mmio_read32(a); }
static void w8(uint64_t a, uint8_t v) { if (a & IO_TAG) outb((uint16_t)a, v); else mmio_write8(a, v); }
static void w16(uint64_t a, uint16_t v) { if (a & IO_TAG) outw((uint16_t)a, v); else mmio_write16(a, v); }
static void w32(uint64_t a, uint32_t v) { if (a & IO_TAG) outl((uint16_t)a, v); else mmio_write32(a, v); }

#define COMMON(d, field) ((d)->common + offsetof(struct virtio_pci_common_cfg, field))

static inline void mb(void) { __asm__ volatile("lock; addl $0, (%%rsp)" : : : "memory", "cc"); }
static inline void barrier(void) { __asm__ volatile("" : : : "memory"); }

static void prefix(const struct virtio_dev *d)
{
    print(d->prefix);
    putchar(' ');
}

void virtio_fail(const struct virtio_dev *d, const char *why)
{
    prefix(d);
    print("FAIL ");
    puts(why);
    if (d->common)
        w8(COMMON(d, device_status), r8(COMMON(d, device_status)) | VIRTIO_CONFIG_S_FAILED);
    reset();
}

/* ---- MSI-X ---- */

_Static_assert(VIRTIO_MSIX_VECTOR_BASE + VIRTIO_MSIX_MAX - 1 <= INTR_DYN_LAST &&
               VIRTIO_MSIX_VECTOR_BASE > TIMER_VECTOR, "MSI-X vectors need handler slots");

static void msix_handler(unsigned vector)
{
    virtio_irq_counts[vector - VIRTIO_MSIX_VECTOR_BASE]++;
    lapic_eoi();
}

static void msix_setup(struct virtio_dev *d)
{
    uint8_t cap = pci_find_cap(&d->pci, PCI_CAP_ID_MSIX, 0);
    if (!cap)
        virtio_fail(d, "irq: no MSI-X capability");
    uint16_t ctrl = pci_read16(&d->pci, cap + PCI_MSIX_FLAGS);
    uint32_t table = pci_read32(&d->pci, cap + PCI_MSIX_TABLE);
    unsigned entries = (ctrl & PCI_MSIX_FLAGS_QSIZE) + 1;
    bool io;
    uint64_t base = pci_bar(&d->pci, table & PCI_MSIX_TABLE_BIR, &io);
    if (!base || io)
        virtio_fail(d, "irq: MSI-X table BAR unusable");
    d->msix_table = base + (table & ~7u);
    d->msix_entries = entries > VIRTIO_MSIX_MAX ? VIRTIO_MSIX_MAX : (uint16_t)entries;
    if (!pci_map(d->msix_table, 16ull * d->msix_entries))
        virtio_fail(d, "irq: cannot map the MSI-X table");

    intr_init();
    for (unsigned e = 0; e < d->msix_entries; e++)
        intr_set_handler(VIRTIO_MSIX_VECTOR_BASE + e, msix_handler);

    /* Enabled with all vectors masked while the entries are written, then unmasked. */
    pci_write16(&d->pci, cap + PCI_MSIX_FLAGS, ctrl | PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL);
    uint32_t dest = lapic_id();
    for (unsigned e = 0; e < d->msix_entries; e++) {
        uint64_t ent = d->msix_table + 16 * e;
        mmio_write32(ent + 0, 0xfee00000u | dest << 12); /* message address: this APIC */
        mmio_write32(ent + 4, 0);
        mmio_write32(ent + 8, VIRTIO_MSIX_VECTOR_BASE + e); /* fixed, edge */
        mmio_write32(ent + 12, 0);                          /* vector control: unmasked */
    }
    pci_write16(&d->pci, cap + PCI_MSIX_FLAGS, (ctrl | PCI_MSIX_FLAGS_ENABLE) & ~PCI_MSIX_FLAGS_MASKALL);
    prefix(d);
    print("msix entries ");
    print_dec(entries);
    print(" table bar ");
    print_dec(table & PCI_MSIX_TABLE_BIR);
    putchar('\n');
}

static uint16_t queue_entry(const struct virtio_dev *d, uint16_t index)
{
    if (d->msix_entries < 2)
        return 0;
    return 1u + index < d->msix_entries ? 1u + index : d->msix_entries - 1u;
}

/* ---- Capabilities ---- */

static const char *const cap_names[6] = {"?", "common", "notify", "isr", "device", "pci"};

static void find_caps(struct virtio_dev *d)
{
    for (uint8_t pos = pci_find_cap(&d->pci, PCI_CAP_ID_VNDR, 0); pos;
         pos = pci_find_cap(&d->pci, PCI_CAP_ID_VNDR, pos)) {
        uint8_t type = pci_read8(&d->pci, pos + VIRTIO_PCI_CAP_CFG_TYPE);
        uint8_t bar = pci_read8(&d->pci, pos + VIRTIO_PCI_CAP_BAR);
        uint32_t off = pci_read32(&d->pci, pos + VIRTIO_PCI_CAP_OFFSET);
        uint32_t len = pci_read32(&d->pci, pos + VIRTIO_PCI_CAP_LENGTH);
        if (type < 1 || type > 5 || (d->caps_seen & 1u << type))
            continue; /* unknown, or not the first of its type */
        if (type == VIRTIO_PCI_CAP_PCI_CFG) {
            d->caps_seen |= 1u << type; /* present; this driver does not use it */
            continue;
        }
        if (bar > 5)
            continue;
        bool io;
        uint64_t base = pci_bar(&d->pci, bar, &io);
        if (!base)
            continue;
        uint64_t addr = base + off;
        if (io) {
            addr = IO_TAG | (addr & 0xffff);
        } else if (!pci_map(addr, len)) {
            continue;
        }
        d->caps_seen |= 1u << type;
        switch (type) {
        case VIRTIO_PCI_CAP_COMMON_CFG:
            d->common = addr;
            break;
        case VIRTIO_PCI_CAP_NOTIFY_CFG:
            d->notify = addr;
            d->notify_mult = pci_read32(&d->pci, pos + VIRTIO_PCI_NOTIFY_CAP_MULT);
            break;
        case VIRTIO_PCI_CAP_ISR_CFG:
            d->isr = addr;
            break;
        case VIRTIO_PCI_CAP_DEVICE_CFG:
            d->device_cfg = addr;
            d->device_cfg_len = len;
            break;
        }
    }
}

/* ---- Initialization ---- */

void virtio_reset(struct virtio_dev *d)
{
    w8(COMMON(d, device_status), 0);
    /* 1.x: the reset is done when the status reads back 0. */
    deadline_start(1000);
    while (r8(COMMON(d, device_status)) != 0)
        if (deadline_passed())
            virtio_fail(d, "reset: status stays non-zero");
    deadline_stop();
}

static void set_status(struct virtio_dev *d, uint8_t bits)
{
    w8(COMMON(d, device_status), r8(COMMON(d, device_status)) | bits);
}

void virtio_init(struct virtio_dev *d, const char *pfx, unsigned type, uint64_t wanted,
                 const char *cmdline)
{
    memset(d, 0, sizeof(*d));
    d->prefix = pfx;
    d->timeout_ms = (uint32_t)cmdline_u64(cmdline, "timeout", VIRTIO_DEFAULT_TIMEOUT_MS);
    /* Transitional device ids (4.1.2.3), by virtio device type 1..4. */
    static const uint8_t transitional[5] = {0, 0x00, 0x01, 0x03, 0x05};
    if (!pci_find(VIRTIO_PCI_VENDOR, VIRTIO_PCI_MODERN_DEVICE_BASE + type, &d->pci) &&
        !(type <= 4 && pci_find(VIRTIO_PCI_VENDOR, 0x1000 + transitional[type], &d->pci)))
        virtio_fail(d, "no device");
    prefix(d);
    print("pci ");
    pci_print_addr(&d->pci);
    putchar(' ');
    print_hex_fixed(d->pci.vendor, 4);
    putchar(':');
    print_hex_fixed(d->pci.device, 4);
    putchar('\n');

    if (cmdline_has(cmdline, "zerobars")) {
        /* Test aid: forget the firmware's BAR placement, so that pci_bar assigns them. */
        pci_write16(&d->pci, PCI_COMMAND, pci_read16(&d->pci, PCI_COMMAND) & ~PCI_COMMAND_MEMORY);
        for (int b = 0; b < 6; b++)
            if (!(pci_read32(&d->pci, PCI_BASE_ADDRESS_0 + 4 * b) & PCI_BASE_ADDRESS_SPACE_IO))
                pci_write32(&d->pci, PCI_BASE_ADDRESS_0 + 4 * b, 0);
    }
    pci_enable(&d->pci);
    find_caps(d);
    prefix(d);
    print("caps");
    for (unsigned t = 1; t <= 5; t++)
        if (d->caps_seen & 1u << t) {
            putchar(' ');
            print(cap_names[t]);
        }
    print(" mult ");
    print_dec(d->notify_mult);
    print(" at ");
    print_hex(d->common);
    putchar('\n');
    if (!d->common || !d->notify)
        virtio_fail(d, "missing common or notify capability");

    d->use_irq = cmdline_has(cmdline, "irq");
    if (d->use_irq)
        msix_setup(d);

    virtio_reset(d);
    set_status(d, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    set_status(d, VIRTIO_CONFIG_S_DRIVER);

    w32(COMMON(d, device_feature_select), 0);
    uint64_t lo = r32(COMMON(d, device_feature));
    w32(COMMON(d, device_feature_select), 1);
    uint64_t hi = r32(COMMON(d, device_feature));
    d->device_features = lo | hi << 32;
    if (!(d->device_features >> VIRTIO_F_VERSION_1 & 1))
        virtio_fail(d, "device does not offer VIRTIO_F_VERSION_1");
    d->features = d->device_features &
                  (wanted | 1ull << VIRTIO_F_VERSION_1 | 1ull << VIRTIO_F_ACCESS_PLATFORM);
    w32(COMMON(d, guest_feature_select), 0);
    w32(COMMON(d, guest_feature), (uint32_t)d->features);
    w32(COMMON(d, guest_feature_select), 1);
    w32(COMMON(d, guest_feature), (uint32_t)(d->features >> 32));
    prefix(d);
    print("features device ");
    print_hex(d->device_features);
    print(" driver ");
    print_hex(d->features);
    putchar('\n');
    set_status(d, VIRTIO_CONFIG_S_FEATURES_OK);
    if (!(r8(COMMON(d, device_status)) & VIRTIO_CONFIG_S_FEATURES_OK))
        virtio_fail(d, "FEATURES_OK not accepted");

    if (d->use_irq) {
        w16(COMMON(d, msix_config), 0);
        if (r16(COMMON(d, msix_config)) != 0)
            virtio_fail(d, "irq: config vector not accepted");
    }
}

/* Ring memory: one page per queue (desc at 0, avail at 1 KiB, used at 2 KiB for <= 64 entries). */
static uint8_t ring_pages[VIRTIO_MAX_QUEUES][4096] __attribute__((aligned(4096)));
_Static_assert(VQ_MAX_SIZE * sizeof(struct vring_desc) <= 1024, "desc table fits 1 KiB");
_Static_assert(6 + 8 * VQ_MAX_SIZE <= 2048, "used ring fits 2 KiB");

struct virtq *virtio_setup_queue(struct virtio_dev *d, uint16_t index)
{
    if (index >= VIRTIO_MAX_QUEUES || index >= r16(COMMON(d, num_queues)))
        virtio_fail(d, "queue index out of range");
    struct virtq *q = &d->vq[index];
    w16(COMMON(d, queue_select), index);
    uint16_t max = r16(COMMON(d, queue_size));
    if (max == 0)
        virtio_fail(d, "queue size 0");
    uint16_t size = VQ_MAX_SIZE;
    while (size > max)
        size >>= 1;
    w16(COMMON(d, queue_size), size);

    uint8_t *mem = d->ring_mem ? d->ring_mem + 4096 * index : ring_pages[index];
    memset(mem, 0, 4096);
    q->index = index;
    q->size = size;
    q->desc = (struct vring_desc *)mem;
    q->avail = (struct vring_avail *)(mem + 1024);
    q->used = (volatile struct vring_used *)(mem + 2048);
    for (uint16_t i = 0; i < size; i++)
        q->desc[i].next = (uint16_t)(i + 1);
    q->free_head = 0;
    q->num_free = size;
    q->avail_idx = q->last_used = 0;

    q->dma_offset = d->dma_offset;
    uint64_t desc = (uint64_t)q->desc + q->dma_offset, avail = (uint64_t)q->avail + q->dma_offset;
    uint64_t used = (uint64_t)q->used + q->dma_offset;
    w32(COMMON(d, queue_desc_lo), (uint32_t)desc);
    w32(COMMON(d, queue_desc_hi), (uint32_t)(desc >> 32));
    w32(COMMON(d, queue_avail_lo), (uint32_t)avail);
    w32(COMMON(d, queue_avail_hi), (uint32_t)(avail >> 32));
    w32(COMMON(d, queue_used_lo), (uint32_t)used);
    w32(COMMON(d, queue_used_hi), (uint32_t)(used >> 32));
    if (d->use_irq) {
        q->msix_entry = queue_entry(d, index);
        w16(COMMON(d, queue_msix_vector), q->msix_entry);
        if (r16(COMMON(d, queue_msix_vector)) != q->msix_entry)
            virtio_fail(d, "irq: queue vector not accepted");
        q->irq_snapshot = virtio_irq_counts[q->msix_entry];
    }
    q->notify_addr = d->notify + (uint64_t)r16(COMMON(d, queue_notify_off)) * d->notify_mult;
    if (!(q->notify_addr & IO_TAG) && !pci_map(q->notify_addr, 2))
        virtio_fail(d, "cannot map the notify address");
    w16(COMMON(d, queue_enable), 1);
    return q;
}

void virtio_driver_ok(struct virtio_dev *d)
{
    set_status(d, VIRTIO_CONFIG_S_DRIVER_OK);
    uint8_t st = r8(COMMON(d, device_status));
    if (st & VIRTIO_CONFIG_S_NEEDS_RESET)
        virtio_fail(d, "device needs reset");
    if (!(st & VIRTIO_CONFIG_S_DRIVER_OK))
        virtio_fail(d, "DRIVER_OK not set");
}

void virtio_finish(struct virtio_dev *d)
{
    if (d->use_irq) {
        prefix(d);
        print("irq OK ");
        print_dec(d->irqs_waited);
        putchar('\n');
    } else if (d->isr) {
        /* Without MSI-X every used buffer (interrupts not suppressed) sets ISR bit 0; the read
         * clears it (4.1.4.5). */
        prefix(d);
        print("isr ");
        print_hex(r8(d->isr));
        putchar('\n');
    }
    virtio_reset(d);
    prefix(d);
    puts("done");
}

/* ---- Device configuration ---- */

static void cfg_check(struct virtio_dev *d, uint32_t off, uint32_t width)
{
    if (!d->device_cfg || off + width > d->device_cfg_len)
        virtio_fail(d, "device config access out of range");
}

uint8_t virtio_cfg8(struct virtio_dev *d, uint32_t off)
{
    cfg_check(d, off, 1);
    return r8(d->device_cfg + off);
}

uint16_t virtio_cfg16(struct virtio_dev *d, uint32_t off)
{
    cfg_check(d, off, 2);
    return r16(d->device_cfg + off);
}

uint32_t virtio_cfg32(struct virtio_dev *d, uint32_t off)
{
    cfg_check(d, off, 4);
    return r32(d->device_cfg + off);
}

uint64_t virtio_cfg64(struct virtio_dev *d, uint32_t off)
{
    cfg_check(d, off, 8);
    for (int tries = 0; tries < 1000; tries++) {
        uint8_t gen = r8(COMMON(d, config_generation));
        uint64_t v = r32(d->device_cfg + off) | (uint64_t)r32(d->device_cfg + off + 4) << 32;
        if (r8(COMMON(d, config_generation)) == gen)
            return v;
    }
    virtio_fail(d, "config_generation never settles");
}

/* ---- Split virtqueue ---- */

int virtq_add(struct virtq *q, const struct vbuf *bufs, int n)
{
    if (n < 1 || n > q->num_free)
        return -1;
    uint16_t head = q->free_head, i = head;
    for (int k = 0; k < n; k++) {
        struct vring_desc *desc = &q->desc[i];
        desc->addr = (uint64_t)bufs[k].addr + q->dma_offset;
        desc->len = bufs[k].len;
        desc->flags = (uint16_t)((k + 1 < n ? VRING_DESC_F_NEXT : 0) |
                                 (bufs[k].device_writes ? VRING_DESC_F_WRITE : 0));
        if (k + 1 < n)
            i = desc->next; /* the free list already links the chain */
    }
    q->free_head = q->desc[i].next;
    q->num_free = (uint16_t)(q->num_free - n);
    q->avail->ring[q->avail_idx % q->size] = head;
    barrier(); /* descriptors and ring entry before the index (x86 keeps stores in order) */
    q->avail_idx++;
    *(volatile uint16_t *)&q->avail->idx = q->avail_idx;
    return head;
}

void virtq_kick(struct virtio_dev *d, struct virtq *q)
{
    mb();
    w16(q->notify_addr, q->index);
}

bool virtq_get_used(struct virtq *q, uint32_t *id, uint32_t *len)
{
    if (q->last_used == q->used->idx)
        return false;
    barrier(); /* the index before the element (x86 keeps loads in order) */
    volatile struct vring_used_elem *e = &q->used->ring[q->last_used % q->size];
    uint32_t head = e->id, n = e->len;
    q->last_used++;
    if (head >= q->size) {
        puts("virtio: used id out of range");
        reset();
    }
    uint16_t i = (uint16_t)head, count = 1;
    while (q->desc[i].flags & VRING_DESC_F_NEXT) {
        i = q->desc[i].next;
        if (++count > q->size)
            break;
    }
    q->desc[i].next = q->free_head;
    q->free_head = (uint16_t)head;
    q->num_free = (uint16_t)(q->num_free + count);
    if (id)
        *id = head;
    if (len)
        *len = n;
    return true;
}

bool virtq_wait(struct virtio_dev *d, struct virtq *q, uint32_t timeout_ms, uint32_t *id, uint32_t *len)
{
    deadline_start(timeout_ms);
    bool got = false;
    if (!d->use_irq) {
        while (!(got = virtq_get_used(q, id, len)) && !deadline_passed())
            cpu_relax();
        deadline_stop();
        return got;
    }
    /* A used element counts once an interrupt of its queue's entry has been seen after it
     * became visible (elements batched under one interrupt all count). */
    irq_disable();
    for (;;) {
        uint32_t seen = virtio_irq_counts[q->msix_entry];
        if (seen != q->irq_snapshot) {
            q->irq_snapshot = seen;
            q->irq_covered = q->used->idx;
        }
        if (q->last_used != q->irq_covered) {
            got = virtq_get_used(q, id, len);
            if (got)
                d->irqs_waited++;
            break;
        }
        if (deadline_passed())
            break;
        intr_wait_cli();
    }
    irq_enable();
    deadline_stop();
    if (!got && q->last_used != q->used->idx)
        virtio_fail(d, "irq missing: used ring advanced without an interrupt");
    return got;
}

uint32_t virtq_transfer(struct virtio_dev *d, struct virtq *q, const struct vbuf *bufs, int n)
{
    int head = virtq_add(q, bufs, n);
    if (head < 0)
        virtio_fail(d, "queue full");
    virtq_kick(d, q);
    uint32_t id, len;
    if (!virtq_wait(d, q, d->timeout_ms, &id, &len))
        virtio_fail(d, "timeout waiting for the used ring");
    if (id != (uint32_t)head)
        virtio_fail(d, "used id is not the head just submitted");
    return len;
}

/* ---- Output ---- */

void print_hex_bytes(const void *p, size_t n)
{
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++)
        print_hex_fixed(b[i], 2);
}

uint32_t fnv1a32(const void *p, size_t n)
{
    const uint8_t *b = p;
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 16777619u;
    }
    return h;
}
