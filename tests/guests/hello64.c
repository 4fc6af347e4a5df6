/* hello, entered through the Linux 64-bit boot protocol (linux64_start.S). The same program is
 * the payload of bzimage.bin, built with -DGUEST_ENTRY_NAME='"bzimage"'. */
#include "guest.h"

#ifndef GUEST_ENTRY_NAME
#define GUEST_ENTRY_NAME "linux64"
#endif

void guest_main(const struct boot_info *bi)
{
    puts("Hello from hyperpy guest");
    print("cmdline: ");
    puts(bi->cmdline);
    puts("entry: " GUEST_ENTRY_NAME);
    boot_timer();
    reset();
}
