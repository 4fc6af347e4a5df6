/* virtio-blk (virtio 1.x section 5.2) through the modern PCI transport (device id 0x1042).
 *
 * cmdline: sector=N (default 1), write=1 (write the pattern to sector N), irq (MSI-X),
 * timeout=MS (per request, default 5000).
 * Output (see tests/virtio_expect.py, which parses it):
 *   BLK pci bb:dd.f 1af4:1042 / BLK caps ... / BLK features device 0x.. driver 0x..   (info)
 *   BLK offered <names of the block feature bits the device offers>                    (info)
 *   BLK capacity <sectors>
 *   BLK size_max <n> | BLK seg_max <n> | BLK blk_size <n> | BLK ro    (each only if offered)
 *   BLK read <sector> status <s> [data <first 16 bytes, hex> sum <fnv1a32 of 512 bytes, 8 hex>]
 *       for sector 0 and sector N
 *   with write=1: BLK write N status <s>
 *   BLK flush status <s> | BLK flush unsupported
 *   with write=1: BLK readback N status <s> [data .. sum ..], then BLK write N OK|MISMATCH
 *   BLK id status <s> [<GET_ID string: up to 20 bytes, to the first NUL; ? for space and
 *       unprintable bytes>]
 *   BLK read <capacity> status <s>         (one sector past the end: expected 1 = IOERR)
 *   BLK irq OK <n> (with irq), BLK done; then the i8042 reset.
 */
#include "virtio.h"


#define SECTOR 512
#define PATTERN_TEXT "hyperpy-blk-write"

static struct virtio_dev dev;
static struct virtio_blk_outhdr hdr __attribute__((aligned(16)));
static uint8_t data[SECTOR] __attribute__((aligned(512)));
static volatile uint8_t status __attribute__((aligned(16)));

static void line(const char *what)
{
    print("BLK ");
    print(what);
}

/* One request: header, optional data (device writes it for IN/GET_ID), status byte. */
static uint8_t request(uint32_t type, uint64_t sector, uint32_t len)
{
    hdr.type = type;
    hdr.ioprio = 0;
    hdr.sector = sector;
    status = 0xff;
    bool dev_writes = type != VIRTIO_BLK_T_OUT;
    struct vbuf bufs[3] = {{&hdr, sizeof(hdr), false}};
    int n = 1;
    if (len)
        bufs[n++] = (struct vbuf){data, len, dev_writes};
    bufs[n++] = (struct vbuf){(const void *)&status, 1, true};
    virtq_transfer(&dev, &dev.vq[0], bufs, n);
    return status;
}

static void print_status(uint8_t s)
{
    print(" status ");
    print_dec(s);
}

static void print_data(void)
{
    print(" data ");
    print_hex_bytes(data, 16);
    print(" sum ");
    print_hex_fixed(fnv1a32(data, SECTOR), 8);
}

static void read_sector(const char *what, uint64_t sector)
{
    memset(data, 0, SECTOR);
    uint8_t s = request(VIRTIO_BLK_T_IN, sector, SECTOR);
    line(what);
    putchar(' ');
    print_dec(sector);
    print_status(s);
    if (s == VIRTIO_BLK_S_OK)
        print_data();
    putchar('\n');
}

static void fill_pattern(uint64_t sector)
{
    size_t t = sizeof(PATTERN_TEXT) - 1;
    memcpy(data, PATTERN_TEXT, t);
    for (size_t i = t; i < SECTOR; i++)
        data[i] = (uint8_t)(i * 13 + sector);
}

static bool check_pattern(uint64_t sector)
{
    static uint8_t want[SECTOR];
    memcpy(want, data, SECTOR);
    fill_pattern(sector);
    bool same = memcmp(want, data, SECTOR) == 0;
    memcpy(data, want, SECTOR);
    return same;
}

/* Names of the block feature bits, each as its bit number (one byte) and a NUL-terminated
 * name; an empty name ends the list. */
static const char feature_names[] =
    "\x01SIZE_MAX\0\x02SEG_MAX\0\x04GEOMETRY\0\x05RO\0\x06" "BLK_SIZE\0\x09" "FLUSH\0"
    "\x0aTOPOLOGY\0\x0b" "CONFIG_WCE\0\x0cMQ\0\x0d" "DISCARD\0\x0eWRITE_ZEROES\0";

static void config_u32(unsigned bit, const char *name, uint32_t off)
{
    if (!virtio_has(&dev, bit))
        return;
    line(name);
    putchar(' ');
    print_dec(virtio_cfg32(&dev, off));
    putchar('\n');
}

void guest_main(const struct boot_info *bi)
{
    uint64_t wanted = 1ull << VIRTIO_BLK_F_SIZE_MAX | 1ull << VIRTIO_BLK_F_SEG_MAX |
                      1ull << VIRTIO_BLK_F_GEOMETRY | 1ull << VIRTIO_BLK_F_RO |
                      1ull << VIRTIO_BLK_F_BLK_SIZE | 1ull << VIRTIO_BLK_F_FLUSH;
    virtio_init(&dev, "BLK", VIRTIO_TYPE_BLOCK, wanted, bi->cmdline);
    virtio_setup_queue(&dev, 0);
    virtio_driver_ok(&dev);

    line("offered");
    for (const char *f = feature_names; *f; f += strlen(f) + 1)
        if (dev.device_features >> (unsigned)f[0] & 1) {
            putchar(' ');
            print(f + 1);
        }
    putchar('\n');

    uint64_t capacity = virtio_cfg64(&dev, offsetof(struct virtio_blk_config, capacity));
    line("capacity ");
    print_dec(capacity);
    putchar('\n');
    config_u32(VIRTIO_BLK_F_SIZE_MAX, "size_max", offsetof(struct virtio_blk_config, size_max));
    config_u32(VIRTIO_BLK_F_SEG_MAX, "seg_max", offsetof(struct virtio_blk_config, seg_max));
    config_u32(VIRTIO_BLK_F_BLK_SIZE, "blk_size", offsetof(struct virtio_blk_config, blk_size));
    if (virtio_has(&dev, VIRTIO_BLK_F_RO))
        line("ro\n");

    uint64_t sector = cmdline_u64(bi->cmdline, "sector", 1);
    bool do_write = cmdline_u64(bi->cmdline, "write", 0) != 0;
    read_sector("read", 0);
    read_sector("read", sector);

    if (do_write) {
        fill_pattern(sector);
        uint8_t s = request(VIRTIO_BLK_T_OUT, sector, SECTOR);
        line("write ");
        print_dec(sector);
        print_status(s);
        putchar('\n');
    }
    if (virtio_has(&dev, VIRTIO_BLK_F_FLUSH)) {
        uint8_t s = request(VIRTIO_BLK_T_FLUSH, 0, 0);
        line("flush");
        print_status(s);
        putchar('\n');
    } else {
        line("flush unsupported\n");
    }
    if (do_write) {
        read_sector("readback", sector);
        line("write ");
        print_dec(sector);
        puts(status == VIRTIO_BLK_S_OK && check_pattern(sector) ? " OK" : " MISMATCH");
    }

    memset(data, 0, SECTOR);
    uint8_t s = request(VIRTIO_BLK_T_GET_ID, 0, VIRTIO_BLK_ID_BYTES);
    line("id");
    print_status(s);
    if (s == VIRTIO_BLK_S_OK) {
        for (int i = 0; i < VIRTIO_BLK_ID_BYTES && data[i]; i++) {
            if (i == 0)
                putchar(' ');
            putchar(data[i] > ' ' && data[i] <= '~' ? (char)data[i] : '?');
        }
    }
    putchar('\n');

    s = request(VIRTIO_BLK_T_IN, capacity, SECTOR);
    line("read ");
    print_dec(capacity);
    print_status(s);
    putchar('\n');

    virtio_finish(&dev);
    reset();
}
