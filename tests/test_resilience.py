"""Resilient change tracking: the chain survives crashes, failures, host moves and foreign snapshots."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import assert_clean, cli_env, kill_after, spawn_vmdp
from disk_model import DiskModel
from engine_helpers import backup, restored
from vmdp.engine import backup as backup_module
from vmdp.errors import RepositoryError
from vmdp.hypervisor.nbd import NbdReader
from vmdp.hypervisor.qemu import QemuSession
from vmdp.hypervisor.qmp import QmpCommandError
from vmdp.model import Mode, Version
from vmdp.repository import Repository
from vmdp.testing.vm import ThrowawayVM

MiB = 1 << 20
CHUNK = 1 * MiB


def points(version: Version) -> dict[str, str]:
    return {d.name: d.tracking_point or "" for d in version.disks}


def test_qemu_killed_gives_iffull_that_stores_only_new_chunks(vms, workdir: Path) -> None:
    vm = vms(disks={"vda": 32 * MiB})
    repo = Repository.open(workdir / "repo", chunk_size=CHUNK)
    model = DiskModel(vm)
    model.write_data("vda", 0, os.urandom(16 * MiB))
    backup(vm, repo, workdir / "scratch")
    vm = vms.restart(vm)  # QEMU stores the tracking point in the image and loads it again
    model.vm = vm
    model.write("vda", 20 * MiB + 5, 3000, 0x42)
    vm.flush()  # what the guest flushed survives the power loss
    vm = vms.restart(vm, kill=True)
    model.vm = vm
    state = vm.query("query-block")[0]["inserted"]["dirty-bitmaps"]  # type: ignore[index]
    assert [b.get("inconsistent") for b in state] == [True]
    after = backup(vm, repo, workdir / "scratch")
    assert after.mode is Mode.IFFULL and after.reason == "change tracking inconsistent after unclean shutdown"
    assert after.disks[0].tracking == "inconsistent"
    assert after.disks[0].read_bytes >= 16 * MiB and after.disks[0].stored_bytes < 2 * MiB  # dedup
    assert restored(repo, after, workdir / "out") == model.snapshot()
    assert_clean(vm, workdir / "scratch", points(after))
    model.write("vda", 30 * MiB, 4096, 0x43)
    again = backup(vm, repo, workdir / "scratch")
    assert again.mode is Mode.IFINCR and again.disks[0].tracking == "ok"
    assert restored(repo, again, workdir / "out") == model.snapshot()


def test_qemu_killed_before_it_ever_saved_the_point(vms, workdir: Path) -> None:
    vm = vms(disks={"vda": 8 * MiB})
    repo = Repository.open(workdir / "repo", chunk_size=CHUNK)
    model = DiskModel(vm)
    backup(vm, repo, workdir / "scratch")
    model.write("vda", 5, 3000, 0x42)
    vm.flush()
    vm = vms.restart(vm, kill=True)  # QEMU writes new bitmaps to the image only when it closes it
    model.vm = vm
    after = backup(vm, repo, workdir / "scratch")
    assert after.mode is Mode.IFFULL and after.disks[0].tracking == "missing"
    assert "QEMU stopped without saving it" in (after.reason or "")
    assert restored(repo, after, workdir / "out") == model.snapshot()


def _backup_then_kill(vm: ThrowawayVM, workdir: Path, delay: float) -> None:
    kill_after(spawn_vmdp("backup", "vm", vm.name, "--workers", "1", env=cli_env(workdir, vm.qmp_path)), delay)


@pytest.mark.parametrize("delay", [0.45, 0.8, 1.3])
def test_vmdp_killed_mid_ifincr_loses_nothing(vms, vmdp, workdir: Path, delay: float) -> None:
    vm = vms(disks={"vda": 512 * MiB})
    model = DiskModel(vm)
    for i in range(6):
        model.write_data("vda", i * 80 * MiB + 777, os.urandom(24 * MiB))
    first = vmdp("backup", "vm", "vm1", "--json")
    assert first.code == 0, first.err
    model.write_data("vda", 100 * MiB, os.urandom(96 * MiB))  # a long IFINCR
    expected = model.snapshot()
    _backup_then_kill(vm, workdir, delay)
    model.write("vda", 300 * MiB, 5000, 0x99)  # written after the kill: must be in the next version
    listing = vmdp("query", "vm", "vm1", "--inactive", "--json").json()
    assert listing[0]["backup_id"] == first.json()[0]["backup_id"]
    assert len(listing) in (1, 2)  # the killed backup either never shows, or shows complete
    nxt = vmdp("backup", "vm", "vm1", "--json")
    assert nxt.code == 0, nxt.err
    [version] = nxt.json()
    assert version["mode"] == "IFINCR"
    assert_clean(vm, workdir / "scratch", {"vda": version["disks"][0]["tracking_point"]})
    repo = Repository.open(workdir / "repo", create=False)
    versions = repo.versions("vm1")
    assert restored(repo, versions[-1], workdir / "out") == model.snapshot()
    if len(versions) == 3:
        assert restored(repo, versions[1], workdir / "out") == expected
    first_disk = restored(repo, versions[0], workdir / "out")["vda"]
    assert first_disk[100 * MiB : 101 * MiB] != expected["vda"][100 * MiB : 101 * MiB]


@pytest.mark.parametrize("delay", [0.4, 0.9])
def test_vmdp_killed_mid_iffull_leaves_no_version(vms, vmdp, workdir: Path, delay: float) -> None:
    vm = vms(disks={"vda": 512 * MiB})
    model = DiskModel(vm)
    model.write_data("vda", 0, os.urandom(160 * MiB))
    _backup_then_kill(vm, workdir, delay)
    listing = vmdp("query", "vm", "vm1", "--inactive", "--json")
    assert listing.code == 2 or len(listing.json()) <= 1
    nxt = vmdp("backup", "vm", "vm1", "--json")
    assert nxt.code == 0, nxt.err
    assert_clean(vm, workdir / "scratch", {"vda": nxt.json()[0]["disks"][0]["tracking_point"]})
    repo = Repository.open(workdir / "repo", create=False)
    for version in repo.versions("vm1"):
        assert restored(repo, version, workdir / "out") == model.snapshot()


class Injected(Exception):
    pass


def _fail(*args: object, **kwargs: object) -> None:
    raise Injected("injected fault")


STAGES = {
    "overlay": (QemuSession, "_create_overlay"),
    "nbd-read": (NbdReader, "read"),
    "pipeline": (backup_module, "backup_disk"),
    "store-chunk": (Repository, "put_chunk"),
    "store-index": (Repository, "put_index"),
    "manifest": (Repository, "commit"),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_fault_at_each_stage_keeps_the_chain(vms, workdir: Path, monkeypatch: pytest.MonkeyPatch, stage: str) -> None:
    vm = vms(disks={"vda": 16 * MiB, "vdb": 8 * MiB})
    repo = Repository.open(workdir / "repo", chunk_size=CHUNK)
    model = DiskModel(vm)
    model.write("vda", 1 * MiB, 3 * MiB, 0x10)
    first = backup(vm, repo, workdir / "scratch")
    model.write("vdb", 2 * MiB + 1, 5000, 0x11)
    owner, attr = STAGES[stage]
    with monkeypatch.context() as patch:
        patch.setattr(owner, attr, _fail)
        with pytest.raises(Injected):
            backup(vm, repo, workdir / "scratch")
    assert [v.backup_id for v in repo.versions()] == [first.backup_id]
    assert_clean(vm, workdir / "scratch", points(first))
    model.write("vda", 9 * MiB, 100, 0x12)
    after = backup(vm, repo, workdir / "scratch")
    assert after.mode is Mode.IFINCR
    assert restored(repo, after, workdir / "out") == model.snapshot()
    assert restored(repo, first, workdir / "out") == {
        "vda": bytes(MiB) + b"\x10" * 3 * MiB + bytes(12 * MiB),
        "vdb": bytes(8 * MiB),
    }


def test_fault_after_the_catalog_commit_is_swept_by_the_next_run(
    vms, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = vms()
    repo = Repository.open(workdir / "repo", chunk_size=CHUNK)
    model = DiskModel(vm)
    backup(vm, repo, workdir / "scratch")
    model.write("vda", 0, 10, 1)
    with monkeypatch.context() as patch:
        patch.setattr(QemuSession, "commit", _fail)
        with pytest.raises(Injected):
            backup(vm, repo, workdir / "scratch")
    second = repo.versions()[-1]  # durable before the fault: it counts
    assert restored(repo, second, workdir / "out") == model.snapshot()
    model.write("vda", 5 * MiB, 10, 2)
    third = backup(vm, repo, workdir / "scratch")
    assert third.mode is Mode.IFINCR
    assert restored(repo, third, workdir / "out") == model.snapshot()
    assert_clean(vm, workdir / "scratch", points(third))


def test_repository_full_fails_cleanly_and_recovers(vms, workdir: Path) -> None:
    mount = workdir / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], check=True)
    try:
        vm = vms(disks={"vda": 64 * MiB})
        repo = Repository.open(mount / "repo", chunk_size=CHUNK)
        model = DiskModel(vm)
        model.write_data("vda", 0, os.urandom(8 * MiB))
        first = backup(vm, repo, workdir / "scratch")
        model.write_data("vda", 16 * MiB, os.urandom(32 * MiB))
        with pytest.raises(RepositoryError, match="full"):
            backup(vm, repo, workdir / "scratch")
        assert [v.backup_id for v in repo.versions()] == [first.backup_id]
        assert_clean(vm, workdir / "scratch", points(first))
        subprocess.run(["mount", "-o", "remount,size=128m", str(mount)], check=True)
        after = backup(vm, repo, workdir / "scratch")
        assert after.mode is Mode.IFINCR
        assert restored(repo, after, workdir / "out") == model.snapshot()
        repo.close()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_one_backup_per_vm_at_a_time_but_vms_in_parallel(vms, vmdp, workdir: Path) -> None:
    vm1 = vms("vm1", disks={"vda": 64 * MiB})
    vm2 = vms("vm2", disks={"vda": 64 * MiB})
    for vm in (vm1, vm2):
        vm.write_data("vda", 0, os.urandom(32 * MiB))
    repo = Repository.open(workdir / "repo")
    with repo.lock_vm(vm1.uuid, "vm1"):  # as a backup of vm1 in progress would
        blocked = vmdp("backup", "vm", "vm1")
        free = vmdp("backup", "vm", "vm2")
    assert blocked.code == 1 and "another backup of VM vm1 is running" in blocked.err
    assert f"pid {os.getpid()}" in blocked.err and "Traceback" not in blocked.err
    assert free.code == 0, free.err
    both = [spawn_vmdp("backup", "vm", name, "--mode", "iffull", env=cli_env(workdir)) for name in ("vm1", "vm2")]
    for proc in both:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert sorted(v.vm for v in repo.versions()) == ["vm1", "vm2", "vm2"]
    assert [v.mode for v in repo.versions()[-2:]] == [Mode.IFFULL, Mode.IFFULL]


def test_host_move_and_offline_changes(vms, workdir: Path) -> None:
    vm = vms(disks={"vda": 16 * MiB})
    repo = Repository.open(workdir / "repo", chunk_size=CHUNK)
    model = DiskModel(vm)
    model.write("vda", 0, MiB, 1)
    backup(vm, repo, workdir / "scratch")
    model.write("vda", 4 * MiB, 4096, 2)
    # failover: stopped cleanly here, started on "another host": a new process and QMP socket
    vm = vms.restart(vm, socket_name="vm1-on-host-b")
    model.vm = vm
    moved = backup(vm, repo, workdir / "scratch")
    assert moved.mode is Mode.IFINCR and moved.host == socket.gethostname()
    assert restored(repo, moved, workdir / "out") == model.snapshot()
    # written while the VM was off by a tool that keeps persistent bitmaps (qemu-io): tracked
    vm.stop()
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 7 8M 64k", str(vm.image("vda"))], check=True, capture_output=True
    )
    model.data["vda"][8 * MiB : 8 * MiB + 65536] = b"\x07" * 65536
    vm = vms.restart(vm)
    model.vm = vm
    offline = backup(vm, repo, workdir / "scratch")
    assert offline.mode is Mode.IFINCR
    assert restored(repo, offline, workdir / "out") == model.snapshot()
    # written while off by a tool that does not know bitmaps: the qcow2 autoclear bit is cleared
    vm.stop()
    with open(vm.image("vda"), "r+b") as image:
        image.seek(88)
        image.write(bytes(8))
    vm = vms.restart(vm)
    model.vm = vm
    distrusted = backup(vm, repo, workdir / "scratch")
    assert distrusted.mode is Mode.IFFULL and distrusted.disks[0].tracking == "missing"
    assert restored(repo, distrusted, workdir / "out") == model.snapshot()
    # the image replaced by a copy (bitmaps are not copied)
    vm.stop()
    copy = workdir / "copy.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(vm.image("vda")), str(copy)], check=True)
    os.replace(copy, vm.image("vda"))
    vm = vms.restart(vm)
    model.vm = vm
    replaced = backup(vm, repo, workdir / "scratch")
    assert replaced.mode is Mode.IFFULL and "missing" in (replaced.reason or "")
    assert restored(repo, replaced, workdir / "out") == model.snapshot()
    assert_clean(vm, workdir / "scratch", points(replaced))


def _wait_job(vm: ThrowawayVM, status: str | None) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        jobs = vm.query("query-jobs")
        if (status is None and not jobs) or (jobs and jobs[0]["status"] == status):  # type: ignore[index]
            return
        time.sleep(0.02)
    raise AssertionError(f"job did not reach {status}")


def _external_snapshot(vm: ThrowawayVM, path: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(vm.disks["vda"])], check=True)
    vm.query(
        "blockdev-add",
        driver="qcow2",
        **{"node-name": "ext-ov"},
        file={"driver": "file", "filename": str(path)},
        backing=None,
    )
    vm.query("blockdev-snapshot", node="d-vda", overlay="ext-ov")


def _commit_back(vm: ThrowawayVM) -> None:
    vm.query("block-commit", device="ext-ov", **{"job-id": "ext-commit"})
    _wait_job(vm, "ready")
    vm.query("job-complete", id="ext-commit")
    _wait_job(vm, None)
    vm.query("blockdev-del", **{"node-name": "ext-ov"})  # the other tool's clean-up


def test_snapshots_of_other_tools_do_not_break_the_chain(vms, workdir: Path) -> None:
    vm = vms(disks={"vda": 16 * MiB})
    repo = Repository.open(workdir / "repo", chunk_size=CHUNK)
    model = DiskModel(vm)
    model.write("vda", 0, MiB, 1)
    backup(vm, repo, workdir / "scratch")
    # another tool's bitmaps and an internal snapshot, taken and deleted
    vm.query("block-dirty-bitmap-add", node="d-vda", name="other-tool", persistent=True)
    vm.query("blockdev-snapshot-internal-sync", device="d-vda", name="other-snap")
    model.write("vda", 2 * MiB, 70000, 2)
    vm.query("blockdev-snapshot-delete-internal-sync", device="d-vda", name="other-snap")
    vm.query("block-dirty-bitmap-add", node="d-vda", name="other-tool-2", persistent=False)
    vm.query("block-dirty-bitmap-remove", node="d-vda", name="other-tool-2")
    v2 = backup(vm, repo, workdir / "scratch")
    assert v2.mode is Mode.IFINCR
    assert restored(repo, v2, workdir / "out") == model.snapshot()
    # an external snapshot taken and committed back between two backups: commit marks the bitmap
    _external_snapshot(vm, workdir / "ext1.qcow2")
    model.write("vda", 6 * MiB, 3 * MiB, 3)
    _commit_back(vm)
    v3 = backup(vm, repo, workdir / "scratch")
    assert v3.mode is Mode.IFINCR
    assert restored(repo, v3, workdir / "out") == model.snapshot()
    # a backup while the external overlay is active: vmdp cannot prove what changed
    _external_snapshot(vm, workdir / "ext2.qcow2")
    model.write("vda", 10 * MiB, MiB, 4)
    v4 = backup(vm, repo, workdir / "scratch")
    assert v4.mode is Mode.IFFULL and "disk image changed" in (v4.reason or "")
    assert restored(repo, v4, workdir / "out") == model.snapshot()
    model.write("vda", 12 * MiB, MiB, 5)
    _commit_back(vm)
    v5 = backup(vm, repo, workdir / "scratch")
    assert v5.mode is Mode.IFFULL and "disk image changed" in (v5.reason or "")
    assert restored(repo, v5, workdir / "out") == model.snapshot()
    names = [b["name"] for b in vm.query("query-block")[0]["inserted"]["dirty-bitmaps"]]  # type: ignore[index]
    assert "other-tool" in names
    assert_clean(vm, workdir / "scratch", points(v5))


def test_disks_resized_added_removed_replaced(vms, workdir: Path) -> None:
    vm = vms(disks={"vda": 16 * MiB, "vdb": 8 * MiB})
    repo = Repository.open(workdir / "repo", chunk_size=CHUNK)
    model = DiskModel(vm)
    model.write("vda", 0, MiB, 1)
    model.write("vdb", 0, MiB, 2)
    v1 = backup(vm, repo, workdir / "scratch")
    vm.query("block_resize", **{"node-name": "d-vdb"}, size=12 * MiB)
    model.data["vdb"].extend(bytes(4 * MiB))
    model.write("vdb", 11 * MiB, 1000, 3)
    v2 = backup(vm, repo, workdir / "scratch")
    modes = {d.name: (d.mode, d.reason) for d in v2.disks}
    assert modes["vda"] == (Mode.IFINCR, None)
    assert modes["vdb"][0] is Mode.IFFULL and "resized" in (modes["vdb"][1] or "")
    assert restored(repo, v2, workdir / "out") == model.snapshot()
    # restarted without vdb, with a new vdc
    vm = vms.restart(vm, disks={"vda": 16 * MiB, "vdc": 4 * MiB})
    model.vm = vm
    old_vdb = model.data.pop("vdb")
    model.data["vdc"] = bytearray(4 * MiB)
    model.write("vdc", MiB, 10, 4)
    v3 = backup(vm, repo, workdir / "scratch")
    modes = {d.name: (d.mode, d.reason) for d in v3.disks}
    assert modes == {"vda": (Mode.IFINCR, None), "vdc": (Mode.IFFULL, "disk is new since the last version")}
    assert restored(repo, v3, workdir / "out") == model.snapshot()
    assert restored(repo, v2, workdir / "old")["vdb"] == bytes(old_vdb)
    # vda replaced by another image
    other = workdir / "other.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), str(16 * MiB)], check=True)
    vm = vms.restart(vm, images={"vda": other})
    model.vm = vm
    model.data["vda"] = bytearray(16 * MiB)
    model.write("vda", 3 * MiB, 10, 5)
    v4 = backup(vm, repo, workdir / "scratch")
    modes = {d.name: (d.mode, d.reason) for d in v4.disks}
    assert modes["vdc"] == (Mode.IFINCR, None)
    assert modes["vda"][0] is Mode.IFFULL and "disk image changed" in (modes["vda"][1] or "")
    assert restored(repo, v4, workdir / "out") == model.snapshot()
    assert restored(repo, v1, workdir / "v1")["vda"] == b"\x01" * MiB + bytes(15 * MiB)


def test_versions_without_tracking_point_lead_to_iffull_then_ifincr(vms, workdir: Path) -> None:
    vm = vms()
    repo = Repository.open(workdir / "repo", chunk_size=CHUNK)
    model = DiskModel(vm)
    model.write("vda", 0, MiB, 1)
    untracked = backup(vm, repo, workdir / "scratch")
    for disk in untracked.disks:  # as a version made before change tracking (the seed's VSS era)
        disk.tracking_point = None
    repo.commit(untracked)
    first = backup(vm, repo, workdir / "scratch")
    assert first.mode is Mode.IFFULL and "carries no tracking point" in (first.reason or "")
    assert first.disks[0].tracking == "none"
    model.write("vda", 3 * MiB, 10, 2)
    second = backup(vm, repo, workdir / "scratch")
    assert second.mode is Mode.IFINCR
    assert restored(repo, second, workdir / "out") == model.snapshot()


def test_cleanup_frees_qemu_after_a_killed_run(vms, vmdp, workdir: Path) -> None:
    vm = vms(disks={"vda": 256 * MiB})
    model = DiskModel(vm)
    model.write_data("vda", 0, os.urandom(64 * MiB))
    first = vmdp("backup", "vm", "vm1", "--json").json()[0]
    model.write_data("vda", 0, os.urandom(128 * MiB))
    proc = spawn_vmdp("backup", "vm", "vm1", "--workers", "1", env=cli_env(workdir, vm.qmp_path))
    deadline = time.monotonic() + 30
    while not vm.query("query-block-exports") and time.monotonic() < deadline:  # reading has begun
        time.sleep(0.005)
    kill_after(proc, 0)
    assert vm.query("query-jobs"), "the kill did not land while the backup ran"
    with pytest.raises(QmpCommandError, match="in use"):  # the leftover snapshot job holds the disk
        vm.query("block_resize", **{"node-name": "d-vda"}, size=300 * MiB)
    run = vmdp("cleanup", "vm", "vm1", "--json")
    assert run.code == 0, run.err
    removed = run.json()[0]["removed"]
    assert any("NBD export" in r for r in removed) and any("block job" in r for r in removed)
    assert_clean(vm, workdir / "scratch", {"vda": first["disks"][0]["tracking_point"]})
    again = vmdp("cleanup", "vm", "vm1")
    assert again.code == 0 and "nothing left behind" in again.out
    nxt = vmdp("backup", "vm", "vm1", "--json").json()[0]
    assert nxt["mode"] == "IFINCR"
    repo = Repository.open(workdir / "repo", create=False)
    assert restored(repo, repo.versions()[-1], workdir / "out") == model.snapshot()
