"""The nested tier: one L1 host H (tests/nested/l1host.py) booted once per session, serving
every nested test.  Skips only when QEMU or virtiofsd is missing and CI is unset; in CI a
nested test that cannot run fails."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import l1host  # noqa: E402


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).resolve().parent == HERE:
            item.add_marker(pytest.mark.nested)


def _missing() -> str | None:
    if l1host.QEMU is None:
        return "qemu-system-x86_64 is not installed (apt-get install -y qemu-system-x86)"
    if l1host.VIRTIOFSD is None:
        return "QEMU's virtiofsd is not installed (apt-get install -y qemu-system-common)"
    return None


@pytest.fixture(scope="session")
def nested_dir(tmp_path_factory) -> Path:
    # Under L0's /tmp: H sees it (read-only) at the same path through virtio-fs.
    return tmp_path_factory.mktemp("nested")


@pytest.fixture(scope="session")
def h(kit, nested_dir):
    """The L1 host, up for the whole session."""
    problem = _missing()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the nested tier cannot run: {problem}")
        pytest.skip(problem)
    host = l1host.L1Host(kit, nested_dir / "h", hugepages_2m=640)
    for attempt in (1, 2):
        try:
            host.start()
            break
        except l1host.HostError as e:
            host.close()
            if attempt == 2:
                pytest.fail(f"the L1 host did not come up twice: {e}")
            # Said loudly: an H that dies while booting is the TCG flake of docs/testing.md.
            print(f"\nWARNING: the L1 host did not come up, booting it once more: {str(e)[-2000:]}")
    yield host
    host.close()
