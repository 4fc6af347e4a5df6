/* Interrupts and time for the device guests: a 64-bit IDT, the local APIC, and a one-shot
 * LAPIC-timer deadline (1 GHz LAPIC bus clock, as both KVM's in-kernel LAPIC and QEMU's
 * model it; divide by 16 -> 62500 counts per ms, so at most ~68 s).
 *
 * Without intr_init() nothing ever interrupts (IF stays 0): the deadline is polled through
 * the timer's current-count register. After intr_init() the timer also raises TIMER_VECTOR,
 * so that a `sti; hlt` wait wakes up when the deadline passes.
 */
#ifndef HYPERPY_INTR_H
#define HYPERPY_INTR_H

#include "guest.h"

#define LAPIC_BASE 0xfee00000ull
#define LAPIC_REG_ID 0x20
#define LAPIC_REG_TPR 0x80
#define LAPIC_REG_EOI 0xb0
#define LAPIC_REG_SVR 0xf0
#define LAPIC_REG_LVT_TIMER 0x320
#define LAPIC_REG_LVT_LINT0 0x350
#define LAPIC_REG_TIMER_INIT 0x380
#define LAPIC_REG_TIMER_CUR 0x390
#define LAPIC_REG_TIMER_DIV 0x3e0
#define LAPIC_LVT_MASKED (1u << 16)

#define TIMER_VECTOR 0x40
#define SPURIOUS_VECTOR 0xff
#define INTR_DYN_FIRST 0x40 /* vectors that can take a handler: 0x40..0x4f */
#define INTR_DYN_LAST 0x4f

/* Interrupt handlers are plain C functions, called by a common assembly stub (which saves the
 * caller-saved registers) with the vector number; a handler must send its own EOI. */
typedef void (*irq_handler_t)(unsigned vector);

/* IDT (exceptions print "EXCEPTION <vector>" and reset; vectors without a handler EOI and
 * count as stray), 8259 PICs and LINT0 masked, LAPIC software-enabled, then `sti`. */
void intr_init(void);
/* vector in INTR_DYN_FIRST..INTR_DYN_LAST (other vectors are ignored). */
void intr_set_handler(unsigned vector, irq_handler_t handler);
bool intr_enabled(void);
extern volatile uint32_t intr_stray_count;

void lapic_enable(void);
uint32_t lapic_id(void);
void lapic_eoi(void);

/* Deadline: starts the one-shot timer (ms is capped at 60000). */
void deadline_start(uint32_t ms);
bool deadline_passed(void);
void deadline_stop(void);
void delay_ms(uint32_t ms);

/* With interrupts on: sleeps until an interrupt arrives (sti; hlt; cli). Call with IF=0 after
 * checking the wake-up condition, so that no interrupt is lost in between. */
static inline void intr_wait_cli(void) { __asm__ volatile("sti; hlt; cli" : : : "memory"); }
static inline void irq_disable(void) { __asm__ volatile("cli" : : : "memory"); }
static inline void irq_enable(void) { __asm__ volatile("sti" : : : "memory"); }

#endif
