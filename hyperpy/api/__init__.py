"""cloud-hypervisor-compatible control API over a Unix socket (``hyperpy run --api-socket``) and
its client (``hyperpy remote``).  See docs/api.md."""
