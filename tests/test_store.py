"""Tests of contract persistence and write-once result freezing."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

import os
import stat
import subprocess
import threading
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers import untrust

from ffrtmp_systemd import errors
from ffrtmp_systemd.errors import FfrtmpError, StateError, UsageError
from ffrtmp_systemd.report.result import Contract, Mode, Outcome, Result, freeze
from ffrtmp_systemd.report.store import Store


def contract(job_id: str = "job-1") -> Contract:
    return Contract(
        job_id, Mode.RUN, 10, f"ffrtmp-{job_id}.scope", {}, None, 9, "2026-11-30T12:00:00.000000Z"
    )


def result(job_id: str = "job-1", exit_code: int = 0) -> Result:
    end = datetime(2026, 11, 30, 12, 0, 1, tzinfo=UTC)
    return freeze(contract(job_id), Outcome(end, exit_code=exit_code), True, None)


def listing(d: Path) -> list[str]:
    return sorted(os.listdir(d)) if d.exists() else []


def test_claim_and_read_back(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.claim(contract())
    assert s.contract("job-1") == contract()
    assert s.contract("job-2") is None
    assert listing(s.jobs) == ["job-1.json"]


def test_claim_twice_refused(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.claim(contract())
    with pytest.raises(FfrtmpError, match="job 'job-1' is already running") as e:
        s.claim(replace(contract(), pid=11))
    assert e.value.exit_code == errors.REFUSED
    assert s.contract("job-1") == contract() and listing(s.jobs) == ["job-1.json"]


def test_claim_after_result_refused(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.freeze(result())
    with pytest.raises(FfrtmpError, match="job 'job-1' already has a result: ") as e:
        s.claim(contract())
    assert e.value.exit_code == errors.REFUSED
    assert listing(s.jobs) == []


def test_freeze_is_write_once_and_read_only(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.claim(contract())
    p = s.freeze(result())
    assert p == tmp_path / "results" / "job-1.json"
    assert stat.S_IMODE(p.stat().st_mode) == 0o444
    assert s.contract("job-1") is None and listing(s.jobs) == []
    before = p.read_bytes()
    with pytest.raises(FfrtmpError, match="result for job 'job-1' already exists"):
        s.freeze(result(exit_code=1))
    assert p.read_bytes() == before and s.result("job-1") == result()
    assert listing(s.results) == ["job-1.json"]
    assert s.ids(s.results) == ["job-1"]


def test_amend_contract_round_trip(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.claim(contract())
    assert s.amend("job-1", limits_released_at="2026-11-30T12:00:05.000000Z", governed=True)
    c = replace(contract(), limits_released_at="2026-11-30T12:00:05.000000Z", governed=True)
    assert s.contract("job-1") == c and listing(s.jobs) == ["job-1.json"]


def test_amend_contract_never_resurrects(tmp_path: Path) -> None:
    s = Store(tmp_path)
    assert not s.amend("job-1", governed=True)
    assert listing(s.jobs) == []


def test_an_amendment_is_in_the_result_or_refused(tmp_path: Path) -> None:
    """The freeze holds the lock amend() takes (an flock of jobs/ that another process sees): a note
    that comes while the job is frozen waits, then finds no contract and says so."""
    s = Store(tmp_path)
    s.claim(contract())
    said: list[bool] = []
    with s.locked():
        busy = subprocess.run(["flock", "--nonblock", str(s.jobs), "true"], check=False)
        assert busy.returncode == 1
        late = threading.Thread(target=lambda: said.append(s.amend("job-1", limits_released_at="x")))
        late.start()
        s.freeze(result())
    late.join()
    assert said == [False] and listing(s.jobs) == [] and s.result("job-1") == result()
    assert subprocess.run(["flock", "--nonblock", str(s.jobs), "true"], check=False).returncode == 0


def test_failing_fsync_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Store(tmp_path)
    s.claim(contract())

    def boom(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(FfrtmpError, match="Input/output error") as e:
        s.freeze(result())
    assert e.value.exit_code == errors.REFUSED
    assert listing(s.results) == []
    assert s.contract("job-1") == contract()
    with pytest.raises(FfrtmpError):
        s.claim(contract("job-2"))
    assert listing(s.jobs) == ["job-1.json"]


def test_ids_sorted_and_corrupt_named(tmp_path: Path) -> None:
    s = Store(tmp_path)
    assert s.ids(s.jobs) == [] and s.ids(s.results) == []
    for j in ("b", "a", "c"):
        s.claim(contract(j))
    (s.jobs / "c.json").write_text("{not json")
    (s.jobs / "d.json").write_text((s.jobs / "a.json").read_text())  # id does not match the name
    (s.jobs / ".tmp.json").write_text((s.jobs / "a.json").read_text())
    assert s.ids(s.jobs) == ["a", "b", "c", "d"] and s.contract("a") == contract("a")
    with pytest.raises(FfrtmpError, match=r"c\.json: Expecting property name"):
        s.contract("c")
    with pytest.raises(FfrtmpError, match=r"d\.json: job_id 'a' does not match the file name"):
        s.contract("d")


def test_drop_contract_missing_is_fine(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.drop_contract("nope")
    s.claim(contract())
    s.drop_contract("job-1")
    assert s.contract("job-1") is None


def test_result_paths_exclude_temp_files(tmp_path: Path) -> None:
    s = Store(tmp_path)
    p = s.freeze(result())
    (s.results / ".x.json").write_text("{}")
    assert s.ids(s.results) == [p.stem] and s.result("missing") is None


@pytest.mark.parametrize("job_id", ["", ".hidden", "../escape", "a/b"])
def test_bad_job_id(tmp_path: Path, job_id: str) -> None:
    with pytest.raises(UsageError):
        Store(tmp_path).claim(contract(job_id))
    assert not any(tmp_path.iterdir())


# -- issue 10: only this user's (or root's) directories, never a link, only regular files, capped --
@pytest.mark.parametrize("how", ["chmod", "chown"])
@pytest.mark.parametrize("where", ["", "jobs", "results"])
def test_an_untrusted_state_directory_is_refused(tmp_path: Path, where: str, how: str) -> None:
    state = tmp_path / "state"
    for d in ("jobs", "results"):
        (state / d).mkdir(parents=True)
    line = untrust(state / where if where else state, how)
    s = Store(state)
    reads = {"": [s.contract, s.result], "jobs": [s.contract], "results": [s.result]}[where]
    for act in [lambda: s.claim(contract()), *[lambda read=read: read("job-1") for read in reads]]:
        with pytest.raises(StateError) as e:
            act()
        assert str(e.value) == line
    assert list(state.rglob("*")) == [state / "jobs", state / "results"]


def test_a_symlinked_directory_or_record_is_never_followed(tmp_path: Path) -> None:
    elsewhere, state = tmp_path / "elsewhere", tmp_path / "state"
    elsewhere.mkdir()
    state.mkdir()
    (state / "jobs").symlink_to(elsewhere)  # swapped in by someone else
    s = Store(state)
    with pytest.raises(FfrtmpError, match=f"cannot write {state}/jobs/job-1.json: "):
        s.claim(contract())
    with pytest.raises(FfrtmpError, match=f"cannot read {state}/jobs: "):
        s.contract("job-1")
    assert list(elsewhere.iterdir()) == []
    (state / "jobs").unlink()
    s.freeze(result("real"))
    (state / "results" / "link.json").symlink_to(state / "results" / "real.json")
    with pytest.raises(FfrtmpError, match=f"^bad record {state}/results/link.json: a symbolic link$"):
        s.result("link")


def test_a_record_over_the_size_cap_is_not_read(tmp_path: Path) -> None:
    s = Store(tmp_path)
    p = s.freeze(result("big"))
    text = p.read_text()
    p.chmod(0o644)
    p.write_text(text + " " * (1 << 20))  # still valid JSON, but no record is that large
    with pytest.raises(FfrtmpError, match=f"^bad record {p}: larger than 1048576 bytes$"):
        s.result("big")


def test_a_directory_on_the_way_that_someone_else_owns_is_refused(tmp_path: Path) -> None:
    """Root must not follow another user's link to write where that user cannot (here: root's etc/)."""
    home, etc = tmp_path / "eve", tmp_path / "etc"
    home.mkdir()
    etc.mkdir()
    os.chown(home, 4242, 4242)
    (home / "state").symlink_to(etc)
    with pytest.raises(StateError) as e:
        Store(home / "state").claim(contract())
    assert str(e.value) == (
        f"refusing state directory {home}/state ({home}: owned by uid 4242): no record is kept there"
    )
    assert list(etc.iterdir()) == []
