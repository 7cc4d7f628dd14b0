"""The command line: parse, call the wrapper, print, exit. The only module that prints or exits."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import __version__, journal
from .client import hold_std_fds, print_json, say, state_dir_of, store_of
from .errors import RUN_WRAPPER_ERROR, USAGE, FfrtmpError, UsageError
from .limits import parse_limits
from .presentation import result_text, summary_line
from .report.result import to_json
from .report.store import Store

app = typer.Typer(
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Governance wrapper: run or adopt media workloads in transient systemd scopes.",
)

StateDir = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        envvar="FFRTMP_STATE_DIR",
        help="Where contracts and results live (default /var/lib/ffrtmp; --user: $XDG_STATE_HOME/ffrtmp).",
        show_default=False,
    ),
]
JobId = Annotated[str | None, typer.Option("--job-id", help="Job id (generated and printed when omitted).")]
CpuMax = Annotated[
    str | None, typer.Option("--cpu-max", help='cgroup v2 cpu.max: "QUOTA PERIOD" (QUOTA may be max).')
]
CpuQuota = Annotated[str | None, typer.Option("--cpu-quota", help="Percent of one core (100 = one core).")]
CpuWeight = Annotated[str | None, typer.Option("--cpu-weight", help="1..10000.")]
MemoryMax = Annotated[str | None, typer.Option("--memory-max", help="Bytes, or with K/M/G/T suffix, or max.")]
IoWeight = Annotated[str | None, typer.Option("--io-weight", help="1..10000.")]
IoMax = Annotated[
    list[str] | None,
    typer.Option("--io-max", help=r'"DEVICE \[rbps=N] \[wbps=N] \[riops=N] \[wiops=N]" (repeatable).'),
]
Intent = Annotated[str | None, typer.Option("--intent", help="Free text, e.g. production, test.")]
_user: list[bool] = []  # --user given: the calling user's own service manager and state directory


def _version(value: bool) -> None:
    if value:
        print(f"ffrtmp {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    user: Annotated[
        bool, typer.Option("--user", help="Govern through the calling user's service manager (its bus).")
    ] = False,
) -> None:
    if user:
        from .systemd.bus import use_user_bus

        use_user_bus()
        journal.unit_field = "USER_UNIT"
        _user.append(True)


def _store(state_dir: Path | None) -> Store:
    """The store at an absolute path, resolved once here: a record never depends on a working directory."""
    return store_of(state_dir, bool(_user))


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    command: Annotated[list[str], typer.Argument(help="COMMAND [ARGS...] after --")],
    job_id: JobId = None,
    cpu_max: CpuMax = None,
    cpu_quota: CpuQuota = None,
    cpu_weight: CpuWeight = None,
    memory_max: MemoryMax = None,
    io_weight: IoWeight = None,
    io_max: IoMax = None,
    intent: Intent = None,
    state_dir: StateDir = None,
) -> int:
    """Start COMMAND already inside a new scope, wait for it, freeze its result. Exits with its status."""
    from .client import run_job
    from .names import check_intent
    from .names import job_id as make_id

    limits = parse_limits(cpu_max, cpu_quota, cpu_weight, memory_max, io_weight, io_max or ())
    job = make_id(job_id)
    journal.bind(FFRTMP_JOB_ID=job, FFRTMP_MODE="run")
    state = state_dir_of(state_dir, bool(_user))
    return run_job(command, job, limits.as_dict(), check_intent(intent), state, bool(_user))


@app.command()
def attach(
    pid: Annotated[int, typer.Option("--pid", help="The running process to adopt.")],
    job_id: JobId = None,
    cpu_max: CpuMax = None,
    cpu_quota: CpuQuota = None,
    cpu_weight: CpuWeight = None,
    memory_max: MemoryMax = None,
    io_weight: IoWeight = None,
    io_max: IoMax = None,
    intent: Intent = None,
    force: Annotated[
        bool, typer.Option("--force", help="Adopt a PID owned by a .service (irreversible).")
    ] = False,
    json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    state_dir: StateDir = None,
) -> int:
    """Adopt a running process (and its children) into a new scope without disturbing it; observe it."""
    from .client import attach_job
    from .names import check_intent
    from .names import job_id as make_id

    limits = parse_limits(cpu_max, cpu_quota, cpu_weight, memory_max, io_weight, io_max or ())
    job = make_id(job_id)
    journal.bind(FFRTMP_JOB_ID=job, FFRTMP_MODE="attach")
    state = state_dir_of(state_dir, bool(_user))
    result = attach_job(pid, job, limits.as_dict(), check_intent(intent), force, state, bool(_user))
    if json and result is not None:
        print_json(result)
    return 0


@app.command()
def release(
    job_id: Annotated[str, typer.Argument(help="The running job.")], state_dir: StateDir = None
) -> int:
    """Lift every limit of a running job's scope; nothing else changes."""
    from .names import job_id as check_id
    from .release import release as release_job

    journal.bind(FFRTMP_JOB_ID=check_id(job_id))
    unit, recorded = release_job(check_id(job_id), _store(state_dir))
    journal.bind(**{journal.unit_field: unit, "FFRTMP_UNIT": unit})
    say(
        f"ffrtmp: limits of {unit} lifted"
        + ("" if recorded else " (the job's record is frozen: not noted there)")
    )
    return 0


@app.command()
def show(
    job_id: Annotated[str, typer.Argument(help="The job.")],
    json: Annotated[bool, typer.Option("--json", help="Print the result JSON only.")] = False,
    state_dir: StateDir = None,
) -> int:
    """Print a frozen result."""
    from .names import job_id as check_id

    store = _store(state_dir)
    result = store.result(check_id(job_id))
    if result is None:
        raise FfrtmpError(f"no result for job {job_id!r} in {store.results}")
    print(to_json(result) if json else result_text(result), end="")
    return 0


@app.command()
def exporter(
    listen: Annotated[
        str, typer.Option("--listen", envvar="FFRTMP_EXPORTER_LISTEN", help="HOST:PORT to serve HTTP on.")
    ] = "127.0.0.1:9464",
    state_dir: StateDir = None,
) -> int:
    """Serve /metrics (Prometheus), /violations (JSON) and /healthz; reconcile orphans as scopes go."""
    from .exporter import serve

    return serve(listen, _store(state_dir))


@app.command()
def agent(
    socket: Annotated[
        str | None, typer.Option("--socket", help="Listen on PATH (made 0600) unless socket-activated.")
    ] = None,
    listen: Annotated[
        str,
        typer.Option(
            "--listen",
            envvar="FFRTMP_EXPORTER_LISTEN",
            help="HOST:PORT for /metrics, /violations, /healthz; none: off.",
        ),
    ] = "127.0.0.1:9464",
    watch: Annotated[
        Path | None,
        typer.Option(
            "--watch", envvar="FFRTMP_WATCH_RULES", help="Adopt new processes by these rules (TOML)."
        ),
    ] = None,
    state_dir: StateDir = None,
) -> int:
    """The node agent: govern the jobs of `run` and `attach` clients over one bus connection."""
    from .agent import main as agent_main

    return agent_main(socket, _store(state_dir), listen, watch.absolute() if watch else None)


@app.command()
def reconcile(state_dir: StateDir = None) -> int:
    """Freeze `observer_lost` for every job whose wrapper and scope are both gone; leave the rest."""
    from .reconcile import LeftAlone, Unreadable
    from .reconcile import reconcile as reconcile_jobs

    bad = 0
    for r in reconcile_jobs(_store(state_dir)):
        if isinstance(r, LeftAlone):
            say(f"ffrtmp: job {r.job_id} left alone: {r.why}")
        elif isinstance(r, Unreadable):
            bad += 1  # already named on stderr, one line each
        else:
            print(summary_line(r))
    return 1 if bad else 0


@app.command("ls")
def ls(
    all: Annotated[bool, typer.Option("--all", help="Also the recent frozen results.")] = False,
    last: Annotated[int, typer.Option("--last", min=1, help="How many recent results with --all.")] = 20,
    json: Annotated[bool, typer.Option("--json", help="JSON for machines.")] = False,
    state_dir: StateDir = None,
) -> int:
    """The governed jobs running now (from systemd) and, with --all, the recent results."""
    from .listing import listing
    from .presentation import listing_json, table

    live, done = listing(_store(state_dir), last if all else 0)
    print(listing_json(live, done) if json else table(live, done if all else None), end="")
    return 0


@app.command()
def watch(
    config: Annotated[Path, typer.Option("--config", help="The rules file (TOML).")],
    check: Annotated[bool, typer.Option("--check", help="Only validate the rules: exit 0, or 2.")] = False,
    state_dir: StateDir = None,
) -> int:
    """Adopt every new process a rule matches, as `attach` would (in the foreground, until stopped)."""
    from .rules import load

    rules = load(config.absolute())
    if check:
        print(f"{rules.path}: {len(rules.rules)} rule{'s' * (len(rules.rules) != 1)}, valid")
        return 0
    if _user:
        raise UsageError("watch adopts system processes: not with --user")
    from .discover import watch as watch_rules

    return watch_rules(rules, _store(state_dir))


class _Say(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:  # syslog priorities: err 3, warning 4, info 6
        level = record.levelno
        say(self.format(record), 3 if level >= logging.ERROR else 4 if level >= logging.WARNING else 6)


def main() -> None:
    """The one place that turns errors into a one-line message and an exit status."""
    hold_std_fds()
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[_Say()])
    sys.stderr = None  # only say() writes there: no warning, no stray traceback
    usage_code = RUN_WRAPPER_ERROR if [a for a in sys.argv[1:3] if a != "--user"][:1] == ["run"] else USAGE
    try:
        code = app(standalone_mode=False)
    except FfrtmpError as err:
        say(f"ffrtmp: {err}", 3)
        code = usage_code if err.exit_code == USAGE else err.exit_code
    except typer.Abort:
        code = usage_code
    except Exception as err:  # click's usage errors, and anything unexpected: one line, never a traceback
        text = err.format_message() if hasattr(err, "format_message") else f"internal error: {err!r}"
        if text:  # `ffrtmp` alone has printed its help: nothing more to say
            say(f"ffrtmp: {text}", 3)
        code = (
            usage_code if hasattr(err, "format_message") else (RUN_WRAPPER_ERROR if usage_code == 125 else 1)
        )
    sys.exit(code if isinstance(code, int) else 0)
