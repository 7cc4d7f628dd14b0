"""A live RTMP receiver adopted mid-stream: every frame arrives, no gap, no reconnect, no signal."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import result_of, scopes, wait_for
from helpers import free_port
from sandbox import Sandbox

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(90),
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed"),
]

FPS, SECONDS = 30, 12
FRAMES = FPS * SECONDS
MiB = 1024 * 1024
SEND = ["-re", "-f", "lavfi", "-i", f"testsrc2=size=640x360:rate={FPS}", "-t", str(SECONDS),
        "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", str(FPS)]  # fmt: skip
COPY = ["-c", "copy"]
TRANSCODE = ["-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", str(FPS),
             "-fps_mode", "passthrough"]  # fmt: skip
PF_EXITING = 0x4
QUIET = ["ffmpeg", "-hide_banner", "-nostdin", "-nostats"]


def listening(port: int) -> bool:
    """A socket in LISTEN state on `port` (read from /proc: connecting would take the one connection)."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(r.split()[1].endswith(f":{port:04X}") and r.split()[3] == "0A" for r in rows)


def progress(path: Path) -> dict[str, str]:
    """The last block of an ffmpeg -progress file."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    return dict(ln.split("=", 1) for ln in lines if "=" in ln)


class Sampler:
    """Reads the receiver's /proc status and cgroup every few ms until it is gone: what a signal or a
    move out of its scope would leave visible. Nothing here touches the process."""

    def __init__(self, pid: int, scope: str) -> None:
        self.pid, self.scope = pid, scope
        self.pending: set[str] = set()  # non-zero SigPnd/ShdPnd values seen
        self.states: set[str] = set()
        self.governed: list[bool] = []  # per sample: in its scope (cpu and memory)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.005):
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
                cgroup = Path(f"/proc/{self.pid}/cgroup").read_text()
                stat = Path(f"/proc/{self.pid}/stat").read_text()  # read last: PF_EXITING is never cleared
            except OSError:
                return
            if int(stat[stat.rindex(")") + 2 :].split()[6]) & PF_EXITING:
                return  # it is ending on its own; v1 cgroup paths of an exiting task read "/"
            fields = dict(ln.split(":\t", 1) for ln in status.splitlines() if ":\t" in ln)
            self.states.add(fields["State"][0])
            self.pending |= {f"{k}={fields[k].strip()}" for k in ("SigPnd", "ShdPnd") if int(fields[k], 16)}
            mine = [ln for ln in cgroup.splitlines() if ln.split(":")[1] in ("memory", "cpu", "cpu,cpuacct")]
            self.governed.append(bool(mine) and all(ln.endswith(f"/{self.scope}") for ln in mine))

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    @property
    def left_its_scope(self) -> bool:
        """Once adopted, was it ever seen outside its scope?"""
        first = self.governed.index(True) if True in self.governed else len(self.governed)
        return not all(self.governed[first:])


@dataclass
class Stream:
    """A receiver (`ffmpeg -listen 1`) and a real-time sender, both inside the sandbox."""

    receiver: subprocess.Popen[bytes]
    sender: subprocess.Popen[bytes]
    host_pid: int
    pid: int  # the receiver's PID inside the sandbox
    dir: Path

    @property
    def out(self) -> Path:
        return self.dir / "out.flv"

    def received(self) -> int:
        return int(progress(self.dir / "recv.progress").get("frame", "0"))

    def finish(self) -> tuple[int, int]:
        """Wait for both ends to stop on their own; their exit statuses (sender, receiver)."""
        return self.sender.wait(timeout=60), self.receiver.wait(timeout=60)

    def kill(self) -> None:
        for p in (self.sender, self.receiver):
            if p.poll() is None:
                p.kill()
                p.wait()


def spawn(sandbox: Sandbox, log: Path, cmd: list[str], **kw: object) -> subprocess.Popen[bytes]:
    """Start `cmd` inside the sandbox, its stderr to `log` (stdout discarded unless told otherwise)."""
    kw.setdefault("stdout", subprocess.DEVNULL)
    with log.open("wb") as f:
        return sandbox.spawn(cmd, stderr=f, **kw)


def start_stream(sandbox: Sandbox, d: Path, receive: list[str]) -> Stream:
    port = free_port()
    url = f"rtmp://127.0.0.1:{port}/live/s"
    receiver = spawn(
        sandbox, d / "recv.log",
        [*QUIET, "-progress", str(d / "recv.progress"), "-listen", "1", "-i", url, *receive, "-f", "flv",
         str(d / "out.flv")],
    )  # fmt: skip
    host_pid, pid = sandbox.inner_pid(receiver)
    wait_for(lambda: listening(port) or receiver.poll() is not None, what="the receiver to listen")
    assert receiver.poll() is None, (d / "recv.log").read_text()
    sender = spawn(
        sandbox, d / "send.log",
        [*QUIET, "-loglevel", "error", *SEND, "-progress", str(d / "send.progress"), "-f", "flv", url],
    )  # fmt: skip
    return Stream(receiver, sender, host_pid, pid, d)


@pytest.fixture
def streams() -> Iterator[list[Stream]]:
    """Streams a test started; whatever still runs at its end (a failed test) is killed."""
    made: list[Stream] = []
    yield made
    for s in made:
        s.kill()


def attach(sandbox: Sandbox, s: Stream, job: str, state: Path, *limits: str) -> subprocess.Popen[bytes]:
    """`ffrtmp attach` the receiver once its output is flowing (mid-stream)."""
    wait_for(lambda: s.received() >= FPS, timeout=30, what="frames to flow through the receiver")
    assert s.received() < FRAMES - 3 * FPS  # really mid-stream: seconds of it still to come
    return spawn(
        sandbox, s.dir / "attach.log",
        ["ffrtmp", "attach", "--pid", str(s.pid), "--job-id", job, *limits, "--json"],
        env={"FFRTMP_STATE_DIR": str(state)}, stdout=subprocess.PIPE,
    )  # fmt: skip


def assert_stream_intact(s: Stream, sampler: Sampler) -> None:
    """Every frame sent arrived once, at 1/FPS spacing from 0, over one connection, and no signal."""
    sent, received = s.finish()
    sampler.stop()
    send_log = (s.dir / "send.log").read_text()
    assert sent == 0, send_log
    recv_log = (s.dir / "recv.log").read_text()
    assert received == 0, recv_log  # it ended on its own at the end of the stream
    assert {"frame": str(FRAMES), "progress": "end"}.items() <= progress(s.dir / "send.progress").items()
    assert recv_log.count("Input #0, flv, from 'rtmp://") == 1  # one connection, never reconnected
    assert "received signal" not in recv_log and "Exiting normally" not in recv_log
    assert sampler.pending == set() and sampler.states <= {"R", "S", "D"}  # no signal, never stopped
    assert sampler.governed.count(True) and not sampler.left_its_scope
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
         "stream=nb_read_frames:packet=pts_time", "-of", "json", str(s.out)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    info = json.loads(probe.stdout)
    assert int(info["streams"][0]["nb_read_frames"]) == FRAMES
    pts = [float(p["pts_time"]) for p in info["packets"]]
    assert len(pts) == FRAMES
    # FLV keeps milliseconds: frame i is at i/FPS s within 1 ms, so no gap, no duplicate, no jump
    assert [(i, t) for i, t in enumerate(sorted(pts)) if abs(t - i / FPS) > 0.0015] == []


def in_scope(s: Stream, scope: str) -> bool:
    try:
        return f"/{scope}" in Path(f"/proc/{s.host_pid}/cgroup").read_text()
    except OSError:
        return False


def cgroup_value(sandbox: Sandbox, controller: str, scope: str, name: str) -> str:
    return sandbox.cgroup_file(controller, f"/ffrtmp.slice/{scope}", name).read_text().strip()


@pytest.mark.parametrize(
    ("receive", "limits", "quota_us", "memory"),
    [
        (COPY, ["--cpu-quota", "50", "--cpu-weight", "200", "--memory-max", "256M"], 50000, 256 * MiB),
        (TRANSCODE, ["--cpu-quota", "100", "--memory-max", "512M"], 100000, 512 * MiB),
    ],
    ids=["copy", "transcode"],
)
def test_attach_mid_stream_drops_nothing(
    sandbox: Sandbox,
    streams: list[Stream],
    tmp_path: Path,
    state_dir: Path,
    receive: list[str],
    limits: list[str],
    quota_us: int,
    memory: int,
) -> None:
    s = start_stream(sandbox, tmp_path, receive)
    streams.append(s)
    sampler = Sampler(s.host_pid, "ffrtmp-live.scope")
    wrapper = attach(sandbox, s, "live", state_dir, *limits)
    wait_for(lambda: in_scope(s, "ffrtmp-live.scope"), what="the receiver in its scope")
    assert cgroup_value(sandbox, "cpu", "ffrtmp-live.scope", "cpu.cfs_quota_us") == str(quota_us)
    assert cgroup_value(sandbox, "memory", "ffrtmp-live.scope", "memory.limit_in_bytes") == str(memory)
    assert s.received() < FRAMES  # governed while the stream still runs
    assert_stream_intact(s, sampler)
    out, _ = wrapper.communicate(timeout=30)
    log = (s.dir / "attach.log").read_text()
    assert wrapper.returncode == 0, log
    assert "Traceback" not in log and len(log.splitlines()) == 2
    res = json.loads(out)
    assert res == result_of(state_dir, "live")
    assert (res["mode"], res["pid"], res["governed"], res["platform_sla_reason"]) == (
        "attach", s.pid, True, "completed_within_limits"
    )  # fmt: skip
    assert res["limits"]["memory_max"] == memory and res["oom_killed"] is False
    wait_for(lambda: "ffrtmp-live.scope" not in scopes(sandbox), what="the scope to go")


def test_kill_9_of_the_attached_wrapper_mid_stream_drops_nothing(
    sandbox: Sandbox, streams: list[Stream], tmp_path: Path, state_dir: Path
) -> None:
    s = start_stream(sandbox, tmp_path, COPY)
    streams.append(s)
    sampler = Sampler(s.host_pid, "ffrtmp-k9.scope")
    wrapper = attach(sandbox, s, "k9", state_dir, "--cpu-quota", "50", "--memory-max", "256M")
    wrapper_host, _ = sandbox.inner_pid(wrapper)
    attach_log = s.dir / "attach.log"
    wait_for(lambda: "adopted into ffrtmp-k9.scope" in attach_log.read_text(), what="the adoption")
    os.kill(wrapper_host, signal.SIGKILL)
    wrapper.wait(timeout=10)
    assert s.received() < FRAMES - FPS  # the kill left at least a second of stream to come
    assert sandbox.systemctl("is-active", "ffrtmp-k9.scope").stdout.strip() == "active"
    assert cgroup_value(sandbox, "memory", "ffrtmp-k9.scope", "memory.limit_in_bytes") == str(256 * MiB)
    assert_stream_intact(s, sampler)  # includes: it stayed in its scope to the end
    assert "Traceback" not in attach_log.read_text()
    if sandbox.agent:  # the agent observed the stream to its end and freezes the job itself, once
        wait_for(lambda: (state_dir / "results" / "k9.json").exists(), what="the agent's freeze")
        res = result_of(state_dir, "k9")
        assert (res["pid"], res["platform_sla_reason"], res["exit_code"]) == (
            s.pid,
            "completed_within_limits",
            None,
        )
        assert res["governed"] is True  # its Finish was pending: the agent had all an attach record holds
        wait_for(lambda: not list((state_dir / "jobs").iterdir()), what="the contract to go")
        return
    assert (state_dir / "jobs" / "k9.json").exists() and not (state_dir / "results" / "k9.json").exists()
    wait_for(lambda: "ffrtmp-k9.scope" not in scopes(sandbox), what="the scope to go")
    # reconciliation freezes the one result the dead wrapper could not
    r = sandbox.run(["ffrtmp", "reconcile"], env={"FFRTMP_STATE_DIR": str(state_dir)})
    assert r.returncode == 0, r.stderr
    res = result_of(state_dir, "k9")
    assert (res["pid"], res["platform_sla_reason"], res["exit_code"]) == (s.pid, "observer_lost", None)
    assert list((state_dir / "jobs").iterdir()) == []
