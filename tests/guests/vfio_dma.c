/* A passed-through (VFIO) PCI function, driven the way a guest driver drives real hardware:
 * hyperpy's SIMULATED VFIO device (hyperpy/vfio/simdevice.py, a small DMA engine) behind
 * hyperpy's VfioPciDevice (config passthrough, BARs as KVM memory slots, MSI-X/MSI through
 * VFIO_DEVICE_SET_IRQS eventfds).
 *
 * cmdline: iommu (the device sits behind the virtio-iommu: attach, map, DMA, unmap)
 *
 * Output (parsed by tests/test_vfio_passthrough.py), one fact a line:
 *   VFIO pci <bb:dd.f> id <vendor>:<device> class <class> pin <n>
 *   VFIO cap <id> at <off>            (each capability), VFIO vendor cap "<text>"
 *   VFIO bar <n> size <hex> addr <hex> (BAR0, BAR2: sized by writing all ones)
 *   VFIO rom <hex>                    (the ROM BAR after all ones: hidden -> 0)
 *   VFIO magic <hex>                  (BAR2 register 0, a trapped read)
 *   VFIO bar0 readback <0|1>          (a pattern written to BAR0 memory reads back)
 *   VFIO msix entries <n> table bar <b> offset <hex>
 *   VFIO dma to_device status <s> irq <n> match <0|1>
 *   VFIO dma from_device status <s> irq <n> match <0|1>
 *   VFIO dma outside status <s>       (no iommu: an address that is not guest RAM)
 *   VFIO masked irq <n> pba <b>; VFIO unmasked irq <n> pba <b>
 *   VFIO msi irq <n>
 *   with iommu: VFIO iommu attach <s>, VFIO iommu unmapped status <s>, VFIO iommu map <s>,
 *     VFIO iommu dma status <s> irq <n> match <m>, VFIO iommu readonly_write status <s>,
 *     VFIO iommu unmap <s>, VFIO iommu after_unmap status <s>, VFIO iommu faults <n>
 *   VFIO done
 */
#include "virtio.h"

#define SIM_VENDOR 0x1b36
#define SIM_DEVICE 0x00f0

#define REG_MAGIC 0x00
#define REG_DMA_ADDR_LO 0x08
#define REG_DMA_ADDR_HI 0x0c
#define REG_DMA_LEN 0x10
#define REG_DMA_OFF 0x14
#define REG_DMA_CMD 0x18
#define REG_STATUS 0x1c
#define REG_IRQ_VECTOR 0x20
#define REG_DOORBELL 0x24
#define REG_FAULT_COUNT 0x2c
#define CMD_TO_DEVICE 1
#define CMD_FROM_DEVICE 2

#define PCI_CAP_ID_MSI 0x05
#define PCI_ROM_ADDRESS 0x30
#define PCI_INTERRUPT_PIN 0x3d
#define MSIX_VEC 0x48
#define MSI_VEC 0x49

static struct pci_dev dev;
static uint64_t bar0, bar2;
static volatile uint32_t irqs[2];

/* DMA buffers: two pages of guest RAM at 4 MiB, away from the image (keeps the ELF small). */
#define src ((uint8_t *)0x400000)
#define dst ((uint8_t *)0x401000)

static void on_irq(unsigned vector)
{
    irqs[vector - MSIX_VEC]++;
    lapic_eoi();
}

static uint32_t reg(uint32_t off) { return mmio_read32(bar2 + off); }
static void set_reg(uint32_t off, uint32_t v) { mmio_write32(bar2 + off, v); }

/* Waits up to ms for irqs[i] to pass `before`; returns the count seen. */
static uint32_t wait_irq(int i, uint32_t before, uint32_t ms)
{
    deadline_start(ms);
    irq_disable();
    while (irqs[i] == before && !deadline_passed())
        intr_wait_cli();
    irq_enable();
    deadline_stop();
    return irqs[i];
}

static uint32_t dma(uint64_t addr, uint32_t len, uint32_t off, uint32_t cmd, uint32_t *irq_delta)
{
    uint32_t before = irqs[0];
    set_reg(REG_DMA_ADDR_LO, (uint32_t)addr);
    set_reg(REG_DMA_ADDR_HI, (uint32_t)(addr >> 32));
    set_reg(REG_DMA_LEN, len);
    set_reg(REG_DMA_OFF, off);
    set_reg(REG_IRQ_VECTOR, 0);
    set_reg(REG_DMA_CMD, cmd);
    *irq_delta = wait_irq(0, before, 1000) - before;
    return reg(REG_STATUS);
}

static void line(const char *what, uint64_t v)
{
    print("VFIO ");
    print(what);
    print(" ");
    print_hex(v);
    putchar('\n');
}

/* DMA of 256 bytes between bus address `addr` and BAR0 offset `off`; checks the copy against
 * `ram` (the guest-RAM side) and prints "VFIO <what> status <s> irq <n> match <0|1>". */
static void dma_check(const char *what, uint64_t addr, const uint8_t *ram, uint32_t off, uint32_t cmd)
{
    uint32_t d, s = dma(addr, 256, off, cmd, &d);
    bool match = true;
    for (int i = 0; i < 256; i++)
        match &= mmio_read8(bar0 + off + i) == ram[i];
    print("VFIO ");
    print(what);
    print(" status ");
    print_dec(s);
    print(" irq ");
    print_dec(d);
    print(" match ");
    print_dec(match);
    putchar('\n');
}

static uint32_t bar_size(int bar)
{
    uint16_t off = PCI_BASE_ADDRESS_0 + 4 * bar;
    uint32_t old = pci_read32(&dev, off);
    pci_write32(&dev, off, 0xffffffffu);
    uint32_t sz = pci_read32(&dev, off);
    pci_write32(&dev, off, old);
    return ~(sz & ~0xfu) + 1;
}

/* ---- virtio-iommu (only with `iommu`) ---- */
struct tail { uint8_t status, rsv[3]; };
struct attach_req { uint8_t type, rsv[3]; uint32_t domain, endpoint, flags; uint8_t rsv2[4]; struct tail t; } __attribute__((packed));
struct map_req { uint8_t type, rsv[3]; uint32_t domain; uint64_t start, end, phys; uint32_t flags; struct tail t; } __attribute__((packed));
struct unmap_req { uint8_t type, rsv[3]; uint32_t domain; uint64_t start, end; uint8_t rsv2[4]; struct tail t; } __attribute__((packed));

static struct virtio_dev iommu;
static struct virtq *rq;

static uint8_t iommu_req(void *req, size_t len)
{
    struct tail *t = (struct tail *)((uint8_t *)req + len - sizeof(struct tail));
    t->status = 0xff;
    struct vbuf b[2] = {{req, len - sizeof *t, false}, {t, sizeof *t, true}};
    virtq_transfer(&iommu, rq, b, 2);
    return t->status;
}

static void iommu_part(const char *cmdline)
{
    const uint64_t iova = 0x80000000ull;
    uint32_t ep = (uint32_t)dev.dev << 3 | dev.fn, d;
    virtio_init(&iommu, "IOMMU", VIRTIO_TYPE_IOMMU, (1ull << 0) | (1ull << 1) | (1ull << 2), cmdline);
    rq = virtio_setup_queue(&iommu, 0);
    virtio_driver_ok(&iommu);

    static struct attach_req at;
    at.type = 1;
    at.domain = 1;
    at.endpoint = ep;
    line("iommu attach", iommu_req(&at, sizeof at));
    line("iommu unmapped status", dma(iova, 256, 0x2000, CMD_TO_DEVICE, &d));

    for (int i = 0; i < 256; i++)
        src[i] = (uint8_t)(i * 7 + 3);
    static struct map_req m;
    m.type = 3;
    m.domain = 1;
    m.start = iova;
    m.end = iova + 4095;
    m.phys = (uint64_t)(uintptr_t)src;
    m.flags = 1; /* READ only */
    line("iommu map", iommu_req(&m, sizeof m));
    dma_check("iommu dma", iova, src, 0x2000, CMD_TO_DEVICE);
    line("iommu readonly_write status", dma(iova, 256, 0x2000, CMD_FROM_DEVICE, &d));

    static struct unmap_req u;
    u.type = 4;
    u.domain = 1;
    u.start = iova;
    u.end = iova + 4095;
    line("iommu unmap", iommu_req(&u, sizeof u));
    line("iommu after_unmap status", dma(iova, 256, 0x2000, CMD_TO_DEVICE, &d));
    line("iommu faults", reg(REG_FAULT_COUNT));
}

void guest_main(const struct boot_info *bi)
{
    const char *cl = bi->cmdline;
    if (!pci_find(SIM_VENDOR, SIM_DEVICE, &dev)) {
        puts("VFIO no device");
        reset();
    }
    print("VFIO pci ");
    pci_print_addr(&dev);
    print(" id ");
    print_hex_fixed(dev.vendor, 4);
    putchar(':');
    print_hex_fixed(dev.device, 4);
    print(" class ");
    print_hex_fixed(pci_read32(&dev, PCI_CLASS_PROG - 1) >> 8, 6);
    print(" pin ");
    print_dec(pci_read8(&dev, PCI_INTERRUPT_PIN));
    putchar('\n');

    for (uint8_t c = pci_read8(&dev, PCI_CAPABILITY_LIST) & ~3; c; c = pci_read8(&dev, c + 1) & ~3) {
        uint8_t id = pci_read8(&dev, c);
        print("VFIO cap ");
        print_hex(id);
        print(" at ");
        print_hex(c);
        putchar('\n');
        if (id == PCI_CAP_ID_VNDR) {
            print("VFIO vendor cap \"");
            for (uint8_t i = 3; i < pci_read8(&dev, c + 2) && pci_read8(&dev, c + i); i++)
                putchar((char)pci_read8(&dev, c + i));
            puts("\"");
        }
    }

    bar0 = pci_bar(&dev, 0, NULL);
    bar2 = pci_bar(&dev, 2, NULL);
    print("VFIO bar 0 size ");
    print_hex(bar_size(0));
    print(" addr ");
    print_hex(bar0);
    putchar('\n');
    print("VFIO bar 2 size ");
    print_hex(bar_size(2));
    print(" addr ");
    print_hex(bar2);
    putchar('\n');
    pci_write32(&dev, PCI_ROM_ADDRESS, 0xfffff800u);
    line("rom", pci_read32(&dev, PCI_ROM_ADDRESS));
    if (!bar0 || !bar2 || !pci_map(bar0, 0x4000) || !pci_map(bar2, 0x1000)) {
        puts("VFIO FAIL bars");
        reset();
    }
    pci_enable(&dev);
    line("magic", reg(REG_MAGIC));

    bool ok = true;
    for (int i = 0; i < 256; i++)
        mmio_write8(bar0 + i, (uint8_t)(0xa5 ^ i));
    for (int i = 0; i < 256; i++)
        ok &= mmio_read8(bar0 + i) == (uint8_t)(0xa5 ^ i);
    line("bar0 readback", ok);

    /* MSI-X: one entry (0) to MSIX_VEC on this CPU. */
    intr_init();
    intr_set_handler(MSIX_VEC, on_irq);
    intr_set_handler(MSI_VEC, on_irq);
    uint8_t cap = pci_find_cap(&dev, PCI_CAP_ID_MSIX, 0);
    uint16_t ctrl = pci_read16(&dev, cap + PCI_MSIX_FLAGS);
    uint32_t table = pci_read32(&dev, cap + PCI_MSIX_TABLE);
    uint32_t pbareg = pci_read32(&dev, cap + 8);
    uint64_t tab = bar0 + (table & ~7u), pba = bar0 + (pbareg & ~7u);
    print("VFIO msix entries ");
    print_dec((ctrl & PCI_MSIX_FLAGS_QSIZE) + 1u);
    print(" table bar ");
    print_dec(table & 7);
    print(" offset ");
    print_hex(table & ~7u);
    putchar('\n');
    pci_write16(&dev, cap + PCI_MSIX_FLAGS, ctrl | PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL);
    mmio_write32(tab + 0, 0xfee00000u | lapic_id() << 12);
    mmio_write32(tab + 4, 0);
    mmio_write32(tab + 8, MSIX_VEC);
    mmio_write32(tab + 12, 0);
    pci_write16(&dev, cap + PCI_MSIX_FLAGS, (ctrl | PCI_MSIX_FLAGS_ENABLE) & ~PCI_MSIX_FLAGS_MASKALL);

    if (cmdline_has(cl, "iommu")) {
        iommu_part(cl);
    } else {
        uint32_t d;
        for (int i = 0; i < 256; i++)
            src[i] = (uint8_t)(i * 13 + 1);
        dma_check("dma to_device", (uint64_t)(uintptr_t)src, src, 0x1000, CMD_TO_DEVICE);
        /* BAR0[0..256) holds the 0xa5 ^ i pattern written above */
        dma_check("dma from_device", (uint64_t)(uintptr_t)dst, dst, 0, CMD_FROM_DEVICE);
        line("dma outside status", dma(0xf0000000ull, 256, 0, CMD_TO_DEVICE, &d));
    }

    /* A masked vector is remembered in the PBA and delivered when unmasked. */
    uint32_t before = irqs[0];
    mmio_write32(tab + 12, 1);
    set_reg(REG_DOORBELL, 0);
    delay_ms(50);
    print("VFIO masked irq ");
    print_dec(irqs[0] - before);
    print(" pba ");
    print_dec(mmio_read32(pba) & 1);
    putchar('\n');
    mmio_write32(tab + 12, 0);
    wait_irq(0, before, 1000);
    print("VFIO unmasked irq ");
    print_dec(irqs[0] - before);
    print(" pba ");
    print_dec(mmio_read32(pba) & 1);
    putchar('\n');

    /* MSI instead of MSI-X: one vector. */
    pci_write16(&dev, cap + PCI_MSIX_FLAGS, ctrl & ~PCI_MSIX_FLAGS_ENABLE);
    uint8_t msi = pci_find_cap(&dev, PCI_CAP_ID_MSI, 0);
    if (msi) {
        uint16_t mc = pci_read16(&dev, msi + 2);
        pci_write32(&dev, msi + 4, 0xfee00000u | lapic_id() << 12);
        pci_write32(&dev, msi + 8, 0);
        pci_write16(&dev, msi + ((mc & 0x80) ? 12 : 8), MSI_VEC);
        pci_write16(&dev, msi + 2, (uint16_t)((mc & ~0x70u) | 1u));
        before = irqs[1];
        set_reg(REG_DOORBELL, 0);
        print("VFIO msi irq ");
        print_dec(wait_irq(1, before, 1000) - before);
        putchar('\n');
        pci_write16(&dev, msi + 2, mc & ~1u);
    }
    puts("VFIO done");
    reset();
}
