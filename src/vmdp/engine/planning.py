"""Deciding, per disk, between IFINCR from the last tracking point and IFFULL, with the reason."""

from __future__ import annotations

from vmdp.model import Disk, DiskVersion, Mode, Version


def disk_reason(disk: Disk, last: Version | None, requested: Mode) -> tuple[DiskVersion | None, str | None]:
    """The earlier disk version an IFINCR builds on, or None and why the disk needs IFFULL."""
    if requested is Mode.IFFULL:
        return None, "IFFULL requested"
    if last is None:
        return None, "no earlier version of this VM"
    prev = next((d for d in last.disks if d.name == disk.name), None)
    if prev is None:
        return None, "disk is new since the last version"
    if prev.location != disk.location:
        return None, f"disk image changed from {prev.location} to {disk.location}"
    if prev.capacity != disk.capacity:
        return None, f"disk was resized from {prev.capacity} to {disk.capacity} bytes"
    if not prev.tracking_point:
        return None, "the last version has no tracking point"
    bitmap = disk.bitmap(prev.tracking_point)
    if bitmap is None:
        return None, f"tracking point {prev.tracking_point} is missing from the disk"
    if bitmap.inconsistent:
        return None, "change tracking inconsistent after unclean shutdown"
    if not bitmap.persistent:
        return None, "tracking point is not persistent"
    if not bitmap.recording:
        return None, "tracking point is not recording"
    if bitmap.busy:
        return None, "tracking point is in use by another operation"
    if prev.granularity and bitmap.granularity != prev.granularity:
        return None, f"tracking granularity changed from {prev.granularity} to {bitmap.granularity}"
    return prev, None


def version_reason(reasons: dict[str, str]) -> str | None:
    """One reason for the version: shared by all disks, or per disk."""
    if not reasons:
        return None
    distinct = set(reasons.values())
    if len(distinct) == 1:
        return distinct.pop()
    return "; ".join(f"{name}: {why}" for name, why in reasons.items())
