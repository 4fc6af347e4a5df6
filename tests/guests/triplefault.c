/* Escalates #UD to a triple fault (shutdown): with an IDT of limit 0 every vector is out of
 * bounds, so #UD -> #GP -> #DF -> shutdown. Never resets through the i8042. */
#include "guest.h"

void guest_main(const struct boot_info *bi)
{
    (void)bi;
    static const struct __attribute__((packed)) {
        uint16_t limit;
        uint64_t base;
    } empty_idt = {0, 0};
    puts("about to triple fault");
    __asm__ volatile("cli; lidt %0; ud2" : : "m"(empty_idt));
    halt_forever(); /* not reached */
}
