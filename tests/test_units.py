"""units/: every shipped unit passes `systemd-analyze verify`; the tmpfiles entry and the exporter service,
installed as the README says inside a sandbox (its own mount namespace: the host never sees it)."""
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
from helpers import free_port, get, samples, value
from sandbox import REPO, Sandbox

UNITS = sorted(
    p for p in (REPO / "units").iterdir() if p.suffix in (".service", ".slice", ".socket", ".timer")
)
TMPFILES = REPO / "units" / "tmpfiles.d" / "ffrtmp.conf"
SERVICE = "ffrtmp-exporter.service"
pytestmark = pytest.mark.slow  # a venv and a pip install of the package in the sandbox


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


def test_exporter_runs_as_the_shipped_service(sandbox: Sandbox, var_lib: Path, tmp_path: Path) -> None:
    port = free_port()
    dropin = sandbox.dir / "units" / f"{SERVICE}.d"  # what `systemctl edit` would write
    dropin.mkdir()
    (dropin / "listen.conf").write_text(f"[Service]\nEnvironment=FFRTMP_EXPORTER_LISTEN=127.0.0.1:{port}\n")
    assert sandbox.systemctl("daemon-reload").returncode == 0
    url = f"http://127.0.0.1:{port}"
    try:
        r = sandbox.systemctl("start", SERVICE)
        assert r.returncode == 0, r.stderr + sandbox.systemctl("status", SERVICE).stdout
        assert _up(url)  # Type=notify: started means serving
        pid = sandbox.systemctl("show", "-p", "MainPID", "--value", SERVICE).stdout.strip()
        status = dict(
            ln.split(":\t", 1) for ln in sandbox.run(["cat", f"/proc/{pid}/status"]).stdout.splitlines()
        )
        assert (status["CapEff"], status["CapBnd"], status["NoNewPrivs"], status["Seccomp"]) == (
            "0000000000000000", "0000000000000000", "1", "2"
        )  # fmt: skip
        mounts = sandbox.run(["cat", f"/proc/{pid}/mountinfo"]).stdout
        private = {m for ln in mounts.splitlines() if ln.split()[4] == "/tmp"
                   for m in re.findall(r"systemd-private-[^/ ]+", ln)}  # fmt: skip
        assert len(private) == 1 and (Path("/tmp") / next(iter(private))).is_dir()

        state = "/var/lib/ffrtmp"  # the service's default, as the sandbox sees it
        ok = sandbox.run(["ffrtmp", "run", "--state-dir", state, "--job-id", "svc", "--", "true"])
        assert ok.returncode == 0, ok.stderr
        _orphan(sandbox, state, tmp_path)  # reconciled by the service: it may write the state directory
        wait_for(lambda: (var_lib / "ffrtmp" / "results" / "orphan.json").exists(), what="reconciliation")
        m = samples(get(f"{url}/metrics")[2])
        assert value(m, "ffrtmp_jobs_total", state="completed") == 2
        assert value(m, "ffrtmp_platform_sla_violations_total", reason="observer_lost") == 1
        assert [v["job_id"] for v in json.loads(get(f"{url}/violations")[2])] == ["orphan"]
        assert sandbox.systemctl("is-active", SERVICE).stdout.strip() == "active"
    finally:
        sandbox.systemctl("stop", SERVICE)
    assert sandbox.systemctl("show", "-p", "Result", "--value", SERVICE).stdout.strip() == "success"
    assert not (Path("/tmp") / next(iter(private))).exists()  # the host's /tmp: PrivateTmp cleaned up


def _up(url: str) -> bool:
    try:
        return get(f"{url}/healthz")[0] == 200
    except OSError:
        return False


def _orphan(sandbox: Sandbox, state: str, tmp_path: Path) -> None:
    """A job whose wrapper is killed -9; its workload then ends."""
    fifo = tmp_path / "go"
    orphan(sandbox, state, "orphan", fifo)
    fifo.write_text("go\n")
