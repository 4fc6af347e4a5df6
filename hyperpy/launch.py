"""The ``hyperpy`` command's entry point: a fast path for ``run`` and ``remote``, typer for the rest.

``hyperpy run ...`` (with or without ``--api-socket``) and ``hyperpy remote ...`` are what users
and orchestrators start and call many times, so they are parsed here with argparse and never
import typer, rich or pydantic (about half of a ``hyperpy run`` process's start-up here, and 6 of
its 19 s in the nested tier's L1 host, where Python runs under TCG).  Anything this parser does
not accept exactly (help, a typo, an unknown option) falls through to the typer command line,
which prints the canonical help or one-line error; both accept the same options and call
:func:`run_options`.
"""

from __future__ import annotations

import sys


class _Refuse(Exception):
    """The fast parser does not take this command line; the typer one will."""


def _fast_parser(command: str):
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):          # fall back to typer for the message
            raise _Refuse(message)

    p = Parser(prog=f"hyperpy {command}", add_help=False, allow_abbrev=False, exit_on_error=False)
    if command == "remote":
        p.add_argument("--api-socket", required=True)
        p.add_argument("command")
        p.add_argument("arg", nargs="?")
        return p
    for opt in ("kernel", "cpus", "memory", "initramfs", "cmdline", "rng", "iommu", "log-file"):
        p.add_argument(f"--{opt}")
    p.add_argument("--serial", default="tty")
    p.add_argument("--console", default="off")
    for opt in ("disk", "net", "device"):
        p.add_argument(f"--{opt}", action="append", default=[])
    p.add_argument("--no-reboot", action="store_true")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("--api-socket")
    return p


def fast_main(argv: list[str]) -> int | None:
    """Run ``argv`` if it is a ``run``/``remote`` command this parser accepts exactly, else None."""
    if not argv or argv[0] not in ("run", "remote") or any(a in ("-h", "--help") for a in argv):
        return None
    import argparse

    p = _fast_parser(argv[0])
    try:
        ns = p.parse_args(argv[1:])
    except (_Refuse, argparse.ArgumentError):
        return None
    if argv[0] == "remote":
        from .api.client import main as remote_main

        return remote_main(ns.api_socket, ns.command, ns.arg)
    from .errors import HyperpyError

    try:
        from .logsetup import setup_logging

        setup_logging(ns.verbose, ns.log_file)
        return run_options(dict(
            kernel=ns.kernel, cpus=ns.cpus, memory=ns.memory, initramfs=ns.initramfs,
            cmdline=ns.cmdline, serial=ns.serial, console=ns.console, disks=ns.disk, nets=ns.net,
            rng=ns.rng, iommu=ns.iommu, devices=ns.device),
            api_socket=ns.api_socket, reboot=not ns.no_reboot)
    except HyperpyError as e:
        print(f"hyperpy: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def run_options(options: dict, *, api_socket: str | None, reboot: bool) -> int:
    """``hyperpy run`` after parsing, for both parsers: serve the API on ``api_socket`` (booting
    the VM ``options`` describe, if any), or build the VmConfig and run it until it ends.
    Returns the exit status; a bad option raises :class:`~hyperpy.errors.HyperpyError`."""
    if api_socket is not None:
        from .api.service import run_command

        return run_command(api_socket, options, reboot=reboot)
    import logging

    from .config import build_vm_config

    cfg = build_vm_config(**options)
    logging.getLogger("hyperpy.launch").debug("configuration: %s", cfg)
    return int(_load_run_vm()(cfg, reboot=reboot) or 0)


def _load_run_vm():
    from .errors import HyperpyError

    try:
        from .vmm import run_vm
    except ImportError as e:
        if not (e.name or "").startswith("hyperpy"):
            raise
        raise HyperpyError(f"cannot load the VMM ({e})",
                           "build the Cython extensions, e.g. pip install -e .") from None
    return run_vm


def main() -> None:
    rc = fast_main(sys.argv[1:])
    if rc is not None:
        sys.exit(rc)
    from .cli import main as typer_main

    typer_main()
