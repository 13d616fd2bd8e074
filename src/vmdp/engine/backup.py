"""Backing up VMs: plan IFFULL/IFINCR per disk, snapshot, read, commit or abort.

Order of durability (DESIGN.md): chunks → index → manifest → catalog row → tracking point
commit in QEMU. A failure before the catalog row drops the new tracking point; the previous
one kept recording, so the next backup still sees every change.

A VM is snapshotted on its own (`backup_vm`, with guest-agent quiescing when its policy asks
for application consistency) or with others at one instant (`backup_group`: pause, snapshot
all, resume what was paused).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from vmdp.engine.pipeline import backup_disk, planned_bytes
from vmdp.engine.planning import DiskDecision, decide, version_reason
from vmdp.engine.progress import NoProgress, Progress
from vmdp.errors import HypervisorError, RepositoryError, UsageError
from vmdp.hypervisor.agent import AgentError, GuestAgent
from vmdp.hypervisor.qemu import DiskPlan, DiskSnapshot, QemuSession, Snapshot
from vmdp.model import VM, Disk, DiskVersion, ExcludedDisk, Mode, Version
from vmdp.repository import Repository

log = logging.getLogger(__name__)

APPLICATION, CRASH = "application", "crash"


@dataclass
class VmPolicy:
    """Per-VM choices, from the config file's [vm.NAME] table and the command line."""

    include_disks: list[str] = field(default_factory=list)  # device ids or image paths; patterns allowed
    exclude_disks: list[str] = field(default_factory=list)
    app_consistent: bool = False
    fallback: str = "fail"  # when quiescing fails: "fail" the backup, or take it "crash"-consistent
    agent_socket: str | None = None  # default: found from the VM's org.qemu.guest_agent.0 channel
    allow_transient: bool = False  # back up disks that cannot hold a persistent bitmap


@dataclass
class BackupOptions:
    mode: Mode = Mode.IFINCR
    scratch: Path = Path("/var/tmp/vmdp")
    workers: int = 4
    progress: Progress = field(default_factory=NoProgress)
    budget: threading.Semaphore | None = None  # chunks in flight, shared by VMs backed up at once


@dataclass
class Plan:
    """What one VM's backup will do, decided before any snapshot."""

    vm: VM
    decisions: list[DiskDecision]
    excluded: list[Disk]
    last: Version | None
    policy: VmPolicy

    def problems(self) -> list[str]:
        """What would stop the backup."""
        out = []
        untrackable = [d.disk for d in self.decisions if not d.disk.persistent_bitmaps]
        if untrackable and not self.policy.allow_transient:
            listing = ", ".join(f"{d.name} ({d.location}, {d.format})" for d in untrackable)
            out.append(f"disks that cannot hold a persistent bitmap: {listing}")
        if not self.decisions:
            out.append("no disk to back up")
        return out


def now() -> str:
    # UTC with microseconds: versions sort by time even across DST changes and within one second
    return datetime.now(UTC).isoformat(timespec="microseconds")


def new_backup_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(2)


def namespace(repo: Repository) -> str:
    return f"vmdp-{repo.id[:8]}"


def last_version(repo: Repository | None, vm: VM) -> Version | None:
    versions = repo.versions(vm.uuid) if repo else []
    return versions[-1] if versions else None


def _matches(disk: Disk, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(disk.name, p) or fnmatch.fnmatchcase(disk.location, p) for p in patterns)


def plan(vm: VM, repo: Repository | None, mode: Mode, policy: VmPolicy) -> Plan:
    """Decide per disk: excluded, IFINCR from its tracking point, or IFFULL and why."""
    included = [d for d in vm.disks if not policy.include_disks or _matches(d, policy.include_disks)]
    chosen = [d for d in included if not _matches(d, policy.exclude_disks)]
    excluded = [d for d in vm.disks if d not in chosen]
    last = last_version(repo, vm)
    transient = policy.allow_transient
    decisions = [decide(d, last, mode, transient and not d.persistent_bitmaps) for d in chosen]
    return Plan(vm, decisions, excluded, last, policy)


def _checked_plan(session: QemuSession, repo: Repository, opts: BackupOptions, policy: VmPolicy) -> Plan:
    """Sweep what a crashed run left, then plan; raise what would stop the backup."""
    last = last_version(repo, session.vm)
    keep = {d.name: d.tracking_point for d in last.disks} if last else {}
    for line in session.sweep(keep):
        log.warning("%s: removed leftover of an earlier run: %s", session.vm.name, line)
    result = plan(session.vm, repo, opts.mode, policy)
    problems = result.problems()
    if problems:
        raise HypervisorError(
            f"VM {session.vm.name} cannot be backed up: {'; '.join(problems)}",
            "upgrade the disks with 'vmdp upgrade disk PATH' (VM stopped), convert raw images to qcow2, "
            "or pass --allow-transient-tracking",
        )
    return result


@contextlib.contextmanager
def _session(vm: VM, repo: Repository, opts: BackupOptions) -> Iterator[QemuSession]:
    opts.scratch.mkdir(parents=True, exist_ok=True)
    with repo.lock_vm(vm.uuid, vm.name):
        session = QemuSession(vm, opts.scratch, namespace(repo))
        try:
            yield session
        finally:
            session.close()


def _prepare(session: QemuSession, p: Plan, repo: Repository) -> Snapshot:
    plans = [
        DiskPlan(d.disk, d.base.tracking_point if d.base else None, persistent=d.disk.persistent_bitmaps)
        for d in p.decisions
    ]
    return session.prepare(plans, f"{namespace(repo)}-{new_backup_id()}")


def backup_vm(vm: VM, repo: Repository, opts: BackupOptions, policy: VmPolicy | None = None) -> Version:
    """Make one new version of `vm` from its own snapshot; quiesce the guest if the policy asks."""
    policy = policy or VmPolicy()
    with _session(vm, repo, opts) as session:
        p = _checked_plan(session, repo, opts, policy)
        started = now()
        snap = _prepare(session, p, repo)
        try:
            if policy.app_consistent:
                consistency = _quiesced_trigger(session, snap, policy)
            else:
                session.trigger(snap)
                consistency = CRASH
        except BaseException:
            session.release(snap)
            session.abort(snap)  # the trigger may have created the new point before the failure
            raise
        return _read_and_commit(session, snap, p, repo, opts, started, consistency, None)


def _quiesced_trigger(session: QemuSession, snap: Snapshot, policy: VmPolicy) -> str:
    """Freeze the guest's filesystems for just the snapshot instant; thaw on every path."""
    name = session.vm.name
    agent = None
    try:
        path = policy.agent_socket or session.agent_socket()
        if not path:
            raise AgentError(f"VM {name} has no guest agent channel (org.qemu.guest_agent.0)")
        agent = GuestAgent(path)
        agent.freeze()
    except AgentError as exc:
        if agent:
            with contextlib.suppress(AgentError):
                agent.thaw()  # a freeze that failed half-way may have frozen some filesystems
            agent.close()
        if policy.fallback != CRASH:
            raise AgentError(
                f"cannot quiesce VM {name}: {exc.message}",
                'install and start qemu-guest-agent in the guest, or set app_consistent_fallback = "crash"',
            ) from None
        log.warning("VM %s: %s; taking a crash-consistent snapshot instead", name, exc.message)
        session.trigger(snap)
        return CRASH
    try:
        session.trigger(snap)
    finally:
        try:
            agent.thaw()
        except AgentError as exc:
            raise AgentError(
                f"VM {name}: {exc.message}: its filesystems may still be frozen",
                "thaw them with the guest agent command guest-fsfreeze-thaw, or reboot the guest",
            ) from None
        finally:
            agent.close()
    return APPLICATION


def backup_group(
    vms: list[VM],
    repo: Repository,
    opts: BackupOptions,
    policies: dict[str, VmPolicy],
) -> list[Version | BaseException]:
    """Back up several VMs from one instant: pause the running ones, snapshot all, resume those paused.

    Returns, per VM in order, its version or the error that stopped it after the instant.
    """
    if any(policies.get(vm.name, VmPolicy()).app_consistent for vm in vms):
        raise UsageError(
            "an application-consistent VM is snapshotted on its own, never in a group", "back it up without --group"
        )
    group = secrets.token_hex(4)
    with contextlib.ExitStack() as stack:
        sessions = [stack.enter_context(_session(vm, repo, opts)) for vm in vms]
        plans = [_checked_plan(s, repo, opts, policies.get(s.vm.name, VmPolicy())) for s in sessions]
        started = now()
        snaps: list[Snapshot] = []
        triggered: list[Snapshot] = []
        paused: list[QemuSession] = []
        try:
            for s, p in zip(sessions, plans, strict=True):
                snaps.append(_prepare(s, p, repo))
            try:
                for s in sessions:
                    if s.pause():
                        paused.append(s)
                instant = time.time()  # no guest of the group writes from here until the resume
                for s, snap in zip(sessions, snaps, strict=True):
                    s.trigger(snap)
                    triggered.append(snap)
                for snap in snaps:
                    snap.taken = instant
            finally:
                _resume_all(paused)
        except BaseException:
            for s, snap in zip(sessions, snaps, strict=False):
                s.release(snap)
                if snap in triggered:
                    s.abort(snap)
            raise
        results: list[Version | BaseException] = []
        for s, snap, p in zip(sessions, snaps, plans, strict=True):
            try:
                results.append(_read_and_commit(s, snap, p, repo, opts, started, CRASH, group))
            except Exception as exc:  # noqa: BLE001 - one VM's failure after the instant does not stop the others
                results.append(exc)
        return results


def _resume_all(paused: list[QemuSession]) -> None:
    errors = []
    for s in paused:
        try:
            s.resume()
        except HypervisorError as exc:
            errors.append(f"{s.vm.name}: {exc}")
    if errors:
        raise HypervisorError(f"could not resume {', '.join(errors)}", "resume the VMs with QMP 'cont'")


def _read_and_commit(
    session: QemuSession,
    snap: Snapshot,
    p: Plan,
    repo: Repository,
    opts: BackupOptions,
    started: str,
    consistency: str,
    group: str | None,
) -> Version:
    """Export and read the snapshot, then make the version durable and commit the tracking points."""
    ok = False
    try:
        session.export(snap)
        disks = [_backup_disk(snap, ds, d, repo, opts) for ds, d in zip(snap.disks, p.decisions, strict=True)]
        ok = True
    finally:
        session.release(snap)
        if not ok:
            session.abort(snap)
    reasons = {d.name: d.reason or "IFFULL" for d in disks if d.mode is Mode.IFFULL}
    version = Version(
        backup_id=snap.new_point.removeprefix(f"{namespace(repo)}-"),
        vm=p.vm.name,
        uuid=p.vm.uuid,
        mode=Mode.IFFULL if reasons else Mode.IFINCR,
        started=started,
        finished=now(),
        host=socket.gethostname(),
        reason=version_reason(reasons),
        disks=disks,
        active=True,
        excluded=[ExcludedDisk(d.name, d.location) for d in p.excluded],
        consistency=consistency,
        snapshot_time=datetime.fromtimestamp(snap.taken or 0, UTC).isoformat(timespec="microseconds"),
        group=group,
    )
    try:
        repo.commit(version)
    except BaseException:
        session.abort(snap)
        raise
    session.commit(snap)
    return version


def _backup_disk(
    snap: Snapshot, ds: DiskSnapshot, decision: DiskDecision, repo: Repository, opts: BackupOptions
) -> DiskVersion:
    disk, prev = decision.disk, decision.base
    base_index = None
    if prev:
        try:
            base_index = repo.get_index(prev.index, f"index of {snap.vm_name} {disk.name}")
        except RepositoryError as exc:  # damaged or lost: read the whole disk instead
            log.warning("%s %s: %s; reading the whole disk", snap.vm_name, disk.name, exc.message)
            decision = DiskDecision(disk, None, "the index of the last version is damaged", decision.tracking)
            prev = None
    lost = repo.quarantined() if base_index else set()
    # self-healing: unchanged slots whose chunk verify found damaged are read again
    forced = frozenset(i for i, d in enumerate(base_index.digests) if d in lost) if base_index and lost else frozenset()
    control = snap.reader(ds)
    try:
        total = planned_bytes(control, disk.capacity, repo.chunk_size, prev is not None, forced)
        opts.progress.start(f"{snap.vm_name} {disk.name}", total)
        res = backup_disk(
            lambda: snap.reader(ds),
            repo,
            disk.capacity,
            base_index,
            opts.workers,
            opts.progress.advance,
            control,
            opts.budget,
            forced,
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


def cleanup_vm(vm: VM, repo: Repository, scratch: Path) -> list[str]:
    """Remove what a killed or failed vmdp run left in QEMU and in the scratch directory, now.

    Only vmdp's own objects go; the tracking point the catalog expects stays, so nothing is lost.
    """
    opts = BackupOptions(scratch=scratch)
    with _session(vm, repo, opts) as session:
        last = last_version(repo, vm)
        return session.sweep({d.name: d.tracking_point for d in last.disks} if last else {})
