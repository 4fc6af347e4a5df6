"""virtio devices (one file each) and the virtio-pci transport."""
