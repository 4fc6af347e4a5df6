"""A Linux guest ("G") on a VMM inside the L1 host H (tests/nested/l1host.py).

A :class:`GuestRun` is one boot of Debian's 6.12 cloud kernel with a busybox initramfs
(tests/linuxkit.py) on ``hyperpy run`` (or, for the peer runs, QEMU ``-accel kvm``) in H.  The
harness writes a bash script that H runs: prepare files in a tmpfs run directory ``$D``, start
the VMM, optionally act while G runs (``during``: ping it, read the API, type into its console),
wait for it, run ``post`` checks in H, and print every artefact between ``=== NAME`` lines.
:func:`run` returns them parsed (:class:`Outcome`).

G's scripts report with ``check NAME CMD...`` (``HPCHECK ok|fail NAME``) and ``fact NAME VALUE``
(``HPFACT NAME VALUE``) lines, and end by printing its kernel log with levels (``dmesg -r``)
between ``HPDMESG begin``/``HPDMESG end``.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import linuxkit
from l1host import HostError, L1Host

#: Printed by every G before it powers off: facts the tests share.
G_PROLOGUE = r"""
fact() { echo "HPFACT $1 $2"; }
# waitfor CMD...: up to 20 s for CMD to succeed (drivers behind the IOMMU probe late: deferred)
waitfor() { i=0; while ! "$@" 2>/dev/null; do i=$((i + 1)); [ $i -gt 200 ] && return 1; sleep 0.1; done; }
fact nproc "$(nproc)"
fact kernel "$(uname -r)"
"""

G_EPILOGUE = r"""
for d in /sys/bus/pci/devices/*; do
    g=$(readlink $d/iommu_group); g=${g##*/}
    drv=$(readlink $d/driver); drv=${drv##*/}
    v=$(cat $d/vendor); p=$(cat $d/device)
    echo "HPPCI $(basename $d) ${v#0x}:${p#0x} class=$(cat $d/class) group=${g:--} driver=${drv:--}"
done
for g in /sys/kernel/iommu_groups/*; do
    [ -d "$g" ] && echo "HPGROUP ${g##*/} type=$(cat $g/type) devices=$(ls $g/devices | tr '\n' ',')"
done
# The host reads the VMM's counters while G is still up.
echo HPCOUNTERS
sleep 3
grep -E 'MSI|PCI-MSI' /proc/interrupts | sed 's/^/HPIRQ /'
echo "HPDMESG begin"
dmesg -r | grep -E '^<[0-4]>'
echo "HPDMESG end"
"""


@dataclass
class GuestRun:
    name: str
    args: list[str]                      # hyperpy run options besides kernel/initramfs/serial
    script: str                          # G's busybox script (between the prologue/epilogue)
    modules: list[str] = field(default_factory=list)
    files: dict = field(default_factory=dict)     # extra initramfs files
    cmdline: str = ""                    # added to G's kernel command line
    pre: str = ""                        # bash in H before the VMM starts ($D: run dir)
    during: str = ""                     # bash in H while G runs ($VMM: its pid)
    post: str = ""                       # bash in H after the VMM exited ($RC: its status)
    vmm: str = "hyperpy"                 # or "qemu": then ``args`` are QEMU's
    stdin: str = "/dev/null"             # what the VMM reads (a fifo for console input)
    timeout: float = 600
    api: bool = True                     # hyperpy: serve the API on $D/api.sock
    boot_timeout: float = 300            # G prints HPBOOT within this (normally 20-60 s)


@dataclass
class Outcome:
    run: GuestRun
    rc: int                              # the H script's status
    out: str                             # everything H printed
    seconds: float
    sections: dict[str, str]
    checks: dict[str, bool]
    facts: dict[str, str]

    @property
    def serial(self) -> str:
        return self.sections.get("serial", "")

    def failed(self) -> list[str]:
        return [k for k, ok in self.checks.items() if not ok]

    def pci(self) -> list[dict]:
        return [dict(bdf=m[0], id=m[1], cls=m[2], group=m[3], driver=m[4])
                for m in re.findall(r"HPPCI (\S+) (\S+) class=(\S+) group=(\S+) driver=(\S+)",
                                    self.serial)]

    def groups(self) -> dict[str, dict]:
        return {m[0]: {"type": m[1], "devices": [d for d in m[2].split(",") if d]}
                for m in re.findall(r"HPGROUP (\S+) type=(\S+) devices=(\S*)", self.serial)}

    def dmesg(self) -> list[tuple[int, str]]:
        m = re.search(r"HPDMESG begin\n(.*?)HPDMESG end", self.serial, re.S)
        lines = []
        for raw in (m.group(1) if m else "").splitlines():
            mm = re.match(r"<(\d+)>\[\s*[\d.]+\] (.*)", raw)
            if mm:
                lines.append((int(mm.group(1)) & 7, mm.group(2)))
        return lines

    def warnings(self) -> list[str]:
        """G's kernel messages at level warn (4) or worse."""
        return [text for level, text in self.dmesg() if level <= 4]

    def explain(self) -> str:
        return (f"{self.run.name}: H script rc {self.rc}, {self.seconds:.0f} s\n"
                + self.out[-6000:])


def _section_split(out: str) -> dict[str, str]:
    parts = re.split(r"^=== (\S+)\n", out, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def g_initramfs(kit: linuxkit.Kit, r: GuestRun, out_dir: Path) -> Path:
    return linuxkit.build_initramfs(kit, G_PROLOGUE + r.script + G_EPILOGUE, r.modules, r.files,
                                    out_dir / f"g-{r.name}.cpio")


def g_cmdline(r: GuestRun) -> str:
    return f"console=ttyS0 panic=-1 quiet {r.cmdline}".strip()


def _quote_with_d(arg: str) -> str:
    """Single-quote ``arg`` for bash but let ``$D`` expand."""
    return "'" + arg.replace("'", "'\\''").replace("$D", "'\"$D\"'") + "'"


def h_script(kit: linuxkit.Kit, r: GuestRun, initrd: Path) -> str:
    boot = int(min(r.boot_timeout, r.timeout))
    if r.vmm == "hyperpy":
        cmd = [sys.executable, "-m", "hyperpy", "run", "--kernel", str(kit.vmlinux),
               "--initramfs", str(initrd), "--cmdline", g_cmdline(r),
               "--serial", "file=$D/serial.log", "-v", "--log-file", "$D/vmm.log", *r.args]
        if r.api:
            cmd += ["--api-socket", "path=$D/api.sock"]
    else:
        cmd = ["qemu-system-x86_64", "-accel", "kvm", "-nodefaults", "-no-user-config",
               "-display", "none", "-no-reboot", "-kernel", str(kit.vmlinux),
               "-initrd", str(initrd), "-append", g_cmdline(r),
               "-serial", "file:$D/serial.log", *r.args]
    vmm = " ".join(_quote_with_d(a) for a in cmd)
    remote = f"{shlex.quote(sys.executable)} -m hyperpy remote --api-socket \"$D/api.sock\""
    return f"""
D=$(mktemp -d /run/g-{r.name}.XXXX)
cd "$D"
REMOTE="{remote}"
# The API's counters with curl (a Python client takes seconds to start at TCG speed).
counters() {{ curl -s --max-time 30 --unix-socket "$D/api.sock" http://localhost/api/v1/vm.counters; echo; }}
wait_serial() {{  # wait_serial TEXT SECONDS: until G printed TEXT (or the VMM ended)
    local i=0
    while ! grep -q -- "$1" "$D/serial.log" 2>/dev/null; do
        kill -0 $VMM 2>/dev/null || return 1
        i=$((i + 1)); [ $i -gt $(($2 * 10)) ] && return 1
        sleep 0.1
    done
}}
stall_report() {{
    for t in /proc/$VMM/task/*; do
        echo "thread ${{t##*/}} $(cat $t/comm) state=$(cut -d' ' -f3 $t/stat) wchan=$(cat $t/wchan)"
        sed 's/^/    /' $t/stack 2>/dev/null | head -12
    done
    mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
    for n in 1 2; do
        for v in /sys/kernel/debug/kvm/$VMM-*; do
            [ -d "$v" ] || continue
            echo "kvm ${{v##*/}} sample $n: $(cd $v && for f in *; do [ -f $f ] && x=$(cat $f 2>/dev/null) \
                && [ "$x" != 0 ] && printf '%s=%s ' $f "$x"; done)"
        done
        [ $n = 1 ] && sleep 5
    done
    [ -S "$D/api.sock" ] && echo "api counters: $(counters)"
    echo "serial bytes: $(wc -c < "$D/serial.log" 2>/dev/null)"
    dmesg | tail -15
}}
{r.pre}
T0=$(date +%s.%N)
{vmm} < {r.stdin} > "$D/vmm.out" 2>&1 &
VMM=$!
# The watchdog: G must print HPBOOT within {boot} s and end within {int(r.timeout)} s.  A G that
# never booted is a stall: what H sees of it (the VMM's threads and kernel stacks, KVM's exit
# counts 5 s apart, its last kernel messages) is kept before the kill, for run() to quote.
(
    start=$SECONDS
    while kill -0 $VMM 2>/dev/null; do
        t=$((SECONDS - start)); why=
        [ $t -ge {int(r.timeout)} ] && why="killed after {int(r.timeout)} s"
        [ $t -ge {boot} ] && ! grep -q '^HPBOOT' "$D/serial.log" 2>/dev/null \
            && why="killed: G did not boot in {boot} s"
        if [ -n "$why" ]; then
            stall_report > "$D/stall.txt" 2>&1
            echo "$why" > "$D/watchdog.txt"
            kill -9 $VMM 2>/dev/null
            break
        fi
        sleep 1
    done
) &
WATCHDOG=$!
{r.during}
if [ "{r.vmm}" = hyperpy ] && [ "{int(r.api)}" = 1 ]; then
    wait_serial '^HPCOUNTERS' {int(r.timeout)} && {{ echo "=== counters"; counters; }}
    wait_serial '^HPDONE' 30 || true
    sleep 1
    $REMOTE shutdown-vmm >/dev/null 2>&1
fi
wait $VMM; RC=$?
kill $WATCHDOG 2>/dev/null
T1=$(date +%s.%N)
[ -f "$D/watchdog.txt" ] && {{ echo "=== watchdog"; cat "$D/watchdog.txt"; echo "=== stall"; cat "$D/stall.txt"; }}
echo "=== vmm-rc"; echo $RC
echo "=== vmm-seconds"; python3 -c "print(round($T1 - $T0, 2))"
{r.post}
echo "=== vmm-out"; tail -c 20000 "$D/vmm.out"
echo "=== vmm-log"; tail -c 20000 "$D/vmm.log" 2>/dev/null
echo "=== serial"; cat "$D/serial.log" 2>/dev/null
echo "=== end"
# Whatever this run left in the background (a TCP sink G never reached) goes with it, so the
# next run finds its port free.
kill $(jobs -p) 2>/dev/null
rm -rf "$D"
"""


def _script_in_h(h: L1Host, r: GuestRun, script: str):
    try:
        return h.script(f"g-{r.name}", script, timeout=r.timeout + 120)
    except HostError as e:
        # H itself died (docs/testing.md: a rare oops of H's kernel under L0's multi-threaded
        # TCG).  Said loudly; H is booted again and this G runs once more.
        h.close()
        oops = "\n".join(ln for ln in h.console().splitlines()
                         if re.search(r"BUG|Oops|RIP:|panic|kvm|\] [ ?]*\w+\+0x", ln))
        print(f"\nWARNING: the L1 host died during {r.name}, rebooting it: {str(e).splitlines()[0]}\n"
              f"H's console (the oops):\n{oops[-3000:]}")
        h.start()
        return h.script(f"g-{r.name}", script, timeout=r.timeout + 120)


def run(h: L1Host, kit: linuxkit.Kit, r: GuestRun, out_dir: Path) -> Outcome:
    initrd = g_initramfs(kit, r, out_dir)
    script = h_script(kit, r, initrd)
    res = _script_in_h(h, r, script)
    sections = _section_split(res.out.replace("\r\n", "\n"))
    if "did not boot" in sections.get("watchdog", ""):
        # G never reached its init (docs/testing.md: seen once in CI, a G stuck before its
        # kernel's perf init under a loaded L0).  Said loudly with what H saw; G runs once more.
        (out_dir / f"g-{r.name}.stall.out").write_text(res.out)
        print(f"\nWARNING: G {r.name} did not boot, running it once more; what H saw:\n"
              f"{sections['stall'][-4000:]}\nvmm-log:\n{sections.get('vmm-log', '')[-1500:]}")
        res = _script_in_h(h, r, script)
        sections = _section_split(res.out.replace("\r\n", "\n"))
    (out_dir / f"g-{r.name}.out").write_text(res.out)
    serial = sections.get("serial", "")
    facts = dict(re.findall(r"^HPFACT (\S+) ?(.*)$", serial, re.M))
    return Outcome(r, res.rc, res.out, res.seconds, sections, linuxkit.parse_checks(serial), facts)
