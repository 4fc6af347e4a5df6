/* Writes the boot-timer marker (123 to port 0x3f0) and resets. */
#include "guest.h"

void guest_main(const struct boot_info *bi)
{
    (void)bi;
    puts("boot timer");
    boot_timer();
    reset();
}
