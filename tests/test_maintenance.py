"""Repository lifecycle on real backups: expiry, GC (also while backups run, and killed),
verification with damage and self-healing, catalog rebuild, check, info and locks."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import VmFactory, cli_env, kill_after, spawn_vmdp
from disk_model import DiskModel
from engine_helpers import backup, restored
from vmdp.errors import CorruptData, RepositoryError
from vmdp.model import Version
from vmdp.repository import Repository
from vmdp.repository.chunks import ZERO_DIGEST
from vmdp.repository.locks import exclusive_lock
from vmdp.repository.maintenance import gc, verify

MiB = 1 << 20


def make_versions(
    vms: VmFactory, workdir: Path, rounds: int = 4
) -> tuple[Repository, DiskModel, list[tuple[Version, dict[str, bytes]]]]:
    vm = vms(disks={"vda": 16 * MiB})
    repo = Repository.open(workdir / "repo", chunk_size=MiB)
    model = DiskModel(vm)
    made = []
    for i in range(rounds):
        model.write_data("vda", 17, os.urandom(2 * MiB))  # rewritten every round: old chunks become garbage
        model.write_data("vda", (i + 1) * 3 * MiB, os.urandom(MiB))
        made.append((backup(vm, repo, workdir / "scratch"), model.snapshot()))
    return repo, model, made


def test_expire_by_id_and_policy_then_gc(vms: VmFactory, vmdp, workdir: Path) -> None:
    repo, _, made = make_versions(vms, workdir)
    ids = [v.backup_id for v, _ in made]
    dry = vmdp("expire", "vm", "vm1", "--keep-last", "2", "--dry-run", "--json")
    assert dry.code == 0, dry.err
    assert [(d["backup_id"], d["action"]) for d in dry.json()] == [
        (ids[3], "keep"),
        (ids[2], "keep"),
        (ids[1], "would remove"),
        (ids[0], "would remove"),
    ]
    assert len(repo.versions()) == 4
    named = vmdp("expire", "vm", "vm1", "--backup-id", ids[1])
    assert named.code == 0, named.err
    assert [v.backup_id for v in repo.versions()] == [ids[0], ids[2], ids[3]]

    def stored() -> int:
        return sum(
            f.stat().st_size for d in ("chunks", "indexes") for f in (workdir / "repo" / d).rglob("*") if f.is_file()
        )

    before = stored()
    freed = vmdp("gc", "--grace", "0", "--json")
    assert freed.code == 0, freed.err
    assert freed.json()["chunks_removed"] > 0 and freed.json()["bytes_freed"] > 0
    assert before - stored() == freed.json()["bytes_freed"]
    for v, expected in (made[0], made[2], made[3]):  # expiring never changes what others restore
        assert restored(repo, v, workdir / "out") == expected
    assert vmdp("verify", "--json").json()["ok"] is True
    policy = vmdp("expire", "vm", "vm*", "--keep-last", "1", "--json")
    assert [d["action"] for d in policy.json()] == ["keep", "removed", "removed"]
    assert policy.json()[0]["why"] == "last 1" or "newest" in policy.json()[0]["why"]
    none = vmdp("expire", "vm", "vm1")
    assert none.code == 2 and "--keep" in none.err
    ghost = vmdp("expire", "vm", "ghost", "--keep-last", "1")
    assert ghost.code == 2 and "no backup of a VM matching ghost" in ghost.err


def test_gc_while_a_backup_runs(vms: VmFactory, workdir: Path) -> None:
    repo, model, made = make_versions(vms, workdir, rounds=2)
    repo.remove_version(made[0][0].backup_id)  # garbage for GC to find
    model.write_data("vda", 0, os.urandom(14 * MiB))
    proc = spawn_vmdp("backup", "vm", "vm1", "--workers", "1", env=cli_env(workdir, model.vm.qmp_path))
    runs = 0
    while proc.poll() is None or runs == 0:
        gc(repo, grace=0)  # no grace at all: only the running backup's start protects its chunks
        runs += 1
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    gc(repo, grace=0)
    newest = Repository.open(workdir / "repo", create=False).versions()[-1]
    assert restored(repo, newest, workdir / "out") == model.snapshot()
    assert restored(repo, made[1][0], workdir / "out") == made[1][1]
    assert not verify(repo, repo.versions()).damaged


def test_gc_killed_at_random_points_loses_nothing(vms: VmFactory, workdir: Path) -> None:
    repo, _, made = make_versions(vms, workdir, rounds=5)
    for v, _ in made[:3]:
        repo.remove_version(v.backup_id)
    env = cli_env(workdir)
    rng = random.Random(7)
    for _ in range(4):
        kill_after(spawn_vmdp("gc", "--grace", "0", env=env), rng.uniform(0.25, 0.6))
        for v, expected in made[3:]:
            assert restored(repo, v, workdir / "out") == expected
    final = subprocess.run([sys.executable, "-m", "vmdp", "gc", "--grace", "0"], env=env, capture_output=True)
    assert final.returncode == 0
    assert not verify(repo, repo.versions()).damaged


def _chunk_file(repo: Repository, version: Version) -> tuple[Path, int]:
    index = repo.get_index(version.disks[0].index, "test")
    slot = next(i for i, d in enumerate(index.digests) if d != ZERO_DIGEST)
    digest = index.digests[slot]
    return repo.root / "chunks" / digest.hex()[:2] / digest.hex(), slot


def _flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    pos = len(data) // 2 if at is None else at
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_chunk_is_found_refused_and_healed(vms: VmFactory, vmdp, workdir: Path) -> None:
    repo, model, made = make_versions(vms, workdir, rounds=2)
    path, slot = _chunk_file(repo, made[-1][0])
    _flip(path)
    report = verify(repo, repo.versions())
    assert report.damaged and report.quarantined == 1
    hit = next(d for d in report.damaged if d.backup_id == made[-1][0].backup_id)
    assert hit.disk == "vda" and (slot * MiB, (slot + 1) * MiB) in hit.ranges and "damaged" in hit.problem
    cli = vmdp("verify", "vm1")
    assert cli.code == 1 and "DAMAGED vm1" in cli.out and "missing chunk" in cli.out  # moved aside
    refused = vmdp("restore", "vm", "vm1", "--target-dir", str(workdir / "r"))
    assert refused.code == 1 and "vda" in refused.err and "missing" in refused.err
    assert not (workdir / "r").exists() or not any((workdir / "r").iterdir())
    healed = backup(model.vm, repo, workdir / "scratch")  # the VM still has the data
    assert healed.disks[0].read_bytes >= MiB
    assert restored(repo, healed, workdir / "out") == model.snapshot()
    assert restored(repo, made[-1][0], workdir / "out") == made[-1][1]  # the older version is whole again
    assert not verify(repo, repo.versions()).damaged


def test_damaged_index_and_manifest_are_found(vms: VmFactory, vmdp, workdir: Path) -> None:
    repo, _model, made = make_versions(vms, workdir, rounds=2)
    digest = made[0][0].disks[0].index
    _flip(repo.root / "indexes" / digest[:2] / digest)
    _flip(repo.root / "manifests" / f"{made[1][0].backup_id}.json", at=0)
    report = verify(repo, repo.versions())
    problems = {(d.backup_id, d.problem.split(":")[0]) for d in report.damaged}
    assert (made[0][0].backup_id, "index") in problems and (made[1][0].backup_id, "manifest") in problems
    with pytest.raises((CorruptData, RepositoryError)):
        restored(repo, made[0][0], workdir / "out")
    check = vmdp("repo", "check", "--json")
    assert check.code == 1 and len(check.json()["problems"]) >= 2


def test_catalog_rebuild_gives_the_same_listing(vms: VmFactory, vmdp, workdir: Path) -> None:
    make_versions(vms, workdir, rounds=3)
    before = vmdp("query", "vm", "--inactive", "--json").out
    (workdir / "repo" / "catalog.sqlite").unlink()
    assert vmdp("query", "vm", "--inactive", "--json").out == before  # rebuilt on open
    rebuilt = vmdp("repo", "rebuild-catalog", "--json")
    assert rebuilt.code == 0 and rebuilt.json() == {"versions": 3}
    assert vmdp("query", "vm", "--inactive", "--json").out == before
    ok = vmdp("repo", "check")
    assert ok.code == 0 and "structure ok" in ok.out


def test_repo_info_and_gc_lock(vms: VmFactory, vmdp, workdir: Path) -> None:
    make_versions(vms, workdir, rounds=3)
    info = vmdp("repo", "info", "--json")
    assert info.code == 0, info.err
    doc = info.json()
    assert (
        doc["versions"] == 3 and doc["vms"] == 1 and doc["dedup_ratio"] == 15 / 12
    )  # 15 chunks in 3 versions, 12 distinct
    assert doc["stored_bytes"] > 0 and doc["per_vm"][0]["vm"] == "vm1"
    assert doc["per_vm"][0]["exclusive_bytes"] == doc["stored_bytes"]
    with exclusive_lock(workdir / "repo" / "locks", "gc", "a garbage collection"):
        busy = vmdp("gc")
    assert busy.code == 1 and "a garbage collection is already running" in busy.err
