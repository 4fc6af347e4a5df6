# cython: language_level=3
"""Declarations from the kernel UAPI headers <linux/kvm.h> and <asm/kvm.h>.

Only names are declared here; every number and layout comes from the system headers at compile
time, so nothing is hand-copied.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t

cdef extern from "<linux/kvm.h>" nogil:
    # ioctls on /dev/kvm
    unsigned long KVM_GET_API_VERSION
    unsigned long KVM_CREATE_VM
    unsigned long KVM_CHECK_EXTENSION
    unsigned long KVM_GET_VCPU_MMAP_SIZE
    unsigned long KVM_GET_SUPPORTED_CPUID
    # ioctls on a VM
    unsigned long KVM_CREATE_VCPU
    unsigned long KVM_SET_USER_MEMORY_REGION
    unsigned long KVM_SET_TSS_ADDR
    unsigned long KVM_SET_IDENTITY_MAP_ADDR
    unsigned long KVM_CREATE_IRQCHIP
    unsigned long KVM_CREATE_PIT2
    unsigned long KVM_IRQ_LINE
    unsigned long KVM_SET_GSI_ROUTING
    unsigned long KVM_IRQFD
    unsigned long KVM_IOEVENTFD
    unsigned long KVM_ENABLE_CAP
    # ioctls on a vCPU
    unsigned long KVM_RUN
    unsigned long KVM_GET_REGS
    unsigned long KVM_SET_REGS
    unsigned long KVM_GET_SREGS
    unsigned long KVM_SET_SREGS
    unsigned long KVM_SET_CPUID2
    unsigned long KVM_GET_CPUID2
    unsigned long KVM_GET_MSRS
    unsigned long KVM_SET_MSRS
    unsigned long KVM_SET_FPU
    unsigned long KVM_GET_LAPIC
    unsigned long KVM_SET_LAPIC
    unsigned long KVM_TRANSLATE
    unsigned long KVM_GET_MP_STATE

    int KVM_API_VERSION
    int KVM_CAP_IRQCHIP
    int KVM_CAP_HLT
    int KVM_CAP_USER_MEMORY
    int KVM_CAP_SET_TSS_ADDR
    int KVM_CAP_SET_IDENTITY_MAP_ADDR
    int KVM_CAP_EXT_CPUID
    int KVM_CAP_PIT2
    int KVM_CAP_IRQ_ROUTING
    int KVM_CAP_IRQFD
    int KVM_CAP_IOEVENTFD
    int KVM_CAP_IMMEDIATE_EXIT
    int KVM_CAP_NR_MEMSLOTS
    int KVM_CAP_NR_VCPUS
    int KVM_CAP_MAX_VCPUS
    int KVM_CAP_INTERNAL_ERROR_DATA
    int KVM_CAP_SYSTEM_EVENT_DATA
    int KVM_CAP_X86_DISABLE_EXITS
    int KVM_CAP_TSC_DEADLINE_TIMER
    int KVM_CAP_EXIT_ON_EMULATION_FAILURE

    int KVM_EXIT_UNKNOWN
    int KVM_EXIT_EXCEPTION
    int KVM_EXIT_IO
    int KVM_EXIT_HYPERCALL
    int KVM_EXIT_DEBUG
    int KVM_EXIT_HLT
    int KVM_EXIT_MMIO
    int KVM_EXIT_IRQ_WINDOW_OPEN
    int KVM_EXIT_SHUTDOWN
    int KVM_EXIT_FAIL_ENTRY
    int KVM_EXIT_INTR
    int KVM_EXIT_NMI
    int KVM_EXIT_INTERNAL_ERROR
    int KVM_EXIT_SYSTEM_EVENT
    int KVM_EXIT_IO_IN
    int KVM_EXIT_IO_OUT
    int KVM_INTERNAL_ERROR_EMULATION
    int KVM_INTERNAL_ERROR_SIMUL_EX
    int KVM_INTERNAL_ERROR_DELIVERY_EV
    int KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON
    unsigned long long KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    int KVM_SYSTEM_EVENT_SHUTDOWN
    int KVM_SYSTEM_EVENT_RESET
    int KVM_SYSTEM_EVENT_CRASH
    int KVM_PIT_SPEAKER_DUMMY
    int KVM_IRQ_ROUTING_IRQCHIP
    int KVM_IRQ_ROUTING_MSI
    int KVM_IRQCHIP_PIC_MASTER
    int KVM_IRQCHIP_PIC_SLAVE
    int KVM_IRQCHIP_IOAPIC
    int KVM_MP_STATE_RUNNABLE
    int KVM_MP_STATE_UNINITIALIZED
    int KVM_MP_STATE_HALTED
    int KVM_MEM_READONLY

    # The anonymous structs inside kvm_run's exit union are given names here only so Cython
    # can type the member accesses; Cython never emits these type names.
    ctypedef struct _kvm_exit_io "hyperpy_never_emitted_io":
        uint8_t direction
        uint8_t size
        uint16_t port
        uint32_t count
        uint64_t data_offset
    ctypedef struct _kvm_exit_mmio "hyperpy_never_emitted_mmio":
        uint64_t phys_addr
        uint8_t data[8]
        uint32_t len
        uint8_t is_write
    ctypedef struct _kvm_exit_fail_entry "hyperpy_never_emitted_fe":
        uint64_t hardware_entry_failure_reason
        uint32_t cpu
    ctypedef struct _kvm_exit_hw "hyperpy_never_emitted_hw":
        uint64_t hardware_exit_reason
    ctypedef struct _kvm_exit_internal "hyperpy_never_emitted_internal":
        uint32_t suberror
        uint32_t ndata
        uint64_t data[16]
    ctypedef struct _kvm_exit_emulation_failure "hyperpy_never_emitted_ef":
        uint32_t suberror
        uint32_t ndata
        uint64_t flags
        uint8_t insn_size
        uint8_t insn_bytes[15]
    ctypedef struct _kvm_exit_system_event "hyperpy_never_emitted_se":
        uint32_t type
        uint32_t ndata
        uint64_t data[16]

    struct kvm_run:
        uint8_t request_interrupt_window
        uint8_t immediate_exit
        uint32_t exit_reason
        uint8_t ready_for_interrupt_injection
        uint8_t if_flag
        uint16_t flags
        uint64_t cr8
        uint64_t apic_base
        _kvm_exit_io io
        _kvm_exit_mmio mmio
        _kvm_exit_fail_entry fail_entry
        _kvm_exit_hw hw
        _kvm_exit_internal internal
        _kvm_exit_emulation_failure emulation_failure
        _kvm_exit_system_event system_event

    struct kvm_userspace_memory_region:
        uint32_t slot
        uint32_t flags
        uint64_t guest_phys_addr
        uint64_t memory_size
        uint64_t userspace_addr

    struct kvm_pit_config:
        uint32_t flags

    struct kvm_irq_level:
        uint32_t irq
        uint32_t level

    struct kvm_irq_routing_irqchip:
        uint32_t irqchip
        uint32_t pin
    struct kvm_irq_routing_msi:
        uint32_t address_lo
        uint32_t address_hi
        uint32_t data
    union _kvm_irq_routing_u "hyperpy_never_emitted_irq_u":
        kvm_irq_routing_irqchip irqchip
        kvm_irq_routing_msi msi
    struct kvm_irq_routing_entry:
        uint32_t gsi
        uint32_t type
        uint32_t flags
        _kvm_irq_routing_u u
    struct kvm_irq_routing:
        uint32_t nr
        uint32_t flags
        kvm_irq_routing_entry entries[0]

    struct kvm_irqfd:
        uint32_t fd
        uint32_t gsi
        uint32_t flags
        uint32_t resamplefd

    int KVM_IRQFD_FLAG_DEASSIGN
    int KVM_IOEVENTFD_FLAG_DATAMATCH
    int KVM_IOEVENTFD_FLAG_PIO
    int KVM_IOEVENTFD_FLAG_DEASSIGN
    struct kvm_ioeventfd:
        uint64_t datamatch
        uint64_t addr
        uint32_t len
        int32_t fd
        uint32_t flags

    struct kvm_enable_cap:
        uint32_t cap
        uint32_t flags
        uint64_t args[4]

    struct kvm_translation:
        uint64_t linear_address
        uint64_t physical_address
        uint8_t valid
        uint8_t writeable
        uint8_t usermode

    struct kvm_mp_state:
        uint32_t mp_state


cdef extern from "<asm/kvm.h>" nogil:
    int KVM_NR_INTERRUPTS
    int KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    struct kvm_regs:
        uint64_t rax, rbx, rcx, rdx
        uint64_t rsi, rdi, rsp, rbp
        uint64_t r8, r9, r10, r11
        uint64_t r12, r13, r14, r15
        uint64_t rip, rflags
    struct kvm_segment:
        uint64_t base
        uint32_t limit
        uint16_t selector
        uint8_t type
        uint8_t present, dpl, db, s, l, g, avl
        uint8_t unusable
    struct kvm_dtable:
        uint64_t base
        uint16_t limit
    struct kvm_sregs:
        kvm_segment cs, ds, es, fs, gs, ss
        kvm_segment tr, ldt
        kvm_dtable gdt, idt
        uint64_t cr0, cr2, cr3, cr4, cr8
        uint64_t efer
        uint64_t apic_base
    struct kvm_fpu:
        uint16_t fcw
        uint16_t fsw
        uint8_t ftwx
        uint32_t mxcsr
    struct kvm_msr_entry:
        uint32_t index
        uint32_t reserved
        uint64_t data
    struct kvm_msrs:
        uint32_t nmsrs
        uint32_t pad
        kvm_msr_entry entries[0]
    struct kvm_cpuid_entry2:
        uint32_t function
        uint32_t index
        uint32_t flags
        uint32_t eax
        uint32_t ebx
        uint32_t ecx
        uint32_t edx
    struct kvm_cpuid2:
        uint32_t nent
        uint32_t padding
        kvm_cpuid_entry2 entries[0]
    struct kvm_lapic_state:
        char regs[1024]
