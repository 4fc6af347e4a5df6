/* virtio-console (virtio 1.x section 5.3) through the modern PCI transport (device id 0x1043).
 *
 * No feature besides VERSION_1 (no MULTIPORT: only port 0, queues 0 = receiveq, 1 = transmitq).
 * Posts receive buffers, transmits "hello from virtio-console\n".
 * cmdline: rxwait=MS: also wait that long for input on port 0 (default 0: do not wait),
 * irq, timeout=MS.
 * Output (parsed by tests/virtio_expect.py):
 *   CONSOLE pci .. / CONSOLE caps .. / CONSOLE features ..      (info)
 *   CONSOLE tx OK
 *   with rxwait: CONSOLE rx <length> <printable bytes, others as '.'> | CONSOLE rx timeout
 *   CONSOLE irq OK <n> (with irq), CONSOLE done; then the i8042 reset.
 */
#include "virtio.h"

#define CONSOLE_TEXT "hello from virtio-console\n"
#define RX_BUFS 2
#define RX_SIZE 256

static struct virtio_dev dev;
static uint8_t rx_bufs[RX_BUFS][RX_SIZE] __attribute__((aligned(64)));
static const char tx_text[] = CONSOLE_TEXT;

void guest_main(const struct boot_info *bi)
{
    virtio_init(&dev, "CONSOLE", VIRTIO_TYPE_CONSOLE, 0, bi->cmdline);
    struct virtq *rxq = virtio_setup_queue(&dev, 0);
    struct virtq *txq = virtio_setup_queue(&dev, 1);
    virtio_driver_ok(&dev);

    uint8_t head_buf[VQ_MAX_SIZE] = {0};
    for (unsigned b = 0; b < RX_BUFS; b++) {
        struct vbuf buf = {rx_bufs[b], RX_SIZE, true};
        int head = virtq_add(rxq, &buf, 1);
        if (head < 0)
            virtio_fail(&dev, "rx queue full");
        head_buf[head] = (uint8_t)b;
    }
    virtq_kick(&dev, rxq);

    struct vbuf tx = {tx_text, sizeof(tx_text) - 1, false};
    virtq_transfer(&dev, txq, &tx, 1);
    puts("CONSOLE tx OK");

    uint32_t rxwait = (uint32_t)cmdline_u64(bi->cmdline, "rxwait", 0);
    if (rxwait) {
        uint32_t id, len;
        if (virtq_wait(&dev, rxq, rxwait, &id, &len)) {
            const uint8_t *p = rx_bufs[head_buf[id]];
            print("CONSOLE rx ");
            print_dec(len);
            putchar(' ');
            for (uint32_t i = 0; i < len && i < RX_SIZE; i++)
                putchar(p[i] >= ' ' && p[i] <= '~' ? (char)p[i] : '.');
            putchar('\n');
        } else {
            puts("CONSOLE rx timeout");
        }
    }
    virtio_finish(&dev);
    reset();
}
