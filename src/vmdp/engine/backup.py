"""Backing up one VM: plan IFFULL/IFINCR per disk, snapshot, read, commit or abort.

Order of durability (DESIGN.md): chunks → index → manifest → catalog row → tracking point
commit in QEMU. A failure before the catalog row drops the new tracking point; the previous
one kept recording, so the next backup still sees every change.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from vmdp.engine.pipeline import backup_disk, planned_bytes
from vmdp.engine.planning import DiskDecision, decide, version_reason
from vmdp.engine.progress import NoProgress, Progress
from vmdp.errors import HypervisorError
from vmdp.hypervisor.qemu import DiskPlan, DiskSnapshot, QemuSession, Snapshot
from vmdp.model import VM, DiskVersion, Mode, Version
from vmdp.repository import Repository

log = logging.getLogger(__name__)


@dataclass
class BackupOptions:
    mode: Mode = Mode.IFINCR
    scratch: Path = Path("/var/tmp/vmdp")
    workers: int = 4
    progress: Progress = field(default_factory=NoProgress)


def now() -> str:
    # UTC with microseconds: versions sort by time even across DST changes and within one second
    return datetime.now(UTC).isoformat(timespec="microseconds")


def new_backup_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(2)


def namespace(repo: Repository) -> str:
    return f"vmdp-{repo.id[:8]}"


def last_version(repo: Repository, vm: VM) -> Version | None:
    versions = repo.versions(vm.uuid)
    return versions[-1] if versions else None


def check_trackable(vm: VM) -> None:
    untrackable = [d for d in vm.disks if not d.persistent_bitmaps]
    if untrackable:
        listing = ", ".join(f"{d.name} ({d.location}, {d.format})" for d in untrackable)
        raise HypervisorError(
            f"VM {vm.name} has disks that cannot hold a persistent bitmap: {listing}",
            "convert them to qcow2 v3 with the VM stopped: qemu-img amend -o compat=1.1 IMAGE "
            "(qcow2 0.10) or qemu-img convert -O qcow2 IMAGE NEW (raw)",
        )
    if not vm.disks:
        raise HypervisorError(f"VM {vm.name} has no writable disk to back up")


def preview(vm: VM, repo: Repository | None, mode: Mode) -> list[DiskDecision]:
    """What a backup would do, without touching QEMU beyond the queries discovery made."""
    last = last_version(repo, vm) if repo else None
    return [decide(disk, last, mode) for disk in vm.disks]


def backup_vm(vm: VM, repo: Repository, opts: BackupOptions) -> Version:
    """Make one new version of `vm`; raise without leaving anything of vmdp's behind on failure."""
    opts.scratch.mkdir(parents=True, exist_ok=True)
    with repo.lock_vm(vm.uuid, vm.name):
        session = QemuSession(vm, opts.scratch, namespace(repo))
        try:
            return _backup(session, repo, opts)
        finally:
            session.close()


def _backup_disk(
    snap: Snapshot, ds: DiskSnapshot, decision: DiskDecision, repo: Repository, opts: BackupOptions
) -> DiskVersion:
    disk, prev = decision.disk, decision.base
    base_index = repo.get_index(prev.index, f"index of {snap.vm_name} {disk.name}") if prev else None
    control = snap.reader(ds)
    try:
        total = planned_bytes(control, disk.capacity, repo.chunk_size, prev is not None)
        opts.progress.start(f"{snap.vm_name} {disk.name}", total)
        res = backup_disk(
            lambda: snap.reader(ds), repo, disk.capacity, base_index, opts.workers, opts.progress.advance, control
        )
    finally:
        control.close()
        opts.progress.finish()
    return DiskVersion(
        name=disk.name,
        location=disk.location,
        format=disk.format,
        capacity=disk.capacity,
        chunk_size=repo.chunk_size,
        index=repo.put_index(res.index),
        mode=decision.mode,
        reason=decision.reason,
        read_bytes=res.read_bytes,
        stored_bytes=res.stored_bytes,
        tracking_point=snap.new_point,
        granularity=ds.granularity,
        tracking=decision.tracking,
    )


def _backup(session: QemuSession, repo: Repository, opts: BackupOptions) -> Version:
    last = last_version(repo, session.vm)
    keep = {d.name: d.tracking_point for d in last.disks} if last else {}
    for line in session.sweep(keep):
        log.warning("removed leftover of an earlier run: %s", line)
    vm = session.vm
    check_trackable(vm)
    decisions = [decide(disk, last, opts.mode) for disk in vm.disks]
    reasons = {d.disk.name: d.reason or "IFFULL" for d in decisions if d.base is None}
    backup_id = new_backup_id()
    started = now()
    plans = [DiskPlan(d.disk, d.base.tracking_point if d.base else None) for d in decisions]
    snap = session.snapshot(plans, f"{namespace(repo)}-{backup_id}")
    ok = False
    try:
        disks = [
            _backup_disk(snap, ds, decision, repo, opts) for ds, decision in zip(snap.disks, decisions, strict=True)
        ]
        ok = True
    finally:
        session.release(snap)
        if not ok:
            session.abort(snap)
    version = Version(
        backup_id=backup_id,
        vm=vm.name,
        uuid=vm.uuid,
        mode=Mode.IFFULL if reasons else Mode.IFINCR,
        started=started,
        finished=now(),
        host=socket.gethostname(),
        reason=version_reason(reasons),
        disks=disks,
        active=True,
    )
    try:
        repo.commit(version)
    except BaseException:
        session.abort(snap)
        raise
    session.commit(snap)
    log.debug("backup %s of %s committed by pid %d", backup_id, vm.name, os.getpid())
    return version
