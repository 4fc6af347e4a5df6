/* Shared runtime of the hyperpy test guests: port/MMIO access, COM1 output, reset, cmdline.
 *
 * Freestanding, ring 0, long mode, identity-mapped. Built with -mgeneral-regs-only (no SSE):
 * the host's instruction emulator rejects SSE integer ops, so nothing here may use them.
 */
#ifndef HYPERPY_GUEST_H
#define HYPERPY_GUEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- What the entry runtime (pvh_start.S or linux64_start.S) hands to guest_main ---- */

enum boot_entry {
    BOOT_ENTRY_PVH = 1,     /* Xen PVH: 32-bit entry from the ELF note, EBX = hvm_start_info */
    BOOT_ENTRY_LINUX64 = 2, /* Linux 64-bit boot protocol: RSI = boot_params ("zero page") */
};

struct boot_info {
    const char *cmdline;     /* NUL-terminated kernel command line; "" when there is none */
    uint64_t ram_bytes;      /* sum of the sizes of the type-1 (RAM) memory-map entries */
    uint32_t entry;          /* enum boot_entry: which entry protocol was used */
    uint32_t memmap_entries; /* number of memory-map entries the loader provided */
    const void *boot_struct; /* the raw hvm_start_info or boot_params */
};

/* Implemented by each guest. If it returns, the runtime resets the VM. */
void guest_main(const struct boot_info *bi);

/* ---- Port I/O and MMIO ---- */

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }

static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline uint16_t inw(uint16_t port)
{
    uint16_t v;
    __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline uint32_t inl(uint16_t port)
{
    uint32_t v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

/* MMIO at the access width the name says (device registers care: virtio, MSI-X, ACPI). */
static inline void mmio_write8(uint64_t addr, uint8_t v) { *(volatile uint8_t *)addr = v; }
static inline void mmio_write16(uint64_t addr, uint16_t v) { *(volatile uint16_t *)addr = v; }
static inline void mmio_write32(uint64_t addr, uint32_t v) { *(volatile uint32_t *)addr = v; }
static inline uint8_t mmio_read8(uint64_t addr) { return *(volatile uint8_t *)addr; }
static inline uint16_t mmio_read16(uint64_t addr) { return *(volatile uint16_t *)addr; }
static inline uint32_t mmio_read32(uint64_t addr) { return *(volatile uint32_t *)addr; }

static inline void cpu_relax(void) { __asm__ volatile("" : : : "memory"); }

/* ---- 8250/16550 UART on COM1 ---- */

#define COM1 0x3f8
#define UART_RBR (COM1 + 0) /* receive buffer (read, DLAB=0) */
#define UART_THR (COM1 + 0) /* transmit holding register (write, DLAB=0) */
#define UART_IER (COM1 + 1) /* interrupt enable: bit 0 RX data, bit 1 THR empty */
#define UART_IIR (COM1 + 2) /* interrupt identification (read) */
#define UART_LCR (COM1 + 3)
#define UART_MCR (COM1 + 4) /* modem control: bit 3 OUT2, bit 4 loopback */
#define UART_LSR (COM1 + 5) /* line status: bit 0 data ready, bit 5 THR empty */

#define UART_LSR_DR 0x01
#define UART_LSR_THRE 0x20
#define UART_MCR_LOOP 0x10

void putchar(char c);         /* waits (bounded) for LSR.THRE, then writes THR */
void print(const char *s);    /* s as is */
void puts(const char *s);     /* s and a newline, like libc */
void print_dec(uint64_t v);
void print_hex(uint64_t v);   /* "0x" and lowercase hex digits */

/* ---- Machine control ---- */

#define I8042_COMMAND_PORT 0x64
#define I8042_RESET 0xfe
#define BOOT_TIMER_PORT 0x3f0
#define BOOT_TIMER_MAGIC 123
#define POST_PORT 0x80

/* hyperpy's hardware-reduced ACPI sleep-control register (FADT SLEEP_CONTROL_REG, an I/O port):
 * SLP_TYP << 2 | SLP_EN; SLP_TYP 5 is \_S5_ (power off). */
#define HYPERPY_SLEEP_CONTROL_PORT 0x600
#define HYPERPY_SLP_EN 0x20
#define HYPERPY_S5_SLP_TYP 5

void boot_timer(void);          /* writes 123 to port 0x3f0 (the VMM's boot-time marker) */
__attribute__((noreturn)) void reset(void); /* i8042 pulse reset (0xfe to 0x64), then cli;hlt */
/* Power off through hyperpy's sleep-control register without reading the ACPI tables; where
 * that port is something else (QEMU q35: the PM1 status register, write-1-to-clear) nothing
 * happens and it resets instead, so the guest ends under QEMU's -no-reboot too. */
__attribute__((noreturn)) void poweroff_or_reset(void);
__attribute__((noreturn)) void halt_forever(void);

/* ---- Strings and the command line ---- */

size_t strlen(const char *s);
int strncmp(const char *a, const char *b, size_t n);
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);

/* Parses decimal or 0x-prefixed hex; false if s[0..len) is not a whole number. */
bool parse_u64(const char *s, size_t len, uint64_t *out);
/* True if the whitespace-separated cmdline has the word `key` or a `key=...` word. */
bool cmdline_has(const char *cmdline, const char *key);
/* Finds `key=value`: sets *val and *len to the value and returns true. */
bool cmdline_get(const char *cmdline, const char *key, const char **val, size_t *len);
/* `key=N` as a number, or `dflt` when absent or malformed. */
uint64_t cmdline_u64(const char *cmdline, const char *key, uint64_t dflt);

#endif
