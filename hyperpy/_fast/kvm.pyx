# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""/dev/kvm, VM and vCPU objects, and the vCPU run loop.

The run loop calls ``KVM_RUN`` without the GIL and dispatches port-I/O and MMIO exits through
:class:`~hyperpy._fast.iobus.IoBus` tables: devices with a C fast path are served inside the
``nogil`` loop, the rest (and every exit that needs policy) go back to Python.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memset, memcpy
from libc.stdlib cimport malloc, calloc, free
from libc.errno cimport errno, EINTR, EAGAIN, E2BIG, ENOMEM
from posix.fcntl cimport open as c_open, O_RDWR, O_CLOEXEC
from posix.unistd cimport close
from posix.mman cimport mmap, munmap, MAP_FAILED, PROT_READ, PROT_WRITE, MAP_SHARED
from posix.ioctl cimport ioctl
from posix.signal cimport sigaction_t, sigaction, sigemptyset
from cpython.bytes cimport PyBytes_FromStringAndSize

from hyperpy._fast.kvm_uapi cimport *
from hyperpy._fast.iobus cimport IoBus, BusRange, IO_DONE, IO_DEFER

import logging
import os

from hyperpy.errors import KvmError

log = logging.getLogger("hyperpy.kvm")

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    pthread_t pthread_self()
    int pthread_kill(pthread_t thread, int sig)

cdef extern from "<signal.h>" nogil:
    int SIGRTMIN

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    int CLOCK_MONOTONIC

# Capabilities by name, for error messages and for Python callers.
CAPABILITIES = {
    "KVM_CAP_IRQCHIP": KVM_CAP_IRQCHIP,
    "KVM_CAP_HLT": KVM_CAP_HLT,
    "KVM_CAP_USER_MEMORY": KVM_CAP_USER_MEMORY,
    "KVM_CAP_SET_TSS_ADDR": KVM_CAP_SET_TSS_ADDR,
    "KVM_CAP_SET_IDENTITY_MAP_ADDR": KVM_CAP_SET_IDENTITY_MAP_ADDR,
    "KVM_CAP_EXT_CPUID": KVM_CAP_EXT_CPUID,
    "KVM_CAP_PIT2": KVM_CAP_PIT2,
    "KVM_CAP_IRQ_ROUTING": KVM_CAP_IRQ_ROUTING,
    "KVM_CAP_IRQFD": KVM_CAP_IRQFD,
    "KVM_CAP_IOEVENTFD": KVM_CAP_IOEVENTFD,
    "KVM_CAP_IMMEDIATE_EXIT": KVM_CAP_IMMEDIATE_EXIT,
    "KVM_CAP_NR_MEMSLOTS": KVM_CAP_NR_MEMSLOTS,
    "KVM_CAP_MAX_VCPUS": KVM_CAP_MAX_VCPUS,
    "KVM_CAP_INTERNAL_ERROR_DATA": KVM_CAP_INTERNAL_ERROR_DATA,
    "KVM_CAP_EXIT_ON_EMULATION_FAILURE": KVM_CAP_EXIT_ON_EMULATION_FAILURE,
}

# The capabilities a hyperpy VM cannot run without.
REQUIRED_CAPABILITIES = (
    "KVM_CAP_IRQCHIP", "KVM_CAP_USER_MEMORY", "KVM_CAP_SET_TSS_ADDR", "KVM_CAP_EXT_CPUID",
    "KVM_CAP_PIT2", "KVM_CAP_IRQ_ROUTING", "KVM_CAP_IRQFD", "KVM_CAP_IOEVENTFD",
    "KVM_CAP_IMMEDIATE_EXIT",
)

EXIT_REASON_NAMES = {
    KVM_EXIT_UNKNOWN: "UNKNOWN", KVM_EXIT_EXCEPTION: "EXCEPTION", KVM_EXIT_IO: "IO",
    KVM_EXIT_HYPERCALL: "HYPERCALL", KVM_EXIT_DEBUG: "DEBUG", KVM_EXIT_HLT: "HLT",
    KVM_EXIT_MMIO: "MMIO", KVM_EXIT_IRQ_WINDOW_OPEN: "IRQ_WINDOW_OPEN",
    KVM_EXIT_SHUTDOWN: "SHUTDOWN", KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY", KVM_EXIT_INTR: "INTR",
    KVM_EXIT_NMI: "NMI", KVM_EXIT_INTERNAL_ERROR: "INTERNAL_ERROR",
    KVM_EXIT_SYSTEM_EVENT: "SYSTEM_EVENT",
}

INTERNAL_ERROR_NAMES = {
    KVM_INTERNAL_ERROR_EMULATION: "emulation failure",
    KVM_INTERNAL_ERROR_SIMUL_EX: "simultaneous exceptions",
    KVM_INTERNAL_ERROR_DELIVERY_EV: "exit during event delivery",
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason",
}

SYSTEM_EVENT_NAMES = {
    KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown", KVM_SYSTEM_EVENT_RESET: "reset",
    KVM_SYSTEM_EVENT_CRASH: "crash",
}

IRQCHIP_PIC_MASTER = KVM_IRQCHIP_PIC_MASTER
IRQCHIP_PIC_SLAVE = KVM_IRQCHIP_PIC_SLAVE
IRQCHIP_IOAPIC = KVM_IRQCHIP_IOAPIC
MP_STATE_RUNNABLE = KVM_MP_STATE_RUNNABLE
MP_STATE_UNINITIALIZED = KVM_MP_STATE_UNINITIALIZED
# struct kvm_cpuid_entry2.flags: CPUID(function, index) matches this entry only for its index.
CPUID_FLAG_SIGNIFCANT_INDEX = KVM_CPUID_FLAG_SIGNIFCANT_INDEX

# ioctl numbers and kvm_run field offsets for the pure-Python reference loop
# (hyperpy.reference), taken from the headers at build time.
cdef kvm_run _layout_probe
IOCTLS = {"KVM_RUN": KVM_RUN}
KVM_RUN_LAYOUT = {
    "immediate_exit": <size_t>(<char *>&_layout_probe.immediate_exit - <char *>&_layout_probe),
    "exit_reason": <size_t>(<char *>&_layout_probe.exit_reason - <char *>&_layout_probe),
    "io.direction": <size_t>(<char *>&_layout_probe.io.direction - <char *>&_layout_probe),
    "io.size": <size_t>(<char *>&_layout_probe.io.size - <char *>&_layout_probe),
    "io.port": <size_t>(<char *>&_layout_probe.io.port - <char *>&_layout_probe),
    "io.count": <size_t>(<char *>&_layout_probe.io.count - <char *>&_layout_probe),
    "io.data_offset": <size_t>(<char *>&_layout_probe.io.data_offset - <char *>&_layout_probe),
    "mmio.phys_addr": <size_t>(<char *>&_layout_probe.mmio.phys_addr - <char *>&_layout_probe),
    "mmio.data": <size_t>(<char *>&_layout_probe.mmio.data - <char *>&_layout_probe),
    "mmio.len": <size_t>(<char *>&_layout_probe.mmio.len - <char *>&_layout_probe),
    "mmio.is_write": <size_t>(<char *>&_layout_probe.mmio.is_write - <char *>&_layout_probe),
}
EXIT_IO = KVM_EXIT_IO
EXIT_MMIO = KVM_EXIT_MMIO
EXIT_IO_OUT = KVM_EXIT_IO_OUT
EXIT_HLT = KVM_EXIT_HLT
EXIT_SHUTDOWN = KVM_EXIT_SHUTDOWN
EXIT_INTR = KVM_EXIT_INTR


cdef void _kick_handler(int sig) noexcept nogil:
    # Nothing to do: the signal's only job is to make a blocked KVM_RUN return -EINTR.
    pass


cdef bint _kick_installed = False
cdef int KICK_SIGNAL = SIGRTMIN + 2


cdef int _install_kick_signal() except -1:
    global _kick_installed
    cdef sigaction_t sa
    if _kick_installed:
        return 0
    memset(&sa, 0, sizeof(sa))
    sa.sa_handler = _kick_handler
    sigemptyset(&sa.sa_mask)
    sa.sa_flags = 0   # no SA_RESTART: KVM_RUN must return EINTR
    if sigaction(KICK_SIGNAL, &sa, NULL) != 0:
        raise OSError(errno, os.strerror(errno))
    _kick_installed = True
    return 0


cdef inline int _ioctl_check(int fd, unsigned long req, void *arg, str what) except -1:
    cdef int r
    with nogil:
        r = ioctl(fd, req, arg)
    if r < 0:
        e = errno
        raise KvmError(f"{what} failed: {os.strerror(e)} (errno {e})")
    return r



cdef list _read_cpuid2(int fd, unsigned long request, int n, str what):
    """A struct kvm_cpuid2 read by ``request`` on ``fd``: the buffer grows while KVM says E2BIG;
    the entries as (function, index, flags, eax, ebx, ecx, edx) tuples."""
    cdef kvm_cpuid2 *c
    cdef int r, e, i
    while True:
        c = <kvm_cpuid2 *>calloc(1, sizeof(kvm_cpuid2) + n * sizeof(kvm_cpuid_entry2))
        if c == NULL:
            raise MemoryError()
        c.nent = n
        r = ioctl(fd, request, c)
        e = errno
        if r < 0:
            free(c)
            if e == E2BIG and n < 4096:
                n *= 2
                continue
            raise KvmError(f"{what} failed: {os.strerror(e)}")
        out = [(c.entries[i].function, c.entries[i].index, c.entries[i].flags,
                c.entries[i].eax, c.entries[i].ebx, c.entries[i].ecx, c.entries[i].edx)
               for i in range(c.nent)]
        free(c)
        return out

cdef class Kvm:
    """An open /dev/kvm."""

    cdef readonly int fd
    cdef readonly int vcpu_mmap_size

    def __cinit__(self, str path="/dev/kvm"):
        self.fd = -1
        cdef bytes bpath = path.encode()
        fd = c_open(bpath, O_RDWR | O_CLOEXEC)
        if fd < 0:
            e = errno
            if not os.path.exists(path):
                raise KvmError(f"{path} does not exist",
                               "load the kvm module (modprobe kvm_intel or kvm_amd) and enable "
                               "virtualization in the firmware, or run on a host with KVM")
            if e in (1, 13):  # EPERM, EACCES
                raise KvmError(f"no permission to open {path}",
                               "run as root or add your user to the 'kvm' group")
            raise KvmError(f"cannot open {path}: {os.strerror(e)}")
        self.fd = fd
        version = ioctl(fd, KVM_GET_API_VERSION, 0)
        if version != KVM_API_VERSION:
            raise KvmError(f"KVM API version {version} is not the supported {KVM_API_VERSION}",
                           "use a Linux kernel with the stable KVM API")
        self.vcpu_mmap_size = ioctl(fd, KVM_GET_VCPU_MMAP_SIZE, 0)
        if self.vcpu_mmap_size <= 0:
            raise KvmError("KVM_GET_VCPU_MMAP_SIZE failed")

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)

    def check_extension(self, cap) -> int:
        """Value of KVM_CHECK_EXTENSION for a capability (number or ``KVM_CAP_*`` name)."""
        cdef int c = CAPABILITIES[cap] if isinstance(cap, str) else cap
        cdef int r = ioctl(self.fd, KVM_CHECK_EXTENSION, <unsigned long>c)
        return max(r, 0)

    def require(self, names=REQUIRED_CAPABILITIES):
        """Raise a one-line KvmError naming the first missing capability."""
        for name in names:
            if not self.check_extension(name):
                raise KvmError(f"this host's KVM lacks {name}",
                               "use a newer Linux kernel (hyperpy needs 5.x or later)")

    def supported_cpuid(self):
        """KVM_GET_SUPPORTED_CPUID as a list of (function, index, flags, eax, ebx, ecx, edx)."""
        return _read_cpuid2(self.fd, KVM_GET_SUPPORTED_CPUID, 128, "KVM_GET_SUPPORTED_CPUID")

    def create_vm(self):
        cdef int fd = ioctl(self.fd, KVM_CREATE_VM, 0)
        if fd < 0:
            e = errno
            raise KvmError(f"KVM_CREATE_VM failed: {os.strerror(e)}",
                           "check that no other hypervisor holds the virtualization extensions")
        return Vm._wrap(self, fd)


cdef class Vm:
    """A KVM virtual machine (the fd from KVM_CREATE_VM)."""

    cdef readonly int fd
    cdef readonly Kvm kvm

    def __cinit__(self):
        self.fd = -1

    @staticmethod
    cdef Vm _wrap(Kvm kvm, int fd):
        cdef Vm vm = Vm.__new__(Vm)
        vm.kvm = kvm
        vm.fd = fd
        return vm

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)

    def close(self):
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    def set_user_memory_region(self, uint32_t slot, uint64_t gpa, uint64_t size,
                               uint64_t host_addr, bint readonly=False):
        cdef kvm_userspace_memory_region r
        memset(&r, 0, sizeof(r))
        r.slot = slot
        r.flags = KVM_MEM_READONLY if readonly else 0
        r.guest_phys_addr = gpa
        r.memory_size = size
        r.userspace_addr = host_addr
        _ioctl_check(self.fd, KVM_SET_USER_MEMORY_REGION, &r,
                     f"KVM_SET_USER_MEMORY_REGION (slot {slot}, {gpa:#x}+{size:#x})")

    def set_tss_addr(self, uint64_t addr):
        cdef int r = ioctl(self.fd, KVM_SET_TSS_ADDR, <unsigned long>addr)
        if r < 0:
            raise KvmError(f"KVM_SET_TSS_ADDR failed: {os.strerror(errno)}")

    def set_identity_map_addr(self, uint64_t addr):
        cdef uint64_t a = addr
        _ioctl_check(self.fd, KVM_SET_IDENTITY_MAP_ADDR, &a, "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self):
        """In-kernel PIC, IOAPIC and local APICs."""
        _ioctl_check(self.fd, KVM_CREATE_IRQCHIP, NULL, "KVM_CREATE_IRQCHIP")

    def create_pit2(self, bint speaker_dummy=True):
        cdef kvm_pit_config cfg
        memset(&cfg, 0, sizeof(cfg))
        cfg.flags = KVM_PIT_SPEAKER_DUMMY if speaker_dummy else 0
        _ioctl_check(self.fd, KVM_CREATE_PIT2, &cfg, "KVM_CREATE_PIT2")

    def irq_line(self, uint32_t irq, uint32_t level):
        cdef kvm_irq_level lv
        lv.irq = irq
        lv.level = level
        _ioctl_check(self.fd, KVM_IRQ_LINE, &lv, f"KVM_IRQ_LINE (irq {irq})")

    def set_gsi_routing(self, entries):
        """Replace the GSI routing table.

        ``entries``: ``("irqchip", gsi, chip, pin)`` or ``("msi", gsi, address, data)`` tuples.
        """
        cdef int n = len(entries), i
        cdef kvm_irq_routing *rt = <kvm_irq_routing *>calloc(
            1, sizeof(kvm_irq_routing) + n * sizeof(kvm_irq_routing_entry))
        if rt == NULL:
            raise MemoryError()
        try:
            rt.nr = n
            for i, ent in enumerate(entries):
                kind = ent[0]
                rt.entries[i].gsi = ent[1]
                if kind == "irqchip":
                    rt.entries[i].type = KVM_IRQ_ROUTING_IRQCHIP
                    rt.entries[i].u.irqchip.irqchip = ent[2]
                    rt.entries[i].u.irqchip.pin = ent[3]
                elif kind == "msi":
                    rt.entries[i].type = KVM_IRQ_ROUTING_MSI
                    rt.entries[i].u.msi.address_lo = ent[2] & 0xffffffff
                    rt.entries[i].u.msi.address_hi = ent[2] >> 32
                    rt.entries[i].u.msi.data = ent[3]
                else:
                    raise ValueError(f"unknown GSI route kind {kind!r}")
            _ioctl_check(self.fd, KVM_SET_GSI_ROUTING, rt, "KVM_SET_GSI_ROUTING")
        finally:
            free(rt)

    def irqfd(self, int fd, uint32_t gsi, bint deassign=False):
        cdef kvm_irqfd f
        memset(&f, 0, sizeof(f))
        f.fd = fd
        f.gsi = gsi
        f.flags = KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        _ioctl_check(self.fd, KVM_IRQFD, &f, f"KVM_IRQFD (gsi {gsi})")

    def ioeventfd(self, int fd, uint64_t addr, uint32_t length=0, datamatch=None,
                  bint pio=False, bint deassign=False):
        """Let guest writes to ``addr`` signal eventfd ``fd`` inside the kernel (no exit to us).

        ``length`` 0 matches a write of any size; ``datamatch`` restricts it to one value.
        """
        cdef kvm_ioeventfd e
        memset(&e, 0, sizeof(e))
        e.fd = fd
        e.addr = addr
        e.len = length
        e.flags = 0
        if datamatch is not None:
            e.datamatch = datamatch
            e.flags |= KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            e.flags |= KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            e.flags |= KVM_IOEVENTFD_FLAG_DEASSIGN
        _ioctl_check(self.fd, KVM_IOEVENTFD, &e, f"KVM_IOEVENTFD ({addr:#x})")

    def create_vcpu(self, int index):
        cdef int fd = ioctl(self.fd, KVM_CREATE_VCPU, <unsigned long>index)
        if fd < 0:
            e = errno
            raise KvmError(f"KVM_CREATE_VCPU {index} failed: {os.strerror(e)}",
                           "lower --cpus boot=")
        return Vcpu._wrap(self, fd, index)


# Events returned by Vcpu.run() to the Python control loop.
cdef enum LoopEvent:
    EV_KICKED = 0
    EV_PY_IO = 1
    EV_PY_MMIO = 2
    EV_OTHER = 3
    EV_ERROR = 4

_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_SEG_FIELDS = ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g",
               "avl", "unusable")


cdef dict _seg_to_dict(kvm_segment *s):
    return {"base": s.base, "limit": s.limit, "selector": s.selector, "type": s.type,
            "present": s.present, "dpl": s.dpl, "db": s.db, "s": s.s, "l": s.l, "g": s.g,
            "avl": s.avl, "unusable": s.unusable}


cdef void _seg_from_dict(kvm_segment *s, dict d):
    s.base = d.get("base", s.base)
    s.limit = d.get("limit", s.limit)
    s.selector = d.get("selector", s.selector)
    s.type = d.get("type", s.type)
    s.present = d.get("present", s.present)
    s.dpl = d.get("dpl", s.dpl)
    s.db = d.get("db", s.db)
    s.s = d.get("s", s.s)
    s.l = d.get("l", s.l)
    s.g = d.get("g", s.g)
    s.avl = d.get("avl", s.avl)
    s.unusable = d.get("unusable", s.unusable)


cdef class Vcpu:
    """One vCPU: its fd, its mmapped ``kvm_run`` and the run loop."""

    cdef readonly int fd
    cdef readonly int index
    cdef readonly Vm vm
    cdef kvm_run *run_area
    cdef size_t run_size
    cdef IoBus pio_bus
    cdef IoBus mmio_bus
    cdef pthread_t thread
    cdef bint thread_known
    # Counters (read by benchmarks and the API).
    cdef readonly uint64_t exits
    cdef readonly uint64_t fast_exits
    cdef readonly uint64_t slow_exits
    cdef set _warned

    def __cinit__(self):
        self.fd = -1
        self.run_area = NULL
        self.thread_known = False
        self._warned = set()

    @staticmethod
    cdef Vcpu _wrap(Vm vm, int fd, int index):
        cdef Vcpu v = Vcpu.__new__(Vcpu)
        cdef void *p
        v.vm = vm
        v.fd = fd
        v.index = index
        v.run_size = vm.kvm.vcpu_mmap_size
        p = mmap(NULL, v.run_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if p == MAP_FAILED:
            raise KvmError(f"mmap of vCPU {index} kvm_run failed: {os.strerror(errno)}")
        v.run_area = <kvm_run *>p
        return v

    def __dealloc__(self):
        if self.run_area != NULL:
            munmap(self.run_area, self.run_size)
        if self.fd >= 0:
            close(self.fd)

    def close(self):
        """Unmap kvm_run and close the vCPU fd (the vCPU must not be running)."""
        if self.run_area != NULL:
            munmap(self.run_area, self.run_size)
            self.run_area = NULL
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    @property
    def mmap_size(self):
        return self.run_size

    def attach_buses(self, IoBus pio, IoBus mmio):
        self.pio_bus = pio
        self.mmio_bus = mmio

    # --- register state -------------------------------------------------------------------
    def get_regs(self):
        cdef kvm_regs r
        _ioctl_check(self.fd, KVM_GET_REGS, &r, "KVM_GET_REGS")
        return {"rax": r.rax, "rbx": r.rbx, "rcx": r.rcx, "rdx": r.rdx, "rsi": r.rsi,
                "rdi": r.rdi, "rsp": r.rsp, "rbp": r.rbp, "r8": r.r8, "r9": r.r9, "r10": r.r10,
                "r11": r.r11, "r12": r.r12, "r13": r.r13, "r14": r.r14, "r15": r.r15,
                "rip": r.rip, "rflags": r.rflags}

    def set_regs(self, dict values):
        """Set the given general registers (others keep their value)."""
        cdef kvm_regs r
        _ioctl_check(self.fd, KVM_GET_REGS, &r, "KVM_GET_REGS")
        d = self.get_regs()
        unknown = set(values) - set(d)
        if unknown:
            raise ValueError(f"unknown registers {sorted(unknown)}")
        d.update(values)
        r.rax, r.rbx, r.rcx, r.rdx = d["rax"], d["rbx"], d["rcx"], d["rdx"]
        r.rsi, r.rdi, r.rsp, r.rbp = d["rsi"], d["rdi"], d["rsp"], d["rbp"]
        r.r8, r.r9, r.r10, r.r11 = d["r8"], d["r9"], d["r10"], d["r11"]
        r.r12, r.r13, r.r14, r.r15 = d["r12"], d["r13"], d["r14"], d["r15"]
        r.rip, r.rflags = d["rip"], d["rflags"]
        _ioctl_check(self.fd, KVM_SET_REGS, &r, "KVM_SET_REGS")

    def get_sregs(self):
        cdef kvm_sregs s
        _ioctl_check(self.fd, KVM_GET_SREGS, &s, "KVM_GET_SREGS")
        return {"cs": _seg_to_dict(&s.cs), "ds": _seg_to_dict(&s.ds), "es": _seg_to_dict(&s.es),
                "fs": _seg_to_dict(&s.fs), "gs": _seg_to_dict(&s.gs), "ss": _seg_to_dict(&s.ss),
                "tr": _seg_to_dict(&s.tr), "ldt": _seg_to_dict(&s.ldt),
                "gdt": {"base": s.gdt.base, "limit": s.gdt.limit},
                "idt": {"base": s.idt.base, "limit": s.idt.limit},
                "cr0": s.cr0, "cr2": s.cr2, "cr3": s.cr3, "cr4": s.cr4, "cr8": s.cr8,
                "efer": s.efer, "apic_base": s.apic_base}

    def set_sregs(self, dict values):
        """Merge ``values`` (same shape as :meth:`get_sregs`, any subset) into the sregs."""
        cdef kvm_sregs s
        _ioctl_check(self.fd, KVM_GET_SREGS, &s, "KVM_GET_SREGS")
        for key, val in values.items():
            if key == "cs": _seg_from_dict(&s.cs, val)
            elif key == "ds": _seg_from_dict(&s.ds, val)
            elif key == "es": _seg_from_dict(&s.es, val)
            elif key == "fs": _seg_from_dict(&s.fs, val)
            elif key == "gs": _seg_from_dict(&s.gs, val)
            elif key == "ss": _seg_from_dict(&s.ss, val)
            elif key == "tr": _seg_from_dict(&s.tr, val)
            elif key == "ldt": _seg_from_dict(&s.ldt, val)
            elif key == "gdt":
                s.gdt.base = val["base"]; s.gdt.limit = val["limit"]
            elif key == "idt":
                s.idt.base = val["base"]; s.idt.limit = val["limit"]
            elif key == "cr0": s.cr0 = val
            elif key == "cr2": s.cr2 = val
            elif key == "cr3": s.cr3 = val
            elif key == "cr4": s.cr4 = val
            elif key == "cr8": s.cr8 = val
            elif key == "efer": s.efer = val
            elif key == "apic_base": s.apic_base = val
            else:
                raise ValueError(f"unknown special register {key!r}")
        _ioctl_check(self.fd, KVM_SET_SREGS, &s, "KVM_SET_SREGS")

    def set_cpuid(self, entries):
        """KVM_SET_CPUID2 from (function, index, flags, eax, ebx, ecx, edx) tuples."""
        cdef int n = len(entries), i
        cdef kvm_cpuid2 *c = <kvm_cpuid2 *>calloc(1, sizeof(kvm_cpuid2) + n * sizeof(kvm_cpuid_entry2))
        if c == NULL:
            raise MemoryError()
        try:
            c.nent = n
            for i, e in enumerate(entries):
                (c.entries[i].function, c.entries[i].index, c.entries[i].flags, c.entries[i].eax,
                 c.entries[i].ebx, c.entries[i].ecx, c.entries[i].edx) = e
            _ioctl_check(self.fd, KVM_SET_CPUID2, c, f"KVM_SET_CPUID2 (vCPU {self.index})")
        finally:
            free(c)

    def get_cpuid(self):
        """KVM_GET_CPUID2: the table KVM holds for this vCPU (with the fields KVM maintains at
        run time, e.g. leaf 0xD.0 EBX for the current XCR0), as (function, index, flags, eax,
        ebx, ecx, edx) tuples."""
        return _read_cpuid2(self.fd, KVM_GET_CPUID2, 64, f"KVM_GET_CPUID2 (vCPU {self.index})")

    def set_msrs(self, msrs):
        """KVM_SET_MSRS from (index, value) pairs; every one must be accepted."""
        cdef int n = len(msrs), i, r
        cdef kvm_msrs *m = <kvm_msrs *>calloc(1, sizeof(kvm_msrs) + n * sizeof(kvm_msr_entry))
        if m == NULL:
            raise MemoryError()
        try:
            m.nmsrs = n
            for i, (idx, val) in enumerate(msrs):
                m.entries[i].index = idx
                m.entries[i].data = val
            r = ioctl(self.fd, KVM_SET_MSRS, m)
            if r != n:
                bad = msrs[r][0] if 0 <= r < n else None
                raise KvmError(f"KVM_SET_MSRS set {r} of {n} MSRs"
                               + (f" (MSR {bad:#x} refused)" if bad is not None else ""))
        finally:
            free(m)

    def get_msrs(self, indices):
        cdef int n = len(indices), i, r
        cdef kvm_msrs *m = <kvm_msrs *>calloc(1, sizeof(kvm_msrs) + n * sizeof(kvm_msr_entry))
        if m == NULL:
            raise MemoryError()
        try:
            m.nmsrs = n
            for i, idx in enumerate(indices):
                m.entries[i].index = idx
            r = ioctl(self.fd, KVM_GET_MSRS, m)
            if r < 0:
                raise KvmError(f"KVM_GET_MSRS failed: {os.strerror(errno)}")
            return {m.entries[i].index: m.entries[i].data for i in range(r)}
        finally:
            free(m)

    def set_fpu(self, uint16_t fcw=0x37f, uint32_t mxcsr=0x1f80):
        """Architectural reset values: FCW 0x37f (all exceptions masked), MXCSR 0x1f80."""
        cdef kvm_fpu f
        memset(&f, 0, sizeof(f))
        f.fcw = fcw
        f.mxcsr = mxcsr
        _ioctl_check(self.fd, KVM_SET_FPU, &f, "KVM_SET_FPU")

    def get_lapic(self):
        cdef kvm_lapic_state st
        _ioctl_check(self.fd, KVM_GET_LAPIC, &st, "KVM_GET_LAPIC")
        return PyBytes_FromStringAndSize(st.regs, sizeof(st))

    def set_lapic(self, bytes regs):
        cdef kvm_lapic_state st
        if len(regs) != sizeof(st):
            raise ValueError("LAPIC state has the wrong size")
        memcpy(&st, <char *>regs, sizeof(st))
        _ioctl_check(self.fd, KVM_SET_LAPIC, &st, "KVM_SET_LAPIC")

    def translate(self, uint64_t linear):
        """Guest linear -> physical through the vCPU's page tables: (phys, valid)."""
        cdef kvm_translation t
        memset(&t, 0, sizeof(t))
        t.linear_address = linear
        _ioctl_check(self.fd, KVM_TRANSLATE, &t, "KVM_TRANSLATE")
        return t.physical_address, bool(t.valid)

    def mp_state(self):
        cdef kvm_mp_state st
        _ioctl_check(self.fd, KVM_GET_MP_STATE, &st, "KVM_GET_MP_STATE")
        return st.mp_state

    # --- run loop -----------------------------------------------------------------------------
    def bind_thread(self):
        """Record the calling thread as this vCPU's, so :meth:`request_exit` can signal it."""
        _install_kick_signal()
        self.thread = pthread_self()
        self.thread_known = True

    def request_exit(self):
        """Make the vCPU leave KVM_RUN soon (from any thread): immediate_exit + a signal."""
        if self.run_area == NULL:
            return   # closed: nothing runs any more
        self.run_area.immediate_exit = 1
        if self.thread_known:
            pthread_kill(self.thread, KICK_SIGNAL)

    cdef int _loop(self, int *err) noexcept nogil:
        """KVM_RUN until an exit that needs Python; fast-path device exits never leave C."""
        cdef kvm_run *run = self.run_area
        cdef BusRange *br
        cdef uint8_t *data
        cdef uint32_t i, size, count
        cdef int r
        while True:
            r = ioctl(self.fd, KVM_RUN, 0)
            if r < 0:
                err[0] = errno
                if err[0] == EINTR or err[0] == EAGAIN:
                    return EV_KICKED
                return EV_ERROR
            self.exits += 1
            if run.exit_reason == KVM_EXIT_IO:
                br = self.pio_bus.lookup(run.io.port, run.io.size) if self.pio_bus is not None else NULL
                if br == NULL or br.fast_write == NULL:
                    return EV_PY_IO
                size = run.io.size
                count = run.io.count
                data = <uint8_t *>run + run.io.data_offset
                if run.io.direction == KVM_EXIT_IO_OUT:
                    if br.fast_write(br.ctx, run.io.port - br.base, data, size) == IO_DEFER:
                        return EV_PY_IO
                    for i in range(1, count):
                        br.fast_write(br.ctx, run.io.port - br.base, data + i * size, size)
                else:
                    if br.fast_read == NULL or br.fast_read(br.ctx, run.io.port - br.base, data, size) == IO_DEFER:
                        return EV_PY_IO
                    for i in range(1, count):
                        br.fast_read(br.ctx, run.io.port - br.base, data + i * size, size)
                self.fast_exits += 1
            elif run.exit_reason == KVM_EXIT_MMIO:
                br = self.mmio_bus.lookup(run.mmio.phys_addr, run.mmio.len) if self.mmio_bus is not None else NULL
                if br == NULL or run.mmio.len > 8:
                    return EV_PY_MMIO
                if run.mmio.is_write:
                    if br.fast_write == NULL or br.fast_write(br.ctx, run.mmio.phys_addr - br.base, run.mmio.data, run.mmio.len) == IO_DEFER:
                        return EV_PY_MMIO
                else:
                    if br.fast_read == NULL or br.fast_read(br.ctx, run.mmio.phys_addr - br.base, run.mmio.data, run.mmio.len) == IO_DEFER:
                        return EV_PY_MMIO
                self.fast_exits += 1
            else:
                return EV_OTHER

    def run(self):
        """Run until the vCPU needs the control plane.

        Returns ``(event, details)``: ``("kicked", None)`` after :meth:`request_exit`,
        ``("hlt", None)``, ``("shutdown", None)`` (triple fault), ``("system_event", {...})``,
        ``("fail_entry", {...})``, ``("internal_error", {...})`` or ``("unknown_exit", {...})``.
        Port-I/O and MMIO exits for Python devices are served here and do not return.
        """
        cdef int err = 0
        cdef int ev
        cdef kvm_run *run = self.run_area
        if run == NULL:
            raise KvmError(f"vCPU {self.index} is closed")
        if not self.thread_known:
            self.bind_thread()
        while True:
            with nogil:
                ev = self._loop(&err)
            if ev == EV_PY_IO:
                self.slow_exits += 1
                self._python_io()
            elif ev == EV_PY_MMIO:
                self.slow_exits += 1
                self._python_mmio()
            elif ev == EV_KICKED:
                run.immediate_exit = 0
                return "kicked", None
            elif ev == EV_ERROR:
                raise KvmError(f"KVM_RUN on vCPU {self.index} failed: {os.strerror(err)}")
            else:
                return self._decode_exit()

    def decode_exit(self):
        """The last exit (not port-I/O or MMIO) as ``(event, details)``, like :meth:`run`."""
        return self._decode_exit()

    cdef _decode_exit(self):
        cdef kvm_run *run = self.run_area
        cdef uint32_t reason = run.exit_reason
        cdef int i, n
        if reason == KVM_EXIT_HLT:
            return "hlt", None
        if reason == KVM_EXIT_SHUTDOWN:
            return "shutdown", None
        if reason == KVM_EXIT_INTR:
            return "kicked", None
        if reason == KVM_EXIT_SYSTEM_EVENT:
            t = run.system_event.type
            return "system_event", {"type": SYSTEM_EVENT_NAMES.get(t, str(t)), "code": t}
        if reason == KVM_EXIT_FAIL_ENTRY:
            return "fail_entry", {"hardware_entry_failure_reason": run.fail_entry.hardware_entry_failure_reason,
                                  "cpu": run.fail_entry.cpu}
        if reason == KVM_EXIT_INTERNAL_ERROR:
            sub = run.internal.suberror
            n = min(run.internal.ndata, 16)
            d = {"suberror": sub, "name": INTERNAL_ERROR_NAMES.get(sub, f"suberror {sub}"),
                 "data": [run.internal.data[i] for i in range(n)], "insn_bytes": None}
            if (sub == KVM_INTERNAL_ERROR_EMULATION and n >= 2
                    and run.emulation_failure.flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES):
                d["insn_bytes"] = bytes([run.emulation_failure.insn_bytes[i]
                                         for i in range(min(run.emulation_failure.insn_size, 15))])
            return "internal_error", d
        return "unknown_exit", {"exit_reason": reason,
                                "name": EXIT_REASON_NAMES.get(reason, str(reason)),
                                "hardware_exit_reason": run.hw.hardware_exit_reason}

    cdef _python_io(self):
        cdef kvm_run *run = self.run_area
        cdef uint16_t port = run.io.port
        cdef uint32_t size = run.io.size, count = run.io.count, i
        cdef uint8_t *data = <uint8_t *>run + run.io.data_offset
        found = self.pio_bus.handler_at(port) if self.pio_bus is not None else None
        out = run.io.direction == KVM_EXIT_IO_OUT
        for i in range(count):
            if found is None:
                if out:
                    self._warn_unhandled("port", port, "write")
                else:
                    self._warn_unhandled("port", port, "read")
                    memset(data + i * size, 0xff, size)  # floating ISA bus reads all ones
                continue
            base, handler = found
            try:
                if out:
                    handler.write(port - base, size,
                                  int.from_bytes(data[i * size:(i + 1) * size], "little"))
                else:
                    value = handler.read(port - base, size)
                    for b in range(size):
                        data[i * size + b] = (value >> (8 * b)) & 0xff
            except Exception:
                log.exception("device %s failed on port %#x; access ignored",
                              type(handler).__name__, port)

    cdef _python_mmio(self):
        cdef kvm_run *run = self.run_area
        cdef uint64_t addr = run.mmio.phys_addr
        cdef uint32_t size = min(run.mmio.len, 8), b
        found = self.mmio_bus.handler_at(addr) if self.mmio_bus is not None else None
        if found is None:
            self._warn_unhandled("MMIO", addr, "write" if run.mmio.is_write else "read")
            if not run.mmio.is_write:
                memset(run.mmio.data, 0xff, size)
            return
        base, handler = found
        try:
            if run.mmio.is_write:
                handler.write(addr - base, size, int.from_bytes(run.mmio.data[:size], "little"))
            else:
                value = handler.read(addr - base, size)
                for b in range(size):
                    run.mmio.data[b] = (value >> (8 * b)) & 0xff
        except Exception:
            log.exception("device %s failed at MMIO %#x; access ignored",
                          type(handler).__name__, addr)

    cdef _warn_unhandled(self, str space, uint64_t addr, str op):
        key = (space, addr, op)
        if key not in self._warned and len(self._warned) < 256:
            self._warned.add(key)
            log.debug("vCPU %d: %s %s at %#x has no device", self.index, op, space, addr)
