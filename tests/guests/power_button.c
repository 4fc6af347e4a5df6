/* The ACPI power button as a guest sees it, and an idle guest for the API tests.
 *
 * Routes the Generic Event Device's interrupt (GSI 5, edge, active high: the DSDT's GED0 _CRS)
 * through the IOAPIC to a handler that reads the GED event register (port 0x603, read to
 * clear), the register GED0._EVT reads.  Prints "PWRBTN READY", then sleeps (sti; hlt) until
 * the register shows the power-button bit: prints "PWRBTN PRESSED <n>" (n: interrupts seen)
 * and powers off through the ACPI sleep-control register (SLP_TYP 5 | SLP_EN), as an OS does.
 * With `rng` on the cmdline it first reads 64 bytes from the virtio-rng ("PWRBTN RNG <n>"),
 * so the VMM's device counters have something to count.  No timeout: it idles until pressed.
 */
#include "guest.h"
#include "intr.h"
#include "virtio.h"

#define GED_VECTOR 0x42
#define GED_GSI 5
#define GED_PORT 0x603
#define GED_POWER_BUTTON 0x01
#define SLEEP_CONTROL_PORT 0x600
#define SLP_EN (1u << 5)
#define S5_SLP_TYP 5

#define IOAPIC_BASE 0xfec00000ull
#define IOAPIC_REGSEL 0x00
#define IOAPIC_WIN 0x10
#define IOAPIC_REDTBL(gsi) (0x10 + 2 * (gsi))

static volatile uint32_t irq_count, pressed;
static struct virtio_dev dev;
static uint8_t pool[64] __attribute__((aligned(64)));

static void ioapic_write(uint32_t reg, uint32_t v)
{
    mmio_write32(IOAPIC_BASE + IOAPIC_REGSEL, reg);
    mmio_write32(IOAPIC_BASE + IOAPIC_WIN, v);
}

static void ged_handler(unsigned vector)
{
    (void)vector;
    irq_count++;
    if (inb(GED_PORT) & GED_POWER_BUTTON)
        pressed = 1;
    lapic_eoi();
}

static void read_rng(const char *cmdline)
{
    virtio_init(&dev, "RNG", VIRTIO_TYPE_RNG, 0, cmdline);
    struct virtq *q = virtio_setup_queue(&dev, 0);
    virtio_driver_ok(&dev);
    uint32_t have = 0;
    for (int tries = 0; have < sizeof(pool) && tries < 16; tries++) {
        struct vbuf b = {pool + have, (uint32_t)(sizeof(pool) - have), true};
        have += virtq_transfer(&dev, q, &b, 1);
    }
    print("PWRBTN RNG ");
    print_dec(have);
    putchar('\n');
}

void guest_main(const struct boot_info *bi)
{
    if (cmdline_has(bi->cmdline, "rng"))
        read_rng(bi->cmdline);
    intr_init();
    intr_set_handler(GED_VECTOR, ged_handler);
    (void)inb(GED_PORT); /* nothing may be pending yet */
    /* Fixed delivery, physical destination, active high, edge, unmasked. */
    ioapic_write(IOAPIC_REDTBL(GED_GSI) + 1, lapic_id() << 24);
    ioapic_write(IOAPIC_REDTBL(GED_GSI), GED_VECTOR);
    puts("PWRBTN READY");

    irq_disable();
    while (!pressed)
        intr_wait_cli();
    irq_enable();
    print("PWRBTN PRESSED ");
    print_dec(irq_count);
    putchar('\n');
    outb(SLEEP_CONTROL_PORT, (uint8_t)(S5_SLP_TYP << 2 | SLP_EN));
    for (;;)
        __asm__ volatile("cli; hlt");
}
