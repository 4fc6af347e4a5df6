/* Echoes the command line between brackets and the RAM size the memory map reports. */
#include "guest.h"

void guest_main(const struct boot_info *bi)
{
    print("CMDLINE[");
    print(bi->cmdline);
    puts("]");
    print("RAM ");
    print_dec(bi->ram_bytes >> 20);
    puts(" MiB");
    reset();
}
