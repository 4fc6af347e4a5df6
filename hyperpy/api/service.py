"""``hyperpy run --api-socket``: the VMM process with the API server.

The main thread only waits: the HTTP server has its own threads, the VM runs in the
controller's thread.  The process ends on ``vmm.shutdown`` (status 0), SIGINT (130) or SIGTERM
(143); the VM is stopped and the socket unlinked on the way out.  A guest reset reboots the VM
(``--no-reboot``: shuts it down); the process stays either way.
"""

from __future__ import annotations

import logging
import signal
import threading

from ..errors import ConfigError

log = logging.getLogger(__name__)

API_SOCKET_KEYS = ("path",)


def parse_api_socket(value: str) -> str:
    """``path=/run/hp.sock`` or a bare path -> the path."""
    v = value.strip()
    if not v:
        raise ConfigError("--api-socket: empty value (e.g. --api-socket path=/run/hyperpy.sock)")
    key, eq, rest = v.partition("=")
    if not eq:
        return v
    if key.strip().lower() == "fd":
        raise ConfigError("--api-socket: fd= is not supported by hyperpy", "give path=PATH")
    if key.strip().lower() != "path" or "," in rest:
        raise ConfigError(f"--api-socket: {value!r} is not path=PATH (e.g. path=/run/hyperpy.sock)")
    path = rest.strip()
    if len(path) >= 2 and path[0] == path[-1] and path[0] in "\"'":
        path = path[1:-1]
    if not path:
        raise ConfigError("--api-socket: path= needs a path (e.g. path=/run/hyperpy.sock)")
    return path


def serve(socket_path: str, config=None, *, ready=None, reboot: bool = True) -> int:
    """Serve the API on ``socket_path``; with ``config`` create and boot that VM at once.
    ``reboot=False`` (``--no-reboot``): a guest reset shuts the VM down instead of rebooting it.
    Returns the process exit status."""
    from .controller import VmController
    from .http import UnixHttpServer
    from .server import ApiServer

    stop = threading.Event()
    status = [0]

    def on_signal(signum, _frame) -> None:
        status[0] = 130 if signum == signal.SIGINT else 143
        stop.set()

    controller = VmController(reboot=reboot)
    http = UnixHttpServer(socket_path, ApiServer(controller, on_vmm_shutdown=stop.set))
    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, on_signal)
    try:
        http.start()
        log.info("API listening on %s", socket_path)
        if ready is not None:
            ready()
        if config is not None:
            controller.create(config)
            controller.boot()
        while not stop.wait(0.5):
            pass
    finally:
        try:
            controller.stop_all()
        finally:
            http.close()
            for sig, handler in old.items():
                signal.signal(sig, handler)
    return status[0]


# run_command's VM options (build_vm_config's keywords) and the command-line flags they came from.
VM_OPTION_FLAGS = {"cpus": "--cpus", "memory": "--memory", "initramfs": "--initramfs",
                   "cmdline": "--cmdline", "disks": "--disk", "nets": "--net", "rng": "--rng",
                   "iommu": "--iommu", "devices": "--device"}


def run_command(api_socket: str, vm_options: dict, *, reboot: bool = True) -> int:
    """``hyperpy run --api-socket ...``: with ``--kernel`` boot that VM at once, without any VM
    option start empty and wait for ``vm.create``.  ``reboot``: as for :func:`serve`."""
    path = parse_api_socket(api_socket)
    config = None
    if vm_options.get("kernel") is not None:
        from ..config import build_vm_config    # not before: an empty start stays quick

        config = build_vm_config(**vm_options)
    else:
        given = [flag for name, flag in VM_OPTION_FLAGS.items() if vm_options.get(name)]
        if given:
            raise ConfigError(f"--kernel is required with {given[0]} "
                              "(or give no VM options and send vm.create to the API socket)")
    return serve(path, config, reboot=reboot)
