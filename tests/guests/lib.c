/* Shared runtime of the hyperpy test guests: serial output, reset, strings, and the two C
 * entry points that turn a loader's boot structure into a struct boot_info. */
#include "guest.h"

/* ---- Serial output (COM1, polled) ---- */

void putchar(char c)
{
    /* Bounded so a broken UART model cannot hang the guest: write anyway after the wait. */
    for (unsigned spins = 0; spins < 100000 && !(inb(UART_LSR) & UART_LSR_THRE); spins++)
        cpu_relax();
    outb(UART_THR, (uint8_t)c);
}

void print(const char *s)
{
    while (*s)
        putchar(*s++);
}

void puts(const char *s)
{
    print(s);
    putchar('\n');
}

void print_dec(uint64_t v)
{
    char buf[21];
    int i = sizeof(buf) - 1;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    print(&buf[i]);
}

void print_hex(uint64_t v)
{
    char buf[19];
    int i = sizeof(buf) - 1;
    buf[i] = 0;
    do {
        buf[--i] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    buf[--i] = 'x';
    buf[--i] = '0';
    print(&buf[i]);
}

/* ---- Machine control ---- */

void boot_timer(void) { outb(BOOT_TIMER_PORT, BOOT_TIMER_MAGIC); }

void halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

void reset(void)
{
    outb(I8042_COMMAND_PORT, I8042_RESET);
    halt_forever();
}

void poweroff_or_reset(void)
{
    outb(HYPERPY_SLEEP_CONTROL_PORT, HYPERPY_S5_SLP_TYP << 2 | HYPERPY_SLP_EN);
    reset();
}

/* ---- Strings (also what gcc may call for struct copies) ---- */

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++) {
        if (*a != *b)
            return (unsigned char)*a - (unsigned char)*b;
        if (!*a)
            break;
    }
    return 0;
}

void *memset(void *d, int c, size_t n)
{
    volatile unsigned char *p = d; /* volatile: keep gcc from turning this into a memset call */
    while (n--)
        *p++ = (unsigned char)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    volatile unsigned char *p = d;
    const unsigned char *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *p = a, *q = b;
    for (; n; n--, p++, q++)
        if (*p != *q)
            return *p - *q;
    return 0;
}

/* ---- Command line ---- */

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

bool parse_u64(const char *s, size_t len, uint64_t *out)
{
    uint64_t v = 0;
    unsigned base = 10;
    if (len > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
        len -= 2;
    }
    if (len == 0)
        return false;
    for (; len; len--, s++) {
        unsigned d;
        if (*s >= '0' && *s <= '9')
            d = (unsigned)(*s - '0');
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            d = (unsigned)(*s - 'a' + 10);
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            d = (unsigned)(*s - 'A' + 10);
        else
            return false;
        v = v * base + d;
    }
    *out = v;
    return true;
}

/* Looks for the word `key` or `key=value` among the whitespace-separated words. */
static bool find_word(const char *cmdline, const char *key, const char **val, size_t *vlen)
{
    size_t klen = strlen(key);
    const char *p = cmdline;
    while (*p) {
        while (is_space(*p))
            p++;
        const char *w = p;
        while (*p && !is_space(*p))
            p++;
        size_t wlen = (size_t)(p - w);
        if (wlen >= klen && strncmp(w, key, klen) == 0 && (wlen == klen || w[klen] == '=')) {
            if (val) {
                *val = wlen == klen ? w + wlen : w + klen + 1;
                *vlen = wlen == klen ? 0 : wlen - klen - 1;
            }
            return true;
        }
    }
    return false;
}

bool cmdline_has(const char *cmdline, const char *key) { return find_word(cmdline, key, NULL, NULL); }

bool cmdline_get(const char *cmdline, const char *key, const char **val, size_t *len)
{
    return find_word(cmdline, key, val, len);
}

uint64_t cmdline_u64(const char *cmdline, const char *key, uint64_t dflt)
{
    const char *v;
    size_t n;
    uint64_t out;
    if (cmdline_get(cmdline, key, &v, &n) && parse_u64(v, n, &out))
        return out;
    return dflt;
}

/* ---- Entry runtimes: called from the assembly with the stack set up and .bss cleared ---- */

static struct boot_info boot_info;

/* Xen PVH: struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h).
 * Only the documented fields are used; the offsets are checked below. */
struct hvm_start_info {
    uint32_t magic;          /* 0: 0x336ec578 ("xEn3" with the top bit of the E set) */
    uint32_t version;        /* 4: 0 or 1; the memmap fields exist from version 1 */
    uint32_t flags;          /* 8 */
    uint32_t nr_modules;     /* 12 */
    uint64_t modlist_paddr;  /* 16 */
    uint64_t cmdline_paddr;  /* 24 */
    uint64_t rsdp_paddr;     /* 32 */
    uint64_t memmap_paddr;   /* 40 */
    uint32_t memmap_entries; /* 48 */
    uint32_t reserved;       /* 52 */
};
struct hvm_memmap_table_entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type; /* 1 = RAM, as in the E820 */
    uint32_t reserved;
};
#define HVM_START_MAGIC 0x336ec578u
_Static_assert(offsetof(struct hvm_start_info, cmdline_paddr) == 24, "hvm_start_info layout");
_Static_assert(offsetof(struct hvm_start_info, memmap_paddr) == 40, "hvm_start_info layout");
_Static_assert(offsetof(struct hvm_start_info, memmap_entries) == 48, "hvm_start_info layout");
_Static_assert(sizeof(struct hvm_memmap_table_entry) == 24, "hvm memmap entry layout");

#define E820_RAM 1

__attribute__((noreturn)) void runtime_pvh(uint64_t start_info_paddr)
{
    const struct hvm_start_info *si = (const struct hvm_start_info *)start_info_paddr;
    if (si->magic != HVM_START_MAGIC) {
        puts("bad start_info magic");
        reset();
    }
    boot_info.entry = BOOT_ENTRY_PVH;
    boot_info.boot_struct = si;
    boot_info.cmdline = si->cmdline_paddr ? (const char *)si->cmdline_paddr : "";
    if (si->version >= 1 && si->memmap_paddr) {
        const struct hvm_memmap_table_entry *e = (const void *)si->memmap_paddr;
        boot_info.memmap_entries = si->memmap_entries;
        for (uint32_t i = 0; i < si->memmap_entries; i++)
            if (e[i].type == E820_RAM)
                boot_info.ram_bytes += e[i].size;
    }
    guest_main(&boot_info);
    reset();
}

/* Linux boot protocol: struct boot_params ("zero page"), by the offsets that
 * Documentation/arch/x86/zero-page.rst and boot.rst give. */
#define BP_EXT_CMD_LINE_PTR 0x0c8 /* u32: high 32 bits of cmd_line_ptr */
#define BP_E820_ENTRIES 0x1e8     /* u8 */
#define BP_CMD_LINE_PTR 0x228     /* u32: setup_header.cmd_line_ptr */
#define BP_E820_TABLE 0x2d0       /* struct boot_e820_entry[E820_MAX_ENTRIES_ZEROPAGE] */
#define BP_E820_MAX 128

struct __attribute__((packed)) boot_e820_entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type;
};
_Static_assert(sizeof(struct boot_e820_entry) == 20, "boot_e820_entry layout");

static uint32_t bp_u32(const uint8_t *bp, unsigned off) { return *(const uint32_t *)(bp + off); }

__attribute__((noreturn)) void runtime_linux(uint64_t boot_params_paddr)
{
    const uint8_t *bp = (const uint8_t *)boot_params_paddr;
    uint64_t cmdline = bp_u32(bp, BP_CMD_LINE_PTR) | (uint64_t)bp_u32(bp, BP_EXT_CMD_LINE_PTR) << 32;
    unsigned n = bp[BP_E820_ENTRIES];
    if (n > BP_E820_MAX)
        n = BP_E820_MAX;
    boot_info.entry = BOOT_ENTRY_LINUX64;
    boot_info.boot_struct = bp;
    boot_info.cmdline = cmdline ? (const char *)cmdline : "";
    boot_info.memmap_entries = n;
    const struct boot_e820_entry *e = (const void *)(bp + BP_E820_TABLE);
    for (unsigned i = 0; i < n; i++)
        if (e[i].type == E820_RAM)
            boot_info.ram_bytes += e[i].size;
    guest_main(&boot_info);
    reset();
}
