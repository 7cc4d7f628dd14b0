"""Persistence of contracts and write-once results ONLY.

Every file is reached through a descriptor of its directory, never through a symbolic link; the
state directory and its jobs/, results/ must belong to this user (or root) and be writable by no
one else; only regular files of at most MAX_RECORD bytes are read, and no open ever blocks.
A contract is written at the claim; it is amended (governed, limits_released_at) only under the lock
of jobs/, which whoever freezes the job holds from reading it to dropping it: no amendment is lost,
and each one is either in the result or refused (then its writer says the record is frozen).
"""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

import errno
import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import replace
from pathlib import Path

from ..errors import FfrtmpError, StateError, UsageError
from .result import Contract, Result, T, from_json, to_json

MAX_RECORD = 1 << 20
DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class BadRecord(FfrtmpError):
    """A record file that cannot be read or parsed: named and skipped, never fatal to the others."""


@contextmanager
def _refuse(p: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise StateError(f"cannot write {p}: {e.strerror or e}") from e


def _check(fd: int, state: Path, at: Path, on_the_way: bool) -> None:
    """Refuse a directory someone else could change: owned by another user, or writable by others
    (but for a sticky one on the way, like /var/tmp)."""
    st = os.fstat(fd)
    why = f"owned by uid {st.st_uid}" if st.st_uid not in (0, os.geteuid()) else ""
    if not why and st.st_mode & 0o022 and not (on_the_way and st.st_mode & stat.S_ISVTX):
        why = f"writable by group or others, mode {stat.S_IMODE(st.st_mode):04o}"
    if why:
        os.close(fd)
        top, where = (state, f"{at}: ") if on_the_way else (at, "")
        raise StateError(f"refusing state directory {top} ({where}{why}): no record is kept there")


def _open_dir(p: Path, state: Path, create: bool) -> int | None:
    """The descriptor of `p` (the state directory, or its jobs/ or results/: never a link), each directory
    from / to it checked: no one else can swap a link in along the path. None if missing and not `create`."""
    fd = os.open("/", DIR)
    for i, part in enumerate(p.parts[1:], 2):
        flags = DIR | (os.O_NOFOLLOW if i > len(state.parts) else 0)
        try:
            try:
                nfd = os.open(part, flags, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    return None
                with suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                nfd = os.open(part, flags, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nfd
        _check(fd, state, Path(*p.parts[:i]), i < len(state.parts))
    return fd


def _place(d: int, name: str, text: str, mode: int, exists: str | None) -> None:
    tmp = f".{name}.{os.getpid()}.tmp"  # the writer's PID: `reconcile` sweeps a dead writer's
    with suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=d)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(fd, mode)
            f.write(text)
            f.flush()
            os.fsync(fd)
        if exists is None:
            os.replace(tmp, name, src_dir_fd=d, dst_dir_fd=d)
        else:
            try:
                os.link(tmp, name, src_dir_fd=d, dst_dir_fd=d, follow_symlinks=False)
            except FileExistsError:
                raise FfrtmpError(exists) from None
    finally:
        with suppress(OSError):
            os.unlink(tmp, dir_fd=d)
    os.fsync(d)


def _bytes(d: int, name: str, p: Path) -> bytes | None:
    """The record `name` in `d`: None if there is none; never a link, a FIFO or a huge file."""
    try:
        fd = os.open(name, READ, dir_fd=d)
    except FileNotFoundError:
        return None
    except OSError as e:
        why = "a symbolic link" if e.errno == errno.ELOOP else e.strerror
        raise BadRecord(f"bad record {p}: {why}") from e
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadRecord(f"bad record {p}: not a regular file")
        data = f.read(MAX_RECORD + 1)
    if len(data) > MAX_RECORD:
        raise BadRecord(f"bad record {p}: larger than {MAX_RECORD} bytes")
    return data


class Store:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir, self.jobs, self.results = state_dir, state_dir / "jobs", state_dir / "results"

    @contextmanager
    def _at(self, sub: Path, create: bool = False) -> Iterator[int | None]:
        """A descriptor of jobs/ or results/ (None if missing and not created), every level trusted."""
        try:
            d = _open_dir(sub.absolute(), self.state_dir.absolute(), create)
        except OSError as e:
            if create:  # a writer says which file it could not write
                raise
            raise StateError(f"cannot read {sub}: {e.strerror or e}") from e
        try:
            yield d
        finally:
            if d is not None:
                os.close(d)

    @staticmethod
    def _name(job_id: str) -> str:
        if not job_id or job_id[0] == "." or "/" in job_id or "\0" in job_id:
            raise UsageError(f"invalid job id: {job_id!r}")
        return f"{job_id}.json"

    def _read(self, sub: Path, job_id: str, cls: type[T]) -> T | None:
        name = self._name(job_id)
        with self._at(sub) as d:
            data = None if d is None else _bytes(d, name, sub / name)
        try:
            x = None if data is None else from_json(cls, data.decode())  # not UTF-8: a ValueError too
        except ValueError as e:
            raise BadRecord(f"bad record {sub / name}: {e}") from e
        if x is not None and x.job_id != job_id:
            raise BadRecord(f"bad record {sub / name}: job_id {x.job_id!r} does not match the file name")
        return x

    def _exists(self, sub: Path, job_id: str) -> bool:
        with self._at(sub) as d:
            return d is not None and _lstat(d, self._name(job_id)) is not None

    def claim(self, c: Contract) -> None:
        done = FfrtmpError(f"job '{c.job_id}' already has a result: {self.results / self._name(c.job_id)}")
        if self._exists(self.results, c.job_id):
            raise done
        name = self._name(c.job_id)
        taken = f"job '{c.job_id}' is already running (contract {self.jobs / name})"
        with _refuse(self.jobs / name), self._at(self.jobs, create=True) as d:
            assert d is not None
            _place(d, name, to_json(c), 0o644, taken)
        if self._exists(self.results, c.job_id):  # a result landed while we claimed: the contract is ours
            self.drop_contract(c.job_id)
            raise done

    def contract(self, job_id: str) -> Contract | None:
        return self._read(self.jobs, job_id, Contract)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The lock of jobs/ (blocks only for another holder's few file operations); without a
        readable jobs/ there is no contract to amend, and none is taken."""
        with ExitStack() as stack:
            with suppress(FfrtmpError, OSError):
                d = stack.enter_context(self._at(self.jobs))
                if d is not None:
                    fcntl.flock(d, fcntl.LOCK_EX)
            yield

    def flock(self) -> int:
        """The state directory's descriptor, made if missing, trusted, and locked (attach's lock, held across
        its bus calls: another holder's may take seconds); -1 if it cannot be had (the claim says why)."""
        with suppress(OSError, FfrtmpError):
            state = self.state_dir.absolute()
            fd = _open_dir(state, state, True)
            assert fd is not None  # made if missing
            fcntl.flock(fd, fcntl.LOCK_EX)
            return fd
        return -1

    def amend(self, job_id: str, **changes: object) -> bool:
        """Change a claimed contract; False if there is none (never resurrect a frozen job's)."""
        name = self._name(job_id)
        with self.locked(), _refuse(self.jobs / name), self._at(self.jobs) as d:
            c = None if d is None else self.contract(job_id)
            if c is not None and d is not None:
                _place(d, name, to_json(replace(c, **changes)), 0o644, None)  # type: ignore[arg-type]
            return c is not None

    def drop_contract(self, job_id: str) -> None:
        name = self._name(job_id)
        with _refuse(self.jobs / name), self._at(self.jobs) as d:
            if d is not None and _lstat(d, name):  # nothing to drop is fine, even on a read-only disk
                os.unlink(name, dir_fd=d)

    def freeze(self, r: Result) -> Path:
        name = self._name(r.job_id)
        with _refuse(self.results / name), self._at(self.results, create=True) as d:
            assert d is not None
            _place(d, name, to_json(r), 0o444, f"result for job '{r.job_id}' already exists")
        with suppress(StateError):  # frozen all the same; a contract left behind is reconcile's to drop
            self.drop_contract(r.job_id)
        return self.results / name

    def freeze_job(
        self, c: Contract, make: Callable[[Contract], Result]
    ) -> tuple[Result, FfrtmpError | None]:
        """Freeze `make(c)` once, from the contract as it is on disk under the lock of jobs/ (a note of
        `release` is in the result, or refused); the error if it is not saved (then made all the same)."""
        with self.locked():
            with suppress(FfrtmpError):
                c = self.contract(c.job_id) or c
            r = make(c)
            try:
                self.freeze(r)
            except FfrtmpError as err:
                return r, err
        return r, None

    def result(self, job_id: str) -> Result | None:
        return self._read(self.results, job_id, Result)

    def ids(self, sub: Path, newest: int | None = None) -> list[str]:
        """The job ids of the records in jobs/ or results/, sorted; or the `newest` ones by file time."""
        with self._at(sub) as d:
            if d is None:
                return []
            ids = sorted(n[:-5] for n in os.listdir(d) if n.endswith(".json") and n[0] != ".")
            if newest is None:
                return ids
            age = {i: getattr(_lstat(d, f"{i}.json"), "st_mtime_ns", 0) for i in ids}
        return sorted(ids, key=lambda i: age[i], reverse=True)[:newest]

    def stamp(self, sub: Path) -> int:
        """When jobs/ or results/ last changed (its mtime, ns); 0 if it does not exist."""
        with self._at(sub) as d:
            return 0 if d is None else os.fstat(d).st_mtime_ns

    def sweep(self, dead: Callable[[int], bool]) -> list[tuple[Path, int]]:
        """Remove the half-written files of writers that are `dead` (one killed mid-write leaves its file)."""
        out = []
        for sub in (self.jobs, self.results):
            with self._at(sub) as d:
                for n in os.listdir(d) if d is not None else []:
                    pid = n.split(".")[-2] if n.startswith(".") and n.endswith(".tmp") else ""
                    if pid.isdigit() and dead(int(pid)):
                        with suppress(OSError):
                            os.unlink(n, dir_fd=d)
                            out.append((sub / n, int(pid)))
        return out


def _lstat(d: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=d, follow_symlinks=False)
    except FileNotFoundError:
        return None
