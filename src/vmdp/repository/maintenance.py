"""Keeping a repository healthy: garbage collection, verification, structure check and insight.

GC is mark-and-sweep and safe while backups run: it removes an object only when no manifest
references it and its mtime is older than the cutoff, the start of the oldest backup running
(or of the GC, if none runs) less a grace period. Backups write new objects (new mtime) and
touch the ones they reuse under a shared per-directory lock that the sweep takes exclusively,
so a reused chunk is either touched before the sweep looks at it or written again after.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from vmdp.errors import CorruptData, RepositoryError
from vmdp.model import Version
from vmdp.repository import manifest
from vmdp.repository.chunks import ZERO_DIGEST
from vmdp.repository.index import DiskIndex
from vmdp.repository.locks import exclusive_dir, running_since
from vmdp.repository.repo import Repository

GRACE_SECONDS = 600.0


@dataclass
class GcReport:
    chunks_removed: int = 0
    indexes_removed: int = 0
    bytes_freed: int = 0
    objects_kept: int = 0
    cutoff: float = 0.0


def _referenced(repo: Repository, versions: list[Version]) -> tuple[set[bytes], set[bytes]]:
    chunk_set: set[bytes] = set()
    index_set: set[bytes] = set()
    for v in versions:
        for d in v.disks:
            index_set.add(bytes.fromhex(d.index))
            chunk_set.update(repo.get_index(d.index, f"index of {v.vm} {d.name} version {v.backup_id}").digests)
    chunk_set.discard(ZERO_DIGEST)
    return chunk_set, index_set


def gc(
    repo: Repository, grace: float = GRACE_SECONDS, dry_run: bool = False, progress: Callable[[str], None] | None = None
) -> GcReport:
    """Remove the objects no version references. Killed at any moment, it loses nothing."""
    started = time.time()
    oldest = running_since(repo.root / "locks")
    report = GcReport(cutoff=min(started, oldest if oldest is not None else started) - grace)
    live_chunks, live_indexes = _referenced(repo, repo.manifests())
    for kind, live in (("indexes", live_indexes), ("chunks", live_chunks)):
        for sub in sorted(p for p in repo.object_dir(kind).iterdir() if p.is_dir()):
            if progress:
                progress(f"{kind}/{sub.name}")
            with exclusive_dir(repo.root / "locks", f"{kind}-{sub.name}"):
                for obj in sub.iterdir():
                    try:
                        digest = bytes.fromhex(obj.name)
                    except ValueError:
                        continue  # not an object of ours
                    if digest in live:
                        report.objects_kept += 1
                        continue
                    st = obj.stat()
                    if st.st_mtime >= report.cutoff:
                        report.objects_kept += 1  # written or reused by a backup that may still commit
                        continue
                    if not dry_run:
                        obj.unlink()
                    report.bytes_freed += st.st_size
                    if kind == "chunks":
                        report.chunks_removed += 1
                    else:
                        report.indexes_removed += 1
    return report


@dataclass
class Damage:
    """What a damaged object breaks: one disk of one version, at these byte ranges."""

    backup_id: str
    vm: str
    disk: str
    problem: str
    ranges: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class VerifyReport:
    versions: int = 0
    chunks_checked: int = 0
    bytes_checked: int = 0
    damaged: list[Damage] = field(default_factory=list)
    quarantined: int = 0


def _ranges(index: DiskIndex, slots: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for slot in sorted(slots):
        start, length = index.slot_range(slot)
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], start + length)
        else:
            out.append((start, start + length))
    return out


def verify(
    repo: Repository,
    versions: list[Version],
    workers: int = 4,
    advance: Callable[[int], None] | None = None,
    total: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Read every chunk the versions reference (each once) and check manifests, indexes and digests.

    Damaged chunks are moved to quarantine/, so the next backup that still has the data writes
    them again; missing ones are reported the same way.
    """
    report = VerifyReport(versions=len(versions))
    users: dict[bytes, list[tuple[Version, str, DiskIndex, int]]] = defaultdict(list)
    for v in versions:
        path = repo.root / "manifests" / f"{v.backup_id}.json"
        try:
            on_disk = manifest.from_bytes(path.read_bytes(), str(path))
        except (OSError, CorruptData) as exc:
            report.damaged.append(Damage(v.backup_id, v.vm, "*", f"manifest: {exc}"))
            continue
        for d in on_disk.disks:
            try:
                index = repo.get_index(d.index, f"index of {v.vm} {d.name}")
            except (CorruptData, RepositoryError) as exc:
                report.damaged.append(Damage(v.backup_id, v.vm, d.name, f"index: {exc}", [(0, d.capacity)]))
                continue
            for slot, digest in enumerate(index.digests):
                if digest != ZERO_DIGEST:
                    users[digest].append((v, d.name, index, slot))

    if total:
        total(sum(u[0][2].slot_range(u[0][3])[1] for u in users.values()))

    def check(digest: bytes) -> tuple[bytes, str | None, int]:
        _, length = users[digest][0][2].slot_range(users[digest][0][3])
        try:
            repo.get_chunk(digest, "chunk")
        except CorruptData:
            repo.quarantine(digest)
            return digest, "damaged chunk (moved to quarantine)", length
        except RepositoryError:
            return digest, "missing chunk", length
        finally:
            if advance:
                advance(length)
        return digest, None, length

    bad: dict[tuple[str, str], tuple[Version, DiskIndex, list[int], set[str]]] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for digest, problem, length in pool.map(check, list(users)):
            report.chunks_checked += 1
            report.bytes_checked += length
            if problem is None:
                continue
            if problem.startswith("damaged"):
                report.quarantined += 1
            for v, disk, index, slot in users[digest]:
                entry = bad.setdefault((v.backup_id, disk), (v, index, [], set()))
                entry[2].append(slot)
                entry[3].add(problem)
    for (backup_id, disk), (v, index, slots, problems) in bad.items():
        report.damaged.append(Damage(backup_id, v.vm, disk, ", ".join(sorted(problems)), _ranges(index, slots)))
    report.damaged.sort(key=lambda d: (d.vm, d.backup_id, d.disk))
    return report


def check(repo: Repository) -> list[str]:
    """Structure only, quickly: manifests parse, indexes decode, every referenced chunk exists."""
    problems = []
    versions = []
    for path in sorted((repo.root / "manifests").glob("*.json")):
        try:
            versions.append(manifest.from_bytes(path.read_bytes(), str(path)))
        except CorruptData as exc:
            problems.append(str(exc))
    if {v.backup_id for v in versions} != {v.backup_id for v in repo.versions()}:
        problems.append("the catalog does not list the same versions as the manifests: run 'vmdp repo rebuild-catalog'")
    for v in versions:
        for d in v.disks:
            try:
                index = repo.get_index(d.index, f"index of {v.vm} {d.name} version {v.backup_id}")
            except (CorruptData, RepositoryError) as exc:
                problems.append(str(exc))
                continue
            missing = {x for x in index.digests if x != ZERO_DIGEST and not repo.chunk_exists(x)}
            if missing:
                problems.append(f"{v.vm} {d.name} version {v.backup_id}: {len(missing)} chunks are missing")
    return problems


@dataclass
class VmSpace:
    vm: str
    versions: int
    logical_bytes: int  # data the versions hold (non-zero chunks, counted per version)
    referenced_bytes: int  # stored bytes of the chunks its versions reference
    exclusive_bytes: int  # stored bytes that only this VM references: what removing it would free


@dataclass
class RepoInfo:
    versions: int
    vms: int
    logical_bytes: int
    unique_bytes: int
    stored_bytes: int
    dedup_ratio: float
    compression_ratio: float
    per_vm: list[VmSpace]


def info(repo: Repository) -> RepoInfo:
    versions = repo.versions()
    size_of: dict[bytes, int] = {}
    plain: dict[bytes, int] = {}
    owners: dict[bytes, set[str]] = defaultdict(set)
    logical: dict[str, int] = defaultdict(int)
    for v in versions:
        for d in v.disks:
            index = repo.get_index(d.index, f"index of {v.vm} {d.name}")
            for slot, digest in enumerate(index.digests):
                if digest == ZERO_DIGEST:
                    continue
                length = index.slot_range(slot)[1]
                logical[v.uuid] += length
                plain[digest] = length
                owners[digest].add(v.uuid)
    for digest in plain:
        path = repo.root / "chunks" / digest.hex()[:2] / digest.hex()
        size_of[digest] = path.stat().st_size if path.exists() else 0
    names = {v.uuid: v.vm for v in versions}
    per_vm = []
    for vm_uuid, name in sorted(names.items(), key=lambda kv: kv[1]):
        mine = [d for d, o in owners.items() if vm_uuid in o]
        per_vm.append(
            VmSpace(
                vm=name,
                versions=sum(1 for v in versions if v.uuid == vm_uuid),
                logical_bytes=logical[vm_uuid],
                referenced_bytes=sum(size_of[d] for d in mine),
                exclusive_bytes=sum(size_of[d] for d in mine if len(owners[d]) == 1),
            )
        )
    total_logical = sum(logical.values())
    unique = sum(plain.values())
    stored = sum(size_of.values())
    return RepoInfo(
        versions=len(versions),
        vms=len(names),
        logical_bytes=total_logical,
        unique_bytes=unique,
        stored_bytes=stored,
        dedup_ratio=total_logical / unique if unique else 1.0,
        compression_ratio=unique / stored if stored else 1.0,
        per_vm=per_vm,
    )
