/* The built-in default guest: greets, echoes its command line, marks the boot time, powers off
 * (so that `hyperpy run --kernel builtin:hello` ends although a reset reboots), else resets. */
#include "guest.h"

void guest_main(const struct boot_info *bi)
{
    puts("Hello from hyperpy guest");
    print("cmdline: ");
    puts(bi->cmdline);
    boot_timer();
    poweroff_or_reset();
}
