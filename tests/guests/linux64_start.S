/* Linux boot protocol entry runtime (Documentation/arch/x86/boot.rst), laid out like the
 * protected-mode part of a bzImage; linked at 1 MiB, this section comes first:
 *
 *   load address + 0x000  startup_32: 32-bit boot protocol. Protected mode, paging off, flat
 *                         segments, %esi = boot_params. Used by bzImage loaders that run the
 *                         real-mode setup (e.g. QEMU -kernel bzimage.bin): we build our own
 *                         page tables, switch to long mode and go on at startup_64.
 *   load address + 0x200  startup_64: 64-bit boot protocol (the ELF e_entry, and the entry of
 *                         a bzImage with XLF_KERNEL_64). Long mode, paging on with low memory
 *                         identity-mapped, %rsi = boot_params ("zero page").
 *
 * startup_64 clears .bss, sets its stack and calls runtime_linux(%rsi) (lib.c), which reads
 * cmd_line_ptr and the e820 table, fills struct boot_info and calls guest_main.
 * This image has no PVH note, so ELF loaders use the Linux 64-bit entry.
 */

    .section .note.GNU-stack, "", @progbits

    .section .text.head, "ax"
    .code32
    .globl startup_32
startup_32:
    cli
    cld
    movl $startup_64, %eax
    jmp enter_long_mode

    .org 0x200, 0x90
    .code64
    .globl _start
    .globl startup_64
_start:
startup_64:
    cli
    movl $runtime_linux, %edx
    jmp enter_c64
