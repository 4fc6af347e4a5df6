/* Real-mode setup code of bzimage.bin: bytes 0x200.. of the setup area (see mkbzimage.py).
 *
 * Only loaders that run the 16-bit boot protocol execute this (e.g. QEMU/SeaBIOS with
 * -kernel): they load the setup area at a segment base X, set DS = ES = SS = X and jump to
 * (X + 0x20):0, i.e. here, with the setup header already patched (cmd_line_ptr, ...).
 * We enable A20, switch to 32-bit protected mode with flat segments and enter the kernel at
 * hdr.code32_start with %esi = X * 16 = boot_params, as the 32-bit boot protocol specifies.
 * 64-bit loaders (hyperpy) never run this: they jump to the kernel's 64-bit entry at +0x200.
 *
 * Linked at 0, so a label's value is its offset from CS = X + 0x20 (setup offset - 0x200).
 * Bytes 2..HEADER_END are left zero: mkbzimage.py writes the setup header there.
 */

#define HEADER_END 0x80      /* = setup offset 0x280, past the end of the 2.15 header */
#define BOOT_CS 0x10         /* __BOOT_CS / __BOOT_DS, as Linux's boot GDT */
#define BOOT_DS 0x18
#define HDR_CODE32_START 0x214

    .section .note.GNU-stack, "", @progbits

    .text
    .code16
    .globl _start
_start:
    .byte 0xeb, start_of_setup - 1f /* jmp short start_of_setup (setup offset 0x200) */
1:
    .org HEADER_END, 0

start_of_setup:
    cli
    cld
    movw %ds, %ax
    movzwl %ax, %esi
    shll $4, %esi                        /* %esi = linear address of boot_params */

    inb $0x92, %al                       /* fast A20 gate on (port 0x92 bit 1), no reset */
    orb $0x02, %al
    andb $0xfe, %al
    outb %al, $0x92

    leal 0x200 + gdt(%esi), %eax         /* patch in the linear addresses */
    movl %eax, %cs:gdt_desc + 2
    leal 0x200 + in_pm32(%esi), %eax
    movl %eax, %cs:pm32_ptr

    lgdtl %cs:gdt_desc
    movl %cr0, %eax
    orb $1, %al                          /* CR0.PE */
    movl %eax, %cr0
    ljmpl *%cs:pm32_ptr

    .code32
in_pm32:
    movl $BOOT_DS, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %fs
    movw %ax, %gs
    movw %ax, %ss
    movl HDR_CODE32_START(%esi), %eax
    xorl %ebx, %ebx
    xorl %ebp, %ebp
    xorl %edi, %edi
    jmp *%eax

    .balign 8
gdt:
    .quad 0
    .quad 0
    .quad 0x00cf9b000000ffff             /* 0x10: __BOOT_CS, 32-bit code, flat */
    .quad 0x00cf93000000ffff             /* 0x18: __BOOT_DS, data, flat */
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .long 0                              /* linear base, patched above */
pm32_ptr:
    .long 0                              /* linear offset of in_pm32, patched above */
    .word BOOT_CS
