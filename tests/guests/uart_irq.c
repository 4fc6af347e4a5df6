/* COM1 interrupts through the IOAPIC: ISA IRQ 4 = GSI 4 -> vector 0x41 on this CPU's LAPIC.
 *
 * TX test: three times, enable the THR-empty interrupt (IER bit 1) with THR empty; each time
 * exactly one interrupt must arrive (the handler reads IIR, which clears it, and sends the
 * LAPIC EOI). Prints "UART IRQ OK 3", or "UART IRQ TIMEOUT" if the 2 s LAPIC-timer deadline
 * passes first.
 * RX test, only with `echo` on the cmdline: enable the RX-data interrupt (IER bit 0) and echo
 * every received byte from the handler until a 'q' (not echoed), after printing "ECHO READY";
 * then "\nECHO DONE". No timeout.
 * intr.c masks the 8259 PICs and LAPIC LINT0, so IRQ 4 can arrive only through the IOAPIC.
 */
#include "guest.h"
#include "intr.h"

#define UART_IRQ_VECTOR 0x41   /* a dynamic vector of intr.c (0x40 is its timer) */
#define TX_ROUNDS 3
#define WATCHDOG_MS 2000

#define IOAPIC_BASE 0xfec00000ull
#define IOAPIC_REGSEL 0x00
#define IOAPIC_WIN 0x10
#define IOAPIC_REDTBL(gsi) (0x10 + 2 * (gsi))
#define COM1_GSI 4

#define UART_IER_RDI 0x01  /* received data available */
#define UART_IER_THRI 0x02 /* transmitter holding register empty */
#define UART_IIR_NO_INT 0x01
#define UART_IIR_ID 0x0e
#define UART_MCR_DTR_RTS_OUT2 0x0b

static volatile uint32_t irq_count, thre_count, echo_mode, echo_done;

static void ioapic_write(uint32_t reg, uint32_t v)
{
    mmio_write32(IOAPIC_BASE + IOAPIC_REGSEL, reg);
    mmio_write32(IOAPIC_BASE + IOAPIC_WIN, v);
}

static void uart_handler(unsigned vector)
{
    (void)vector;
    irq_count++;
    for (int i = 0; i < 16; i++) {
        uint8_t iir = inb(UART_IIR);
        if (iir & UART_IIR_NO_INT)
            break;
        switch (iir & UART_IIR_ID) {
        case 0x02: /* THR empty: reading IIR cleared it */
            thre_count++;
            break;
        case 0x04: /* RX data */
        case 0x0c: /* RX timeout */
            while (inb(UART_LSR) & UART_LSR_DR) {
                char c = (char)inb(UART_RBR);
                if (!echo_mode)
                    continue;
                if (c == 'q')
                    echo_done = 1;
                else if (!echo_done)
                    putchar(c);
            }
            break;
        case 0x06: /* line status */
            (void)inb(UART_LSR);
            break;
        default: /* modem status */
            (void)inb(COM1 + 6);
            break;
        }
    }
    lapic_eoi();
}

/* Sleeps until *counter reaches target or (with_deadline) the deadline passes; no lost
 * wake-ups: the check runs with interrupts off and sti's one-instruction shadow covers hlt. */
static bool wait_for(volatile uint32_t *counter, uint32_t target, bool with_deadline)
{
    irq_disable();
    while (*counter < target && !(with_deadline && deadline_passed()))
        intr_wait_cli();
    irq_enable();
    return *counter >= target;
}

void guest_main(const struct boot_info *bi)
{
    intr_init();
    intr_set_handler(UART_IRQ_VECTOR, uart_handler);

    /* GSI 4: fixed delivery, physical destination, active high, edge, unmasked. */
    ioapic_write(IOAPIC_REDTBL(COM1_GSI) + 1, lapic_id() << 24);
    ioapic_write(IOAPIC_REDTBL(COM1_GSI), UART_IRQ_VECTOR);

    /* Quiet UART: no interrupts, OUT2 on (gates IRQ on PC hardware), nothing pending. */
    outb(UART_IER, 0);
    outb(UART_MCR, UART_MCR_DTR_RTS_OUT2);
    (void)inb(UART_LSR);
    (void)inb(UART_IIR);
    while (inb(UART_LSR) & UART_LSR_DR)
        (void)inb(UART_RBR);

    deadline_start(WATCHDOG_MS);
    bool ok = true;
    for (uint32_t round = 1; round <= TX_ROUNDS && ok; round++) {
        outb(UART_IER, 0);
        outb(UART_IER, UART_IER_THRI); /* THR is empty: raises IRQ 4 now */
        ok = wait_for(&irq_count, round, true);
    }
    outb(UART_IER, 0);
    deadline_stop();

    if (ok) {
        print("UART IRQ OK ");
        print_dec(irq_count);
        putchar('\n');
    } else {
        puts("UART IRQ TIMEOUT");
        print("uart_irq: irqs ");
        print_dec(irq_count);
        print(" thre ");
        print_dec(thre_count);
        print(" stray ");
        print_dec(intr_stray_count);
        putchar('\n');
        reset();
    }

    if (cmdline_has(bi->cmdline, "echo")) {
        echo_mode = 1;
        puts("ECHO READY");
        outb(UART_IER, UART_IER_RDI);
        wait_for(&echo_done, 1, false);
        outb(UART_IER, 0);
        puts("\nECHO DONE");
    }
    reset();
}
