"""Watch rules: `ffrtmp watch --check` on bad files (one line naming file, rule and problem; exit 2) and
good ones; which rule a process matches (first match wins; a .service only by a rule naming it)."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ffrtmp_systemd.limits import Limits
from ffrtmp_systemd.names import JOB_ID, watch_job_id
from ffrtmp_systemd.rules import ConfigError, Process, load

FFRTMP = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "ffrtmp"
GOOD = """
# An RTMP receiver started by anyone's shell, and one started by nginx's exec hook.
[[rule]]
name = "rtmp-ingest"
exe = "ffmpeg"
argv = "-listen 1 .*rtmp://"
user = "root"
cpu-quota = 200
memory-max = "512M"
intent = "production"

[[rule]]
name = "nginx-rtmp"
exe = "ffmpeg"
unit = "nginx.service"
cpu-max = "50000 100000"
cpu-weight = 200
io-weight = 50
"""
R = '[[rule]]\nname = "r"\nexe = "ffmpeg"\n'  # a valid rule to add a bad line to

# (id, file text or None for a missing file, what the one line says after "ffrtmp: FILE: ")
BAD: list[tuple[str, str | bytes | None, str]] = [
    ("missing-file", None, "cannot read: No such file or directory"),
    ("toml-syntax", "[[rule]\nname = 1\n", "invalid TOML: "),
    ("not-utf8", b'[[rule]]\nname = "\xff"\n', "not UTF-8 text"),
    ("empty", "# nothing\n", "no [[rule]]: nothing to watch (there are no default rules)"),
    ("top-level-key", R + "[rules]\n", "unknown top-level key 'rules' (rules are [[rule]] tables)"),
    ("not-a-table", "rule = [1]\n", "rule #1: must be a table ([[rule]])"),
    ("no-name", '[[rule]]\nexe = "ffmpeg"\n', "rule #1: 'name' is missing"),
    ("bad-name", '[[rule]]\nname = "-x"\nexe = "ffmpeg"\n', "rule #1: invalid name '-x': 1-64 of"),
    ("duplicate-name", R + R, "rule #2: name 'r' is used by an earlier rule"),
    ("no-exe", '[[rule]]\nname = "r"\n', "rule 'r': 'exe' is missing"),
    ("relative-exe", '[[rule]]\nname = "r"\nexe = "bin/ffmpeg"\n', "rule 'r': exe 'bin/ffmpeg': a file name"),
    ("exe-via-symlink", '[[rule]]\nname = "r"\nexe = "/bin/sh"\n',
     "rule 'r': exe '/bin/sh' is reached through a symbolic link: name '/usr/bin/dash'"),
    ("bad-regex", R + 'argv = "("\n', "rule 'r': argv '(' is not a regular expression RE2 accepts: "),
    ("backreference", R + "argv = '(a)\\1'\n", "rule 'r': argv '(a)\\\\1' is not a regular expression RE2 a"),
    ("lookahead", R + "argv = '(?=a)'\n", "rule 'r': argv '(?=a)' is not a regular expression RE2 accepts: "),
    ("unknown-user", R + 'user = "nosuchuser-ffrtmp"\n', "rule 'r': user 'nosuchuser-ffrtmp' does not exist"),
    ("negative-uid", R + "user = -1\n", "rule 'r': user -1: a uid is 0..4294967294"),
    ("unit-no-suffix", R + 'unit = "nginx"\n', "rule 'r': unit 'nginx': a unit name ending in .service"),
    ("unit-ffrtmp", R + 'unit = "ffrtmp-x.scope"\n', "rule 'r': unit 'ffrtmp-x.scope' is an ffrtmp scope"),
    ("unknown-key", R + 'memory = "1G"\n', "rule 'r': unknown key 'memory' (known: name, exe,"),
    ("bad-quota", R + 'cpu-quota = "abc"\n', "rule 'r': --cpu-quota: invalid percentage 'abc'"),
    ("exclusive-cpu", R + 'cpu-quota = 5\ncpu-max = "max"\n', "rule 'r': --cpu-max and --cpu-quota are ex"),
    ("bool-memory", R + "memory-max = true\n", "rule 'r': memory-max must be a string or a number, not True"),
    ("weight-zero", R + "cpu-weight = 0\n", "rule 'r': --cpu-weight: invalid weight '0' (1..10000)"),
    ("io-max-string", R + 'io-max = "/dev/null rbps=1"\n', "rule 'r': io-max must be a list of strings"),
    ("io-max-no-device", R + 'io-max = ["/dev/null rbps=1M"]\n', "rule 'r': --io-max: no block device"),
    ("intent-control", R + 'intent = "a\\u0007b"\n', "rule 'r': invalid --intent 'a\\x07b': no control"),
    ("group-writable", R, "mode 0664: only its owner (root) may be able to change what is adopted"),
    ("second-rule", GOOD + R + "cpu-weight = 10001\n", "rule 'r': --cpu-weight: invalid weight '10001'"),
]  # fmt: skip


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FFRTMP, "watch", "--check", "--config", str(path)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def bad_results(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Path, subprocess.CompletedProcess[str]]]:
    """Every bad case through the real CLI (two at a time: each is a fresh interpreter)."""
    d = tmp_path_factory.mktemp("rules")

    def one(case: tuple[str, str | bytes | None, str]) -> tuple[Path, subprocess.CompletedProcess[str]]:
        path = d / f"{case[0]}.toml"
        if isinstance(case[1], str):
            path.write_text(case[1])
            path.chmod(0o664 if case[0] == "group-writable" else 0o644)
        elif isinstance(case[1], bytes):
            path.write_bytes(case[1])
        return path, check(path)

    with ThreadPoolExecutor(2) as pool:
        return dict(zip([c[0] for c in BAD], pool.map(one, BAD), strict=True))


@pytest.mark.parametrize(("name", "text", "says"), BAD, ids=[c[0] for c in BAD])
def test_a_bad_rules_file_is_one_line_and_exit_2(
    bad_results: dict[str, tuple[Path, subprocess.CompletedProcess[str]]], name: str, text: object, says: str
) -> None:
    path, r = bad_results[name]
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"ffrtmp: {path}: {says}"), r.stderr


def test_a_device_or_a_huge_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    r = check(Path("/dev/zero"))
    assert (r.returncode, r.stderr) == (2, "ffrtmp: /dev/zero: not a regular file\n")
    (tmp_path / "big.toml").write_text(R + "#" * (1 << 20))
    r = check(tmp_path / "big.toml")
    assert (r.returncode, r.stderr) == (
        2,
        f"ffrtmp: {tmp_path}/big.toml: larger than 1048576 bytes: not a rules file\n",
    )


def test_good_rules_are_valid(tmp_path: Path) -> None:
    (tmp_path / "watch.toml").write_text(GOOD)
    r = check(tmp_path / "watch.toml")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{tmp_path}/watch.toml: 2 rules, valid\n", "")


def test_rules_carry_attach_limits_and_options(tmp_path: Path) -> None:
    (tmp_path / "w.toml").write_text(GOOD)
    ingest, nginx = load(tmp_path / "w.toml").rules
    assert ingest.limits == Limits(cpu_quota_per_sec_usec=2_000_000, memory_max=512 << 20)
    assert ingest.attach_args == ("--cpu-quota", "200", "--memory-max", "512M", "--intent", "production")
    assert (ingest.uid, ingest.unit, ingest.intent, nginx.unit) == (0, None, "production", "nginx.service")
    assert nginx.limits == Limits(500_000, 100_000, 200, None, 50)


def proc(exe: str = "/usr/bin/ffmpeg", argv: str = "ffmpeg -listen 1 -i rtmp://0.0.0.0/live/a",
         uid: int = 0, unit: str | None = "session-1.scope") -> Process:  # fmt: skip
    return Process(4242, exe, tuple(argv.split()), uid, unit, 1234567)


@pytest.mark.parametrize(
    ("p", "rule"),
    [
        (proc(), "rtmp-ingest"),
        (proc(unit=None), "rtmp-ingest"),  # in no unit (the root cgroup): as `attach` takes it
        (proc(argv="ffmpeg -i in.mp4 out.mkv"), None),  # not a receiver
        (proc(uid=1000), None),
        (proc(exe="/usr/bin/ffprobe"), None),
        (proc(exe="/opt/ffmpeg/bin/ffmpeg"), "rtmp-ingest"),  # a name matches in any directory
        (proc(unit="nginx.service"), "nginx-rtmp"),  # first match: rtmp-ingest names no unit, so not it
        (proc(unit="other.service"), None),  # a .service only by a rule that names it
        (proc(unit="ffrtmp-job1.scope"), None),  # governed already
        (proc(argv="ffmpeg -listen 1 -i rtmp://x", unit="nginx.service", uid=33), "nginx-rtmp"),
    ],
)
def test_the_first_matching_rule_wins(tmp_path: Path, p: Process, rule: str | None) -> None:
    (tmp_path / "w.toml").write_text(GOOD)
    got = load(tmp_path / "w.toml").match(p)
    assert (got.name if got else None) == rule


def test_an_absolute_exe_matches_that_file_only(tmp_path: Path) -> None:
    real = os.path.realpath("/usr/bin/env")
    (tmp_path / "w.toml").write_text(f'[[rule]]\nname = "e"\nexe = "{real}"\nuser = 0\n')
    rules = load(tmp_path / "w.toml")
    assert rules.match(proc(exe=real)) is not None and rules.match(proc(exe="/tmp" + real)) is None
    assert rules.wants(real) and not rules.wants("/usr/bin/ffmpeg")


def test_the_job_id_of_a_rule_is_a_valid_one_per_process() -> None:
    longest = watch_job_id("r" * 64, 4194304, 2**64 - 1)
    assert JOB_ID.fullmatch(longest) and watch_job_id("rtmp", 42, 7) == "rtmp-42-7"


def test_a_config_error_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path / "none.toml")
    assert err.value.exit_code == 2


def test_a_backtracking_pattern_cannot_stall_the_match(tmp_path: Path) -> None:
    # Any local user writes the command line. With Python's re these searches take longer than the test's
    # timeout (bench/argv.py: 26 bytes already take seconds); RE2 answers in linear time.
    (tmp_path / "w.toml").write_text(
        '[[rule]]\nname = "n"\nexe = "ffmpeg"\nargv = \'(a+)+$\'\n'
        '[[rule]]\nname = "p"\nexe = "ffmpeg"\nargv = \'.*-i.*rtmp.*live\'\n'
    )
    rules = load(tmp_path / "w.toml")
    assert rules.match(proc(argv="ffmpeg " + "a" * 60 + "!")) is None
    assert rules.match(proc(argv="ffmpeg " + "-i" * 30000)) is None
    got = rules.match(proc(argv="ffmpeg " + "-i" * 30000 + " rtmp://x/live"))
    assert got is not None and got.name == "p"


def test_arguments_that_are_not_utf8_are_matched_as_bytes(tmp_path: Path) -> None:
    (tmp_path / "w.toml").write_text('[[rule]]\nname = "r"\nexe = "ffmpeg"\nargv = \'rtmp://\\S+/live\'\n')
    rules = load(tmp_path / "w.toml")
    odd = b"-metadata t=\xff\xfe\n -i rtmp://h\xff/live".decode(errors="surrogateescape")  # as facts() reads
    assert rules.match(proc(argv="ffmpeg " + odd)) is not None
    assert rules.match(proc(argv="ffmpeg -i \udcff")) is None


def test_a_rules_file_that_others_could_change_or_that_blocks_is_refused(tmp_path: Path) -> None:
    """Root adopts what the file says: not only the file but every directory on its way must be root's,
    and a symbolic link is refused (name the file itself). A FIFO would hold the check (and the agent's
    start) until someone writes to it: refused without waiting."""
    nobody = 65534
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "w.toml").write_text(R)
    (theirs / "w.toml").chmod(0o644)
    os.chown(theirs, nobody, nobody)  # their directory: they could put another file in its place
    r = check(theirs / "w.toml")
    assert r.returncode == 2 and r.stderr == (
        f"ffrtmp: {theirs}/w.toml: directory {theirs} is owned by uid {nobody}:"
        " only root may be able to change what is adopted\n"
    ), r.stderr
    (tmp_path / "link.toml").symlink_to(theirs / "w.toml")
    r = check(tmp_path / "link.toml")
    assert r.returncode == 2 and r.stderr == (
        f"ffrtmp: {tmp_path}/link.toml: a symbolic link (to {theirs}/w.toml): name the file itself\n"
    ), r.stderr
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    (open_dir / "w.toml").write_text(R)
    (open_dir / "w.toml").chmod(0o644)
    open_dir.chmod(0o777)
    r = check(open_dir / "w.toml")
    assert r.returncode == 2 and r.stderr.endswith(
        f"directory {open_dir} is mode 0777: only root may be able to change what is adopted\n"
    ), r.stderr
    (tmp_path / "their.toml").write_text(R)
    os.chown(tmp_path / "their.toml", nobody, nobody)
    assert "owned by uid 65534: only its owner (root)" in check(tmp_path / "their.toml").stderr
    os.mkfifo(tmp_path / "fifo.toml")
    r = check(tmp_path / "fifo.toml")
    assert (r.returncode, r.stderr) == (2, f"ffrtmp: {tmp_path}/fifo.toml: not a regular file\n")
