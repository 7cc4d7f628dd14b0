"""units/: every shipped unit passes `systemd-analyze verify`; the tmpfiles entry, the agent's socket and
service, installed as the README says inside a sandbox (its own mount namespace: the host never sees it)."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import orphan, wait_for
from helpers import free_port
from sandbox import REPO, Sandbox

UNITS = sorted(
    p for p in (REPO / "units").iterdir() if p.suffix in (".service", ".slice", ".socket", ".timer")
)
TMPFILES = REPO / "units" / "tmpfiles.d" / "ffrtmp.conf"
SERVICE = "ffrtmp-agent.service"
SOCKET = "ffrtmp.socket"
# Slow: a venv and a pip install of the package in the sandbox. In-process mode only: it installs and
# starts the shipped units itself.
pytestmark = [pytest.mark.slow, pytest.mark.mode("in-process")]


@pytest.fixture(scope="module")
def var_lib(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """README's install steps, inside the sandbox: a venv of Debian's python3 in /usr/local/lib/ffrtmp,
    linked as /usr/local/bin/ffrtmp; the tmpfiles entry applied.

    /usr/local and /var/lib are directories of this test bind-mounted in the sandbox's mount
    namespace only (the host never sees them); returns the host path of the sandbox's /var/lib.
    """
    root = tmp_path_factory.mktemp("install")
    for name, target in (("usr-local", "/usr/local"), ("var-lib", "/var/lib")):
        (root / name).mkdir()
        sandbox.run(["mount", "--bind", str(root / name), target], check=True)
    src = root / "src"  # a copy, so that the build leaves nothing in the repository
    shutil.copytree(
        REPO, src, ignore=shutil.ignore_patterns(".*", "build", "tests", "*.egg-info", "__pycache__")
    )
    for step in (
        ["/usr/bin/python3", "-m", "venv", "/usr/local/lib/ffrtmp"],
        ["/usr/local/lib/ffrtmp/bin/pip", "install", "-q", str(src)],
        ["mkdir", "-p", "/usr/local/bin"],
        ["ln", "-s", "/usr/local/lib/ffrtmp/bin/ffrtmp", "/usr/local/bin/ffrtmp"],
    ):
        r = sandbox.run(step, timeout=300)
        assert r.returncode == 0, r.stderr
    r = sandbox.run(["systemd-tmpfiles", "--create", str(TMPFILES)])
    assert r.returncode == 0, r.stderr
    return root / "var-lib"


def test_the_host_is_untouched(var_lib: Path) -> None:
    assert not Path("/usr/local/bin/ffrtmp").exists() and not Path("/var/lib/ffrtmp").exists()


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_systemd_analyze_verify(sandbox: Sandbox, var_lib: Path, unit: Path) -> None:
    r = sandbox.run(["systemd-analyze", "verify", str(unit)])
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_tmpfiles_entry_makes_the_state_directory(var_lib: Path) -> None:
    for d in ("ffrtmp", "ffrtmp/jobs", "ffrtmp/results"):
        st = (var_lib / d).stat()
        assert (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid) == ("0o755", 0, 0)


# The agent's hardening as the kernel sees it: CAP_DAC_OVERRIDE (1) and CAP_SYSLOG (34), nothing else.
CAPS = f"{(1 << 1) | (1 << 12) | (1 << 19) | (1 << 34):016x}"  # DAC_OVERRIDE NET_ADMIN SYS_PTRACE SYSLOG
HOG = "b = bytearray(0)\nwhile True: b += bytearray(16 << 20)"


def test_the_agent_runs_as_the_shipped_service(sandbox: Sandbox, var_lib: Path, tmp_path: Path) -> None:
    """The socket and the service as installed (ExecStart /usr/local/bin/ffrtmp, state /var/lib/ffrtmp):
    the first run activates the agent, which governs it, an OOM kill (cgroup v1's event_control, written
    under ProtectKernelTunables), freezes the job of a client killed -9, reconciles an in-process orphan;
    the hardening holds."""
    port = free_port()
    dropin = sandbox.dir / "units" / f"{SERVICE}.d"  # the sandbox's own drop-in out, the shipped unit as is
    shutil.rmtree(dropin)
    dropin.mkdir()  # what `systemctl edit` would write: another port (the sandbox shares the host's network)
    (dropin / "listen.conf").write_text(f"[Service]\nEnvironment=FFRTMP_EXPORTER_LISTEN=127.0.0.1:{port}\n")
    assert sandbox.systemctl("daemon-reload").returncode == 0
    state = "/var/lib/ffrtmp"  # the default, as the sandbox sees it
    try:
        r = sandbox.systemctl("start", SOCKET)
        assert r.returncode == 0, r.stderr
        st = sandbox.run(["stat", "-c", "%a %U %F", "/run/ffrtmp/agent.sock"]).stdout.strip()
        assert st == "600 root socket"
        assert sandbox.systemctl("is-active", SERVICE).stdout.strip() == "inactive"  # until a client comes
        ok = sandbox.run(["ffrtmp", "run", "--state-dir", state, "--job-id", "svc", "--", "true"])
        assert ok.returncode == 0, ok.stderr + sandbox.systemctl("status", SERVICE).stdout
        assert re.search(r"job svc started in ffrtmp-svc.scope \(pid \d+, agent\)", ok.stderr), ok.stderr
        assert sandbox.systemctl("is-active", SERVICE).stdout.strip() == "active"
        pid = sandbox.systemctl("show", "-p", "MainPID", "--value", SERVICE).stdout.strip()
        status = dict(
            ln.split(":\t", 1) for ln in sandbox.run(["cat", f"/proc/{pid}/status"]).stdout.splitlines()
        )
        assert (status["CapEff"], status["CapBnd"], status["NoNewPrivs"], status["Seccomp"]) == (
            CAPS, CAPS, "1", "2"
        )  # fmt: skip
        mounts = {
            ln.split()[4]: ln.split()[5]
            for ln in sandbox.run(["cat", f"/proc/{pid}/mountinfo"]).stdout.splitlines()
        }
        assert mounts["/usr"].startswith("ro") and mounts["/proc/sys"].startswith("ro")
        assert "/tmp" not in mounts or mounts["/tmp"].startswith("rw")  # no PrivateTmp: state dirs anywhere

        oom = sandbox.run(["ffrtmp", "run", "--state-dir", state, "--job-id", "oom", "--memory-max", "50M",
                           "--", "python3", "-c", HOG])  # fmt: skip
        assert oom.returncode == 137, oom.stderr
        res = json.loads((var_lib / "ffrtmp" / "results" / "oom.json").read_text())
        assert (res["oom_killed"], res["platform_sla_reason"]) == (True, "oom_killed")

        for job, in_process in (("lost", False), ("orphan", True)):
            fifo = tmp_path / job
            orphan(sandbox, state, job, fifo, in_process)
            fifo.write_text("go\n")
        # Its client killed -9: the agent observes the job to its end and freezes it.
        wait_for(lambda: (var_lib / "ffrtmp" / "results" / "lost.json").exists(), what="the freeze")
        res = json.loads((var_lib / "ffrtmp" / "results" / "lost.json").read_text())
        assert res["governed"] is True and "client lost" in res["governance_error"], (
            res["governed"],
            res["governance_error"],
            res["platform_sla_reason"],
        )
        # An in-process wrapper killed -9 (a job of its state directory): the agent's Reconciler freezes it.
        wait_for(lambda: (var_lib / "ffrtmp" / "results" / "orphan.json").exists(), what="reconciliation")
        res = json.loads((var_lib / "ffrtmp" / "results" / "orphan.json").read_text())
        assert res["platform_sla_reason"] == "observer_lost"
        assert sandbox.systemctl("is-active", SERVICE).stdout.strip() == "active"
        assert sandbox.systemctl("show", "-p", "NRestarts", "--value", SERVICE).stdout.strip() == "0"
    finally:
        sandbox.systemctl("stop", SERVICE, SOCKET)
    assert sandbox.systemctl("show", "-p", "Result", "--value", SERVICE).stdout.strip() == "success"
    assert sandbox.run(["test", "-e", "/run/ffrtmp/agent.sock"]).returncode == 1  # RemoveOnStop
