/* Shared by both entry runtimes: 32-bit protected mode -> 64-bit long mode, and the common
 * 64-bit tail (clear .bss, set the stack, call the C runtime).
 *
 *   enter_long_mode (.code32, paging off, flat segments): %eax = 64-bit code to jump to,
 *       %esi = value to hand over in %rsi. Loads our GDT, builds identity page tables for the
 *       first 4 GiB (2 MiB pages) in .pgtables, enables PAE, EFER.LME and paging, far-jumps to
 *       64-bit code and jumps to %rax with %rsi = %esi (zero-extended). Uses no stack.
 *   enter_c64 (.code64): %rdx = C function, %rsi = its argument. Clears .bss (which holds the
 *       stack), sets %rsp and calls the function with the argument in %rdi. Never returns.
 *
 * The page tables live in their own NOBITS section .pgtables, outside .bss, so that
 * enter_c64 may clear .bss while running on them.
 */

#define GDT_CODE32 0x08
#define GDT_DATA 0x10
#define GDT_CODE64 0x18

#define MSR_EFER 0xc0000080
#define EFER_LME (1 << 8)
#define CR0_PE (1 << 0)
#define CR0_PG (1 << 31)
#define CR4_PAE (1 << 5)
#define PTE_P 0x01
#define PTE_RW 0x02
#define PTE_PS 0x80 /* 2 MiB page in a PDE */

    .section .note.GNU-stack, "", @progbits

    .section .rodata
    .balign 8
gdt:
    .quad 0
    .quad 0x00cf9b000000ffff /* 0x08: 32-bit code, flat (accessed bit preset: no GDT writes) */
    .quad 0x00cf93000000ffff /* 0x10: data, flat */
    .quad 0x00af9b000000ffff /* 0x18: 64-bit code */
gdt_end:
    .balign 4
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt

    .section .pgtables, "aw", @nobits
    .balign 4096
pml4:
    .skip 4096
pdpt:
    .skip 4096
pd:
    .skip 4 * 4096 /* 4 x 512 PDEs x 2 MiB = 4 GiB */
pgtables_end:

    .section .bss
    .balign 16
boot_stack:
    .skip 16384
boot_stack_top:

    .text
    .code32
    .globl enter_long_mode
enter_long_mode:
    movl %eax, %ebp
    lgdt gdt_desc
    ljmp $GDT_CODE32, $1f
1:  movl $GDT_DATA, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %fs
    movw %ax, %gs
    movw %ax, %ss

    /* Zero the page tables (memory below our image may hold anything). */
    movl $pml4, %edi
    movl $(pgtables_end - pml4) / 4, %ecx
    xorl %eax, %eax
    rep stosl

    /* PML4[0] -> PDPT; PDPT[0..3] -> the four PDs; PD[i] maps [i * 2 MiB, +2 MiB). */
    movl $(pdpt + PTE_P + PTE_RW), pml4
    movl $(pd + PTE_P + PTE_RW), %eax
    xorl %ecx, %ecx
2:  movl %eax, pdpt(, %ecx, 8)
    addl $4096, %eax
    incl %ecx
    cmpl $4, %ecx
    jb 2b
    movl $(PTE_P + PTE_RW + PTE_PS), %eax
    xorl %ecx, %ecx
3:  movl %eax, pd(, %ecx, 8)
    addl $0x200000, %eax
    incl %ecx
    cmpl $4 * 512, %ecx
    jb 3b

    movl $pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $CR4_PAE, %eax
    movl %eax, %cr4
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl %cr0, %eax
    orl $(CR0_PG | CR0_PE), %eax
    movl %eax, %cr0
    ljmp $GDT_CODE64, $4f

    .code64
4:  movl $GDT_DATA, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %esi, %esi /* the upper halves of the registers are undefined after the switch */
    movl %ebp, %eax
    jmp *%rax

    .globl enter_c64
enter_c64:
    cld
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb
    movl $boot_stack_top, %esp
    movq %rsi, %rdi
    call *%rdx
5:  cli
    hlt
    jmp 5b
