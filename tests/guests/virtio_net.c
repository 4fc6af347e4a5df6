/* virtio-net (virtio 1.x section 5.1) through the modern PCI transport (device id 0x1041).
 *
 * Negotiates only MAC and STATUS (no offloads, no mergeable buffers: every buffer starts with
 * the 12-byte struct virtio_net_hdr_v1). Posts NET_RX_BUFS receive buffers, transmits one
 * 60-byte frame (broadcast destination, own MAC source, ethertype 0x88B5, payload
 * "hyperpy-net-test", zero padding), then waits for a received frame of ethertype 0x88B5
 * (frames of other types are put back unprinted).
 *
 * cmdline: rxwait=MS (per received frame, default 10000; 0 skips receiving), irq, timeout=MS.
 * Output (parsed by tests/virtio_expect.py):
 *   NET pci .. / NET caps .. / NET features ..                 (info)
 *   NET mac xx:xx:xx:xx:xx:xx | NET mac none
 *   NET link up|down                                            (if STATUS is offered)
 *   NET tx OK
 *   NET rx <frame length> 0x88b5 <payload to the first NUL or unprintable byte>
 *     | NET rx timeout | NET rx skipped
 *   NET irq OK <n> (with irq), NET done; then the i8042 reset.
 */
#include "virtio.h"


#define NET_RX_BUFS 8
#define NET_BUF_SIZE 2048
#define NET_ETHERTYPE 0x88b5
#define NET_PAYLOAD "hyperpy-net-test"
#define ETH_MIN_FRAME 60
#define RXQ 0
#define TXQ 1

static struct virtio_dev dev;
static uint8_t rx_bufs[NET_RX_BUFS][NET_BUF_SIZE] __attribute__((aligned(64)));
static uint8_t rx_of_head[VQ_MAX_SIZE]; /* descriptor head -> rx buffer */
static struct virtio_net_hdr_v1 tx_hdr __attribute__((aligned(16)));
static uint8_t tx_frame[ETH_MIN_FRAME] __attribute__((aligned(16)));
static uint8_t mac[6];

static void post_rx(struct virtq *q, unsigned b)
{
    struct vbuf buf = {rx_bufs[b], NET_BUF_SIZE, true};
    int head = virtq_add(q, &buf, 1);
    if (head < 0)
        virtio_fail(&dev, "rx queue full");
    rx_of_head[head] = (uint8_t)b;
}

static void print_mac(const uint8_t *m)
{
    for (int i = 0; i < 6; i++) {
        if (i)
            putchar(':');
        print_hex_fixed(m[i], 2);
    }
}

void guest_main(const struct boot_info *bi)
{
    virtio_init(&dev, "NET", VIRTIO_TYPE_NET, 1ull << VIRTIO_NET_F_MAC | 1ull << VIRTIO_NET_F_STATUS,
                bi->cmdline);
    struct virtq *rxq = virtio_setup_queue(&dev, RXQ);
    struct virtq *txq = virtio_setup_queue(&dev, TXQ);
    virtio_driver_ok(&dev);

    print("NET mac ");
    if (virtio_has(&dev, VIRTIO_NET_F_MAC)) {
        for (int i = 0; i < 6; i++)
            mac[i] = virtio_cfg8(&dev, offsetof(struct virtio_net_config, mac) + i);
        print_mac(mac);
        putchar('\n');
    } else {
        static const uint8_t fallback[6] = {0x02, 0, 0, 0, 0, 0x01};
        memcpy(mac, fallback, 6);
        puts("none");
    }
    if (virtio_has(&dev, VIRTIO_NET_F_STATUS)) {
        uint16_t st = virtio_cfg16(&dev, offsetof(struct virtio_net_config, status));
        puts(st & VIRTIO_NET_S_LINK_UP ? "NET link up" : "NET link down");
    }

    /* Receive buffers first, so that a reply to our frame has somewhere to go. */
    uint32_t rxwait = (uint32_t)cmdline_u64(bi->cmdline, "rxwait", 10000);
    if (rxwait) {
        for (unsigned b = 0; b < NET_RX_BUFS && b < rxq->size; b++)
            post_rx(rxq, b);
        virtq_kick(&dev, rxq);
    }

    memset(&tx_hdr, 0, sizeof(tx_hdr));
    memset(tx_frame, 0xff, 6);         /* destination: broadcast */
    memcpy(tx_frame + 6, mac, 6);      /* source */
    tx_frame[12] = NET_ETHERTYPE >> 8; /* ethertype, big-endian */
    tx_frame[13] = NET_ETHERTYPE & 0xff;
    memcpy(tx_frame + 14, NET_PAYLOAD, sizeof(NET_PAYLOAD) - 1);
    struct vbuf tx[2] = {{&tx_hdr, sizeof(tx_hdr), false}, {tx_frame, sizeof(tx_frame), false}};
    virtq_transfer(&dev, txq, tx, 2);
    puts("NET tx OK");

    if (!rxwait) {
        puts("NET rx skipped");
    } else {
        bool got = false;
        for (int frames = 0; frames < 64 && !got; frames++) {
            uint32_t id, len;
            if (!virtq_wait(&dev, rxq, rxwait, &id, &len))
                break;
            unsigned b = rx_of_head[id];
            const uint8_t *f = rx_bufs[b] + sizeof(struct virtio_net_hdr_v1);
            uint32_t flen = len >= sizeof(struct virtio_net_hdr_v1) ? len - sizeof(struct virtio_net_hdr_v1) : 0;
            if (flen >= 14 && (f[12] << 8 | f[13]) == NET_ETHERTYPE) {
                print("NET rx ");
                print_dec(flen);
                print(" 0x");
                print_hex_fixed(NET_ETHERTYPE, 4);
                putchar(' ');
                for (uint32_t i = 14; i < flen && f[i] >= ' ' && f[i] <= '~'; i++)
                    putchar((char)f[i]);
                putchar('\n');
                got = true;
            } else {
                post_rx(rxq, b); /* not ours: give the buffer back */
                virtq_kick(&dev, rxq);
            }
        }
        if (!got)
            puts("NET rx timeout");
    }
    virtio_finish(&dev);
    reset();
}
