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
