"""Error types of hyperpy.

Every error a user can trigger is a ``HyperpyError``: its ``str()`` is one line that names the
thing that is wrong and, where there is one, what to do about it.  The CLI prints that line and
exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations


class HyperpyError(Exception):
    """Base class: ``what`` names the problem, ``hint`` says how to fix it."""

    def __init__(self, what: str, hint: str | None = None) -> None:
        self.what = what
        self.hint = hint
        super().__init__(what if not hint else f"{what}: {hint}")


class ConfigError(HyperpyError):
    """A command-line option or configuration value is invalid."""


class KvmError(HyperpyError):
    """/dev/kvm is missing, unusable, or lacks a capability hyperpy needs."""


class GuestMemoryError(HyperpyError):
    """Guest RAM could not be set up, or an access fell outside guest RAM."""


class BootError(HyperpyError):
    """The kernel, initramfs or command line cannot be loaded into the guest."""


class DeviceError(HyperpyError):
    """A device could not be created or configured."""
