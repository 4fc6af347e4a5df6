/* virtio-rng / entropy device (virtio 1.x section 5.4), modern PCI transport (id 0x1044).
 *
 * Fills two 64-byte buffers from the one request queue (a request may return fewer bytes
 * than asked: each request is one line) and checks them.
 * cmdline: irq, timeout=MS.
 * Output (parsed by tests/virtio_expect.py):
 *   RNG pci .. / RNG caps .. / RNG features ..                  (info)
 *   RNG <n> bytes <n bytes as hex>      (one line a request, until 64 bytes; twice)
 *   RNG nonzero OK | RNG all zero       (the first 64 bytes)
 *   RNG distinct OK | RNG repeated      (the second 64 bytes differ from the first)
 *   RNG irq OK <n> (with irq), RNG done; then the i8042 reset.
 */
#include "virtio.h"

#define RNG_BYTES 64

static struct virtio_dev dev;
static uint8_t pool[2][RNG_BYTES] __attribute__((aligned(64)));

static void fill(struct virtq *q, uint8_t *buf)
{
    uint32_t have = 0;
    for (int tries = 0; have < RNG_BYTES && tries < 16; tries++) {
        struct vbuf b = {buf + have, RNG_BYTES - have, true};
        uint32_t n = virtq_transfer(&dev, q, &b, 1);
        if (n > RNG_BYTES - have)
            virtio_fail(&dev, "used length larger than the buffer");
        print("RNG ");
        print_dec(n);
        print(" bytes ");
        print_hex_bytes(buf + have, n);
        putchar('\n');
        have += n;
    }
    if (have < RNG_BYTES)
        virtio_fail(&dev, "too few bytes");
}

void guest_main(const struct boot_info *bi)
{
    virtio_init(&dev, "RNG", VIRTIO_TYPE_RNG, 0, bi->cmdline);
    struct virtq *q = virtio_setup_queue(&dev, 0);
    virtio_driver_ok(&dev);

    fill(q, pool[0]);
    bool nonzero = false;
    for (int i = 0; i < RNG_BYTES; i++)
        nonzero |= pool[0][i] != 0;
    puts(nonzero ? "RNG nonzero OK" : "RNG all zero");
    fill(q, pool[1]);
    puts(memcmp(pool[0], pool[1], RNG_BYTES) ? "RNG distinct OK" : "RNG repeated");

    virtio_finish(&dev);
    reset();
}
