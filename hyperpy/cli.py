"""The ``hyperpy`` command line (typer).

Options mirror cloud-hypervisor's.  Every user error (a :class:`~hyperpy.errors.HyperpyError`,
or a malformed command line) is printed as one line ``hyperpy: error: ...`` on stderr with exit
status 2, never as a traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

try:  # typer >= 0.24 vendors click; its exceptions all derive from TyperException
    from typer import TyperException as _CommandLineError
except ImportError:  # older typer on top of click
    from click import ClickException as _CommandLineError

from . import __version__
from .launch import run_options
from .cpuid import mask_names
from .errors import ConfigError, HyperpyError
from .vhost_user.cli import app as vhost_user_app

PROG = "hyperpy"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

log = logging.getLogger("hyperpy")


class OneLineErrorGroup(TyperGroup):
    """A group whose command-line errors are one ``hyperpy: error: ...`` line, exit status 2."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             windows_expand_args: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode,
                                windows_expand_args, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except _CommandLineError as e:   # UsageError, BadParameter, NoSuchOption, ...
            ctx = getattr(e, "ctx", None)
            see = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            _print_error(f"{e.format_message()}{see}")
            sys.exit(getattr(e, "exit_code", EXIT_USAGE))
        except typer.Abort:
            _print_error("aborted")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name=PROG,
    cls=OneLineErrorGroup,
    help=(
        "hyperpy: a KVM virtual machine monitor with a Python control plane and Cython hot "
        "paths.\n\n"
        "Boots a Linux kernel (PVH ELF, vmlinux or bzImage) with an optional initramfs on "
        "/dev/kvm, with a serial console on COM1.  Options follow cloud-hypervisor's syntax.\n\n"
        "Example: hyperpy run --kernel builtin:hello --cpus boot=2 --memory size=1G"
    ),
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(vhost_user_app, name="vhost-user")


def _print_error(message: str) -> None:
    one_line = " ".join(str(message).split())
    typer.echo(f"{PROG}: error: {one_line}", err=True)


def fail(error: HyperpyError | str) -> NoReturn:
    """Print ``error`` as one line and exit with status 2."""
    _print_error(str(error))
    raise typer.Exit(EXIT_USAGE)


# --------------------------------------------------------------------------- logging

from .logsetup import LOG_FORMAT, STDERR_FORMAT, _handlers, log_level, setup_logging  # noqa: E402,F401


# --------------------------------------------------------------------------- help texts

CPUS_HELP = (
    "vCPUs: boot=N[,features=[-NAME,...]].  boot is 1-255 (default 1).  features= hides CPUID "
    "features from the guest (names as in /proc/cpuinfo, listed below).  "
    "Example: --cpus boot=2,features=[-popcnt]"
)
MEMORY_HELP = (
    "Guest RAM: size=SIZE, then optionally shared=on|off, file=PATH, hugepages=on|off, "
    "hugepage_size=2M|1G, prefault=on|off.  SIZE in bytes or with K/M/G/T (default 512M); "
    "file= is an existing file or a hugetlbfs directory such as /dev/hugepages (a directory on "
    "another file system works, with a warning: RAM there is not on huge pages).  "
    "Example: --memory size=1G,hugepages=on"
)
KERNEL_HELP = (
    "Kernel to boot (required): a PVH ELF, vmlinux or bzImage, or builtin:NAME for a guest "
    "shipped with hyperpy.  Example: --kernel ./vmlinux or --kernel builtin:hello"
)
INITRAMFS_HELP = "Initramfs (cpio archive) loaded for the kernel.  Example: --initramfs ./initrd.cpio.gz"
CMDLINE_HELP = 'Kernel command line.  Example: --cmdline "console=ttyS0 reboot=k panic=1"'
SERIAL_HELP = (
    "Where COM1 goes: tty (this terminal), file=PATH, null (device present, output dropped) or "
    "off (no device).  Example: --serial file=/tmp/serial.log"
)
CONSOLE_HELP = ("Where the virtio console (hvc0) goes: off (no device), tty, null or file=PATH.  "
                "Example: --console file=/tmp/hvc0.log")
DISK_HELP = ("A virtio-blk disk (repeatable): path=FILE[,readonly=on][,direct=on][,num_queues=N]"
             "[,queue_size=N][,id=SERIAL][,pci_device_id=N].  Example: --disk path=disk.img,readonly=on")
NET_HELP = ("A virtio-net device on a host TAP (repeatable): [tap=NAME][,mac=MAC][,ip=IP,mask=MASK]"
            "[,num_queues=N][,queue_size=N][,pci_device_id=N]; the tap is created if the name is free.  "
            "An empty or absent tap= creates a new tap that the kernel names vmtapN; an empty or absent "
            "mac= is a random locally administered MAC.  "
            "Example: --net tap=hp0,ip=192.168.249.1,mask=255.255.255.0 or --net tap=,mac=,iommu=on")
RNG_HELP = "A virtio-rng entropy device: src=FILE (default /dev/urandom).  Example: --rng src=/dev/urandom"
IOMMU_HELP = ("The virtio-iommu that iommu=on devices sit behind (added automatically when a device "
              "says iommu=on): [page_sizes=4K,2M,1G][,bypass=on][,max_mappings=N][,max_domains=N].  "
              "Example: --iommu page_sizes=4K,2M")
DEVICE_HELP = ("A PCI function passed through with VFIO (repeatable): "
               "path=/sys/bus/pci/devices/DDDD:BB:DD.F[,iommu=on][,batching=off], bound to vfio-pci on the "
               "host; or path=sim:NAME[,iommu=on][,entry_limit=N][,pin_ns=NS][,batching=off] for the "
               "SIMULATED vfio-pci device and type1 container (hosts without /dev/vfio; tests and "
               "benchmarks).  Example: --device path=0000:01:00.0,iommu=on")
API_SOCKET_HELP = ("Serve the cloud-hypervisor-compatible REST API on a Unix socket (created 0600; an "
                   "existing path is refused).  Without --kernel, start with no VM and wait for vm.create; "
                   "the process runs until vmm.shutdown.  See docs/api.md.  "
                   "Example: --api-socket path=/run/hyperpy.sock")
NO_REBOOT_HELP = ("Exit instead of rebooting: a guest reset ends the VM like a power-off (exit status 0; "
                  "with --api-socket the VM goes to Shutdown).  Without it a guest reset reboots the VM "
                  "with the same configuration, as cloud-hypervisor does.  Spelled like QEMU's -no-reboot.")
VERBOSE_HELP = "More log output: -v for INFO, -vv for DEBUG (default WARNING)."
LOG_FILE_HELP = "Write the log to PATH instead of stderr.  Example: --log-file /tmp/hyperpy.log"


def features_epilog() -> str:
    return (
        "CPU features that --cpus features=[-NAME,...] can hide: "
        f"{' '.join(mask_names())}.\n\n"
        "Only the named bits are hidden: hide a feature's dependents too "
        "(e.g. -avx2 with -avx512f,-avx512bw,...)."
    )


# --------------------------------------------------------------------------- commands


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"{PROG} {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_version_callback,
                                          is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """hyperpy: a KVM virtual machine monitor (Python control plane, Cython hot paths)."""
    if ctx.invoked_subcommand is None:
        text = ctx.get_help()   # rich prints the help itself and returns ""
        if text:
            typer.echo(text)


RUN_HELP = (
    "Boot a VM and run it until the guest powers off; a guest reset reboots it (--no-reboot: "
    "ends it).\n\n"
    "Exit status: 0 when the guest powers off (or resets, with --no-reboot), non-zero on a "
    "triple fault or an emulation failure, 2 for a configuration error, 130 when interrupted, "
    "143 when terminated (SIGTERM)."
)


@app.command(help=RUN_HELP, epilog=features_epilog())
def run(
    kernel: Annotated[str | None, typer.Option("--kernel", help=KERNEL_HELP,
                                               metavar="PATH|builtin:NAME")] = None,
    cpus: Annotated[str | None, typer.Option("--cpus", help=CPUS_HELP,
                                             metavar="boot=N,features=[-NAME]")] = None,
    memory: Annotated[str | None, typer.Option("--memory", help=MEMORY_HELP,
                                               metavar="size=SIZE,...")] = None,
    initramfs: Annotated[str | None, typer.Option("--initramfs", help=INITRAMFS_HELP,
                                                  metavar="PATH")] = None,
    cmdline: Annotated[str | None, typer.Option("--cmdline", help=CMDLINE_HELP,
                                                metavar="TEXT")] = None,
    serial: Annotated[str, typer.Option("--serial", help=SERIAL_HELP,
                                        metavar="tty|off|null|file=PATH")] = "tty",
    console: Annotated[str, typer.Option("--console", help=CONSOLE_HELP,
                                         metavar="off|tty|null|file=PATH")] = "off",
    disk: Annotated[list[str] | None, typer.Option("--disk", help=DISK_HELP,
                                                   metavar="path=FILE,...")] = None,
    net: Annotated[list[str] | None, typer.Option("--net", help=NET_HELP,
                                                  metavar="tap=NAME,...")] = None,
    rng: Annotated[str | None, typer.Option("--rng", help=RNG_HELP, metavar="src=FILE")] = None,
    iommu: Annotated[str | None, typer.Option("--iommu", help=IOMMU_HELP,
                                              metavar="page_sizes=4K,2M,1G,...")] = None,
    device: Annotated[list[str] | None, typer.Option("--device", help=DEVICE_HELP,
                                                     metavar="path=...,iommu=on")] = None,
    no_reboot: Annotated[bool, typer.Option("--no-reboot", help=NO_REBOOT_HELP)] = False,
    verbose: Annotated[int, typer.Option("-v", "--verbose", count=True, help=VERBOSE_HELP)] = 0,
    log_file: Annotated[Path | None, typer.Option("--log-file", help=LOG_FILE_HELP,
                                                  metavar="PATH", dir_okay=False)] = None,
    api_socket: Annotated[str | None, typer.Option("--api-socket", help=API_SOCKET_HELP,
                                                   metavar="path=PATH")] = None,
) -> None:
    """``hyperpy run``: build the VmConfig, hand it to :func:`hyperpy.vmm.run_vm`, exit with
    the status it returns."""
    try:
        setup_logging(verbose, log_file)
        status = run_options(dict(
            kernel=kernel, cpus=cpus, memory=memory, initramfs=initramfs, cmdline=cmdline,
            serial=serial, console=console, disks=disk or (), nets=net or (), rng=rng,
            iommu=iommu, devices=device or ()), api_socket=api_socket, reboot=not no_reboot)
    except HyperpyError as e:
        fail(e)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    raise typer.Exit(int(status or 0))


REMOTE_HELP = (
    "Send one request to a hyperpy (or cloud-hypervisor) API socket and print the JSON reply.\n\n"
    "COMMAND is one of: ping, info, counters, create CONFIG.json, boot, pause, resume, shutdown, "
    "reboot, power-button, delete, shutdown-vmm.  Exit status 1 with the server's message when it "
    "answers an error.\n\nExample: hyperpy remote --api-socket /run/hyperpy.sock info"
)


@app.command(help=REMOTE_HELP)
def remote(
    api_socket: Annotated[str, typer.Option("--api-socket", metavar="PATH",
                                            help="The API socket of the VMM.")],
    command: Annotated[str, typer.Argument(metavar="COMMAND")],
    arg: Annotated[str | None, typer.Argument(metavar="[CONFIG.json]")] = None,
) -> None:
    from .api.client import main as remote_main

    raise typer.Exit(remote_main(api_socket, command, arg))


@app.command()
def version() -> None:
    """Print hyperpy's version."""
    typer.echo(f"{PROG} {__version__}")


def main() -> None:
    """Console-script entry point: ``hyperpy = hyperpy.cli:main``."""
    app(prog_name=PROG)


if __name__ == "__main__":
    main()
