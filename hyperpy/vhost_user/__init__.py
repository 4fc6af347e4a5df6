"""vhost-user back-ends: hyperpy's virtio devices serving another VMM's guest (``docs/vhost-user.md``).

:class:`.backend.VhostUserBackend` puts one :class:`~hyperpy.devices.virtio.device.VirtioDevice` (Block,
Net, Rng, Console -- the same objects the built-in virtio-pci transport drives) behind a
vhost-user socket: :mod:`.server` speaks the protocol, :mod:`.transport` builds the split queues
and the device context, :mod:`.protocol` holds the protocol's numbers.
"""
