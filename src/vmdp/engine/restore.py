"""Restoring a version: manifest → index → chunks (each checked against its digest) → image files.

Each image is written under a temporary name in the target directory and renamed when
complete, so a failed restore never leaves a file that looks finished.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from vmdp.engine.pipeline import bounded_map
from vmdp.engine.progress import NoProgress, Progress
from vmdp.errors import NotFound, TargetExists, UsageError
from vmdp.hypervisor.images import ImageWriter, open_image
from vmdp.model import Version
from vmdp.repository import Repository
from vmdp.repository.chunks import ZERO_DIGEST

FORMATS = ("qcow2", "raw")


@dataclass
class RestoredDisk:
    name: str
    path: Path
    format: str


def select_version(versions: list[Version], vm: str, backup_id: str | None, pit: datetime | None) -> Version:
    """The version asked for: by id, the latest at or before `pit`, or the active one."""
    if not versions:
        raise NotFound(f"no backup of VM {vm} in this repository", "run 'vmdp query vm' to list protected VMs")
    if backup_id:
        for v in versions:
            if v.backup_id == backup_id:
                return v
        raise NotFound(f"VM {vm} has no version {backup_id}", "run 'vmdp query vm --inactive' to list versions")
    if pit:
        earlier = [v for v in versions if datetime.fromisoformat(v.finished) <= pit]
        if not earlier:
            raise NotFound(
                f"VM {vm} has no version made at or before {pit.isoformat()}",
                f"its oldest version finished {versions[0].finished}",
            )
        return earlier[-1]
    return versions[-1]


def target_paths(version: Version, target_dir: Path, fmt: str, vmname: str | None, replace: bool) -> list[RestoredDisk]:
    if fmt not in FORMATS:
        raise UsageError(f"unknown image format {fmt}", f"use one of {', '.join(FORMATS)}")
    prefix = re.sub(r"[^A-Za-z0-9._-]", "_", vmname or version.vm)
    out = [RestoredDisk(d.name, target_dir / f"{prefix}-{d.name}.{fmt}", fmt) for d in version.disks]
    if not replace:
        existing = [str(r.path) for r in out if r.path.exists()]
        if existing:
            raise TargetExists(
                f"{', '.join(existing)} already exists", "remove it, pick another --target-dir, or pass --replace"
            )
    return out


def restore_version(
    repo: Repository,
    version: Version,
    targets: list[RestoredDisk],
    workers: int = 4,
    progress: Progress | None = None,
) -> list[RestoredDisk]:
    progress = progress or NoProgress()
    for target in targets:
        target.path.parent.mkdir(parents=True, exist_ok=True)
    for disk, target in zip(version.disks, targets, strict=True):
        what = f"{version.vm} {disk.name} version {version.backup_id}"
        index = repo.get_index(disk.index, f"index of {what}")
        partial = target.path.with_name(f".{target.path.name}.partial")
        writer: ImageWriter = open_image(partial, target.format, disk.capacity, workers)
        slots = [(slot, digest) for slot, digest in enumerate(index.digests) if digest != ZERO_DIGEST]
        progress.start(f"restore {version.vm} {disk.name}", sum(index.slot_range(s)[1] for s, _ in slots))

        def work(slot: int, digest: bytes, index=index, writer=writer, what=what) -> None:
            offset, length = index.slot_range(slot)
            data = repo.get_chunk(digest, f"{what} at offset {offset}")
            writer.write(offset, data)
            progress.advance(length)

        try:
            bounded_map(workers, iter(slots), work, lambda _: None)
            writer.close()
        except BaseException:
            writer.discard()
            raise
        finally:
            progress.finish()
        partial.rename(target.path)
    return targets
