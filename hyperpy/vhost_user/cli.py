"""``hyperpy vhost-user blk|net|rng|console``: serve one device to a vhost-user front-end.

Each command creates the device exactly as ``hyperpy run`` would (same option syntax for the
disk), listens on ``--socket`` and serves front-ends one after the other until SIGINT/SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

log = logging.getLogger("hyperpy.vhost_user")

app = typer.Typer(
    name="vhost-user",
    help=("Serve a hyperpy virtio device to another VMM (QEMU, cloud-hypervisor) over the "
          "vhost-user protocol.  Example: hyperpy vhost-user blk --socket /tmp/blk.sock "
          "--disk path=disk.img, then qemu ... -chardev socket,id=c,path=/tmp/blk.sock "
          "-device vhost-user-blk-pci,chardev=c"),
    no_args_is_help=True,
    add_completion=False,
)

SocketOpt = Annotated[Path, typer.Option("--socket", metavar="PATH",
                                         help="Unix socket to listen on (created; removed on exit).")]
IommuOpt = Annotated[bool, typer.Option("--iommu/--no-iommu",
                                        help="Offer VIRTIO_F_ACCESS_PLATFORM (IOVAs through the "
                                             "front-end's IOTLB) [default: on].")]
VerboseOpt = Annotated[int, typer.Option("--verbose", "-v", count=True,
                                         help="-v: log negotiation and ring events; -vv: debug.")]
LogFileOpt = Annotated[Path | None, typer.Option("--log-file", metavar="PATH",
                                                 help="Write the log there instead of stderr.")]


def _serve(make_device, socket: Path, iommu: bool, verbose: int, log_file: Path | None,
           queue_num=None) -> None:
    from ..cli import fail, setup_logging
    from ..errors import HyperpyError
    from .backend import VhostUserBackend

    try:
        setup_logging(verbose, log_file)
        device = make_device()
    except HyperpyError as e:
        fail(e)
    try:
        backend = VhostUserBackend(device, socket, iommu=iommu,
                                   queue_num=queue_num(device) if queue_num else None)
    except HyperpyError as e:
        device.close()
        fail(e)
    done = threading.Event()

    def stop(signum, frame):
        done.set()

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    backend.start()
    print(f"hyperpy: vhost-user {device.name} back-end listening on {socket}", file=sys.stderr,
          flush=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        backend.close()
        for s, h in old.items():
            signal.signal(s, h)


@app.command()
def blk(
    socket: SocketOpt,
    disk: Annotated[str, typer.Option("--disk", metavar="path=FILE[,readonly=on][,num_queues=N]",
                                      help="Raw image, with --disk's syntax of 'hyperpy run'.")],
    iommu: IommuOpt = True,
    verbose: VerboseOpt = 0,
    log_file: LogFileOpt = None,
) -> None:
    """virtio-blk on a raw image (queues served in Cython with preadv/pwritev)."""
    from ..config import parse_disk
    from ..devices.virtio.blk import Block

    def make():
        d = parse_disk(disk)
        return Block(d.path, readonly=d.readonly, direct=d.direct, num_queues=d.num_queues,
                     queue_size=d.queue_size, serial=d.id)

    _serve(make, socket, iommu, verbose, log_file)


@app.command()
def net(
    socket: SocketOpt,
    tap: Annotated[str, typer.Option("--tap", metavar="NAME",
                                     help="TAP interface (created if missing); empty or left out: "
                                          "a new one that the kernel names vmtapN.")] = "",
    ip: Annotated[str | None, typer.Option("--ip", help="Host-side IPv4 address of the tap.")] = None,
    mask: Annotated[str | None, typer.Option("--mask", help="Host-side netmask of the tap.")] = None,
    num_queues: Annotated[int, typer.Option("--num-queues", metavar="N",
                                            help="rx+tx queues: an even number, 2 to 16 "
                                                 "(N/2 queue pairs on a multi-queue tap).")] = 2,
    iommu: IommuOpt = True,
    verbose: VerboseOpt = 0,
    log_file: LogFileOpt = None,
) -> None:
    """virtio-net over a host TAP device (the front-end keeps the MAC and the control queue)."""
    from ..config import parse_net
    from ..devices.virtio.net import Net

    def make():
        opts = f"tap={tap},num_queues={num_queues}"
        if ip:
            opts += f",ip={ip}"
        if mask:
            opts += f",mask={mask}"
        n = parse_net(opts)
        return Net(n.tap, n.mac, ip=n.ip, mask=n.mask, queue_size=n.queue_size,
                   num_queues=n.num_queues)

    # GET_QUEUE_NUM answers queue pairs for virtio-net.
    _serve(make, socket, iommu, verbose, log_file, queue_num=lambda d: d.max_pairs)


@app.command()
def rng(
    socket: SocketOpt,
    src: Annotated[Path, typer.Option("--src", help="Entropy source.")] = Path("/dev/urandom"),
    iommu: IommuOpt = True,
    verbose: VerboseOpt = 0,
    log_file: LogFileOpt = None,
) -> None:
    """virtio-rng filled from --src."""
    from ..devices.virtio.rng import Rng

    _serve(lambda: Rng(src), socket, iommu, verbose, log_file)


@app.command()
def console(
    socket: SocketOpt,
    output: Annotated[Path | None, typer.Option("--output", metavar="FILE",
                                                help="Where the guest's hvc0 output goes "
                                                     "[default: stdout].")] = None,
    iommu: IommuOpt = True,
    verbose: VerboseOpt = 0,
    log_file: LogFileOpt = None,
) -> None:
    """virtio-console (one port); the guest's output goes to stdout or --output."""
    from ..devices.virtio.console import Console
    from ..errors import DeviceError

    def make():
        if output is None:
            return Console(sys.stdout.fileno())
        try:
            fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise DeviceError(f"--output {output}: {e.strerror}") from None
        return Console(fd)

    _serve(make, socket, iommu, verbose, log_file)
