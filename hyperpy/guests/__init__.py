"""Guests shipped inside the package (``--kernel builtin:NAME``).

They are compiled from ``tests/guests`` during the package build, so a user who only ran
``pip install`` can boot one without a compiler.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import ConfigError


def available() -> list[str]:
    return sorted(p.name[:-4] for p in resources.files(__name__).iterdir() if p.name.endswith(".elf"))


def builtin_kernel(name: str) -> Path:
    """Path of the built-in guest ``name`` (e.g. ``hello``)."""
    path = Path(str(resources.files(__name__) / f"{name}.elf"))
    if not path.is_file():
        have = ", ".join(available()) or "none"
        raise ConfigError(
            f"--kernel: no built-in guest 'builtin:{name}' (available: {have})",
            "use builtin:hello, or reinstall hyperpy with 'pip install .' to build the built-in guests",
        )
    return path
