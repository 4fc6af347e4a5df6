/* Makes KVM's instruction emulator fail, on any KVM host: `popcnt (%rax)` with RAX pointing at
 * unbacked MMIO (addr=0x..., default 0xd0000000). Hardware KVM must emulate an instruction that
 * touches MMIO, and its emulator does not implement POPCNT, so KVM reports an emulation failure
 * (KVM_EXIT_INTERNAL_ERROR / KVM_INTERNAL_ERROR_EMULATION). The VMM must stop with RIP and the
 * instruction bytes. Encoding: F3 48 0F B8 00 = popcnt (%rax),%rax. */
#include "guest.h"

void guest_main(const struct boot_info *bi)
{
    uint64_t addr = cmdline_u64(bi->cmdline, "addr", 0xd0000000);
    uint64_t v = addr;
    puts("about to fail emulation");
    __asm__ volatile(".byte 0xf3, 0x48, 0x0f, 0xb8, 0x00" : "+a"(v) : : "memory", "cc");
    print("emulation did not fail: ");
    print_hex(v);
    putchar('\n');
    reset();
}
