/* PCI configuration mechanism #1, bus-0 enumeration, BARs, capabilities (see pci.h). */
#include "pci.h"

#define PCI_CONFIG_ADDRESS 0xcf8
#define PCI_CONFIG_DATA 0xcfc

static void select_reg(const struct pci_dev *d, uint16_t off)
{
    outl(PCI_CONFIG_ADDRESS, 0x80000000u | (uint32_t)d->bus << 16 | (uint32_t)d->dev << 11 |
                                 (uint32_t)d->fn << 8 | (off & 0xfc));
}

uint8_t pci_read8(const struct pci_dev *d, uint16_t off)
{
    select_reg(d, off);
    return inb(PCI_CONFIG_DATA + (off & 3));
}

uint16_t pci_read16(const struct pci_dev *d, uint16_t off)
{
    select_reg(d, off);
    return inw(PCI_CONFIG_DATA + (off & 2));
}

uint32_t pci_read32(const struct pci_dev *d, uint16_t off)
{
    select_reg(d, off);
    return inl(PCI_CONFIG_DATA);
}

void pci_write8(const struct pci_dev *d, uint16_t off, uint8_t v)
{
    select_reg(d, off);
    outb(PCI_CONFIG_DATA + (off & 3), v);
}

void pci_write16(const struct pci_dev *d, uint16_t off, uint16_t v)
{
    select_reg(d, off);
    outw(PCI_CONFIG_DATA + (off & 2), v);
}

void pci_write32(const struct pci_dev *d, uint16_t off, uint32_t v)
{
    select_reg(d, off);
    outl(PCI_CONFIG_DATA, v);
}

bool pci_scan(bool (*fn)(const struct pci_dev *d, void *ctx), void *ctx)
{
    for (uint8_t dev = 0; dev < 32; dev++) {
        for (uint8_t f = 0; f < 8; f++) {
            struct pci_dev d = {.bus = 0, .dev = dev, .fn = f};
            uint32_t id = pci_read32(&d, PCI_VENDOR_ID);
            if ((id & 0xffff) == 0xffff || (id & 0xffff) == 0) {
                if (f == 0)
                    break; /* no function 0: no device */
                continue;
            }
            d.vendor = (uint16_t)id;
            d.device = (uint16_t)(id >> 16);
            if (fn(&d, ctx))
                return true;
            if (f == 0 && !(pci_read8(&d, PCI_HEADER_TYPE) & 0x80))
                break; /* single-function device */
        }
    }
    return false;
}

struct find_ctx {
    uint16_t vendor, device;
    struct pci_dev *out;
};

static bool match(const struct pci_dev *d, void *ctx)
{
    struct find_ctx *c = ctx;
    if (d->vendor != c->vendor || d->device != c->device)
        return false;
    *c->out = *d;
    return true;
}

bool pci_find(uint16_t vendor, uint16_t device, struct pci_dev *out)
{
    struct find_ctx c = {vendor, device, out};
    return pci_scan(match, &c);
}

void pci_enable(const struct pci_dev *d)
{
    uint16_t cmd = pci_read16(d, PCI_COMMAND);
    pci_write16(d, PCI_COMMAND, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
}

/* ---- BAR sizing and placement ---- */

/* Size of the memory BAR at `reg` (decoding must be off); 0 if it is not implemented. */
static uint64_t bar_size(const struct pci_dev *d, uint16_t reg, bool is64)
{
    uint32_t lo = pci_read32(d, reg), hi = is64 ? pci_read32(d, reg + 4) : 0;
    pci_write32(d, reg, 0xffffffffu);
    uint64_t mask = pci_read32(d, reg) & ~0xfull;
    pci_write32(d, reg, lo);
    if (is64) {
        pci_write32(d, reg + 4, 0xffffffffu);
        mask |= (uint64_t)pci_read32(d, reg + 4) << 32;
        pci_write32(d, reg + 4, hi);
    } else if (mask) {
        mask |= 0xffffffff00000000ull;
    }
    return mask ? ~mask + 1 : 0;
}

/* Memory ranges already decoded in the allocation window: what the VMM/firmware placed on
 * bus 0 (collected once, at the first assignment) and what we placed since. */
#define MAX_USED 48
static struct { uint64_t base, end; } used[MAX_USED];
static int n_used = -1; /* -1: not collected yet */

static void add_used(uint64_t base, uint64_t size)
{
    if (n_used < MAX_USED && size && base < PCI_MMIO_ALLOC_END && base + size > PCI_MMIO_ALLOC_BASE) {
        used[n_used].base = base;
        used[n_used].end = base + size;
        n_used++;
    }
}

static bool collect_used(const struct pci_dev *d, void *ctx)
{
    (void)ctx;
    uint16_t cmd = pci_read16(d, PCI_COMMAND);
    pci_write16(d, PCI_COMMAND, cmd & ~(PCI_COMMAND_MEMORY | PCI_COMMAND_IO));
    for (int b = 0; b < 6; b++) {
        uint16_t reg = PCI_BASE_ADDRESS_0 + 4 * b;
        uint32_t lo = pci_read32(d, reg);
        if (lo & PCI_BASE_ADDRESS_SPACE_IO)
            continue;
        bool is64 = (lo & PCI_BASE_ADDRESS_MEM_TYPE_MASK) == PCI_BASE_ADDRESS_MEM_TYPE_64 && b < 5;
        uint64_t base = (lo & ~0xfull) | (is64 ? (uint64_t)pci_read32(d, reg + 4) << 32 : 0);
        if (base)
            add_used(base, bar_size(d, reg, is64));
        b += is64;
    }
    pci_write16(d, PCI_COMMAND, cmd);
    return false;
}

/* Lowest naturally aligned free range of `size` bytes in the window; 0 if none. */
static uint64_t alloc_mmio(uint64_t size)
{
    if (n_used < 0) {
        n_used = 0;
        pci_scan(collect_used, NULL);
    }
    uint64_t cand = PCI_MMIO_ALLOC_BASE;
    for (bool moved = true; moved;) {
        moved = false;
        cand = (cand + size - 1) & ~(size - 1);
        for (int i = 0; i < n_used; i++)
            if (cand < used[i].end && used[i].base < cand + size) {
                cand = used[i].end;
                moved = true;
            }
    }
    if (cand + size > PCI_MMIO_ALLOC_END)
        return 0;
    add_used(cand, size);
    return cand;
}

uint64_t pci_bar(const struct pci_dev *d, int bar, bool *is_io)
{
    if (bar < 0 || bar > 5)
        return 0;
    uint16_t reg = PCI_BASE_ADDRESS_0 + 4 * bar;
    uint32_t lo = pci_read32(d, reg);
    if (is_io)
        *is_io = lo & PCI_BASE_ADDRESS_SPACE_IO;
    if (lo & PCI_BASE_ADDRESS_SPACE_IO)
        return lo & ~3u;
    bool is64 = (lo & PCI_BASE_ADDRESS_MEM_TYPE_MASK) == PCI_BASE_ADDRESS_MEM_TYPE_64;
    if (is64 && bar == 5)
        return 0;
    uint64_t base = (lo & ~0xfull) | (is64 ? (uint64_t)pci_read32(d, reg + 4) << 32 : 0);
    if (base)
        return base;

    /* Unassigned: size it with decoding off, then place it in a free, aligned range. */
    uint16_t cmd = pci_read16(d, PCI_COMMAND);
    pci_write16(d, PCI_COMMAND, cmd & ~(PCI_COMMAND_MEMORY | PCI_COMMAND_IO));
    uint64_t size = bar_size(d, reg, is64);
    base = size && size <= 0x10000000ull ? alloc_mmio(size) : 0;
    if (base) {
        pci_write32(d, reg, (uint32_t)base);
        if (is64)
            pci_write32(d, reg + 4, (uint32_t)(base >> 32));
    }
    pci_write16(d, PCI_COMMAND, base ? cmd | PCI_COMMAND_MEMORY : cmd);
    return base;
}

uint8_t pci_find_cap(const struct pci_dev *d, uint8_t id, uint8_t start)
{
    uint8_t pos;
    if (start) {
        pos = pci_read8(d, start + 1);
    } else {
        if (!(pci_read16(d, PCI_STATUS) & PCI_STATUS_CAP_LIST))
            return 0;
        pos = pci_read8(d, PCI_CAPABILITY_LIST);
    }
    for (int guard = 0; guard < 48 && pos >= 0x40; guard++) {
        pos &= 0xfc;
        if (pci_read8(d, pos) == id)
            return pos;
        pos = pci_read8(d, pos + 1);
    }
    return 0;
}

/* ---- Identity mapping above 4 GiB ----
 * longmode.S maps [0, 4 GiB) through PML4[0] -> PDPT[0..3] -> 2 MiB pages. For a BAR above,
 * hang one more page directory (512 x 2 MiB = 1 GiB) under PDPT[addr >> 30]: up to 512 GiB. */
#define PTE_P 0x01ull
#define PTE_RW 0x02ull
#define PTE_PCD 0x10ull
#define PTE_PS 0x80ull
#define PTE_ADDR 0x000ffffffffff000ull
#define EXTRA_PDS 4

static uint64_t extra_pd[EXTRA_PDS][512] __attribute__((aligned(4096)));
static int extra_pds_used;

static bool map_gib(uint64_t gib)
{
    uint64_t cr3;
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    uint64_t *pml4 = (uint64_t *)(cr3 & PTE_ADDR);
    if (!(pml4[0] & PTE_P))
        return false;
    uint64_t *pdpt = (uint64_t *)(pml4[0] & PTE_ADDR);
    if (pdpt[gib] & PTE_P)
        return true;
    if (extra_pds_used == EXTRA_PDS)
        return false;
    uint64_t *pd = extra_pd[extra_pds_used++];
    for (uint64_t i = 0; i < 512; i++)
        pd[i] = ((gib << 30) + (i << 21)) | PTE_P | PTE_RW | PTE_PCD | PTE_PS;
    pdpt[gib] = (uint64_t)pd | PTE_P | PTE_RW;
    __asm__ volatile("mov %0, %%cr3" : : "r"(cr3) : "memory"); /* flush the TLB */
    return true;
}

bool pci_map(uint64_t addr, uint64_t len)
{
    if (len == 0)
        len = 1;
    uint64_t end = addr + len - 1;
    if (end < addr || end >= (512ull << 30))
        return false;
    for (uint64_t gib = addr >> 30; gib <= end >> 30; gib++)
        if (gib >= 4 && !map_gib(gib))
            return false;
    return true;
}

/* ---- Output helpers ---- */

void print_hex_fixed(uint64_t v, int digits)
{
    for (int i = digits - 1; i >= 0; i--)
        putchar("0123456789abcdef"[(v >> (4 * i)) & 15]);
}

void pci_print_addr(const struct pci_dev *d)
{
    print_hex_fixed(d->bus, 2);
    putchar(':');
    print_hex_fixed(d->dev, 2);
    putchar('.');
    print_hex_fixed(d->fn, 1);
}
