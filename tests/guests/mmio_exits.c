/* count=N (default 100000) 4-byte writes to the MMIO address addr=0x... (default 0xd0000000,
 * in the 32-bit MMIO hole): N MMIO exits in a tight loop, then the boot timer. The address must
 * be 4-byte aligned and below 4 GiB (the runtime identity-maps only that). */
#include "guest.h"

void guest_main(const struct boot_info *bi)
{
    uint64_t n = cmdline_u64(bi->cmdline, "count", 100000);
    uint64_t addr = cmdline_u64(bi->cmdline, "addr", 0xd0000000);
    if ((addr & 3) || addr > 0xfffffffcull) {
        print("mmio exits: bad addr ");
        print_hex(addr);
        putchar('\n');
        reset();
    }
    for (uint64_t i = 0; i < n; i++)
        mmio_write32(addr, (uint32_t)i);
    boot_timer();
    print("mmio exits done ");
    print_dec(n);
    putchar('\n');
    reset();
}
