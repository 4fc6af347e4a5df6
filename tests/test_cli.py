"""The typer CLI: help texts, one-line errors, config pass-through, exit statuses."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

import hyperpy
from hyperpy import cli
from hyperpy.cli import app
from hyperpy.config import CpusConfig, PayloadConfig, SerialConfig, VmConfig
from hyperpy.errors import KvmError
from hyperpy.memory import MemoryBacking

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def runner() -> CliRunner:
    # Wide terminal so rich does not wrap help lines in the middle of what we look for.
    return CliRunner(env={"COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"})


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    logger = logging.getLogger("hyperpy")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    yield
    for h in cli._handlers:
        logger.removeHandler(h)
        h.close()
    cli._handlers.clear()
    logger.setLevel(saved[0])
    logger.propagate = saved[1]
    logger.handlers[:] = saved[2]


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "vmlinux"
    k.write_bytes(b"\x7fELF")
    return k


@pytest.fixture
def fake_vmm(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[VmConfig], int]], list[VmConfig]]:
    """Replace hyperpy.vmm.run_vm (with a stub module when hyperpy.vmm cannot be imported)."""
    try:
        import hyperpy.vmm as vmm
    except Exception:
        vmm = types.ModuleType("hyperpy.vmm")
        monkeypatch.setitem(sys.modules, "hyperpy.vmm", vmm)
        monkeypatch.setattr(hyperpy, "vmm", vmm, raising=False)

    def install(behaviour: Callable[[VmConfig], int]) -> list[VmConfig]:
        seen: list[VmConfig] = []

        def run_vm(cfg: VmConfig, *, reboot: bool = True) -> int:
            seen.append(cfg)
            reboots.append(reboot)
            return behaviour(cfg)

        monkeypatch.setattr(vmm, "run_vm", run_vm, raising=False)
        return seen

    reboots: list[bool] = []
    install.reboots = reboots      # run_vm's reboot= argument, per call
    return install


def plain(text: str) -> str:
    """Help output without rich's box drawing, whitespace collapsed."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", text).split())


def error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hyperpy: error: ")
    assert "Traceback" not in result.output
    return lines[0].removeprefix("hyperpy: error: ")


# --------------------------------------------------------------------------- help


def test_top_level_help(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    out = plain(result.output)
    assert "hyperpy: a KVM virtual machine monitor" in out
    assert "run" in out and "version" in out


def test_no_arguments_shows_help(runner: CliRunner) -> None:
    result = runner.invoke(app, [])
    assert result.exit_code == 0
    assert "Usage" in result.output and "run" in result.output


def test_run_help_mentions_options(runner: CliRunner) -> None:
    result = runner.invoke(app, ["run", "--help"])
    assert result.exit_code == 0
    out = plain(result.output)
    for opt in ("--cpus", "--memory", "--kernel", "--initramfs", "--cmdline", "--serial",
                "--console", "--no-reboot", "--verbose", "-v", "--log-file"):
        assert opt in out, opt
    assert "--cpus boot=2,features=[-popcnt]" in out
    assert "--memory size=1G" in out
    assert "builtin:hello" in out
    assert "file=PATH" in out
    assert "avx2" in out and "popcnt" in out and "sse4_2" in out     # feature list
    assert "Exit instead of rebooting" in out


def test_short_help_option(runner: CliRunner) -> None:
    assert runner.invoke(app, ["run", "-h"]).exit_code == 0


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"hyperpy {hyperpy.__version__}"
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"hyperpy {hyperpy.__version__}"


# --------------------------------------------------------------------------- errors


def test_missing_kernel_file(runner: CliRunner) -> None:
    result = runner.invoke(app, ["run", "--kernel", "/x/vmlinux"])
    assert result.exit_code == 2
    assert error_line(result) == ("--kernel: no such file: /x/vmlinux (give the path of a PVH ELF, "
                                  "vmlinux or bzImage, or builtin:hello)")


def test_kernel_required(runner: CliRunner) -> None:
    result = runner.invoke(app, ["run"])
    assert result.exit_code == 2
    assert error_line(result).startswith("--kernel is required")


def test_bad_size(runner: CliRunner, kernel: Path) -> None:
    result = runner.invoke(app, ["run", "--kernel", str(kernel), "--memory", "size=12Q"])
    assert result.exit_code == 2
    assert error_line(result) == "--memory size: '12Q' is not a size (use e.g. 512M, 2G)"


def test_unknown_key(runner: CliRunner, kernel: Path) -> None:
    result = runner.invoke(app, ["run", "--kernel", str(kernel), "--memory", "sise=1G"])
    assert result.exit_code == 2
    assert error_line(result).startswith("--memory: unknown key 'sise' (")


def test_unknown_feature(runner: CliRunner, kernel: Path) -> None:
    result = runner.invoke(app, ["run", "--kernel", str(kernel), "--cpus", "features=[-nope]"])
    assert result.exit_code == 2
    assert error_line(result) == \
        "--cpus features: unknown CPU feature 'nope' (see hyperpy run --help)"


def test_bad_serial(runner: CliRunner, kernel: Path) -> None:
    result = runner.invoke(app, ["run", "--kernel", str(kernel), "--serial", "pty"])
    assert result.exit_code == 2
    assert "--serial: 'pty' is not one of" in error_line(result)


def test_unknown_option(runner: CliRunner) -> None:
    result = runner.invoke(app, ["run", "--cpu", "2"])
    assert result.exit_code == 2
    msg = error_line(result)
    assert "--cpu" in msg and "--help" in msg


def test_option_without_value(runner: CliRunner) -> None:
    result = runner.invoke(app, ["run", "--kernel"])
    assert result.exit_code == 2
    assert "--kernel" in error_line(result)


def test_unknown_command(runner: CliRunner) -> None:
    result = runner.invoke(app, ["runn"])
    assert result.exit_code == 2
    assert "runn" in error_line(result)


def test_bad_log_file(runner: CliRunner, kernel: Path) -> None:
    result = runner.invoke(app, ["run", "--kernel", str(kernel), "--log-file", "/no/such/dir/l"])
    assert result.exit_code == 2
    assert error_line(result).startswith("--log-file: cannot open /no/such/dir/l")


# --------------------------------------------------------------------------- run_vm


def test_config_passed_to_run_vm(runner: CliRunner, kernel: Path, fake_vmm) -> None:
    seen = fake_vmm(lambda cfg: 0)
    result = runner.invoke(app, [
        "run", "--kernel", str(kernel), "--cpus", "boot=2,features=[-popcnt,-avx2]",
        "--memory", "size=1G", "--cmdline", "console=ttyS0 panic=1",
    ])
    assert result.exit_code == 0, result.output
    assert len(seen) == 1
    cfg = seen[0]
    assert cfg.cpus == CpusConfig(boot=2, features=("popcnt", "avx2"))
    assert cfg.memory == MemoryBacking(size=1 << 30)
    assert cfg.payload == PayloadConfig(kernel=kernel, initramfs=None, cmdline="console=ttyS0 panic=1")
    assert cfg.serial == SerialConfig("tty", None)
    assert cfg.console.mode == "off"


@pytest.mark.parametrize("flags, reboot", [([], True), (["--no-reboot"], False)])
def test_no_reboot_reaches_run_vm(runner: CliRunner, kernel: Path, fake_vmm, flags: list[str],
                                  reboot: bool) -> None:
    fake_vmm(lambda cfg: 0)
    result = runner.invoke(app, ["run", "--kernel", str(kernel), *flags])
    assert result.exit_code == 0, result.output
    assert fake_vmm.reboots == [reboot]


def test_no_reboot_takes_no_value(runner: CliRunner, kernel: Path, fake_vmm) -> None:
    seen = fake_vmm(lambda cfg: 0)
    result = runner.invoke(app, ["run", "--kernel", str(kernel), "--no-reboot=on"])
    assert result.exit_code == 2 and seen == []
    assert "--no-reboot" in error_line(result)


@pytest.mark.parametrize("status", [0, 1, 3])
def test_exit_status_propagated(runner: CliRunner, kernel: Path, fake_vmm, status: int) -> None:
    fake_vmm(lambda cfg: status)
    result = runner.invoke(app, ["run", "--kernel", str(kernel)])
    assert result.exit_code == status


def test_run_vm_error_is_one_line(runner: CliRunner, kernel: Path, fake_vmm) -> None:
    def boom(cfg: VmConfig) -> int:
        raise KvmError("/dev/kvm: permission denied", "add yourself to the kvm group")

    fake_vmm(boom)
    result = runner.invoke(app, ["run", "--kernel", str(kernel)])
    assert result.exit_code == 2
    assert error_line(result) == "/dev/kvm: permission denied: add yourself to the kvm group"


def test_keyboard_interrupt(runner: CliRunner, kernel: Path, fake_vmm) -> None:
    def interrupted(cfg: VmConfig) -> int:
        raise KeyboardInterrupt

    fake_vmm(interrupted)
    result = runner.invoke(app, ["run", "--kernel", str(kernel)])
    assert result.exit_code == 130


def test_run_vm_not_called_on_config_error(runner: CliRunner, fake_vmm) -> None:
    seen = fake_vmm(lambda cfg: 0)
    result = runner.invoke(app, ["run", "--kernel", "/x/vmlinux"])
    assert result.exit_code == 2
    assert seen == []


# --------------------------------------------------------------------------- logging


@pytest.mark.parametrize("flags, level", [([], logging.WARNING), (["-v"], logging.INFO),
                                          (["-vv"], logging.DEBUG), (["-v", "--verbose"], logging.DEBUG)])
def test_verbosity(runner: CliRunner, kernel: Path, fake_vmm, flags: list[str], level: int) -> None:
    levels: list[int] = []
    fake_vmm(lambda cfg: levels.append(logging.getLogger("hyperpy").level) or 0)
    result = runner.invoke(app, ["run", "--kernel", str(kernel), *flags])
    assert result.exit_code == 0, result.output
    assert levels == [level]


def test_log_file(runner: CliRunner, kernel: Path, tmp_path: Path, fake_vmm) -> None:
    def log_something(cfg: VmConfig) -> int:
        logging.getLogger("hyperpy.vmm").info("guest started")
        return 0

    fake_vmm(log_something)
    log = tmp_path / "hyperpy.log"
    result = runner.invoke(app, ["run", "--kernel", str(kernel), "-v", "--log-file", str(log)])
    assert result.exit_code == 0, result.output
    assert "guest started" in log.read_text()
    assert "guest started" not in result.stderr


def test_log_to_stderr(runner: CliRunner, kernel: Path, fake_vmm) -> None:
    def log_something(cfg: VmConfig) -> int:
        logging.getLogger("hyperpy.vmm").warning("something odd")
        return 0

    fake_vmm(log_something)
    result = runner.invoke(app, ["run", "--kernel", str(kernel)])
    assert "something odd" in result.stderr


# --------------------------------------------------------------------------- entry points


def test_python_dash_m(kernel: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run([sys.executable, "-m", "hyperpy", "version"], capture_output=True,
                        text=True, env=env, cwd=REPO)
    assert ok.returncode == 0
    assert ok.stdout.strip() == f"hyperpy {hyperpy.__version__}"
    bad = subprocess.run([sys.executable, "-m", "hyperpy", "run", "--kernel", "/x/vmlinux"],
                         capture_output=True, text=True, env=env, cwd=REPO)
    assert bad.returncode == 2
    assert bad.stderr.startswith("hyperpy: error: --kernel: no such file: /x/vmlinux")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_main_is_callable() -> None:
    assert callable(cli.main)


@pytest.mark.parametrize("flags, reboot", [([], True), (["--no-reboot"], False)])
def test_api_socket_paths_take_no_reboot(runner: CliRunner, monkeypatch: pytest.MonkeyPatch,
                                         flags: list[str], reboot: bool) -> None:
    """Both parsers of `run --api-socket` (the argparse fast path and typer) hand --no-reboot on."""
    from hyperpy import launch
    import hyperpy.api.service as service

    calls: list[dict] = []
    monkeypatch.setattr(service, "run_command", lambda sock, opts, **kw: calls.append(kw) or 0)
    argv = ["run", "--api-socket", "path=/tmp/hp-none.sock", *flags]
    assert launch.fast_main(argv) == 0
    assert runner.invoke(app, argv).exit_code == 0
    assert calls == [{"reboot": reboot}] * 2
