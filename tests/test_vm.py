"""The VM test bed itself: a real Debian 12 host (systemd PID 1, cgroup v2), the checkout's ffrtmp
inside, limits as systemd-run puts them, a reboot keeps the disk, nothing left behind, image cached."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need_vm, wait_for
from vm import REPO, VM, Boot, Script, image_key

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]
VM_PY = [sys.executable, str(REPO / "tests" / "vm.py")]

# The workload prints its own scope's cgroup files while it runs.
PROBE = (
    'd=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); echo "$d"; '
    'cat "$d/cpu.max" "$d/cpu.weight" "$d/memory.max"'
)
SCRIPTS = [
    Script(
        "basics",
        """cat /proc/1/comm
stat -fc %T /sys/fs/cgroup
systemctl is-system-running --wait
cat /proc/sys/kernel/random/boot_id > /var/lib/ffrtmp-vm-boot-id
ffrtmp --help > "$OUT/help.txt" 2>&1; echo "help=$?"
""",
    ),
    Script(
        "limits",
        f"""probe='{PROBE}; sleep 1'
ffrtmp run --cpu-quota 50 --cpu-weight 200 --memory-max 64M -- sh -c "$probe" > "$OUT/ffrtmp.txt"
echo "ffrtmp=$?"
systemd-run --scope -q -p CPUQuota=50% -p CPUWeight=200 -p MemoryMax=64M -- sh -c "$probe" \\
  > "$OUT/systemd-run.txt"
echo "systemd-run=$?"
""",
    ),
    Script(
        "after",
        """systemctl list-units --all --plain --no-legend 'ffrtmp-*.scope' 'run-*.scope'
pgrep -a sleep
echo done
""",
    ),
]


@pytest.fixture(scope="module")
def boot(vm: VM) -> Boot:
    return vm.boot(SCRIPTS)


def test_pid1_is_systemd_on_pure_cgroup_v2_booted_fully(boot: Boot) -> None:
    assert boot["basics"].status == 0, boot["basics"].stderr
    # ... and the boot is over (the scripts run after it) with no unit failed.
    assert boot["basics"].stdout.splitlines()[:3] == ["systemd", "cgroup2fs", "running"]


def test_the_checkouts_ffrtmp_runs_inside(boot: Boot) -> None:
    assert "help=0" in boot["basics"].stdout
    assert "Usage: ffrtmp" in (boot["basics"].files / "help.txt").read_text()


def test_limits_land_as_systemd_run_puts_them(boot: Boot) -> None:
    limits = boot["limits"]
    assert limits.status == 0 and limits.stdout.split() == ["ffrtmp=0", "systemd-run=0"], limits.stderr
    ours = (limits.files / "ffrtmp.txt").read_text().split("\n")
    theirs = (limits.files / "systemd-run.txt").read_text().split("\n")
    assert ours[0].startswith("/sys/fs/cgroup/ffrtmp.slice/ffrtmp-") and ours[0].endswith(".scope")
    assert theirs[0].endswith(".scope")
    assert ours[1:4] == theirs[1:4] == ["50000 100000", "200", str(64 * 1024 * 1024)]


def test_nothing_left_running_inside_after_the_jobs(boot: Boot) -> None:
    assert boot["after"].stdout.strip() == "done"


def test_a_second_boot_keeps_the_disk(vm: VM, boot: Boot) -> None:
    ids = "cat /var/lib/ffrtmp-vm-boot-id /proc/sys/kernel/random/boot_id; echo $BOOT"
    again = vm.boot([Script("again", ids)])
    before, now, number = again["again"].stdout.split()
    assert again["again"].status == 0
    assert before != now and number == "2"


def _qemu_mentioning(path: Path) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if proc.name.isdigit() and cmd.startswith(b"qemu-system") and str(path).encode() in cmd:
            found.append(proc.name)
    return found


def test_command_form_exits_with_the_commands_status_and_leaves_nothing(tmp_path: Path) -> None:
    need_vm()
    env = {**os.environ, "FFRTMP_VM_WORK": str(tmp_path)}
    cmd = "cat /proc/1/comm; stat -fc %T /sys/fs/cgroup; echo oops >&2; exit 7"
    r = subprocess.run([*VM_PY, "run", "--", "sh", "-c", cmd], env=env, capture_output=True, text=True)
    assert (r.returncode, r.stdout.split(), r.stderr.strip()) == (7, ["systemd", "cgroup2fs"], "oops")
    assert list(tmp_path.iterdir()) == [] and _qemu_mentioning(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_to_the_command_stops_the_vm(tmp_path: Path, sig: signal.Signals) -> None:
    need_vm()
    env = {**os.environ, "FFRTMP_VM_WORK": str(tmp_path)}
    proc = subprocess.Popen([*VM_PY, "run", "--", "sleep", "600"], env=env, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: _qemu_mentioning(tmp_path), timeout=120, what="QEMU")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig and f"interrupted by {sig.name}" in err
    assert list(tmp_path.iterdir()) == [] and _qemu_mentioning(tmp_path) == []


def test_a_second_run_reuses_the_cached_image(vm: VM) -> None:
    manifest = vm.image / "manifest.json"
    built = manifest.stat().st_mtime_ns
    r = subprocess.run([*VM_PY, "image"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == str(vm.image)
    assert f"image {image_key()}: cached" in r.stderr and "building" not in r.stderr
    assert manifest.stat().st_mtime_ns == built
