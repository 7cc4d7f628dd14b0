"""A real Debian 12 host for tests: systemd as PID 1, pure cgroup v2, under QEMU. Test bed ONLY.

Usage as a command:

    python3 tests/vm.py run -- CMD [ARGS...]
    python3 tests/vm.py image            # build or find the cached image; print its directory

`run` boots the VM, runs CMD inside as root (a service of the VM's systemd, after the boot; cwd a copy of
this checkout, the image's venv with the checkout importable first on PATH), powers it off and
exits with CMD's status (125 when the VM could not boot or CMD did not finish). CMD's stdout and
stderr come back after the power-off, not live. Nothing stays running: QEMU dies with this
process, also on SIGTERM/SIGINT/SIGHUP/SIGKILL.

The image (Debian's packages only, through this machine's apt sources, with mmdebstrap) is cached
under /var/cache/ffrtmp-vm/<key>/, keyed by everything that goes into it; the checkout and the
scenario scripts come in per boot on a second small ext4 disk, and the results go back on it
(read with debugfs, no mount on the host). Facts behind it: shared/notes/real-host-vm.md.

In tests (the `vm` fixture of conftest.py, one session per module):

    boot = vm.boot([Script("name", "shell text"), ...])   # one boot, the scripts in order
    boot["name"].status, .stdout, .stderr, .files          # .files: what the script put in $OUT
    vm.boot([...])                                         # again: a reboot of the same root disk
"""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("FFRTMP_VM_CACHE", "/var/cache/ffrtmp-vm"))
WORK = Path(os.environ.get("FFRTMP_VM_WORK", "/var/tmp"))  # per-session disks; never /tmp
SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
SUITE = "bookworm"
TOOLS = ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "mkfs.ext4", "e2fsck", "debugfs", "unshare")
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "udev", "python3", "python3-venv", "linux-image-cloud-amd64",
    "initramfs-tools", "procps", "util-linux", "iproute2", "ffmpeg", "curl", "passwd", "adduser",
    "psmisc", "libpam-systemd", "dbus-user-session",
)  # fmt: skip
# Wheels for the guest's CPython 3.11, beside the project's own dependencies: setuptools and wheel
# let `pip install .` of the checkout build offline inside (the README's install steps).
EXTRA_WHEELS = ("setuptools>=61", "wheel")
VENV = "/opt/ffrtmp/venv"
WHEELS = "/opt/ffrtmp/wheels"
KERNEL_ARGS = "root=/dev/vda rw console=ttyS0 quiet panic=-1 systemd.show_status=0"
QEMU = (
    "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max", "-m", "2048", "-smp", "2",
    "-nographic", "-no-reboot", "-nic", "none", "-monitor", "none",
)  # fmt: skip
FORMAT = 1  # bump to force a rebuild when something not listed in the key changes

# The runner comes in on the data disk with each boot (changing it rebuilds nothing); the image's
# unit mounts that disk and runs it, then powers the VM off.
RUNNER = f"""#!/bin/sh
say() {{ echo "ffrtmp-vm: $*" > /dev/ttyS0; }}
cat /proc/uptime > /vm/out/uptime-start
# The image's venv is the checkout's .venv, as scripts/bootstrap.sh would have made it.
ln -s {VENV} /vm/src/.venv && rm -f {VENV}/.installed-* && \\
  touch "{VENV}/.installed-$(sha256sum /vm/src/pyproject.toml | cut -c1-16)"
export PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \\
  LANG=C.UTF-8 VIRTUAL_ENV={VENV} SRC=/vm/src WHEELS={WHEELS} BOOT="$(cat /vm/boot)"
for s in /vm/scripts/*; do
  [ -e "$s" ] || continue
  n=${{s##*/}}; o=/vm/out/$n; mkdir -p "$o/files"
  say "$n: start"
  (cd /vm/src && OUT=$o/files "$s" < /dev/null > "$o/stdout" 2> "$o/stderr"); rc=$?
  echo $rc > "$o/status"; sync; say "$n: exit $rc"
done
cat /proc/uptime > /vm/out/uptime-end
sync
"""
# Files written into the image (path -> text); all of it is part of the cache key.
GUEST = {
    "etc/systemd/system/ffrtmp-vm-runner.service": """[Unit]
Description=ffrtmp VM test runner
After=multi-user.target
[Service]
# exec, not oneshot: the boot finishes while the scripts run (is-system-running says so), as on a
# host where commands come after the boot.
Type=exec
ExecStart=/bin/sh -c 'mkdir -p /vm && mount /dev/vdb /vm && exec /vm/runner'
ExecStopPost=/bin/systemctl poweroff --no-block
TimeoutStartSec=infinity
[Install]
WantedBy=multi-user.target
""",
    "etc/fstab": "/dev/vda / ext4 rw,errors=remount-ro 0 0\n",
    "etc/hostname": "ffrtmp-vm\n",
    "etc/hosts": "127.0.0.1 localhost ffrtmp-vm\n::1 localhost\n",
    # No network inside: pip finds everything among the brought-in wheels.
    "etc/pip.conf": f"[global]\nno-index = true\nfind-links = {WHEELS}\ndisable-pip-version-check = true\n",
    # The checkout of each boot (/vm/src) is importable from the venv, as an editable install is.
    f"{VENV[1:]}/lib/python3.11/site-packages/ffrtmp-checkout.pth": "/vm/src\n",
    f"{VENV[1:]}/bin/ffrtmp": f"#!{VENV}/bin/python3\nimport sys\n\nfrom ffrtmp_systemd.cli import main\n\n"
    "sys.exit(main())\n",
}
ENABLE = {
    "etc/systemd/system/multi-user.target.wants/ffrtmp-vm-runner.service": "../ffrtmp-vm-runner.service",
}
# Timers that would only cost time in a VM that lives for a minute.
MASK = ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer",
        "dpkg-db-backup.timer", "systemd-tmpfiles-clean.timer")  # fmt: skip
MACHINE_ID = "f3e1c0de5eed4b1d9a7c2b6e8d4f0a11"
CHROOT = 'chroot "$1" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8'


class VMUnavailable(RuntimeError):
    """This machine cannot build or boot the VM; the message says why."""


def why_unavailable() -> str | None:
    """Why the VM cannot boot here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (mmdebstrap builds the image as root)"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is missing (scripts/bootstrap.sh installs qemu-system-x86 qemu-utils mmdebstrap)"
    if not SOURCES.exists():
        return f"{SOURCES} is missing (the image is built from this machine's apt sources)"
    return None


def _say(msg: str) -> None:
    print(f"vm: {msg}", file=sys.stderr, flush=True)


def _die_with_parent(sig: int) -> Callable[[], None]:
    """For preexec_fn: the kernel sends the child `sig` when this process dies."""
    parent = os.getpid()

    def arm() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # died before the line above
            os._exit(1)

    return arm


# -- the image ----------------------------------------------------------------------------------
def requirements() -> list[str]:
    """The project's dependencies with its test tools (pyproject.toml) and the build wheels."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return sorted({*project["dependencies"], *project["optional-dependencies"]["test"], *EXTRA_WHEELS})


def image_key() -> str:
    """A hash of every input of the image: packages, guest files, wheel specs, apt sources."""
    inputs = {
        "format": FORMAT,
        "suite": SUITE,
        "packages": PACKAGES,
        "guest": GUEST,
        "enable": ENABLE,
        "mask": MASK,
        "requirements": requirements(),
        "sources": SOURCES.read_text(),
        "hooks": _hooks(Path("/W"), Path("/O")),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _hooks(wheels: Path, overlay: Path) -> list[str]:
    """mmdebstrap customize hooks ($1 is the new root): wheels, venv, guest files."""
    reqs = " ".join(shlex.quote(r) for r in requirements())
    return [
        f'mkdir -p "$1/opt/ffrtmp" && cp -a {wheels} "$1{WHEELS}"',
        f"{CHROOT} python3 -m venv {VENV}",
        f"{CHROOT} {VENV}/bin/pip install -q --no-index --find-links {WHEELS} {reqs}",
        f'cp -a {overlay}/. "$1/"',
        f'echo {MACHINE_ID} > "$1/etc/machine-id"',  # fixed: the journal stays one across reboots
    ]


def image(log: bool = True) -> Path:
    """The directory of the cached image (disk.img, vmlinuz, initrd.img), built if missing."""
    reason = why_unavailable()
    if reason:
        raise VMUnavailable(reason)
    key = image_key()
    dest = CACHE / key
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f".lock-{key}").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent build of the same key: wait for it
        if (dest / "manifest.json").exists():
            (dest / "last-used").touch()
            if log:
                _say(f"image {key}: cached in {dest}")
            return dest
        for stale in CACHE.glob(f"{key}.build.*"):  # a build killed before; we hold the lock
            _remove_tree(stale)
        _say(f"image {key}: building (mmdebstrap + pip, a few minutes, once) in {dest}")
        start = time.monotonic()
        _build(key, dest)
        (dest / "last-used").touch()
        _say(f"image {key}: built in {time.monotonic() - start:.0f} s")
    _prune(keep=key)
    return dest


def _prune(keep: str) -> None:
    """Remove images of other keys unused for two days (a session may still run on a recent one)."""
    for manifest in CACHE.glob("*/manifest.json"):
        used = manifest.with_name("last-used")
        stamp = used if used.exists() else manifest
        if manifest.parent.name != keep and time.time() - stamp.stat().st_mtime > 2 * 86400:
            _remove_tree(manifest.parent)
            (CACHE / f".lock-{manifest.parent.name}").unlink(missing_ok=True)


def _build(key: str, dest: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f"{key}.build.", dir=CACHE))
    try:
        start = time.monotonic()
        log = tmp / "build.log"
        wheels = tmp / "wheels"
        _run([_pip_python(), "-m", "pip", "download", "-q", "--disable-pip-version-check",
              "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
              "-d", str(wheels), *requirements()], log)  # fmt: skip
        overlay = tmp / "overlay"
        for rel, text in GUEST.items():
            assert not rel.startswith("/"), rel  # relative to the image's root, never the host's
            (overlay / rel).parent.mkdir(parents=True, exist_ok=True)
            (overlay / rel).write_text(text)
            (overlay / rel).chmod(0o755 if "/bin/" in f"/{rel}" or "sbin/" in rel else 0o644)
        for rel, target in ENABLE.items():
            (overlay / rel).parent.mkdir(parents=True, exist_ok=True)
            (overlay / rel).symlink_to(target)
        for unit in MASK:
            (overlay / "etc/systemd/system" / unit).symlink_to("/dev/null")
        tree = tmp / "tree"
        hooks = [f"--customize-hook={h}" for h in _hooks(wheels, overlay)]
        # Its own mount namespace: the chroot's /proc, /sys, /dev mounts die with it, however it ends.
        _run(["unshare", "--mount", "--propagation", "private", "mmdebstrap", "--quiet",
              "--variant=minbase", f"--include={','.join(PACKAGES)}", *hooks, SUITE, str(tree),
              str(SOURCES)], log, env={**os.environ, "TMPDIR": str(tmp)})  # fmt: skip
        for name in ("vmlinuz", "initrd.img"):
            found = sorted((tree / "boot").glob(f"{name}-*"))
            if len(found) != 1:
                raise RuntimeError(f"image: expected one {name}-* in boot/, found {found}")
            shutil.copy(found[0], tmp / name)
        _run(["mkfs.ext4", "-q", "-F", "-d", str(tree), "-L", "root", str(tmp / "disk.img"), "4G"], log)
        for part in (tree, wheels, overlay):
            _remove_tree(part)
        manifest = {"key": key, "packages": PACKAGES, "requirements": requirements(),
                    "build_seconds": round(time.monotonic() - start, 1)}  # fmt: skip
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        tmp.chmod(0o755)
        tmp.rename(dest)
    except BaseException:
        _remove_tree(tmp)
        raise


def _pip_python() -> str:
    """A Python with pip: the checkout's .venv (scripts/bootstrap.sh), else this one."""
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _run(argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run a build step, output to `log`; it gets SIGTERM if we die, or if we are interrupted."""
    with log.open("ab") as out, subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent(signal.SIGTERM),
    ) as proc:  # fmt: skip
        try:
            rc = proc.wait()
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
    if rc != 0:
        tail = "\n".join(_read(log).splitlines()[-20:])
        raise RuntimeError(f"image: {argv[0]} {' '.join(argv[1:4])}... exited {rc}:\n{tail}")


def _remove_tree(path: Path) -> None:
    """rm -rf, but never through a mount point (a build's /proc or /dev, should one be left)."""
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    inside = [m.split()[4] for m in mounts if m.split()[4].startswith(f"{path}/")]
    if inside:
        raise RuntimeError(f"vm: not removing {path}: mounts inside it: {inside}")
    shutil.rmtree(path, ignore_errors=True)


# -- sessions and boots -------------------------------------------------------------------------
@dataclass(frozen=True)
class Script:
    """A scenario script run as root inside; no shebang means /bin/sh. It may write files to $OUT."""

    name: str
    text: str


@dataclass(frozen=True)
class Result:
    """What one script left: its exit status (None: it did not finish), output and $OUT files."""

    status: int | None
    stdout: str
    stderr: str
    files: Path


@dataclass(frozen=True)
class Boot:
    """One boot: each script's result by name, the serial console, the timings (seconds)."""

    results: dict[str, Result]
    console: str
    seconds: float  # QEMU start to exit
    ready: float | None  # guest uptime when the first script started

    def __getitem__(self, name: str) -> Result:
        return self.results[name]


class VM:
    """One VM session: a copy-on-write disk over the cached image, booted once per `boot()`.

    The root disk persists across boots of the session (a second `boot()` is a reboot); the data
    disk (checkout, scripts, results) is made fresh for each boot."""

    def __init__(self, work: Path = WORK) -> None:
        self.image = image(log=False)
        _sweep_stale_sessions(work)
        self.dir = Path(tempfile.mkdtemp(prefix="ffrtmp-vm.", dir=work))
        (self.dir / "pid").write_text(str(os.getpid()))
        self.boots = 0
        self._qemu: subprocess.Popen[bytes] | None = None
        try:
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                 str(self.image / "disk.img"), str(self.dir / "root.qcow2")],
                check=True, capture_output=True,
            )  # fmt: skip
        except BaseException:
            self.close()
            raise

    def boot(self, scripts: Sequence[Script], timeout: float = 600) -> Boot:
        """Boot, run `scripts` in order, power off; results come back. A timeout kills the VM."""
        self.boots += 1
        here = self.dir / f"boot{self.boots}"
        data = self._data_disk(here, scripts)
        console = here / "console.log"
        argv = [*QEMU, "-kernel", str(self.image / "vmlinuz"), "-initrd", str(self.image / "initrd.img"),
                "-append", KERNEL_ARGS, "-serial", f"file:{console}",
                "-drive", f"file={self.dir / 'root.qcow2'},format=qcow2,if=virtio",
                "-drive", f"file={data},format=raw,if=virtio"]  # fmt: skip
        start = time.monotonic()
        with (here / "qemu.log").open("wb") as log:
            self._qemu = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent(signal.SIGKILL),
            )  # fmt: skip
        try:
            self._qemu.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            self._kill_qemu()
        seconds = time.monotonic() - start
        out = here / "back"
        out.mkdir()
        # Killed (timeout) before its clean unmount: replay the journal, or debugfs misses files.
        subprocess.run(["e2fsck", "-fy", str(data)], capture_output=True)
        subprocess.run(["debugfs", "-R", f"rdump /out {out}", str(data)], check=True, capture_output=True)
        data.unlink()
        return self._collect(out / "out", scripts, console, seconds)

    def _data_disk(self, here: Path, scripts: Sequence[Script]) -> Path:
        stage = here / "stage"
        for sub in ("scripts", "out"):
            (stage / sub).mkdir(parents=True)
        (stage / "boot").write_text(f"{self.boots}\n")
        (stage / "runner").write_text(RUNNER)
        (stage / "runner").chmod(0o755)
        _copy_checkout(stage / "src")
        names = [s.name for s in scripts]
        if len(set(names)) != len(names) or not all(re.fullmatch(r"[a-z0-9][a-z0-9_-]*", n) for n in names):
            raise ValueError(f"vm: script names must be unique, [a-z0-9_-]: {names}")
        for i, script in enumerate(scripts):
            path = stage / "scripts" / f"{i:02d}-{script.name}"
            path.write_text(script.text if script.text.startswith("#!") else f"#!/bin/sh\n{script.text}")
            path.chmod(0o755)
        data = here / "data.img"
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(stage), "-L", "ffrtmpdata", str(data), "1G"],
                       check=True, capture_output=True)  # fmt: skip
        shutil.rmtree(stage)
        return data

    def _collect(self, out: Path, scripts: Sequence[Script], console: Path, seconds: float) -> Boot:
        results = {}
        for i, script in enumerate(scripts):
            d = out / f"{i:02d}-{script.name}"
            status = _read(d / "status").strip()
            (d / "files").mkdir(parents=True, exist_ok=True)
            results[script.name] = Result(
                int(status) if status else None, _read(d / "stdout"), _read(d / "stderr"), d / "files"
            )
        uptime = _read(out / "uptime-start").split()
        text = _read(console)
        return Boot(results, text, round(seconds, 1), float(uptime[0]) if uptime else None)

    def _kill_qemu(self) -> None:
        if self._qemu is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._qemu.pid, signal.SIGKILL)
            self._qemu.wait()
            self._qemu = None

    def close(self) -> None:
        """Kill QEMU if it runs, remove the session's disks. Safe to call twice."""
        self._kill_qemu()
        shutil.rmtree(self.dir, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """What of this session still exists on the host (empty after close())."""
        left = [str(self.dir)] if self.dir.exists() else []
        return left + [f"process {p}" for p in _qemu_pids(str(self.dir))]

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _copy_checkout(dest: Path) -> None:
    """The checkout's files (tracked and untracked, not ignored; .git and .venv left out), with
    bytecode compiled here when this Python is the guest's 3.11 (importing is slow inside)."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
    )
    if listed.returncode == 0:
        for rel in filter(None, listed.stdout.decode().split("\0")):
            src = REPO / rel
            if src.is_file():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)
    else:
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__"))
    if sys.version_info[:2] == (3, 11):
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(dest / "ffrtmp_systemd")],
                       capture_output=True)  # fmt: skip


def _qemu_pids(marker: str) -> list[int]:
    """PIDs of QEMU processes whose command line mentions `marker`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (proc / "cmdline").read_bytes()
                if cmd.startswith(b"qemu-system") and marker.encode() in cmd:
                    pids.append(int(proc.name))
    return pids


def _sweep_stale_sessions(work: Path) -> None:
    """Remove session directories whose owner died without cleaning up (SIGKILL)."""
    for old in work.glob("ffrtmp-vm.*"):
        pid = _read(old / "pid").strip()
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and not _qemu_pids(str(old)):
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM/SIGHUP (as `timeout` sends) unwind like Ctrl-C, so every `finally` runs."""

    def handler(sig: int, _frame: object) -> None:
        raise KeyboardInterrupt(sig)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str]) -> int:
    usage = "usage: python3 tests/vm.py run -- CMD [ARGS...] | python3 tests/vm.py image"
    if argv[:1] == ["image"] and len(argv) == 1:
        try:
            print(image())
        except VMUnavailable as err:
            print(f"vm: cannot build here: {err}", file=sys.stderr)
            return 125
        return 0
    if len(argv) < 3 or argv[0] != "run" or argv[1] != "--":
        print(usage, file=sys.stderr)
        return 2
    try:
        with _signals_raise():
            return _run_command(argv[2:])
    except KeyboardInterrupt as err:
        sig = signal.Signals(err.args[0] if err.args else signal.SIGINT)
        print(f"vm: interrupted by {sig.name}; the VM was stopped", file=sys.stderr)
        return 128 + sig


def _run_command(cmd: list[str]) -> int:
    why = why_unavailable()
    if why is not None:
        print(f"vm: cannot boot here: {why}", file=sys.stderr)
        return 125
    with VM() as vm:
        timeout = float(os.environ.get("FFRTMP_VM_TIMEOUT", "900"))
        boot = vm.boot([Script("cmd", f"#!/bin/sh\nexec {shlex.join(cmd)}\n")], timeout=timeout)
        result = boot["cmd"]
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        if result.status is None:
            tail = "\n".join(boot.console.splitlines()[-15:])
            print(f"vm: the command did not finish ({boot.seconds:.0f} s); console:\n{tail}", file=sys.stderr)
            return 125
        return result.status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
