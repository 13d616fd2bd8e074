"""Deciding, per disk, between IFINCR from the last tracking point and IFFULL, with the reason.

Any doubt means IFFULL: an IFINCR is only taken when the tracking point the catalog expects
is on the disk, persistent, consistent, recording, idle and of the recorded granularity, and
the disk's image and size are the ones of the last version.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmdp.model import Disk, DiskVersion, Mode, Version

# Tracking states, as `query vm --detail` shows them for each disk of a version.
OK, NONE, MISSING, INCONSISTENT, TRANSIENT, DISABLED, BUSY = (
    "ok",
    "none",
    "missing",
    "inconsistent",
    "transient",
    "disabled",
    "busy",
)


@dataclass(frozen=True)
class DiskDecision:
    disk: Disk
    base: DiskVersion | None  # the earlier disk version an IFINCR builds on; None: IFFULL
    reason: str | None  # why IFFULL
    tracking: str  # the state of the expected tracking point when the backup started

    @property
    def mode(self) -> Mode:
        return Mode.IFINCR if self.base else Mode.IFFULL


def tracking_state(disk: Disk, prev: DiskVersion | None, transient_ok: bool = False) -> tuple[str, str | None]:
    """The state of the tracking point `prev` recorded, and what is wrong with it (None: nothing).

    `transient_ok`: the disk cannot hold a persistent bitmap and the user allowed a
    non-persistent one, which is trusted while the QEMU process that holds it lives.
    """
    if prev is None or not prev.tracking_point:
        return NONE, "the last version carries no tracking point: first backup with change tracking"
    bitmap = disk.bitmap(prev.tracking_point)
    if bitmap is None and transient_ok:
        return MISSING, "transient tracking point lost: QEMU restarted since the last version"
    if bitmap is None:
        return MISSING, (
            f"tracking point {prev.tracking_point} is missing from the disk "
            "(removed, image replaced, or QEMU stopped without saving it)"
        )
    if bitmap.inconsistent:
        return INCONSISTENT, "change tracking inconsistent after unclean shutdown"
    if not bitmap.persistent and not transient_ok:
        return TRANSIENT, "tracking point is not persistent"
    if not bitmap.recording:
        return DISABLED, "tracking point is not recording"
    if bitmap.busy:
        return BUSY, "tracking point is in use by another operation"
    if prev.granularity and bitmap.granularity != prev.granularity:
        return INCONSISTENT, f"tracking granularity changed from {prev.granularity} to {bitmap.granularity}"
    return (TRANSIENT if not bitmap.persistent else OK), None


def decide(disk: Disk, last: Version | None, requested: Mode, transient_ok: bool = False) -> DiskDecision:
    """IFINCR from the last version's tracking point, or IFFULL and why."""
    prev = next((d for d in last.disks if d.name == disk.name), None) if last else None
    state, problem = tracking_state(disk, prev, transient_ok)
    if requested is Mode.IFFULL:
        return DiskDecision(disk, None, "IFFULL requested", state)
    if last is None:
        return DiskDecision(disk, None, "no earlier version of this VM", state)
    if prev is None:
        return DiskDecision(disk, None, "disk is new since the last version", state)
    if prev.location != disk.location:
        return DiskDecision(disk, None, f"disk image changed from {prev.location} to {disk.location}", state)
    if prev.capacity != disk.capacity:
        return DiskDecision(disk, None, f"disk was resized from {prev.capacity} to {disk.capacity} bytes", state)
    if problem:
        return DiskDecision(disk, None, problem, state)
    return DiskDecision(disk, prev, None, state)


def version_reason(reasons: dict[str, str]) -> str | None:
    """One reason for the version: shared by all disks, or per disk."""
    if not reasons:
        return None
    distinct = set(reasons.values())
    if len(distinct) == 1:
        return distinct.pop()
    return "; ".join(f"{name}: {why}" for name, why in reasons.items())
