"""Release: lift every limit of a running job's scope (the reversible undo of governance). ONLY."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from ..errors import FfrtmpError
from ..limits import release_properties
from ..report.result import rfc3339
from ..report.store import Store
from ..systemd.bus import BusError, with_bus
from .job import unit_name


def release(job: str, store: Store) -> str:
    c = store.contract(job)
    if c is None:
        raise FfrtmpError(f"no running job {job!r} (no contract in {store.state_dir}/jobs)")

    try:
        with_bus(lambda bus: bus.set_properties(unit_name(job), release_properties()))
    except BusError as err:
        raise FfrtmpError(f"cannot release job {job!r}: {err}") from None
    store.update_contract(dataclasses.replace(c, limits_released_at=rfc3339(datetime.now(UTC))))
    return c.unit
