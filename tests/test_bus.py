"""The D-Bus client against a real systemd: scopes, job results, errors by name, unit lookups."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from conftest import read_until, result_of, wait_for, wakeups
from sandbox import Sandbox

from ffrtmp_systemd.systemd.bus import Bus, BusError


@pytest.fixture
async def bus(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Bus]:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", sandbox.bus_address)
    b = await Bus.connect()
    yield b
    b.close()


@pytest.fixture
def sleeper(sandbox: Sandbox) -> Iterator[int]:
    """A process inside the sandbox (its PID there), in no unit."""
    proc = sandbox.spawn(["sleep", "60"])
    yield sandbox.inner_pid(proc)[1]
    proc.kill()
    proc.wait()


async def test_start_scope_waits_for_its_job(bus: Bus, sandbox: Sandbox, sleeper: int) -> None:
    assert await bus.unit_of_pid(sleeper) is None
    await bus.start_scope("bus-a.scope", [("PIDs", "au", [sleeper]), ("MemoryMax", "t", 64 << 20)])
    assert await bus.unit_of_pid(sleeper) == "bus-a.scope"  # done means moved: no race
    props = await bus.properties(await bus.unit_path("bus-a.scope"))
    assert props["ActiveState"] == "active" and props["ActiveEnterTimestamp"] > 0
    units = await bus.list_units("bus-*")
    assert [(name, state) for name, state, _ in units] == [("bus-a.scope", "active")]
    await bus.set_properties("bus-a.scope", [("MemoryMax", "t", 2**64 - 1)])
    cg = sandbox.cgroup_file("memory", "/system.slice/bus-a.scope", "memory.limit_in_bytes")
    assert cg.read_text().strip() == "9223372036854771712"


async def test_close_frees_the_socket_at_once(bus: Bus) -> None:
    """dbus-next's disconnect only shuts its socket down; close() frees the descriptor now (the freeze
    that follows may need it under a low `ulimit -n`), and a second close() does nothing."""
    before = set(os.listdir("/proc/self/fd"))
    bus.close()
    assert len(set(os.listdir("/proc/self/fd")) - before) == 0
    assert len(before - set(os.listdir("/proc/self/fd"))) == 1 and not bus.connected
    bus.close()


async def test_errors_carry_their_dbus_name(bus: Bus, sleeper: int) -> None:
    await bus.start_scope("bus-b.scope", [("PIDs", "au", [sleeper])])
    with pytest.raises(BusError) as err:
        await bus.start_scope("bus-b.scope", [("PIDs", "au", [sleeper])])
    assert err.value.name == "org.freedesktop.systemd1.UnitExists"
    with pytest.raises(BusError) as err:
        await bus.start_scope("bus-c.scope", [("PIDs", "au", [999999])])
    assert err.value.name == "org.freedesktop.DBus.Error.UnixProcessIdUnknown"
    with pytest.raises(BusError) as err:
        await bus.start_scope("bus-d.scope", [("PIDs", "au", [sleeper]), ("NoSuchProperty", "t", 1)])
    assert err.value.name.startswith("org.freedesktop.DBus.Error.")


async def test_scope_properties_are_known_by_what_the_manager_has(bus: Bus) -> None:
    assert await bus.scope_has("OOMPolicy")  # systemd 253, and 252-stable from January 2023
    assert not await bus.scope_has("NoSuchSetting")  # an older manager's answer: not sent, no retry


async def test_no_bus_is_a_bus_error(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/none")
    with pytest.raises(BusError) as err:
        await Bus.connect()
    assert "cannot reach the system bus" in str(err.value)


def _asleep(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "S"


def test_a_waiting_wrapper_sleeps_through_other_units_jobs(sandbox: Sandbox, state_dir: Path) -> None:
    """Its JobRemoved match names its own unit: jobs of other units never wake it."""
    proc = sandbox.spawn(
        ["ffrtmp", "run", "--job-id", "idle", "--", "sleep", "300"],
        env={"FFRTMP_STATE_DIR": str(state_dir)}, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    wrapper = sandbox.inner_pid(proc)[0]
    try:
        read_until(proc, "started in")
        wait_for(lambda: _asleep(wrapper), what="the wrapper to wait")
        before = wakeups(wrapper)
        for _ in range(5):
            assert sandbox.run(["systemd-run", "--scope", "-q", "true"]).returncode == 0
        assert _asleep(wrapper) and wakeups(wrapper) == before
    finally:
        for workload in Path(f"/proc/{wrapper}/task/{wrapper}/children").read_text().split():
            os.kill(int(workload), signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.parametrize(("value", "limit"), [
    (None, 5.0), ("2", 2.0), ("0.5", 0.5), ("", 5.0), ("0", 5.0), ("-1", 5.0), ("abc", 5.0), ("1e3", 5.0),
])  # fmt: skip
def test_the_time_limit_is_5_s_unless_the_test_hook_says_otherwise(value: str | None, limit: float) -> None:
    """FFRTMP_BUS_TIMEOUT (README: a positive number of seconds, anything else ignored), read at import."""
    env = {k: v for k, v in os.environ.items() if k != "FFRTMP_BUS_TIMEOUT"}
    if value is not None:
        env["FFRTMP_BUS_TIMEOUT"] = value
    code = "from ffrtmp_systemd.systemd.bus import TIMEOUT; print(TIMEOUT)"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert float(r.stdout) == limit


# Any peer of the system bus may send a signal to one connection (dbus-daemon's system policy allows
# signals from anyone, and a match rule filters broadcasts only): as uid 65534, one such signal turned a
# compliant job into `governance_lost`. systemd's own signals are broadcasts: a signal with a destination
# is never theirs.
FORGE = """
import asyncio, sys
from dbus_next import BusType, Message, MessageType, Variant
from dbus_next.aio import MessageBus

async def main():
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    path, body = sys.argv[1], ["org.freedesktop.systemd1.Unit", {"ActiveState": Variant("s", "inactive")}, []]
    for to in sys.argv[2:]:
        await bus.send(Message(to, path, "org.freedesktop.DBus.Properties", "PropertiesChanged",
                               message_type=MessageType.SIGNAL, signature="sa{sv}as", body=body))
    await bus.call(Message("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetId"))

asyncio.run(main())
"""


def test_a_signal_sent_to_one_connection_alone_is_not_systemds(sandbox: Sandbox, state_dir: Path) -> None:
    proc = sandbox.spawn(
        ["ffrtmp", "run", "--job-id", "forged", "--", "head", "-c1"],
        env={"FFRTMP_STATE_DIR": str(state_dir)}, stdin=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None
    read_until(proc, "started in")  # followed: its unit's changes are heard from now on
    peers = sandbox.run(["busctl", "--system", "list", "--unique", "--no-legend"], check=True).stdout
    to = [p.split()[0] for p in peers.splitlines() if p.split()[1] != "1"]  # all but systemd's
    path = "/org/freedesktop/systemd1/unit/ffrtmp_2dforged_2escope"
    sandbox.run(["python", "-c", FORGE, path, *to], check=True)  # delivered before its GetId is answered
    proc.stdin.write(b"x")
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0
    assert result_of(state_dir, "forged")["platform_sla_reason"] == "completed_within_limits"


async def test_a_bus_without_systemd_is_refused_and_closed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Connected, but no systemd answers the subscription: a BusError, and no descriptor left behind."""
    daemon = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--print-address", f"--address=unix:dir={tmp_path}"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert daemon.stdout is not None
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", daemon.stdout.readline().strip())
        before = sorted(os.listdir("/proc/self/fd"))
        with pytest.raises(BusError):
            await Bus.connect()
        assert sorted(os.listdir("/proc/self/fd")) == before
    finally:
        daemon.kill()
        daemon.wait()
