/* IDT, local APIC and the LAPIC-timer deadline of the device guests (see intr.h). */
#include "intr.h"

volatile uint32_t intr_stray_count;
static bool intr_on, lapic_on;

static void lapic_write(uint32_t reg, uint32_t v) { mmio_write32(LAPIC_BASE + reg, v); }
static uint32_t lapic_read(uint32_t reg) { return mmio_read32(LAPIC_BASE + reg); }

void lapic_enable(void)
{
    if (lapic_on)
        return;
    lapic_write(LAPIC_REG_TPR, 0);
    lapic_write(LAPIC_REG_SVR, 0x100 | SPURIOUS_VECTOR); /* APIC software enable */
    lapic_on = true;
}

uint32_t lapic_id(void) { return lapic_read(LAPIC_REG_ID) >> 24; }
void lapic_eoi(void) { lapic_write(LAPIC_REG_EOI, 0); }

/* ---- IDT ---- */

struct idt_gate {
    uint16_t offset_lo;
    uint16_t selector;
    uint8_t ist;
    uint8_t type_attr; /* 0x8e: present, DPL 0, 64-bit interrupt gate */
    uint16_t offset_mid;
    uint32_t offset_hi;
    uint32_t reserved;
};
_Static_assert(sizeof(struct idt_gate) == 16, "64-bit IDT gate");

static struct idt_gate idt[256] __attribute__((aligned(16)));
static uint16_t code_selector;

void intr_set_handler(int vector, irq_handler_t handler)
{
    uint64_t a = (uint64_t)handler;
    struct idt_gate *g = &idt[vector];
    g->offset_lo = (uint16_t)a;
    g->selector = code_selector;
    g->ist = 0;
    g->type_attr = 0x8e;
    g->offset_mid = (uint16_t)(a >> 16);
    g->offset_hi = (uint32_t)(a >> 32);
    g->reserved = 0;
}

__attribute__((noreturn)) static void exception(unsigned vector)
{
    print("EXCEPTION ");
    print_dec(vector);
    putchar('\n');
    reset();
}

/* One stub per exception vector, so that the report names it. None returns, so the frame
 * layout (with or without an error code) does not matter. */
#define EXC(n) \
    __attribute__((interrupt)) static void exc##n(struct interrupt_frame *f) { (void)f; exception(n); }
EXC(0) EXC(1) EXC(2) EXC(3) EXC(4) EXC(5) EXC(6) EXC(7) EXC(8) EXC(9) EXC(10) EXC(11) EXC(12)
EXC(13) EXC(14) EXC(15) EXC(16) EXC(17) EXC(18) EXC(19) EXC(20) EXC(21)
static const irq_handler_t exception_stubs[22] = {
    exc0, exc1, exc2, exc3, exc4, exc5, exc6, exc7, exc8, exc9, exc10, exc11, exc12, exc13,
    exc14, exc15, exc16, exc17, exc18, exc19, exc20, exc21,
};

__attribute__((interrupt)) static void exc_other(struct interrupt_frame *f)
{
    (void)f;
    exception(99);
}

__attribute__((interrupt)) static void stray_handler(struct interrupt_frame *f)
{
    (void)f;
    intr_stray_count++;
    lapic_eoi();
}

__attribute__((interrupt)) static void spurious_handler(struct interrupt_frame *f)
{
    (void)f; /* spurious LAPIC interrupts take no EOI */
}

__attribute__((interrupt)) static void timer_handler(struct interrupt_frame *f)
{
    (void)f; /* only wakes a hlt; deadline_passed() reads the count */
    lapic_eoi();
}

void intr_init(void)
{
    if (intr_on)
        return;
    __asm__ volatile("mov %%cs, %0" : "=r"(code_selector));
    for (int v = 0; v < 256; v++)
        intr_set_handler(v, v < 22 ? exception_stubs[v] : v < 32 ? exc_other : stray_handler);
    intr_set_handler(TIMER_VECTOR, timer_handler);
    intr_set_handler(SPURIOUS_VECTOR, spurious_handler);
    struct __attribute__((packed)) {
        uint16_t limit;
        uint64_t base;
    } idtr = {sizeof(idt) - 1, (uint64_t)idt};
    __asm__ volatile("lidt %0" : : "m"(idtr));

    /* Only MSI/LAPIC interrupts: mask both 8259s and LINT0 (ExtINT). */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    lapic_enable();
    lapic_write(LAPIC_REG_LVT_LINT0, LAPIC_LVT_MASKED);
    intr_on = true;
    irq_enable();
}

bool intr_enabled(void) { return intr_on; }

/* ---- Deadline ---- */

#define COUNTS_PER_MS 62500u /* 1 GHz / 16 */

void deadline_start(uint32_t ms)
{
    if (ms > 60000)
        ms = 60000;
    if (ms == 0)
        ms = 1;
    lapic_enable();
    lapic_write(LAPIC_REG_TIMER_INIT, 0);
    lapic_write(LAPIC_REG_TIMER_DIV, 0x3); /* divide by 16 */
    lapic_write(LAPIC_REG_LVT_TIMER, intr_on ? TIMER_VECTOR : (LAPIC_LVT_MASKED | TIMER_VECTOR));
    lapic_write(LAPIC_REG_TIMER_INIT, ms * COUNTS_PER_MS);
}

bool deadline_passed(void) { return lapic_read(LAPIC_REG_TIMER_CUR) == 0; }

void deadline_stop(void)
{
    lapic_write(LAPIC_REG_TIMER_INIT, 0);
    lapic_write(LAPIC_REG_LVT_TIMER, LAPIC_LVT_MASKED | TIMER_VECTOR);
}

void delay_ms(uint32_t ms)
{
    deadline_start(ms);
    while (!deadline_passed()) {
        if (intr_on) {
            irq_disable();
            if (!deadline_passed())
                intr_wait_cli();
            irq_enable();
        } else {
            cpu_relax();
        }
    }
    deadline_stop();
}
