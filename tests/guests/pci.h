/* PCI for the device guests: configuration mechanism #1 (ports 0xCF8/0xCFC), bus 0 only.
 *
 * BARs are used where the VMM or firmware placed them; only a memory BAR that reads as 0 is
 * assigned (for a VMM that leaves BARs unassigned): sized, then placed at the lowest naturally
 * aligned address from 0xC0000000 that no other bus-0 memory BAR decodes (their ranges are
 * sized once, at the first assignment, each device's decoding off meanwhile).
 * Memory BARs above 4 GiB are identity-mapped on demand (pci_map), since the entry runtime
 * maps only the first 4 GiB.
 */
#ifndef HYPERPY_PCI_H
#define HYPERPY_PCI_H

#include "guest.h"

/* Configuration space offsets and bits (PCI Local Bus 3.0, as in <linux/pci_regs.h>). */
#define PCI_VENDOR_ID 0x00
#define PCI_DEVICE_ID 0x02
#define PCI_COMMAND 0x04
#define PCI_COMMAND_IO 0x1
#define PCI_COMMAND_MEMORY 0x2
#define PCI_COMMAND_MASTER 0x4
#define PCI_COMMAND_INTX_DISABLE 0x400
#define PCI_STATUS 0x06
#define PCI_STATUS_CAP_LIST 0x10
#define PCI_REVISION_ID 0x08
#define PCI_CLASS_PROG 0x09
#define PCI_HEADER_TYPE 0x0e
#define PCI_BASE_ADDRESS_0 0x10
#define PCI_SUBSYSTEM_ID 0x2e
#define PCI_CAPABILITY_LIST 0x34
#define PCI_BASE_ADDRESS_SPACE_IO 0x01
#define PCI_BASE_ADDRESS_MEM_TYPE_MASK 0x06
#define PCI_BASE_ADDRESS_MEM_TYPE_64 0x04
#define PCI_CAP_ID_MSIX 0x11
#define PCI_CAP_ID_VNDR 0x09
#define PCI_MSIX_FLAGS 2             /* message control */
#define PCI_MSIX_FLAGS_QSIZE 0x07ff  /* table size - 1 */
#define PCI_MSIX_FLAGS_MASKALL 0x4000
#define PCI_MSIX_FLAGS_ENABLE 0x8000
#define PCI_MSIX_TABLE 4             /* table offset | BIR */
#define PCI_MSIX_TABLE_BIR 0x7

#define PCI_MMIO_ALLOC_BASE 0xc0000000ull /* window for BARs we place: [BASE, END) */
#define PCI_MMIO_ALLOC_END 0xfec00000ull  /* the IOAPIC, LAPIC and firmware lie above */

struct pci_dev {
    uint8_t bus, dev, fn;
    uint16_t vendor, device;
};

uint8_t pci_read8(const struct pci_dev *d, uint16_t off);
uint16_t pci_read16(const struct pci_dev *d, uint16_t off);
uint32_t pci_read32(const struct pci_dev *d, uint16_t off);
void pci_write8(const struct pci_dev *d, uint16_t off, uint8_t v);
void pci_write16(const struct pci_dev *d, uint16_t off, uint16_t v);
void pci_write32(const struct pci_dev *d, uint16_t off, uint32_t v);

/* Visits every function on bus 0 in (device, function) order; stops when fn returns true. */
bool pci_scan(bool (*fn)(const struct pci_dev *d, void *ctx), void *ctx);
/* First function on bus 0 with this vendor and device id. */
bool pci_find(uint16_t vendor, uint16_t device, struct pci_dev *out);

/* Base address of BAR `bar` (64-bit BARs combined), assigning it if it is an unassigned
 * memory BAR; *is_io (if not NULL) says whether it is an I/O BAR. 0 on failure. */
uint64_t pci_bar(const struct pci_dev *d, int bar, bool *is_io);
/* Sets memory decoding and bus mastering in the command register. */
void pci_enable(const struct pci_dev *d);
/* Capability list: first capability with this id at or after `start` (0: the list head);
 * 0 when there is none. */
uint8_t pci_find_cap(const struct pci_dev *d, uint8_t id, uint8_t start);
/* Makes [addr, addr+len) accessible (identity mapping). False if it cannot. */
bool pci_map(uint64_t addr, uint64_t len);

/* "bb:dd.f" */
void pci_print_addr(const struct pci_dev *d);
void print_hex_fixed(uint64_t v, int digits); /* lowercase hex, zero-padded, no "0x" */

#endif
