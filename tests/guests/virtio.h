/* A small virtio-pci "modern" (virtio 1.x) driver for the device guests.
 *
 * Transport: virtio 1.x section 4.1 (PCI capabilities COMMON/NOTIFY/ISR/DEVICE/PCI), split
 * virtqueues (section 2.7), status handshake (3.1.1). Completions are polled from the used ring
 * unless `irq` is on the command line: then MSI-X is enabled and each completion must also
 * raise its interrupt. MSI-X table entry e delivers IDT vector VIRTIO_MSIX_VECTOR_BASE + e to
 * this CPU; entry 0 takes configuration changes, queue i uses entry 1 + i (the last entry when
 * the table is smaller; entry 0 for everything when it has one entry).
 *
 * cmdline: `irq` (above), `timeout=MS` (per request, default 5000), `zerobars` (test aid: clear
 * the device's memory BARs first, so that pci_bar() assigns them from 0xC0000000).
 *
 * Output lines start with the guest's prefix ("BLK", "NET", ...): "<P> pci bb:dd.f vvvv:dddd",
 * "<P> caps ..." (informational), and "<P> FAIL <reason>" on a fatal error (then reset).
 */
#ifndef HYPERPY_VIRTIO_H
#define HYPERPY_VIRTIO_H

#include "guest.h"
#include "intr.h"
#include "pci.h"

#include "virtio_defs.h"

#define VIRTIO_PCI_VENDOR 0x1af4
#define VIRTIO_PCI_MODERN_DEVICE_BASE 0x1040 /* device id = 0x1040 + virtio device type */
#define VIRTIO_TYPE_NET 1
#define VIRTIO_TYPE_BLOCK 2
#define VIRTIO_TYPE_CONSOLE 3
#define VIRTIO_TYPE_RNG 4
#define VIRTIO_TYPE_IOMMU 23

#define VIRTIO_MSIX_VECTOR_BASE 0x48 /* .. 0x4f: within intr.h's INTR_DYN range */
#define VIRTIO_MSIX_MAX 8   /* table entries programmed at most */
#define VQ_MAX_SIZE 64      /* queue size used: min(device maximum, this), a power of two */
#define VIRTIO_MAX_QUEUES 4
#define VIRTIO_DEFAULT_TIMEOUT_MS 5000

struct virtq {
    uint16_t index;     /* queue number */
    uint16_t size;      /* 0: not set up */
    uint16_t free_head, num_free;
    uint16_t avail_idx; /* shadow of avail->idx */
    uint16_t last_used;
    struct vring_desc *desc;
    struct vring_avail *avail;
    volatile struct vring_used *used;
    uint64_t notify_addr;
    uint16_t msix_entry;   /* with irq: the MSI-X entry of this queue */
    uint16_t irq_covered;  /* with irq: used entries below this index came after an interrupt */
    uint32_t irq_snapshot; /* with irq: virtio_irq_counts[msix_entry] when last looked at */
    uint64_t dma_offset;   /* added to every address given to the device (virtio_dev's) */
};

struct virtio_dev {
    const char *prefix;
    struct pci_dev pci;
    uint64_t common, notify, isr, device_cfg; /* MMIO addresses of the structures */
    uint32_t notify_mult, device_cfg_len;
    uint8_t caps_seen; /* bit n: a cfg_type n capability was found */
    uint64_t device_features, features;
    bool use_irq;
    uint16_t msix_entries;
    uint64_t msix_table;
    uint32_t irqs_waited; /* completions that arrived with their interrupt */
    uint32_t timeout_ms;
    /* Set between virtio_init and virtio_setup_queue (both 0 by default): ring_mem, one 4 KiB
     * page per queue index instead of the static ring pages; dma_offset, added to the ring and
     * buffer addresses the device is given (device address = guest address + dma_offset, e.g.
     * an IOVA window behind an IOMMU). */
    uint8_t *ring_mem;
    uint64_t dma_offset;
    struct virtq vq[VIRTIO_MAX_QUEUES];
};

struct vbuf {
    const void *addr;
    uint32_t len;
    bool device_writes; /* VRING_DESC_F_WRITE */
};

extern volatile uint32_t virtio_irq_counts[VIRTIO_MSIX_MAX]; /* interrupts per MSI-X entry */

__attribute__((noreturn)) void virtio_fail(const struct virtio_dev *d, const char *why);

/* Finds device `type` (modern id 0x1040+type, else its transitional id: net 0x1000, block
 * 0x1001, console 0x1003, entropy 0x1005; through its modern capabilities), prints "<P> pci ...",
 * maps its capabilities, enables MSI-X when `irq` is on the command line, resets it and
 * negotiates: features = device features & (wanted | VERSION_1 | ACCESS_PLATFORM).
 * Fails (prints, resets) if the device is missing, lacks VERSION_1 or rejects FEATURES_OK.
 * Leaves the status at ACKNOWLEDGE|DRIVER|FEATURES_OK: set up queues, then virtio_driver_ok. */
void virtio_init(struct virtio_dev *d, const char *prefix, unsigned type, uint64_t wanted,
                 const char *cmdline);
struct virtq *virtio_setup_queue(struct virtio_dev *d, uint16_t index);
void virtio_driver_ok(struct virtio_dev *d);
void virtio_reset(struct virtio_dev *d);
/* Ends a guest: with irq prints "<P> irq OK <completions waited by interrupt>", else
 * "<P> isr 0x<ISR status read>" (bit 0 must be set after completions without MSI-X), resets
 * the device, prints "<P> done". */
void virtio_finish(struct virtio_dev *d);
static inline bool virtio_has(const struct virtio_dev *d, unsigned bit) { return d->features >> bit & 1; }

/* Device-specific configuration, at the access width the name says. */
uint8_t virtio_cfg8(struct virtio_dev *d, uint32_t off);
uint16_t virtio_cfg16(struct virtio_dev *d, uint32_t off);
uint32_t virtio_cfg32(struct virtio_dev *d, uint32_t off);
uint64_t virtio_cfg64(struct virtio_dev *d, uint32_t off); /* two 32-bit reads, generation-checked */

/* Adds a descriptor chain and makes it available (no notify); returns the head or -1. */
int virtq_add(struct virtq *q, const struct vbuf *bufs, int n);
void virtq_kick(struct virtio_dev *d, struct virtq *q);
/* Takes one used element if there is one (frees its chain). */
bool virtq_get_used(struct virtq *q, uint32_t *id, uint32_t *len);
/* Waits (polls, or with `irq` sleeps for the interrupt) for one used element, at most
 * timeout_ms. With `irq` the interrupt must arrive too, else "<P> FAIL irq missing". */
bool virtq_wait(struct virtio_dev *d, struct virtq *q, uint32_t timeout_ms, uint32_t *id, uint32_t *len);
/* add + kick + wait for that chain; fails on timeout. Returns the used length. */
uint32_t virtq_transfer(struct virtio_dev *d, struct virtq *q, const struct vbuf *bufs, int n);

void print_hex_bytes(const void *p, size_t n); /* lowercase, two digits a byte, no spaces */
uint32_t fnv1a32(const void *p, size_t n);

#endif
