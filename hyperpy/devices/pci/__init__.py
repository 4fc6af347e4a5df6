"""PCI: configuration space, the segment-0 bus with its config access mechanisms, MSI-X."""
