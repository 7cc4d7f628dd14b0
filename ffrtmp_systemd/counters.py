"""Frozen results -> counters and the last violations. Counting ONLY (standard library; no HTTP, no bus).

Each result file is read once (new names are found by listing results/ only when its mtime moved);
counters live in memory and are recomputed from the records at start; a bad record is named,
counted and skipped. Reads files, holding the lock meanwhile: call `refresh`, `families` and
`violations_json` from a worker thread, never from an event loop (`unreadable` may be called there).
"""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from typing import Any

from .errors import FfrtmpError
from .report.result import Mode, Reason, Result
from .report.store import Store

log = logging.getLogger(__name__)
LAST_VIOLATIONS = 50
VIOLATIONS = [r.value for r in Reason if not r.compliant]
EXITS = ("0", "non_zero", "unknown")
RACY_NS = 1_000_000_000
WATCH = "watch:"  # the origin of a job a watch rule adopted: watch:RULE
Family = tuple[str, str, dict[str, int]]  # (counter name, its label, label value -> count)


def exit_label(r: Result) -> str:
    if r.exit_code == 0:
        return "0"
    return "non_zero" if r.exit_code is not None or r.signal else "unknown"


class Tally:
    """Counters over the frozen results, each result file read once; the last violations, newest first."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.lock = threading.Lock()
        self.seen: set[str] = set()  # job ids of the results already read
        self.bad: dict[str, set[str]] = {"contract": set(), "result": set()}  # job ids of bad records
        self.started = 0
        keys = ("sla", "reason", "mode", "exit", "rule")
        self.counts: dict[str, Counter[str]] = {k: Counter() for k in keys}
        self.violations: list[dict[str, Any]] = []
        self._mtime = self._listed = 0  # results/'s mtime at the last listing, and when that was (ns)

    def refresh(self) -> None:
        with self.lock:
            try:
                new = self.store.ids(self.store.results) if self._changed() else []
                pending = len(set(self.store.ids(self.store.jobs)) - self.seen)
            except FfrtmpError as err:
                log.warning("ffrtmp exporter: records not read: %s", err)
                return
            for job in (j for j in new if j not in self.seen):
                self.seen.add(job)
                try:
                    r = self.store.result(job)
                except FfrtmpError as err:
                    log.warning("ffrtmp exporter: not counted: %s", err)
                    self.bad["result"].add(job)
                    continue
                if r is not None:
                    self._count(r)
            self.started = max(self.started, len(self.seen) + pending)  # never goes down

    def unreadable(self, job: str) -> None:
        """A contract found unreadable (by the Reconciler): counted as a bad record. Called in an event
        loop: never waits for the lock (a refresh may hold it while it reads); one set.add is atomic."""
        self.bad["contract"].add(job)

    def _changed(self) -> bool:
        """Whether results/ may hold names not listed yet: a scrape costs one stat while nothing changed.

        Its mtime moved, or it was so close to the last listing that a later change could carry the
        same coarse timestamp (the racy case git's index knows): then list again."""
        mtime = self.store.stamp(self.store.results)
        if not mtime or (mtime == self._mtime and self._listed - mtime > RACY_NS):
            return False
        self._mtime, self._listed = mtime, time.time_ns()
        return True

    def _count(self, r: Result) -> None:
        c = self.counts
        c["sla"][str(r.platform_sla_compliant).lower()] += 1
        c["mode"][str(r.mode)] += 1
        c["exit"][exit_label(r)] += 1
        if r.origin and r.origin.startswith(WATCH):
            c["rule"][r.origin.removeprefix(WATCH)] += 1
        if not r.platform_sla_compliant:
            c["reason"][str(r.platform_sla_reason)] += 1
            self.violations.append(
                {
                    "job_id": r.job_id,
                    "reason": str(r.platform_sla_reason),
                    "mode": str(r.mode),
                    "processing_seconds": r.processing_seconds,
                    "exit_code": r.exit_code,
                    "pid": r.pid,
                    "end_time": r.end_time,
                }
            )
            self.violations.sort(key=lambda v: (v["end_time"], v["job_id"]), reverse=True)
            del self.violations[LAST_VIOLATIONS:]

    def families(self) -> list[Family]:
        """Every counter, each label value present (0 when none): what /metrics shows of the records."""
        with self.lock:
            c, done = self.counts, len(self.seen) - len(self.bad["result"])
            return [
                ("ffrtmp_jobs", "state", {"started": self.started, "completed": done}),
                ("ffrtmp_platform_sla", "compliant", {k: c["sla"][k] for k in ("true", "false")}),
                ("ffrtmp_platform_sla_violations", "reason", {k: c["reason"][k] for k in VIOLATIONS}),
                ("ffrtmp_jobs_by_mode", "mode", {m.value: c["mode"][m.value] for m in Mode}),
                ("ffrtmp_jobs_by_exit", "exit", {k: c["exit"][k] for k in EXITS}),
                ("ffrtmp_watch_jobs", "rule", dict(sorted(c["rule"].items()))),  # the rules seen only
                ("ffrtmp_bad_records", "kind", {k: len(v) for k, v in self.bad.items()}),
            ]

    def violations_json(self) -> bytes:
        with self.lock:
            return (json.dumps(self.violations, sort_keys=True, indent=2) + "\n").encode()
