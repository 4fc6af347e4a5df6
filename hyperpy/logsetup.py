"""Logging set-up shared by the typer command line and the fast API entry point (imports only
the standard library and hyperpy.errors, so the fast path stays light)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from .errors import ConfigError

PROG = "hyperpy"
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
STDERR_FORMAT = f"{PROG}: %(levelname)s %(name)s: %(message)s"
_handlers: list[logging.Handler] = []


def log_level(verbose: int) -> int:
    """0 -> WARNING, 1 (-v) -> INFO, 2+ (-vv) -> DEBUG."""
    return {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)


def setup_logging(verbose: int, log_file: str | Path | None) -> None:
    """Log hyperpy's messages to ``log_file``, or to stderr when none is given."""
    logger = logging.getLogger(PROG)
    for h in _handlers:
        logger.removeHandler(h)
        h.close()
    _handlers.clear()
    if log_file is not None:
        try:
            handler: logging.Handler = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"--log-file: cannot open {log_file}: {e.strerror}") from None
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(STDERR_FORMAT))
    logger.addHandler(handler)
    _handlers.append(handler)
    logger.setLevel(log_level(verbose))
    logger.propagate = False
