/* Polled serial input: prints "ECHO READY", then echoes every received byte until a 'q' (not
 * echoed) arrives. Send input only after the READY line: a loader's own start-up may drop it. */
#include "guest.h"

void guest_main(const struct boot_info *bi)
{
    (void)bi;
    puts("ECHO READY");
    for (;;) {
        while (!(inb(UART_LSR) & UART_LSR_DR))
            cpu_relax();
        char c = (char)inb(UART_RBR);
        if (c == 'q')
            break;
        putchar(c);
    }
    puts("\nECHO DONE");
    reset();
}
