"""Plain data shared by every layer: VMs, disks, extents, versions and backup modes."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Mode(enum.StrEnum):
    """IFFULL reads every allocated block; IFINCR reads only what changed since the last version."""

    IFFULL = "IFFULL"
    IFINCR = "IFINCR"


@dataclass(frozen=True)
class Extent:
    """A byte range of a disk; `data` is False where the range reads as zeros."""

    offset: int
    length: int
    data: bool = True

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class Bitmap:
    """A dirty bitmap as QEMU reports it."""

    name: str
    granularity: int
    persistent: bool
    recording: bool
    busy: bool
    inconsistent: bool
    count: int


@dataclass(frozen=True)
class Disk:
    """A disk attached to a VM: `name` is the device id (e.g. `vda`), `node` QEMU's block node."""

    name: str
    node: str
    location: str
    format: str
    capacity: int
    persistent_bitmaps: bool
    bitmaps: tuple[Bitmap, ...] = ()
    allocated: int = 0  # bytes the image file takes on the host

    def bitmap(self, name: str) -> Bitmap | None:
        return next((b for b in self.bitmaps if b.name == name), None)


@dataclass(frozen=True)
class VM:
    """A running VM found through its QMP socket."""

    name: str
    uuid: str
    qmp: str
    disks: tuple[Disk, ...] = ()
    uuid_is_name: bool = False


@dataclass
class DiskVersion:
    """One disk of one version: what was read and stored, and where its index lives."""

    name: str
    location: str
    format: str
    capacity: int
    chunk_size: int
    index: str
    mode: Mode
    reason: str | None
    read_bytes: int = 0
    stored_bytes: int = 0
    tracking_point: str | None = None
    granularity: int | None = None
    tracking: str = "ok"  # state of the expected tracking point when the backup started


@dataclass
class ExcludedDisk:
    """A disk of the VM that a version left out on purpose (include/exclude rules)."""

    name: str
    location: str


@dataclass
class Version:
    """One backup of one VM: the unit that `query vm` lists and `restore vm` restores."""

    backup_id: str
    vm: str
    uuid: str
    mode: Mode
    started: str
    finished: str
    host: str
    reason: str | None = None
    disks: list[DiskVersion] = field(default_factory=list)
    active: bool = False
    excluded: list[ExcludedDisk] = field(default_factory=list)
    consistency: str = "crash"  # or "application": the guest's filesystems were frozen
    snapshot_time: str | None = None  # the instant of the point-in-time snapshot
    group: str | None = None  # shared by the versions of VMs snapshotted together
