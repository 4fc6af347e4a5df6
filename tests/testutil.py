"""Small helpers shared by the test files (tests/ is on sys.path; it is not a package)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def load_module(name: str, path: Path):
    """Import the file ``path`` as module ``name`` (build.py, *_expect.py, ...)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def kvm_problem() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm is missing"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible (run as root or join the kvm group)"
    return None


def hyperpy_command(*args: str, no_reboot: bool = True) -> list[str]:
    """``python -m hyperpy ARGS...``; a ``run`` gets ``--no-reboot`` unless ``no_reboot`` is
    false: the test guests say "done" with a reset, which would reboot them otherwise."""
    if no_reboot and args and args[0] == "run":
        args = ("run", "--no-reboot", *args[1:])
    return [sys.executable, "-m", "hyperpy", *args]


def run_hyperpy(*args: str, timeout: float = 120, input: bytes | None = None,
                env: dict | None = None, no_reboot: bool = True) -> subprocess.CompletedProcess:
    """Run the installed `hyperpy` CLI (as `python -m hyperpy`) and capture its output
    (``no_reboot``: see :func:`hyperpy_command`)."""
    e = dict(os.environ)
    if env:
        e.update(env)
    # cwd outside the repository, so `-m hyperpy` imports the installed package.
    return subprocess.run(hyperpy_command(*args, no_reboot=no_reboot), capture_output=True,
                          timeout=timeout, input=input, env=e, cwd=tempfile.gettempdir())


class ByteCursor:
    """Decodes a fuzz scenario from one Hypothesis byte string (one draw per example keeps 10k
    runs fast; all-zero bytes decode to the simplest choices, so shrinking heads there)."""

    def __init__(self, blob: bytes) -> None:
        self.b = blob
        self.i = 0

    def int(self, nbytes: int) -> int:
        v = int.from_bytes(self.b[self.i:self.i + nbytes], "little")
        self.i += nbytes
        return v

    def u8(self) -> int:
        return self.int(1)

    def below(self, n: int) -> int:
        return self.int(2) % n

    def bool(self) -> bool:
        return bool(self.u8() & 1)

    def more(self) -> bool:
        return self.i < len(self.b)
