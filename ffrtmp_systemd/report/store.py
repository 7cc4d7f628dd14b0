"""Persistence of contracts and write-once results ONLY."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ..errors import FfrtmpError, StateError, UsageError
from .result import Contract, Result, T, contract_from_json, result_from_json, to_json


@contextmanager
def _refuse(p: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise StateError(f"cannot write {p}: {e.strerror or e}") from e


def _place(final: Path, text: str, mode: int, exists: str | None) -> None:
    d = final.parent
    d.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = d / f".{final.name}.{os.getpid()}.tmp"  # the writer's PID: `reconcile` sweeps a dead writer's
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(fd, mode)
            f.write(text)
            f.flush()
            os.fsync(fd)
        if exists is None:
            os.replace(tmp, final)
        else:
            try:
                os.link(tmp, final)
            except FileExistsError:
                raise FfrtmpError(exists) from None
    finally:
        with suppress(OSError):
            os.unlink(tmp)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _load(p: Path, load: Callable[[str], T]) -> T:
    x = load(p.read_text(encoding="utf-8"))
    if x.job_id != p.stem:
        raise ValueError(f"job_id {x.job_id!r} does not match the file name")
    return x


class Store:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir, self.jobs, self.results = state_dir, state_dir / "jobs", state_dir / "results"

    def _path(self, d: Path, job_id: str) -> Path:
        if not job_id or job_id[0] == "." or "/" in job_id or "\0" in job_id:
            raise UsageError(f"invalid job id: {job_id!r}")
        return d / f"{job_id}.json"

    def _read(self, p: Path, load: Callable[[str], T]) -> T | None:
        try:
            return _load(p, load)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise FfrtmpError(f"{p}: unreadable: {e}") from e

    def claim(self, c: Contract) -> None:
        res, p = self._path(self.results, c.job_id), self._path(self.jobs, c.job_id)
        done = FfrtmpError(f"job '{c.job_id}' already has a result: {res}")
        if res.exists():
            raise done
        with _refuse(p):
            _place(p, to_json(c), 0o644, f"job '{c.job_id}' is already running (contract {p})")
        if res.exists():  # a result landed while we claimed: the contract just linked is ours
            self.drop_contract(c.job_id)
            raise done

    def contract(self, job_id: str) -> Contract | None:
        return self._read(self._path(self.jobs, job_id), contract_from_json)

    def update_contract(self, c: Contract) -> None:
        p = self._path(self.jobs, c.job_id)
        if not p.exists():  # never resurrect the contract of a frozen job
            raise FfrtmpError(f"job '{c.job_id}' has no contract to update ({p})")
        with _refuse(p):
            _place(p, to_json(c), 0o644, None)

    def drop_contract(self, job_id: str) -> None:
        p = self._path(self.jobs, job_id)
        if p.exists():  # nothing to drop is fine, even where nothing can be written (EROFS)
            with _refuse(p):
                p.unlink(missing_ok=True)

    def contracts(self) -> list[Contract]:
        out = []
        for p in self._files(self.jobs):
            with suppress(OSError, ValueError):
                out.append(_load(p, contract_from_json))
        return sorted(out, key=lambda c: c.job_id)

    def freeze(self, r: Result) -> Path:
        p = self._path(self.results, r.job_id)
        with _refuse(p):
            _place(p, to_json(r), 0o444, f"result for job '{r.job_id}' already exists")
        self.drop_contract(r.job_id)
        return p

    def result(self, job_id: str) -> Result | None:
        return self._read(self._path(self.results, job_id), result_from_json)

    def temp_files(self) -> list[tuple[Path, int]]:
        """Half-written files and the PIDs of their writers (one killed mid-write leaves its file behind)."""
        out = []
        for p in [*self.jobs.glob(".*.tmp"), *self.results.glob(".*.tmp")]:
            with suppress(ValueError):
                out.append((p, int(p.name.split(".")[-2])))
        return out

    def result_paths(self) -> list[Path]:
        return self._files(self.results)

    @staticmethod
    def _files(d: Path) -> list[Path]:
        return sorted(p for p in d.glob("*.json") if not p.name.startswith("."))
