/* count=N (default 100000) single-byte writes to port 0x80 (a null device in the VMM): N
 * port-I/O exits in a tight loop, then the boot timer. */
#include "guest.h"

void guest_main(const struct boot_info *bi)
{
    uint64_t n = cmdline_u64(bi->cmdline, "count", 100000);
    for (uint64_t i = 0; i < n; i++)
        outb(POST_PORT, (uint8_t)i);
    boot_timer();
    print("exits done ");
    print_dec(n);
    putchar('\n');
    reset();
}
