/* Xen PVH entry runtime (docs: xen/include/public/arch-x86/hvm/start_info.h,
 * xen/include/public/elfnote.h).
 *
 * The loader finds the 32-bit entry in the XEN_ELFNOTE_PHYS32_ENTRY note and enters it in
 * 32-bit protected mode, flat segments, paging off, with %ebx = guest-physical address of
 * struct hvm_start_info. We switch to long mode and call runtime_pvh(%rbx) (lib.c), which
 * checks the magic, fills struct boot_info and calls guest_main.
 */

#define XEN_ELFNOTE_PHYS32_ENTRY 18

    .section .note.GNU-stack, "", @progbits

    /* ELF note: namesz, descsz, type, name "Xen\0", desc = 32-bit physical entry address.
     * 4-byte aligned, as the PT_NOTE readers (QEMU, linux-loader) expect. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 2f - 1f
    .long 4f - 3f
    .long XEN_ELFNOTE_PHYS32_ENTRY
1:  .asciz "Xen"
2:  .balign 4
3:  .long pvh_start32
4:  .balign 4

    .section .text.head, "ax"
    .code32
    .globl _start
    .globl pvh_start32
_start: /* ELF e_entry; only the note's address is a PVH entry */
pvh_start32:
    cli
    cld
    movl %ebx, %esi
    movl $pvh_start64, %eax
    jmp enter_long_mode

    .code64
pvh_start64:
    movl $runtime_pvh, %edx
    jmp enter_c64
