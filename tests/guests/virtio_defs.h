/* The virtio definitions the device guests use: from the Linux UAPI headers when they are
 * installed (linux-libc-dev; they compile freestanding), else the same names defined here from
 * the virtio 1.x specification (sections 2.7 split virtqueues, 3.1 status, 4.1.4 PCI
 * capabilities, 5.1 net, 5.2 block, 6 reserved feature bits). A gcc installed without its
 * recommends has no UAPI headers, and the guests must still build. Build with
 * -DHYPERPY_NO_UAPI to force the fallback: tests/test_virtio_guests_qemu.py checks that both
 * give byte-identical images.
 */
#ifndef HYPERPY_VIRTIO_DEFS_H
#define HYPERPY_VIRTIO_DEFS_H

#include <stdint.h>

#if !defined(HYPERPY_NO_UAPI) && __has_include(<linux/virtio_pci.h>) && __has_include(<linux/virtio_net.h>)

#include <linux/virtio_blk.h>
#include <linux/virtio_config.h>
#include <linux/virtio_net.h>
#include <linux/virtio_pci.h>
#include <linux/virtio_ring.h>

#else /* fallback: the spec's names and layouts (all little-endian) */

/* 3.1 Device status field */
#define VIRTIO_CONFIG_S_ACKNOWLEDGE 1
#define VIRTIO_CONFIG_S_DRIVER 2
#define VIRTIO_CONFIG_S_DRIVER_OK 4
#define VIRTIO_CONFIG_S_FEATURES_OK 8
#define VIRTIO_CONFIG_S_NEEDS_RESET 0x40
#define VIRTIO_CONFIG_S_FAILED 0x80

/* 6 Reserved feature bits */
#define VIRTIO_F_VERSION_1 32
#define VIRTIO_F_ACCESS_PLATFORM 33

/* 4.1.4 Virtio structure PCI capabilities */
#define VIRTIO_PCI_CAP_COMMON_CFG 1
#define VIRTIO_PCI_CAP_NOTIFY_CFG 2
#define VIRTIO_PCI_CAP_ISR_CFG 3
#define VIRTIO_PCI_CAP_DEVICE_CFG 4
#define VIRTIO_PCI_CAP_PCI_CFG 5
/* struct virtio_pci_cap: cap_vndr, cap_next, cap_len, cfg_type, bar, id, padding[2],
 * le32 offset, le32 length; struct virtio_pci_notify_cap adds le32 notify_off_multiplier. */
#define VIRTIO_PCI_CAP_CFG_TYPE 3
#define VIRTIO_PCI_CAP_BAR 4
#define VIRTIO_PCI_CAP_OFFSET 8
#define VIRTIO_PCI_CAP_LENGTH 12
#define VIRTIO_PCI_NOTIFY_CAP_MULT 16

/* 4.1.4.3 Common configuration structure layout */
struct virtio_pci_common_cfg {
    uint32_t device_feature_select;
    uint32_t device_feature;
    uint32_t guest_feature_select; /* the spec's driver_feature_select */
    uint32_t guest_feature;        /* driver_feature */
    uint16_t msix_config;
    uint16_t num_queues;
    uint8_t device_status;
    uint8_t config_generation;
    uint16_t queue_select;
    uint16_t queue_size;
    uint16_t queue_msix_vector;
    uint16_t queue_enable;
    uint16_t queue_notify_off;
    uint32_t queue_desc_lo; /* queue_desc */
    uint32_t queue_desc_hi;
    uint32_t queue_avail_lo; /* queue_driver */
    uint32_t queue_avail_hi;
    uint32_t queue_used_lo; /* queue_device */
    uint32_t queue_used_hi;
};

/* 2.7 Split virtqueues */
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vring_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];
};

struct vring_used_elem {
    uint32_t id;
    uint32_t len;
};

struct vring_used {
    uint16_t flags;
    uint16_t idx;
    struct vring_used_elem ring[];
};

/* 5.2 Block device */
#define VIRTIO_BLK_F_SIZE_MAX 1
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_GEOMETRY 4
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_F_TOPOLOGY 10
#define VIRTIO_BLK_F_CONFIG_WCE 11
#define VIRTIO_BLK_F_MQ 12
#define VIRTIO_BLK_F_DISCARD 13
#define VIRTIO_BLK_F_WRITE_ZEROES 14
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
#define VIRTIO_BLK_ID_BYTES 20

struct __attribute__((packed)) virtio_blk_config {
    uint64_t capacity;
    uint32_t size_max;
    uint32_t seg_max;
    struct virtio_blk_geometry {
        uint16_t cylinders;
        uint8_t heads;
        uint8_t sectors;
    } geometry;
    uint32_t blk_size;
};

struct virtio_blk_outhdr {
    uint32_t type;
    uint32_t ioprio; /* the spec's reserved */
    uint64_t sector;
};

/* 5.1 Network device */
#define VIRTIO_NET_F_MAC 5
#define VIRTIO_NET_F_STATUS 16
#define VIRTIO_NET_S_LINK_UP 1

struct __attribute__((packed)) virtio_net_config {
    uint8_t mac[6];
    uint16_t status;
};

struct virtio_net_hdr_v1 {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
    uint16_t num_buffers;
};

#endif

_Static_assert(sizeof(struct virtio_pci_common_cfg) == 56, "virtio_pci_common_cfg layout");
_Static_assert(sizeof(struct vring_desc) == 16, "vring_desc layout");
_Static_assert(sizeof(struct virtio_blk_outhdr) == 16, "virtio_blk_outhdr layout");
_Static_assert(sizeof(struct virtio_net_hdr_v1) == 12, "virtio_net_hdr_v1 layout");

#endif
