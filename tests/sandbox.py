"""A real systemd for tests: booted as PID 1 of fresh pid/mount/cgroup namespaces. Test bed ONLY.

Usage as a command (a machine without systemd as PID 1 can try the tool this way):

    python3 tests/sandbox.py run [--agent] -- CMD [ARGS...]

boots a sandbox, runs CMD inside its PID, mount and cgroup namespaces with
DBUS_SYSTEM_BUS_ADDRESS pointing at the sandbox's bus and the repo's .venv/bin first on PATH,
tears everything down and exits with CMD's status. Facts behind it: shared/notes/sandbox.md.
The units of units/ are installed in it as on a host (not enabled), ffrtmp-agent.service with a
drop-in that runs the repo's venv; `--agent` starts ffrtmp.socket before CMD (the installed mode,
as `systemctl start ffrtmp.socket` inside does), else `ffrtmp run` governs in-process.
SIGTERM, SIGHUP (and, for the command, SIGINT) tear every sandbox of the process down before it dies
of the signal; under pytest SIGINT stays KeyboardInterrupt, whose unwinding closes them too.
"""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path

from helpers import children, free_port, nspids, wait_for

REPO = Path(__file__).resolve().parent.parent
SYSTEMD = Path("/lib/systemd/systemd")
DBUS_DAEMON = Path("/usr/bin/dbus-daemon")
CGROUP = Path("/sys/fs/cgroup")
V1 = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids")
BOOT_TARGET = "ffrtmp-sandbox.target"
AGENT = "ffrtmp-agent.service"
# Stub targets that transient units depend on; empty so that nothing of the host's is pulled in.
STUBS = (
    "sysinit",
    "basic",
    "shutdown",
    "sockets",
    "timers",
    "paths",
    "slices",
    "local-fs",
    "multi-user",
    "network",
    "network-online",
    "nss-user-lookup",
    "remote-fs",
    "umount",
    "final",
)

UNITS = {
    BOOT_TARGET: """[Unit]
Description=ffrtmp test sandbox
DefaultDependencies=no
Requires=dbus.socket dbus.service
After=dbus.socket dbus.service
""",
    "dbus.socket": """[Unit]
DefaultDependencies=no
[Socket]
ListenStream=/run/dbus/system_bus_socket
""",
    "dbus.service": f"""[Unit]
DefaultDependencies=no
Requires=dbus.socket
[Service]
Type=notify
ExecStart={DBUS_DAEMON} --system --address=systemd: --nofork --nopidfile --systemd-activation --nosyslog
""",
}

# Runs as the first process in the new namespaces: fresh cgroup mounts on a private tmpfs (a
# remount of the host's tmpfs would change the host), a private /run, then systemd as PID 1. Every
# mount is then made shared, in peer groups of this namespace only (unshare made them private first,
# so nothing reaches the host): as systemd does on a host (not in a container), so that a mount made
# inside later also shows in the namespace of a service with ProtectSystem= (the agent's), a slave.
INIT = r"""
set -e
mount -t tmpfs -o mode=755 ffrtmp-sandbox /sys/fs/cgroup
for c in {v1}; do mkdir /sys/fs/cgroup/$c; mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c; done
mkdir /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
mount --bind "$1/run" /run
mount --make-rshared /
exec {systemd} --system --unit={target} --log-target=console --log-level=notice
"""


LIVE: set[Sandbox] = set()  # booted or booting, not yet closed


def _die(sig: int, _frame: object) -> None:
    """Tear every sandbox down as on a normal exit, then die of the signal as without this handler."""
    for sb in list(LIVE):
        sb.close()
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)


def tear_down_on(*sigs: signal.Signals, always: bool = False) -> None:
    """Install `_die` for `sigs` where nobody else handles them (or `always`); main thread only."""
    if threading.current_thread() is threading.main_thread():
        for sig in sigs:
            if always or signal.getsignal(sig) == signal.SIG_DFL:
                signal.signal(sig, _die)


class SandboxUnavailable(RuntimeError):
    """This machine cannot boot a sandbox; the message says why."""


def why_unavailable() -> str | None:
    """Why a sandbox cannot boot here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (it mounts and creates cgroups)"
    for need in (SYSTEMD, DBUS_DAEMON):
        if not need.exists():
            return f"{need} is missing (apt-get install systemd dbus)"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (util-linux)"
    if not (CGROUP / "memory").is_dir() and not (CGROUP / "cgroup.controllers").exists():
        return "no cgroup hierarchy at /sys/fs/cgroup"
    return None


def _own_cgroups() -> dict[str, Path]:
    """Where this process sits now, per hierarchy (host paths), read once before anything moves."""
    out: dict[str, Path] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        for name in names.split(",") if names else ["unified"]:
            name = name.removeprefix("name=")
            mount = CGROUP / name if (CGROUP / name).is_dir() else CGROUP
            if name == "unified" and not (CGROUP / "unified").is_dir():
                mount = CGROUP
            out[name] = mount / path.lstrip("/")
    return out


class Sandbox:
    """One booted systemd with its own bus, directory and cgroup subtree."""

    def __init__(self, units_dir: Path = REPO / "units", *, agent: bool = False) -> None:
        """`agent`: start ffrtmp.socket once booted, so that `ffrtmp run` and `attach` inside go
        through the agent (the installed mode); without it they govern in-process."""
        reason = why_unavailable()
        if reason:
            raise SandboxUnavailable(reason)
        self.name = f"ffrtmp-sb-{uuid.uuid4().hex[:8]}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.name}.", dir="/var/tmp"))
        self.cgroups = {name: path / self.name for name, path in _own_cgroups().items()}
        # Commands started from outside get a CPU group of their own beside the sandbox's, as the
        # clients of a real host's systemd do (PID 1 sits in init.scope): else, where the caller
        # runs in a CPU cgroup without autogroup (some CI runners), 120 wrappers outweigh the whole
        # sandbox 120:1 and systemd runs its start jobs seconds late.
        self.clients = {
            c: self.cgroups[c].with_name(f"{self.name}-clients") for c in ("cpu",) if c in self.cgroups
        }
        self.bus_address = f"unix:path={self.dir}/run/dbus/system_bus_socket"
        # The agent's own state directory and its exporter's address: this sandbox's, never the host's
        # /var/lib/ffrtmp or 127.0.0.1:9464 (a sandbox shares the host's file system and network).
        self.agent_state = self.dir / "state"
        self.agent_listen = f"127.0.0.1:{free_port()}"
        self.pid = 0  # host PID of the sandbox's systemd
        self._proc: subprocess.Popen[bytes] | None = None
        self.agent = agent
        LIVE.add(self)
        tear_down_on(signal.SIGTERM, signal.SIGHUP)
        try:
            self._boot(units_dir)
            if agent:
                self.start_agent()
        except BaseException:
            self.close()
            raise

    # -- boot -------------------------------------------------------------------------------
    def _write_units(self, units_dir: Path) -> Path:
        udir = self.dir / "units"
        udir.mkdir()
        for stub in STUBS:
            (udir / f"{stub}.target").write_text("[Unit]\nDefaultDependencies=no\n")
        for name, text in UNITS.items():
            (udir / name).write_text(text)
        for unit in sorted(units_dir.glob("*")):
            if unit.is_file():
                shutil.copy(unit, udir / unit.name)
        if (udir / AGENT).exists():  # what an operator's `systemctl edit ffrtmp-agent.service` would write
            (udir / f"{AGENT}.d").mkdir()
            (udir / f"{AGENT}.d" / "sandbox.conf").write_text(
                "[Service]\nExecStart=\n"
                f"ExecStart={REPO / '.venv' / 'bin' / 'ffrtmp'} agent --state-dir {self.agent_state}\n"
                f"Environment=FFRTMP_EXPORTER_LISTEN={self.agent_listen} PYTHONDONTWRITEBYTECODE=1\n"
            )
            for sub in ("jobs", "results"):  # as units/tmpfiles.d/ffrtmp.conf makes /var/lib/ffrtmp
                (self.agent_state / sub).mkdir(parents=True)
        return udir

    def _make_cgroups(self) -> None:
        for path in self.clients.values():
            path.mkdir()
        for name, path in self.cgroups.items():
            path.mkdir()
            if name == "cpuset":  # an empty cpuset refuses tasks (ENOSPC)
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (path / f).write_text((path.parent / f).read_text())

    def _boot(self, units_dir: Path) -> None:
        udir = self._write_units(units_dir)
        (self.dir / "run").mkdir()
        self._make_cgroups()
        procs = " ".join(str(p / "cgroup.procs") for p in self.cgroups.values())
        init = INIT.format(
            v1=" ".join(c for c in V1 if c in self.cgroups), systemd=SYSTEMD, target=BOOT_TARGET
        )
        # Move ourselves into the new subtree first, so that the cgroup namespace is rooted there.
        launcher = (
            f'for f in {procs}; do echo $$ > "$f"; done; exec unshare --cgroup --pid --mount --fork '
            f"--mount-proc --propagation private sh -c '{init}' init \"$0\""
        )
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "container": "ffrtmp-sandbox",
            # The sandbox's private /run (never the host's /etc or /lib): without the transient and
            # runtime-control directories a daemon-reload or daemon-reexec drops every transient
            # scope's limits (the unit is reloaded without its file), unlike on a real host.
            "SYSTEMD_UNIT_PATH": f"/run/systemd/system.control:/run/systemd/transient:{udir}",
            "LANG": "C.UTF-8",
        }
        log = (self.dir / "systemd.log").open("wb")
        self._proc = subprocess.Popen(
            ["sh", "-c", launcher, str(self.dir)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

        def booted() -> bool:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"sandbox systemd exited: {self.log_tail()}")
            self.pid = self.pid or self._init_pid()
            return bool(self.pid) and self.state() in ("running", "degraded")

        try:
            wait_for(booted, timeout=30, every=0.05)
        except TimeoutError:
            raise RuntimeError(f"sandbox did not boot in 30 s: {self.log_tail()}") from None

    def _init_pid(self) -> int:
        """The host PID of the namespace's PID 1 (the child of unshare)."""
        assert self._proc is not None
        for kid in children(self._proc.pid):
            try:
                if Path(f"/proc/{kid}/comm").read_text().strip() == "systemd":
                    return int(kid)
            except OSError:
                pass
        return 0

    def state(self) -> str:
        """systemd's SystemState, "" while it does not answer (a busctl slower than 10 s on a loaded machine
        is a "not yet", as is an error: the boot's own time limit decides)."""
        try:
            r = self._state()
        except subprocess.TimeoutExpired:
            return ""
        return r.stdout.split('"')[1] if r.returncode == 0 and '"' in r.stdout else ""

    def _state(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "busctl",
                f"--address={self.bus_address}",
                "get-property",
                "org.freedesktop.systemd1",
                "/org/freedesktop/systemd1",
                "org.freedesktop.systemd1.Manager",
                "SystemState",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )

    def log_tail(self, n: int = 20) -> str:
        try:
            return " | ".join((self.dir / "systemd.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # -- use --------------------------------------------------------------------------------
    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a command inside: the sandbox's bus, the repo's venv first on PATH."""
        env = dict(os.environ)
        env["DBUS_SYSTEM_BUS_ADDRESS"] = self.bus_address
        env["PATH"] = f"{REPO / '.venv' / 'bin'}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        env.pop("container", None)
        env.update(extra or {})
        return env

    def argv(self, cmd: list[str]) -> list[str]:
        """`cmd` prefixed so that it runs in the sandbox's PID, mount and cgroup namespaces."""
        enter = ["nsenter", "-t", str(self.pid), "-p", "-m", "-C", f"--wd={os.getcwd()}", "--", *cmd]
        procs = " ".join(str(p / "cgroup.procs") for p in self.clients.values())
        return ["sh", "-c", 'for f in $0; do echo $$ > "$f" || exit 125; done; exec "$@"', procs, *enter]

    def run(
        self,
        cmd: list[str],
        *,
        check: bool = False,
        timeout: float = 60,
        env: dict[str, str] | None = None,
        **kw: object,
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` inside and wait for it; output captured as text unless told otherwise."""
        kw.setdefault("capture_output", True)
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            self.argv(cmd),
            env=self.env(env),
            check=check,
            timeout=timeout,
            text=True,
            **kw,
        )

    def spawn(
        self, cmd: list[str], *, env: dict[str, str] | None = None, **kw: object
    ) -> subprocess.Popen[bytes]:
        """Start `cmd` inside without waiting. `inner_pid(proc)` gives its PID inside the sandbox."""
        return subprocess.Popen(self.argv(cmd), env=self.env(env), **kw)  # type: ignore[call-overload, no-any-return]

    def inner_pid(self, proc: subprocess.Popen[bytes], timeout: float = 10) -> tuple[int, int]:
        """(host PID, sandbox PID) of the process that nsenter started for `proc`."""

        def entered() -> tuple[int, int] | None:
            for kid in children(proc.pid)[:1]:
                with contextlib.suppress(OSError):
                    if len(pids := nspids(kid)) > 1:  # in the sandbox's PID namespace already
                        return pids[0], pids[-1]
            return None

        return wait_for(entered, timeout, "nsenter to start its child", every=0.01)

    def host_pid(self, inner: int) -> int:
        """The host PID of a process whose PID inside the sandbox is `inner` (0 if none)."""
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                ns = next(ln for ln in (proc / "status").read_text().splitlines() if ln.startswith("NSpid:"))
                pids = ns.split()[1:]
                if (
                    len(pids) > 1
                    and int(pids[-1]) == inner
                    and os.readlink(proc / "ns" / "pid") == os.readlink(f"/proc/{self.pid}/ns/pid")
                ):
                    return int(proc.name)
            except (OSError, StopIteration):
                continue
        return 0

    def cgroup_file(self, controller: str, unit_cgroup: str, name: str) -> Path:
        """Host path of a cgroup file, e.g. ("memory", "/ffrtmp.slice/x.scope", "memory.limit_in_bytes")."""
        return self.cgroups[controller] / unit_cgroup.lstrip("/") / name

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", "--no-pager", *args])

    def start_agent(self) -> None:
        """`systemctl start ffrtmp.socket`: from now on the first `ffrtmp run` or `attach` starts the
        agent (socket activation) and every job goes through it."""
        r = self.systemctl("start", "ffrtmp.socket")
        if r.returncode != 0:
            raise RuntimeError(f"sandbox: ffrtmp.socket did not start: {r.stderr.strip()}")

    # -- teardown ---------------------------------------------------------------------------
    def close(self) -> None:
        """Kill the whole PID namespace, remove its cgroups and directory. Safe to call twice; a signal
        that comes meanwhile waits until it is done."""
        stop = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        held = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        try:
            self._close()
        finally:
            LIVE.discard(self)
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def _close(self) -> None:
        if self._proc is not None:
            if self.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=10)
            self._proc = None
        for top in [*self.cgroups.values(), *self.clients.values()]:
            _rmtree_cgroup(top)
        shutil.rmtree(self.dir, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """What of this sandbox still exists on the host (empty after close())."""
        left = [str(p) for p in [*self.cgroups.values(), *self.clients.values()] if p.exists()]
        if self.dir.exists():
            left.append(str(self.dir))
        if self.pid and Path(f"/proc/{self.pid}").exists():
            left.append(f"process {self.pid}")
        mounts = Path("/proc/self/mountinfo").read_text()
        left += [ln for ln in mounts.splitlines() if self.name in ln]
        return left

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rmtree_cgroup(top: Path) -> None:
    """rmdir a cgroup subtree depth-first; the killed tasks may take a moment to leave."""

    def removed() -> bool:
        with contextlib.suppress(OSError):
            for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
                os.rmdir(dirpath)
        return not top.exists()

    wait_for(removed, timeout=10, what=f"{top} to be removed")


def main(argv: list[str]) -> int:
    agent = argv[1:2] == ["--agent"]
    if agent:
        argv = argv[:1] + argv[2:]
    if len(argv) < 3 or argv[0] != "run" or argv[1] != "--":
        print("usage: python3 tests/sandbox.py run [--agent] -- CMD [ARGS...]", file=sys.stderr)
        return 2
    tear_down_on(signal.SIGINT, always=True)
    try:
        sandbox = Sandbox(agent=agent)
    except SandboxUnavailable as err:
        print(f"sandbox: cannot boot here: {err}", file=sys.stderr)
        return 125
    with sandbox:
        proc = subprocess.run(sandbox.argv(argv[2:]), env=sandbox.env())
        return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
