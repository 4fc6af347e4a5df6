"""Small helpers shared by the test files (tests/ is on sys.path; it is not a package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def load_module(name: str, path: Path):
    """Import the file ``path`` as module ``name`` (build.py, *_expect.py, ...)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
