/* Prints what CPUID tells the guest, one "name value" line each, for the VMM's CPUID policy
 * tests: leaf 1 ECX/EDX/EBX, leaf 7.0 EBX/ECX, leaf 0xB subleaf 0/1, 0x80000001 ECX/EDX and the
 * hypervisor signature at 0x40000000. */
#include "guest.h"

static void cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4])
{
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static void line(const char *name, uint64_t v)
{
    print(name);
    putchar(' ');
    print_hex(v);
    putchar('\n');
}

void guest_main(const struct boot_info *bi)
{
    (void)bi;
    uint32_t r[4];
    char sig[13];

    cpuid(0, 0, r);
    line("max_leaf", r[0]);
    cpuid(1, 0, r);
    line("leaf1.ebx", r[1]);
    line("leaf1.ecx", r[2]);
    line("leaf1.edx", r[3]);
    cpuid(7, 0, r);
    line("leaf7.ebx", r[1]);
    line("leaf7.ecx", r[2]);
    cpuid(0xb, 0, r);
    line("leafb.0.ebx", r[1]);
    line("leafb.0.edx", r[3]);
    cpuid(0xb, 1, r);
    line("leafb.1.ebx", r[1]);
    cpuid(0x80000001, 0, r);
    line("ext1.ecx", r[2]);
    line("ext1.edx", r[3]);
    cpuid(0x40000000, 0, r);
    memcpy(sig, &r[1], 4);
    memcpy(sig + 4, &r[2], 4);
    memcpy(sig + 8, &r[3], 4);
    sig[12] = 0;
    print("hypervisor ");
    puts(sig);
    reset();
}
