/* Prints the initramfs the loader handed over: "INITRD <size> <addr> [<first bytes>]".
 * PVH: module 0 of hvm_start_info (modlist_paddr: {u64 paddr, u64 size, u64 cmdline, u64 rsvd}).
 * Linux 64-bit protocol: boot_params.hdr.ramdisk_image (0x218) / ramdisk_size (0x21c), plus
 * ext_ramdisk_image (0x0c0) / ext_ramdisk_size (0x0c4) for the high 32 bits. */
#include "guest.h"

void guest_main(const struct boot_info *bi)
{
    const uint8_t *bs = bi->boot_struct;
    uint64_t addr = 0, size = 0;

    if (bi->entry == BOOT_ENTRY_PVH) {
        uint32_t nr = *(const uint32_t *)(bs + 12);
        uint64_t modlist = *(const uint64_t *)(bs + 16);
        if (nr >= 1 && modlist) {
            addr = *(const uint64_t *)modlist;
            size = *(const uint64_t *)(modlist + 8);
        }
    } else {
        addr = *(const uint32_t *)(bs + 0x218) | ((uint64_t)*(const uint32_t *)(bs + 0x0c0) << 32);
        size = *(const uint32_t *)(bs + 0x21c) | ((uint64_t)*(const uint32_t *)(bs + 0x0c4) << 32);
    }
    if (!size) {
        puts("INITRD none");
        reset();
    }
    print("INITRD ");
    print_dec(size);
    putchar(' ');
    print_hex(addr);
    print(" [");
    const char *p = (const char *)addr;
    for (uint64_t i = 0; i < size && i < 32 && p[i] >= ' ' && p[i] <= '~'; i++)
        putchar(p[i]);
    puts("]");
    reset();
}
