# cython: language_level=3
"""Layout of the Linux x86 boot protocol structures, taken from the kernel's UAPI headers.

``struct boot_params`` (the "zero page") and ``struct setup_header`` are Linux UAPI ABI defined
in ``<asm/bootparam.h>``.  Rather than hard-coding their offsets in Python, this module lets the C
compiler compute them from the installed header, so a mistake in a hand-written offset table
cannot happen.  Python code (:mod:`hyperpy.boot.linux`) packs the zero page with these numbers.

Exported:

* ``SIZEOF_BOOT_PARAMS``, ``SIZEOF_SETUP_HEADER``, ``SIZEOF_BOOT_E820_ENTRY``
* ``BOOT_PARAMS_OFFSETS``: field name -> byte offset in ``struct boot_params``.  Setup-header
  fields are named ``"hdr.<field>"`` and their offsets are from the start of ``boot_params``
  (``SETUP_HEADER_OFFSETS`` has the same fields relative to ``struct setup_header``).
* ``BOOT_PARAMS_SIZES``: field name -> size in bytes of that field.
* ``E820_ENTRY_OFFSETS``: ``addr``/``size``/``type`` offsets in ``struct boot_e820_entry``.
* constants: ``LOADED_HIGH``, ``KASLR_FLAG``, ``QUIET_FLAG``, ``KEEP_SEGMENTS``, ``CAN_USE_HEAP``,
  ``XLF_KERNEL_64``, ``XLF_CAN_BE_LOADED_ABOVE_4G``, ``E820_MAX_ENTRIES_ZEROPAGE``, ``E820_RAM``,
  ``E820_RESERVED``, ``E820_ACPI``, ``E820_NVS``, ``E820_UNUSABLE``.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from *:
    """
    /* The E820 type numbers are Linux UAPI in <asm/e820.h>; newer UAPI header sets dropped that
     * file, so fall back to the (stable, ABI) values when it is missing. */
    #if defined(__has_include)
    #  if __has_include(<asm/e820.h>)
    #    include <asm/e820.h>
    #  endif
    #endif
    #ifndef E820_RAM
    #  define E820_RAM 1
    #  define E820_RESERVED 2
    #  define E820_ACPI 3
    #  define E820_NVS 4
    #  define E820_UNUSABLE 5
    #endif
    """
    int _E820_RAM "E820_RAM"
    int _E820_RESERVED "E820_RESERVED"
    int _E820_ACPI "E820_ACPI"
    int _E820_NVS "E820_NVS"
    int _E820_UNUSABLE "E820_UNUSABLE"

cdef extern from "<asm/bootparam.h>":
    int _LOADED_HIGH "LOADED_HIGH"
    int _KASLR_FLAG "KASLR_FLAG"
    int _QUIET_FLAG "QUIET_FLAG"
    int _KEEP_SEGMENTS "KEEP_SEGMENTS"
    int _CAN_USE_HEAP "CAN_USE_HEAP"
    int _XLF_KERNEL_64 "XLF_KERNEL_64"
    int _XLF_CAN_BE_LOADED_ABOVE_4G "XLF_CAN_BE_LOADED_ABOVE_4G"
    int _E820_MAX_ENTRIES_ZEROPAGE "E820_MAX_ENTRIES_ZEROPAGE"

    # Only the fields hyperpy reads or writes are declared; Cython needs no more to take their
    # addresses, and sizeof() below is the C compiler's sizeof of the full header struct.
    struct setup_header:
        uint8_t setup_sects
        uint16_t root_flags
        uint32_t syssize
        uint16_t boot_flag
        uint16_t jump
        uint32_t header
        uint16_t version
        uint32_t realmode_swtch
        uint8_t type_of_loader
        uint8_t loadflags
        uint32_t code32_start
        uint32_t ramdisk_image
        uint32_t ramdisk_size
        uint16_t heap_end_ptr
        uint32_t cmd_line_ptr
        uint32_t initrd_addr_max
        uint32_t kernel_alignment
        uint8_t relocatable_kernel
        uint8_t min_alignment
        uint16_t xloadflags
        uint32_t cmdline_size
        uint32_t hardware_subarch
        uint64_t hardware_subarch_data
        uint64_t setup_data
        uint64_t pref_address
        uint32_t init_size

    struct boot_e820_entry:
        uint64_t addr
        uint64_t size
        uint32_t type

    struct boot_params:
        uint64_t acpi_rsdp_addr
        uint32_t ext_ramdisk_image
        uint32_t ext_ramdisk_size
        uint32_t ext_cmd_line_ptr
        uint8_t e820_entries
        uint8_t sentinel
        setup_header hdr
        boot_e820_entry e820_table[1]   # real length E820_MAX_ENTRIES_ZEROPAGE; only &[0] used


cdef boot_params _bp
cdef boot_e820_entry _e8


cdef inline size_t _off(const void *field) noexcept:
    return <size_t>(<const char *>field - <const char *>&_bp)


SIZEOF_BOOT_PARAMS = sizeof(boot_params)
SIZEOF_SETUP_HEADER = sizeof(setup_header)
SIZEOF_BOOT_E820_ENTRY = sizeof(boot_e820_entry)

BOOT_PARAMS_OFFSETS = {
    "acpi_rsdp_addr": _off(&_bp.acpi_rsdp_addr),
    "ext_ramdisk_image": _off(&_bp.ext_ramdisk_image),
    "ext_ramdisk_size": _off(&_bp.ext_ramdisk_size),
    "ext_cmd_line_ptr": _off(&_bp.ext_cmd_line_ptr),
    "e820_entries": _off(&_bp.e820_entries),
    "sentinel": _off(&_bp.sentinel),
    "hdr": _off(&_bp.hdr),
    "e820_table": _off(&_bp.e820_table[0]),
    "hdr.setup_sects": _off(&_bp.hdr.setup_sects),
    "hdr.root_flags": _off(&_bp.hdr.root_flags),
    "hdr.syssize": _off(&_bp.hdr.syssize),
    "hdr.boot_flag": _off(&_bp.hdr.boot_flag),
    "hdr.jump": _off(&_bp.hdr.jump),
    "hdr.header": _off(&_bp.hdr.header),
    "hdr.version": _off(&_bp.hdr.version),
    "hdr.realmode_swtch": _off(&_bp.hdr.realmode_swtch),
    "hdr.type_of_loader": _off(&_bp.hdr.type_of_loader),
    "hdr.loadflags": _off(&_bp.hdr.loadflags),
    "hdr.code32_start": _off(&_bp.hdr.code32_start),
    "hdr.ramdisk_image": _off(&_bp.hdr.ramdisk_image),
    "hdr.ramdisk_size": _off(&_bp.hdr.ramdisk_size),
    "hdr.heap_end_ptr": _off(&_bp.hdr.heap_end_ptr),
    "hdr.cmd_line_ptr": _off(&_bp.hdr.cmd_line_ptr),
    "hdr.initrd_addr_max": _off(&_bp.hdr.initrd_addr_max),
    "hdr.kernel_alignment": _off(&_bp.hdr.kernel_alignment),
    "hdr.relocatable_kernel": _off(&_bp.hdr.relocatable_kernel),
    "hdr.min_alignment": _off(&_bp.hdr.min_alignment),
    "hdr.xloadflags": _off(&_bp.hdr.xloadflags),
    "hdr.cmdline_size": _off(&_bp.hdr.cmdline_size),
    "hdr.hardware_subarch": _off(&_bp.hdr.hardware_subarch),
    "hdr.hardware_subarch_data": _off(&_bp.hdr.hardware_subarch_data),
    "hdr.setup_data": _off(&_bp.hdr.setup_data),
    "hdr.pref_address": _off(&_bp.hdr.pref_address),
    "hdr.init_size": _off(&_bp.hdr.init_size),
}

BOOT_PARAMS_SIZES = {
    "acpi_rsdp_addr": sizeof(_bp.acpi_rsdp_addr),
    "ext_ramdisk_image": sizeof(_bp.ext_ramdisk_image),
    "ext_ramdisk_size": sizeof(_bp.ext_ramdisk_size),
    "ext_cmd_line_ptr": sizeof(_bp.ext_cmd_line_ptr),
    "e820_entries": sizeof(_bp.e820_entries),
    "sentinel": sizeof(_bp.sentinel),
    "hdr": sizeof(setup_header),
    "e820_table": sizeof(boot_e820_entry) * _E820_MAX_ENTRIES_ZEROPAGE,
    "hdr.setup_sects": sizeof(_bp.hdr.setup_sects),
    "hdr.root_flags": sizeof(_bp.hdr.root_flags),
    "hdr.syssize": sizeof(_bp.hdr.syssize),
    "hdr.boot_flag": sizeof(_bp.hdr.boot_flag),
    "hdr.jump": sizeof(_bp.hdr.jump),
    "hdr.header": sizeof(_bp.hdr.header),
    "hdr.version": sizeof(_bp.hdr.version),
    "hdr.realmode_swtch": sizeof(_bp.hdr.realmode_swtch),
    "hdr.type_of_loader": sizeof(_bp.hdr.type_of_loader),
    "hdr.loadflags": sizeof(_bp.hdr.loadflags),
    "hdr.code32_start": sizeof(_bp.hdr.code32_start),
    "hdr.ramdisk_image": sizeof(_bp.hdr.ramdisk_image),
    "hdr.ramdisk_size": sizeof(_bp.hdr.ramdisk_size),
    "hdr.heap_end_ptr": sizeof(_bp.hdr.heap_end_ptr),
    "hdr.cmd_line_ptr": sizeof(_bp.hdr.cmd_line_ptr),
    "hdr.initrd_addr_max": sizeof(_bp.hdr.initrd_addr_max),
    "hdr.kernel_alignment": sizeof(_bp.hdr.kernel_alignment),
    "hdr.relocatable_kernel": sizeof(_bp.hdr.relocatable_kernel),
    "hdr.min_alignment": sizeof(_bp.hdr.min_alignment),
    "hdr.xloadflags": sizeof(_bp.hdr.xloadflags),
    "hdr.cmdline_size": sizeof(_bp.hdr.cmdline_size),
    "hdr.hardware_subarch": sizeof(_bp.hdr.hardware_subarch),
    "hdr.hardware_subarch_data": sizeof(_bp.hdr.hardware_subarch_data),
    "hdr.setup_data": sizeof(_bp.hdr.setup_data),
    "hdr.pref_address": sizeof(_bp.hdr.pref_address),
    "hdr.init_size": sizeof(_bp.hdr.init_size),
}

SETUP_HEADER_OFFSETS = {
    name[4:]: off - BOOT_PARAMS_OFFSETS["hdr"]
    for name, off in BOOT_PARAMS_OFFSETS.items() if name.startswith("hdr.")
}

E820_ENTRY_OFFSETS = {
    "addr": <size_t>(<char *>&_e8.addr - <char *>&_e8),
    "size": <size_t>(<char *>&_e8.size - <char *>&_e8),
    "type": <size_t>(<char *>&_e8.type - <char *>&_e8),
}

# Python-visible copies of the header's constants.
LOADED_HIGH = _LOADED_HIGH
KASLR_FLAG = _KASLR_FLAG
QUIET_FLAG = _QUIET_FLAG
KEEP_SEGMENTS = _KEEP_SEGMENTS
CAN_USE_HEAP = _CAN_USE_HEAP
XLF_KERNEL_64 = _XLF_KERNEL_64
XLF_CAN_BE_LOADED_ABOVE_4G = _XLF_CAN_BE_LOADED_ABOVE_4G
E820_MAX_ENTRIES_ZEROPAGE = _E820_MAX_ENTRIES_ZEROPAGE
E820_RAM = _E820_RAM
E820_RESERVED = _E820_RESERVED
E820_ACPI = _E820_ACPI
E820_NVS = _E820_NVS
E820_UNUSABLE = _E820_UNUSABLE
