/* IDT, local APIC and the LAPIC-timer deadline of the device guests (see intr.h). */
#include "intr.h"

volatile uint32_t intr_stray_count;
static bool intr_on, lapic_on;
static irq_handler_t handlers[INTR_DYN_LAST - INTR_DYN_FIRST + 1];

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

/* ---- Entry stubs ----
 * One 8-byte stub per vector 0..31 and INTR_DYN_FIRST..INTR_DYN_LAST: push the vector, jump to
 * the common code, which saves the caller-saved registers, calls intr_dispatch(vector) with a
 * 16-byte aligned stack and returns with iretq. Exceptions never return (the error code some
 * push sits under our vector, so it does not matter). The stray stub reports vector 256; the
 * spurious-interrupt stub returns at once (no EOI for spurious interrupts). */
void intr_dispatch(uint64_t vector);
extern const char intr_stubs_low[], intr_stubs_dyn[], intr_stub_stray[], intr_stub_spurious[];

__asm__(
    "    .text\n"
    "intr_common:\n"
    "    push %rax\n push %rcx\n push %rdx\n push %rsi\n push %rdi\n"
    "    push %r8\n push %r9\n push %r10\n push %r11\n"
    "    mov 72(%rsp), %rdi\n"
    "    cld\n"
    "    sub $8, %rsp\n"
    "    call intr_dispatch\n"
    "    add $8, %rsp\n"
    "    pop %r11\n pop %r10\n pop %r9\n pop %r8\n"
    "    pop %rdi\n pop %rsi\n pop %rdx\n pop %rcx\n pop %rax\n"
    "    add $8, %rsp\n"
    "    iretq\n"
    "    .balign 8\n"
    "intr_stubs_low:\n"
    "    .set vec, 0\n"
    "    .rept 32\n"
    "    .balign 8\n"
    "    pushq $vec\n"
    "    jmp intr_common\n"
    "    .set vec, vec + 1\n"
    "    .endr\n"
    "    .balign 8\n"
    "intr_stubs_dyn:\n"
    "    .set vec, 0x40\n"
    "    .rept 16\n"
    "    .balign 8\n"
    "    pushq $vec\n"
    "    jmp intr_common\n"
    "    .set vec, vec + 1\n"
    "    .endr\n"
    "intr_stub_stray:\n"
    "    pushq $256\n"
    "    jmp intr_common\n"
    "intr_stub_spurious:\n"
    "    iretq\n");
_Static_assert(INTR_DYN_FIRST == 0x40 && INTR_DYN_LAST - INTR_DYN_FIRST == 15, "stub table");

void intr_dispatch(uint64_t vector)
{
    if (vector < 32) {
        print("EXCEPTION ");
        print_dec(vector);
        putchar('\n');
        reset();
    }
    if (vector >= INTR_DYN_FIRST && vector <= INTR_DYN_LAST && handlers[vector - INTR_DYN_FIRST]) {
        handlers[vector - INTR_DYN_FIRST]((unsigned)vector);
        return;
    }
    intr_stray_count++;
    lapic_eoi();
}

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

static void set_gate(unsigned vector, const void *stub, uint16_t cs)
{
    uint64_t a = (uint64_t)stub;
    struct idt_gate *g = &idt[vector];
    g->offset_lo = (uint16_t)a;
    g->selector = cs;
    g->ist = 0;
    g->type_attr = 0x8e;
    g->offset_mid = (uint16_t)(a >> 16);
    g->offset_hi = (uint32_t)(a >> 32);
    g->reserved = 0;
}

void intr_set_handler(unsigned vector, irq_handler_t handler)
{
    if (vector >= INTR_DYN_FIRST && vector <= INTR_DYN_LAST)
        handlers[vector - INTR_DYN_FIRST] = handler;
}

static void timer_handler(unsigned vector)
{
    (void)vector; /* only wakes a hlt; deadline_passed() reads the count */
    lapic_eoi();
}

void intr_init(void)
{
    if (intr_on)
        return;
    uint16_t cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    for (unsigned v = 0; v < 256; v++) {
        const void *stub = intr_stub_stray;
        if (v < 32)
            stub = intr_stubs_low + 8 * v;
        else if (v >= INTR_DYN_FIRST && v <= INTR_DYN_LAST)
            stub = intr_stubs_dyn + 8 * (v - INTR_DYN_FIRST);
        else if (v == SPURIOUS_VECTOR)
            stub = intr_stub_spurious;
        set_gate(v, stub, cs);
    }
    intr_set_handler(TIMER_VECTOR, timer_handler);
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
