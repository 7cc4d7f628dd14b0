"""Watch rules: read and check a TOML file of rules; which rule, if any, a process matches. Deciding ONLY."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import os
import pwd
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import re2  # type: ignore[import-untyped]  # the argv patterns: matched in linear time (see _regex)

from .errors import UsageError
from .limits import Limits, parse_limits
from .names import RULE, check_intent, job_of, printable

MAX_BYTES = 1 << 20  # a rules file larger than this is a mistake
MAX_ARGV = 64 << 10  # bytes of a command line (/proc/PID/cmdline) a rule's argv is matched against
LIMIT_KEYS = ("cpu-max", "cpu-quota", "cpu-weight", "memory-max", "io-weight", "io-max")
KEYS = ("name", "exe", "argv", "user", "unit", "intent", *LIMIT_KEYS)
UNIT = re.compile(r"[A-Za-z0-9:_.\\@-]{1,240}\.(service|scope)")


class ConfigError(UsageError):
    """One line: the file, the rule, the problem. Exit status 2."""


@dataclass(frozen=True)
class Process:
    """What a rule is matched against, read from /proc when the process is seen."""

    pid: int
    exe: str  # /proc/PID/exe: the file the kernel runs (symlinks resolved; for a script, its interpreter)
    argv: tuple[str, ...]  # at most MAX_ARGV bytes of it (the last argument may be cut)
    uid: int  # real uid
    unit: str | None  # the unit its cgroup belongs to; None: in no unit (the root cgroup)
    start_ticks: int  # start time, clock ticks since boot


@dataclass(frozen=True)
class Rule:
    name: str
    exe: str  # a file name (matches the executable's last path component) or an absolute path
    argv: Any  # an RE2 pattern (bytes) searched in the arguments (argv[1:]) joined by single spaces, or None
    uid: int | None
    unit: str | None  # the process must be in exactly this unit
    limits: Limits
    intent: str | None
    attach_args: tuple[str, ...]  # the same rule as `ffrtmp attach` options (--cpu-quota 50 ...)

    def matches(self, p: Process) -> bool:
        if (p.exe if self.exe.startswith("/") else p.exe.rpartition("/")[2]) != self.exe:
            return False
        if self.uid is not None and p.uid != self.uid:
            return False
        if self.argv is not None and not self.argv.search(_args(p)):
            return False
        # A process in a .service is adopted only by a rule naming that unit: moving it out cannot be undone.
        if self.unit is None:
            return not (p.unit or "").endswith(".service")
        return p.unit == self.unit


def _theirs(st: os.stat_result) -> str | None:
    """Why someone other than root (or this user) could change this file or directory; None: no one can.
    A sticky directory (/tmp) lets others change only their own entries."""
    if st.st_uid not in (0, os.geteuid()):
        return f"owned by uid {st.st_uid}"
    if st.st_mode & 0o022 and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
        return f"mode {st.st_mode & 0o7777:04o}"
    return None


def _args(p: Process) -> bytes:
    """What an argv pattern is searched in: argv[1:] joined by spaces, the bytes as the process has them."""
    return " ".join(p.argv[1:]).encode(errors="surrogateescape")


@dataclass(frozen=True)
class Rules:
    path: Path
    rules: tuple[Rule, ...]

    def wants(self, exe: str) -> bool:
        """Whether any rule could match a process running `exe` (the cheap first test of each exec)."""
        name = exe.rpartition("/")[2]
        return any(r.exe in (exe, name) for r in self.rules)

    def match(self, p: Process) -> Rule | None:
        """The FIRST rule, in file order, that matches `p`; None when none does or when `p` is in an
        ffrtmp scope already (governed: `ffrtmp run`, or adopted before)."""
        if job_of(p.unit) is not None:
            return None
        return next((r for r in self.rules if r.matches(p)), None)


def load(path: Path) -> Rules:
    """The rules of `path`; ConfigError (one line naming the file, the rule and the problem) if anything
    in it is wrong. Nothing is guessed: an unknown key, a wrong type, an empty file are all errors."""
    try:  # O_NONBLOCK: a FIFO's open would wait for a writer
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            st = os.fstat(f.fileno())
            raw = f.read(MAX_BYTES + 1) if stat.S_ISREG(st.st_mode) else b""
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path}: not a regular file")
    if (real := os.path.realpath(path)) != os.path.abspath(path):  # where it leads, others may change
        raise ConfigError(f"{path}: a symbolic link (to {real}): name the file itself")
    for d in Path(real).parents:  # whoever may write a directory on its way may put another file there
        if who := _theirs(os.stat(d)):
            raise ConfigError(
                f"{path}: directory {d} is {who}: only root may be able to change what is adopted"
            )
    if who := _theirs(st):  # root adopts what this file says
        raise ConfigError(f"{path}: {who}: only its owner (root) may be able to change what is adopted")
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_BYTES} bytes: not a rules file")
    try:
        data = tomllib.loads(raw.decode())
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    if extra := sorted(set(data) - {"rule"}):
        raise ConfigError(f"{path}: unknown top-level key {extra[0]!r} (rules are [[rule]] tables)")
    tables = data.get("rule")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{path}: no [[rule]]: nothing to watch (there are no default rules)")
    rules: list[Rule] = []
    for i, table in enumerate(tables, 1):
        label = f"rule #{i}"
        try:
            rule = _rule(table, label)
        except UsageError as err:
            name = table.get("name") if isinstance(table, dict) else None
            if isinstance(name, str) and RULE.fullmatch(name):
                label = f"rule {name!r}"
            raise ConfigError(f"{path}: {label}: {err}") from None
        if any(r.name == rule.name for r in rules):
            raise ConfigError(f"{path}: rule #{i}: name {rule.name!r} is used by an earlier rule")
        rules.append(rule)
    return Rules(path, tuple(rules))


def _rule(t: Any, label: str) -> Rule:
    if not isinstance(t, dict):
        raise UsageError("must be a table ([[rule]])")
    if extra := sorted(set(t) - set(KEYS)):
        raise UsageError(f"unknown key {extra[0]!r} (known: {', '.join(KEYS)})")
    name = _str(t, "name", required=True)
    if not RULE.fullmatch(name):
        hint = "1-64 of A-Z a-z 0-9 _ . : - (not starting with _ . : -)"
        raise UsageError(f"invalid name {printable(name)!r}: {hint}")
    exe = _exe(_str(t, "exe", required=True))
    argv = _regex(t.get("argv"))
    uid = _user(t.get("user"))
    unit = _unit(t.get("unit"))
    intent = check_intent(_str(t, "intent"))
    values = {k: _limit(t, k) for k in LIMIT_KEYS if k in t}
    io_max = values.pop("io-max", [])
    assert isinstance(io_max, list)
    opts = {k: v for k, v in values.items() if isinstance(v, str)}
    cpu_max, cpu_quota, cpu_weight, memory_max, io_weight = (opts.get(k) for k in LIMIT_KEYS[:5])
    limits = parse_limits(cpu_max, cpu_quota, cpu_weight, memory_max, io_weight, io_max)
    args = [a for k, v in opts.items() for a in (f"--{k}", v)] + [a for d in io_max for a in ("--io-max", d)]
    if intent is not None:
        args += ["--intent", intent]
    return Rule(name, exe, argv, uid, unit, limits, intent, tuple(args))


def _str(t: dict[str, Any], key: str, required: bool = False) -> Any:
    value = t.get(key)
    if value is None and required:
        raise UsageError(f"{key!r} is missing")
    if value is not None and (not isinstance(value, str) or not value):
        raise UsageError(f"{key} must be a non-empty string, not {value!r}")
    return value


def _exe(exe: str) -> str:
    if "\0" in exe or exe in (".", ".."):
        raise UsageError(f"invalid exe {printable(exe)!r}")
    if "/" not in exe:
        return exe
    if not exe.startswith("/") or os.path.normpath(exe) != exe:
        raise UsageError(f"exe {exe!r}: a file name (ffmpeg) or a normalized absolute path (/usr/bin/ffmpeg)")
    real = os.path.realpath(exe)
    if real != exe:  # the kernel reports the resolved path: this rule would never match
        why = f"is reached through a symbolic link: name {real!r}, which the kernel reports"
        raise UsageError(f"exe {exe!r} {why}")
    return exe


def _regex(value: Any) -> Any:
    """RE2, not Python's re: the text is what any local user puts on a command line, and RE2 matches in time
    linear in it whatever the pattern (no backtracking: a pattern such as `(a+)+$` cannot stall the agent).
    What needs backtracking (backreferences, lookaround, possessive or atomic forms) is refused here. The
    pattern's UTF-8 is matched against the argument bytes as they are (a command line need not be UTF-8)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise UsageError(f"argv must be a non-empty regular expression (a string), not {value!r}")
    options = re2.Options()
    options.log_errors = False  # RE2's own log goes to stderr: the error is our one line
    options.encoding = re2.Options.Encoding.LATIN1  # one byte, one character: any bytes can be matched
    try:
        return re2.compile(value.encode(), options)
    except re2.error as err:
        why = err.args[0].decode(errors="replace") if err.args and isinstance(err.args[0], bytes) else err
        raise UsageError(f"argv {value!r} is not a regular expression RE2 accepts: {why}") from None


def _user(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < 2**32 - 1:
            raise UsageError(f"user {value}: a uid is 0..4294967294")
        return value
    if not isinstance(value, str) or not value:
        raise UsageError(f"user must be a user name (a string) or a uid (an integer), not {value!r}")
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise UsageError(f"user {printable(value)!r} does not exist on this host") from None


def _unit(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not UNIT.fullmatch(value):
        raise UsageError(f"unit {value!r}: a unit name ending in .service or .scope (e.g. nginx.service)")
    if job_of(value) is not None:
        raise UsageError(f"unit {value!r} is an ffrtmp scope: its processes are governed already")
    return value


def _limit(t: dict[str, Any], key: str) -> str | list[str]:
    """A limit as `attach` takes it: a string (numbers are written as they read)."""
    value = t[key]
    if key == "io-max":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise UsageError(f'io-max must be a list of strings (["/dev/vda rbps=1M"]), not {value!r}')
        return list(value)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise UsageError(f"{key} must be a string or a number, not {value!r}")
    return value if isinstance(value, str) else str(value)
