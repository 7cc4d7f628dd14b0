"""dashboards/: the Prometheus alerting rules (promtool check and unit tests, then a real Prometheus
evaluating them against the real exporter while real jobs violate the SLA) and the Grafana dashboard
(every query accepted by that Prometheus, with data, naming only metrics the exporter serves)."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Ffrtmp, orphan, wait_for
from helpers import HOG, Exporter, get, prometheus, promql, scraped
from prometheus_client.parser import text_string_to_metric_families
from sandbox import Sandbox

DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"
RULES = DASHBOARDS / "ffrtmp-alerts.yml"
DASHBOARD = DASHBOARDS / "ffrtmp.json"
# Grafana's variables, as Grafana would fill them in before sending a query
GRAFANA = {"__rate_interval": "1m", "__range": "1h", "__interval": "15s", "instance": ".*"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], cwd=DASHBOARDS, capture_output=True, text=True, timeout=60)


def test_promtool_checks_the_rules() -> None:
    r = promtool("check", "rules", RULES.name)
    assert r.returncode == 0 and "SUCCESS: 4 rules found" in r.stdout, r.stdout + r.stderr


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    """Timing and labels: fires on a new violation, not on a restart or a reset, resolves; `for` of the
    down alerts (dashboards/ffrtmp-alerts.test.yml)."""
    r = promtool("test", "rules", "ffrtmp-alerts.test.yml")
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in items:
        yield p
        yield from panels(p.get("panels", []))


def grafana(expr: str) -> str:
    """An expression with Grafana's variables filled in; an unknown variable fails the test."""
    used = set(re.findall(r"\$\{?(\w+)", expr))
    assert used <= set(GRAFANA), f"unknown Grafana variable in {expr!r}"
    return re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA[m[1]], expr)


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard, its node variable's included."""
    doc = json.loads(DASHBOARD.read_text())
    out = [(p["title"], grafana(t["expr"])) for p in panels(doc["panels"]) for t in p.get("targets", [])]
    for v in doc["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+), *(\w+)\)", v["query"]["query"])
            assert m, v
            out.append((f"variable {v['name']}", m[1]))
    return out


def test_the_dashboard_is_well_formed() -> None:
    doc = json.loads(DASHBOARD.read_text())
    every = list(panels(doc["panels"]))
    assert len({p["id"] for p in every}) == len(every)
    assert [v["name"] for v in doc["templating"]["list"]] == ["datasource", "instance"]
    for p in every:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(set(refs)) == len(refs), p["title"]
        assert all('instance=~"$instance"' in t["expr"] for t in p["targets"]), p["title"]
    titles = " ".join(p["title"] for p in every)
    for words in ("Running jobs", "Verdicts", "Violations by reason", "Memory", "CPU"):
        assert words in titles
    assert len(queries()) >= 15


def alerts(base: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Active alerts (pending or firing) by (alertname, reason)."""
    status, _, body = get(f"{base}/api/v1/alerts")
    assert status == 200, body
    found = json.loads(body)["data"]["alerts"]
    return {(a["labels"]["alertname"], a["labels"].get("reason", "")): a for a in found}


def firing(base: str, *keys: tuple[str, str]) -> bool:
    now = alerts(base)
    return all(k in now and now[k]["state"] == "firing" for k in keys)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_alerts_fire_on_real_violations(
    sandbox: Sandbox, ffrtmp: Ffrtmp, state_dir: Path, exporter: Exporter, tmp_path: Path
) -> None:
    with prometheus(tmp_path, exporter, RULES) as base:
        quiet = 'ffrtmp_platform_sla_violations_total{reason="oom_killed"} == 0'
        wait_for(lambda: scraped(base, quiet), timeout=90, what="prometheus to scrape the exporter")
        assert alerts(base) == {}  # a quiet node: nothing pending, nothing firing
        # an OOM kill inside the scope (oom_killed), and a wrapper killed -9 (observer_lost)
        oom = ffrtmp("run", "--job-id", "oom", "--memory-max", "50M", "--", "python3", "-c", HOG)
        assert oom.returncode == 137
        fifo = tmp_path / "go"
        orphan(sandbox, state_dir, "lost", fifo)
        fifo.write_text("go\n")  # the workload ends, the exporter reconciles it as observer_lost
        want = ("FfrtmpSlaViolation", "oom_killed"), ("FfrtmpObserverLost", "")
        try:
            wait_for(lambda: firing(base, *want), timeout=60, what=f"{want} to fire")
        except TimeoutError:
            seen = promql(base, "ffrtmp_platform_sla_violations_total")
            raise AssertionError((alerts(base), seen, get(f"{exporter.url}/violations")[2])) from None
        now = alerts(base)
        assert set(now) == set(want)  # and nothing else: the exporter and systemd are up
        instance = exporter.url.removeprefix("http://")
        fired = now[want[0]]
        labels = {"alertname": "FfrtmpSlaViolation", "reason": "oom_killed", "severity": "warning"}
        assert fired["labels"] == {**labels, "instance": instance}
        assert fired["annotations"]["summary"] == f"ffrtmp on {instance}: platform SLA violated (oom_killed)"
        # the exporter stops: its alert becomes pending (it fires after `for: 2m`, tested by promtool)
        assert exporter.stop()[0] == 0
        down = ("FfrtmpExporterDown", "")
        wait_for(lambda: down in alerts(base), timeout=30, what="FfrtmpExporterDown pending")
        assert alerts(base)[down]["state"] == "pending"


def exposed(exporter: Exporter) -> set[str]:
    """Every metric name the exporter serves (counters with _total), with or without samples now."""
    names = set()
    for fam in text_string_to_metric_families(get(f"{exporter.url}/metrics")[2]):
        names |= {fam.name + ("_total" if fam.type == "counter" else "")} | {s.name for s in fam.samples}
    return names


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_every_dashboard_query_runs_in_a_real_prometheus(
    sandbox: Sandbox, ffrtmp: Ffrtmp, state_dir: Path, exporter: Exporter, tmp_path: Path
) -> None:
    assert ffrtmp("run", "--job-id", "done", "--", "true").returncode == 0
    job = sandbox.spawn(
        ["ffrtmp", "run", "--state-dir", str(state_dir), "--job-id", "live", "--",
         "python3", "-c", "import sys; b = bytearray(20 << 20); sys.stdin.read()"],
        stdin=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with prometheus(tmp_path, exporter) as base:
            three = 'count_over_time(ffrtmp_job_memory_bytes{job_id="live"}[1m]) >= 3'  # rate() needs two
            wait_for(lambda: scraped(base, three), timeout=90, what="three scrapes of the live job")
            cpu = sandbox.systemctl(
                "show", "-p", "CPUUsageNSec", "--value", "ffrtmp-live.scope"
            ).stdout.strip()
            names = exposed(exporter)
            for title, expr in queries():
                assert set(re.findall(r"\bffrtmp_\w+", expr)) <= names, (title, expr)
                result = promql(base, expr)  # fails on any error Prometheus reports
                if "cpu_seconds" not in expr or cpu != "[not set]":  # CPU: where systemd tracks it
                    assert result, f"{title}: no data for {expr}"
    finally:
        job.communicate(b"", timeout=30)
    assert job.returncode == 0
