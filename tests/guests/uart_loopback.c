/* 16550 loopback (MCR bit 4): every byte 0x00..0xff and a test string written to THR must come
 * back, in order, from RBR. */
#include "guest.h"

/* Writes c in loopback mode and reads it back; -1 if nothing arrives within a bounded wait. */
static int loop_byte(uint8_t c)
{
    for (unsigned spins = 0; spins < 100000 && !(inb(UART_LSR) & UART_LSR_THRE); spins++)
        cpu_relax();
    outb(UART_THR, c);
    for (unsigned spins = 0; spins < 100000; spins++)
        if (inb(UART_LSR) & UART_LSR_DR)
            return inb(UART_RBR);
    return -1;
}

void guest_main(const struct boot_info *bi)
{
    (void)bi;
    static const char text[] = "hyperpy loopback test string";
    uint8_t mcr = inb(UART_MCR);
    int fail = -1;

    while (inb(UART_LSR) & UART_LSR_DR) /* drain stale input */
        (void)inb(UART_RBR);
    outb(UART_MCR, mcr | UART_MCR_LOOP);
    for (int i = 0; i < 256 && fail < 0; i++)
        if (loop_byte((uint8_t)i) != i)
            fail = i;
    for (int i = 0; text[i] && fail < 0; i++)
        if (loop_byte((uint8_t)text[i]) != (uint8_t)text[i])
            fail = 256 + i;
    outb(UART_MCR, mcr & ~UART_MCR_LOOP);

    if (fail < 0) {
        puts("UART loopback PASS");
    } else {
        print("UART loopback FAIL at ");
        print_dec((uint64_t)fail);
        putchar('\n');
    }
    reset();
}
