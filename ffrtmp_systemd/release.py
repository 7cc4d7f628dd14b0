"""`ffrtmp release`, an admin command: lift every limit of a running job's scope (the undo). ONLY."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import contextlib
from datetime import UTC, datetime

from .errors import FfrtmpError
from .limits import release_properties
from .names import unit_name
from .report.result import rfc3339
from .report.store import Store
from .systemd.bus import UNIT, Bus, BusError, with_bus


def release(job: str, store: Store) -> tuple[str, bool]:
    """Any running job scope, found through systemd; noted in the contract if one is left."""
    unit = unit_name(job)

    async def lift(bus: Bus) -> bool:
        try:
            if await bus.get(await bus.unit_path(unit), UNIT, "ActiveState") != "active":
                return False
        except BusError as err:
            if err.name.endswith(".NoSuchUnit"):
                return False
            raise
        await bus.set_properties(unit, release_properties())
        return True

    try:
        if not with_bus(lift):
            raise FfrtmpError(f"no running job {job!r} (systemd runs no {unit})")
    except BusError as err:
        raise FfrtmpError(f"cannot release job {job!r}: {err}") from None
    with contextlib.suppress(FfrtmpError):  # lifted all the same; False: the note is not in the record
        return unit, store.amend(job, limits_released_at=rfc3339(datetime.now(UTC)))
    return unit, False
