/* ACPI: finds and checks the tables, then powers off through ACPI.
 *
 * RSDP: the PVH start_info's rsdp_paddr, boot_params.acpi_rsdp_addr (Linux 64-bit entry), else
 * a scan of 0xE0000-0xFFFFF on 16-byte boundaries for "RSD PTR ". Root table: the XSDT when the
 * RSDP is revision 2+ and names one, else the RSDT. Power-off: with HW_REDUCED_ACPI, write
 * SLP_TYPa << 2 | SLP_EN (bit 5) to the FADT's SLEEP_CONTROL_REG; otherwise enable ACPI mode
 * through SMI_CMD if SCI_EN is clear, then write SLP_TYPa << 10 | SLP_EN (bit 13) to PM1a_CNT
 * (and SLP_TYPb to PM1b_CNT if present). SLP_TYPa/b are the first two elements of the DSDT's
 * \_S5_ package. (ACPI 6.x sections 5.2.5 RSDP, 5.2.9 FADT, 5.2.12 MADT, 4.8.3.7 sleep
 * registers, 7.4.2 \_Sx; MCFG: PCI Firmware spec 4.1.2.)
 *
 * Output (parsed by tests/virtio_expect.py):
 *   ACPI rsdp <addr> from <pvh|bootparams|scan> rev <r> ok|bad     (addr: info)
 *   ACPI table <SIG> len <n> ok|bad         (the root table first, then each entry in order;
 *                                            DSDT right after FACP)
 *   ACPI fadt rev <r> hw_reduced <0|1>
 *   ACPI _S5_ <SLP_TYPa> <SLP_TYPb> | ACPI _S5_ missing
 *   ACPI madt lapics <enabled local (x2)APICs> ioapics <n>
 *   ACPI mcfg base 0x<ecam base> seg <s> bus <start>-<end>      (each MCFG allocation)
 *   ACPI smi_cmd 0x<port> acpi_enable 0x<value>  (not HW_REDUCED, SCI_EN clear: switching
 *                                                 to ACPI mode; info)
 *   ACPI sci_en <0|1> (not HW_REDUCED: after enabling ACPI mode)
 *   ACPI poweroff
 *   then nothing, or after 2 s: ACPI poweroff failed, and the i8042 reset.
 * Fatal problems: "ACPI FAIL <reason>", then the i8042 reset.
 */
#include "guest.h"
#include "intr.h"

struct __attribute__((packed)) rsdp {
    char signature[8];
    uint8_t checksum;
    char oem_id[6];
    uint8_t revision;
    uint32_t rsdt;
    uint32_t length; /* revision 2+ */
    uint64_t xsdt;
    uint8_t ext_checksum;
    uint8_t reserved[3];
};

struct __attribute__((packed)) sdt {
    char signature[4];
    uint32_t length;
    uint8_t revision;
    uint8_t checksum;
    char oem_id[6];
    char oem_table_id[8];
    uint32_t oem_revision;
    uint32_t creator_id;
    uint32_t creator_revision;
};
_Static_assert(sizeof(struct sdt) == 36, "ACPI table header");

struct __attribute__((packed)) gas {
    uint8_t space_id; /* 0 system memory, 1 system I/O */
    uint8_t bit_width;
    uint8_t bit_offset;
    uint8_t access_size; /* 1 byte, 2 word, 3 dword, 4 qword */
    uint64_t address;
};

/* FADT field offsets (ACPI 6.x table 5.9). */
#define FADT_FIRMWARE_CTRL 36
#define FADT_DSDT 40
#define FADT_SCI_INT 46
#define FADT_SMI_CMD 48
#define FADT_ACPI_ENABLE 52
#define FADT_PM1A_CNT_BLK 64
#define FADT_PM1B_CNT_BLK 68
#define FADT_PM1_CNT_LEN 89
#define FADT_FLAGS 112
#define FADT_X_DSDT 140
#define FADT_X_PM1A_CNT_BLK 172
#define FADT_X_PM1B_CNT_BLK 184
#define FADT_SLEEP_CONTROL_REG 244
#define FADT_HW_REDUCED_ACPI (1u << 20)

#define PM1_SCI_EN 0x0001
#define PM1_SLP_TYP_SHIFT 10
#define PM1_SLP_EN (1u << 13)
#define SLEEP_CTL_TYP_SHIFT 2
#define SLEEP_CTL_SLP_EN (1u << 5)

#define MAX_TABLE_LEN (1u << 20)

static void fail(const char *why)
{
    print("ACPI FAIL ");
    puts(why);
    reset();
}

static bool checksum_ok(const void *p, uint32_t len)
{
    const uint8_t *b = p;
    uint8_t sum = 0;
    for (uint32_t i = 0; i < len; i++)
        sum = (uint8_t)(sum + b[i]);
    return sum == 0;
}

static void print_sig(const char *s)
{
    for (int i = 0; i < 4; i++)
        putchar(s[i] > ' ' && s[i] <= '~' ? s[i] : '?');
}

static uint32_t rd32(const void *base, uint32_t off) { return *(const uint32_t *)((const uint8_t *)base + off); }
static uint64_t rd64(const void *base, uint32_t off) { return *(const uint64_t *)((const uint8_t *)base + off); }

/* A table at addr: printed as "ACPI table SIG len N ok|bad"; NULL if it cannot be read. */
static const struct sdt *table(uint64_t addr)
{
    if (!addr || addr >= (4ull << 30) - sizeof(struct sdt)) {
        print("ACPI table at ");
        print_hex(addr);
        puts(" unmapped");
        return NULL;
    }
    const struct sdt *t = (const struct sdt *)addr;
    bool sane = t->length >= sizeof(struct sdt) && t->length <= MAX_TABLE_LEN;
    print("ACPI table ");
    print_sig(t->signature);
    print(" len ");
    print_dec(t->length);
    puts(sane && checksum_ok(t, t->length) ? " ok" : " bad");
    return sane ? t : NULL;
}

static const struct rsdp *find_rsdp(const struct boot_info *bi, const char **from)
{
    const uint8_t *bs = bi->boot_struct;
    uint64_t addr = 0;
    if (bi->entry == BOOT_ENTRY_PVH) {
        addr = rd64(bs, 32); /* hvm_start_info.rsdp_paddr */
        *from = "pvh";
    } else {
        addr = rd64(bs, 0x070); /* boot_params.acpi_rsdp_addr */
        *from = "bootparams";
    }
    if (addr && addr < (4ull << 30))
        return (const struct rsdp *)addr;
    *from = "scan";
    for (uint64_t a = 0xe0000; a < 0x100000; a += 16)
        if (memcmp((const void *)a, "RSD PTR ", 8) == 0 && checksum_ok((const void *)a, 20))
            return (const struct rsdp *)a;
    return NULL;
}

/* An AML integer data object (ACPI 6.x 20.2.3) in [p, end): returns the bytes it takes, 0 if
 * it is not one (or runs past end). */
static int aml_integer(const uint8_t *p, const uint8_t *end, uint64_t *v)
{
    if (p >= end)
        return 0;
    int n;
    switch (p[0]) {
    case 0x00: *v = 0; return 1; /* ZeroOp */
    case 0x01: *v = 1; return 1; /* OneOp */
    case 0xff: *v = ~0ull; return 1; /* OnesOp */
    case 0x0a: n = 2; break; /* BytePrefix */
    case 0x0b: n = 3; break; /* WordPrefix */
    case 0x0c: n = 5; break; /* DWordPrefix */
    default: return 0;
    }
    if (end - p < n)
        return 0;
    *v = 0;
    for (int i = n - 1; i >= 1; i--)
        *v = *v << 8 | p[i];
    return n;
}

/* \_S5_: Name(_S5_, Package(){SLP_TYPa, SLP_TYPb, ...}) in the DSDT. */
static bool find_s5(const struct sdt *dsdt, uint64_t *a, uint64_t *b)
{
    const uint8_t *p = (const uint8_t *)dsdt, *end = p + dsdt->length;
    for (const uint8_t *s = p + sizeof(struct sdt); end - s >= 8; s++) {
        if (memcmp(s, "_S5_", 4) != 0 || s[4] != 0x12) /* PackageOp */
            continue;
        const uint8_t *q = s + 5;
        q += 1 + (q[0] >> 6); /* PkgLength: lead byte bits 7:6 = number of following bytes */
        if (q >= end)
            continue;
        uint8_t n = *q++; /* NumElements */
        int used = aml_integer(q, end, a);
        if (n < 1 || !used)
            continue;
        *b = 0;
        if (n >= 2)
            aml_integer(q + used, end, b);
        return true;
    }
    return false;
}

/* Writes a generic address register at its access width (bit width when access_size is 0). */
static bool gas_write(const struct gas *g, uint32_t v)
{
    unsigned bytes = g->access_size ? 1u << (g->access_size - 1) : (g->bit_width + 7u) / 8;
    if (!g->address || bytes == 0 || bytes > 4)
        return false;
    if (g->space_id == 1) {
        uint16_t port = (uint16_t)g->address;
        if (bytes == 1) outb(port, (uint8_t)v);
        else if (bytes == 2) outw(port, (uint16_t)v);
        else outl(port, v);
        return true;
    }
    if (g->space_id == 0 && g->address < (4ull << 30)) {
        if (bytes == 1) mmio_write8(g->address, (uint8_t)v);
        else if (bytes == 2) mmio_write16(g->address, (uint16_t)v);
        else mmio_write32(g->address, v);
        return true;
    }
    return false;
}

static uint32_t gas_read(const struct gas *g)
{
    unsigned bytes = g->access_size ? 1u << (g->access_size - 1) : (g->bit_width + 7u) / 8;
    if (g->space_id == 1) {
        uint16_t port = (uint16_t)g->address;
        return bytes == 1 ? inb(port) : bytes == 2 ? inw(port) : inl(port);
    }
    if (g->space_id == 0 && g->address && g->address < (4ull << 30))
        return bytes == 1 ? mmio_read8(g->address) : bytes == 2 ? mmio_read16(g->address) : mmio_read32(g->address);
    return 0;
}

/* PM1x_CNT as a GAS: the X_ field when the FADT has it and it is set, else the I/O port block. */
static struct gas pm1_cnt(const struct sdt *fadt, uint32_t x_off, uint32_t blk_off)
{
    struct gas g = {0};
    if (fadt->length >= x_off + sizeof(struct gas))
        memcpy(&g, (const uint8_t *)fadt + x_off, sizeof(g));
    if (!g.address) {
        g.space_id = 1;
        g.bit_width = 16;
        g.access_size = 2;
        g.address = rd32(fadt, blk_off);
        uint8_t len = ((const uint8_t *)fadt)[FADT_PM1_CNT_LEN];
        if (len && len < 2)
            g.bit_width = 8, g.access_size = 1;
    }
    return g;
}

static void madt(const struct sdt *t)
{
    const uint8_t *p = (const uint8_t *)t;
    unsigned lapics = 0, ioapics = 0;
    for (uint32_t off = sizeof(struct sdt) + 8; off + 2 <= t->length;) {
        uint8_t type = p[off], len = p[off + 1];
        if (len < 2 || off + len > t->length)
            break;
        if (type == 0 && len >= 8 && (rd32(p, off + 4) & 1)) /* Processor Local APIC */
            lapics++;
        else if (type == 9 && len >= 16 && (rd32(p, off + 8) & 1)) /* Processor Local x2APIC */
            lapics++;
        else if (type == 1) /* I/O APIC */
            ioapics++;
        off += len;
    }
    print("ACPI madt lapics ");
    print_dec(lapics);
    print(" ioapics ");
    print_dec(ioapics);
    putchar('\n');
}

static void mcfg(const struct sdt *t)
{
    const uint8_t *p = (const uint8_t *)t;
    for (uint32_t off = sizeof(struct sdt) + 8; off + 16 <= t->length; off += 16) {
        print("ACPI mcfg base ");
        print_hex(rd64(p, off));
        print(" seg ");
        print_dec(*(const uint16_t *)(p + off + 8));
        print(" bus ");
        print_dec(p[off + 10]);
        putchar('-');
        print_dec(p[off + 11]);
        putchar('\n');
    }
}

void guest_main(const struct boot_info *bi)
{
    const char *from;
    const struct rsdp *r = find_rsdp(bi, &from);
    if (!r)
        fail("no RSDP");
    bool r_ok = memcmp(r->signature, "RSD PTR ", 8) == 0 && checksum_ok(r, 20) &&
                (r->revision < 2 || (r->length >= 36 && r->length < 4096 && checksum_ok(r, r->length)));
    print("ACPI rsdp ");
    print_hex((uint64_t)r);
    print(" from ");
    print(from);
    print(" rev ");
    print_dec(r->revision);
    puts(r_ok ? " ok" : " bad");

    bool use_xsdt = r->revision >= 2 && r->xsdt;
    const struct sdt *root = table(use_xsdt ? r->xsdt : r->rsdt);
    if (!root)
        fail("no root table");
    unsigned esize = use_xsdt ? 8 : 4;
    const struct sdt *fadt = NULL, *dsdt = NULL;
    for (uint32_t off = sizeof(struct sdt); off + esize <= root->length; off += esize) {
        uint64_t a = use_xsdt ? rd64(root, off) : rd32(root, off);
        const struct sdt *t = table(a);
        if (!t)
            continue;
        if (!memcmp(t->signature, "FACP", 4)) {
            fadt = t;
            uint64_t d = t->length >= FADT_X_DSDT + 8 ? rd64(t, FADT_X_DSDT) : 0;
            dsdt = table(d ? d : rd32(t, FADT_DSDT));
        } else if (!memcmp(t->signature, "APIC", 4)) {
            madt(t);
        } else if (!memcmp(t->signature, "MCFG", 4)) {
            mcfg(t);
        }
    }
    if (!fadt)
        fail("no FADT");

    bool hw_reduced = fadt->length >= FADT_FLAGS + 4 && (rd32(fadt, FADT_FLAGS) & FADT_HW_REDUCED_ACPI);
    print("ACPI fadt rev ");
    print_dec(fadt->revision);
    print(" hw_reduced ");
    print_dec(hw_reduced);
    putchar('\n');

    uint64_t typ_a = 0, typ_b = 0;
    if (!dsdt || !find_s5(dsdt, &typ_a, &typ_b)) {
        puts("ACPI _S5_ missing");
        fail("cannot power off without \\_S5_");
    }
    print("ACPI _S5_ ");
    print_dec(typ_a & 0xff);
    putchar(' ');
    print_dec(typ_b & 0xff);
    putchar('\n');
    typ_a &= 7;
    typ_b &= 7;

    if (hw_reduced) {
        struct gas ctl = {0};
        if (fadt->length >= FADT_SLEEP_CONTROL_REG + sizeof(struct gas))
            memcpy(&ctl, (const uint8_t *)fadt + FADT_SLEEP_CONTROL_REG, sizeof(ctl));
        puts("ACPI poweroff");
        if (!gas_write(&ctl, (uint32_t)(typ_a << SLEEP_CTL_TYP_SHIFT | SLEEP_CTL_SLP_EN)))
            puts("ACPI sleep control register unusable");
    } else {
        struct gas a = pm1_cnt(fadt, FADT_X_PM1A_CNT_BLK, FADT_PM1A_CNT_BLK);
        struct gas b = pm1_cnt(fadt, FADT_X_PM1B_CNT_BLK, FADT_PM1B_CNT_BLK);
        uint32_t smi_cmd = rd32(fadt, FADT_SMI_CMD);
        uint8_t enable = ((const uint8_t *)fadt)[FADT_ACPI_ENABLE];
        if (!(gas_read(&a) & PM1_SCI_EN) && smi_cmd && enable) {
            print("ACPI smi_cmd ");
            print_hex(smi_cmd);
            print(" acpi_enable ");
            print_hex(enable);
            putchar('\n');
            outb((uint16_t)smi_cmd, enable); /* legacy -> ACPI mode (ACPI 6.x 16.3.1) */
            deadline_start(1000);
            while (!(gas_read(&a) & PM1_SCI_EN) && !deadline_passed())
                cpu_relax();
            deadline_stop();
        }
        print("ACPI sci_en ");
        print_dec(gas_read(&a) & PM1_SCI_EN);
        putchar('\n');
        puts("ACPI poweroff");
        uint32_t keep = ~(7u << PM1_SLP_TYP_SHIFT | PM1_SLP_EN);
        if (b.address)
            gas_write(&b, (gas_read(&b) & keep) | (uint32_t)typ_b << PM1_SLP_TYP_SHIFT | PM1_SLP_EN);
        if (!gas_write(&a, (gas_read(&a) & keep) | (uint32_t)typ_a << PM1_SLP_TYP_SHIFT | PM1_SLP_EN))
            puts("ACPI PM1a_CNT unusable");
    }
    delay_ms(2000);
    puts("ACPI poweroff failed");
    reset();
}
