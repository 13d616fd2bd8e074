"""Backup and restore on real QEMU, real NBD and a real repository directory."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_clean
from disk_model import DiskModel
from engine_helpers import backup, restored
from vmdp.model import Mode
from vmdp.repository import Repository
from vmdp.testing.vm import ThrowawayVM

MiB = 1 << 20
CHUNK = 1 * MiB


def touched_slots(writes: list[tuple[int, int, int]], chunk: int) -> set[int]:
    return {s for off, length, _ in writes for s in range(off // chunk, (off + length - 1) // chunk + 1)}


DISK = 8 * MiB
write_st = st.integers(0, DISK - 1).flatmap(
    lambda off: st.tuples(st.just(off), st.integers(1, min(3 * MiB, DISK - off)), st.integers(0, 255))
)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds=st.lists(st.lists(write_st, max_size=6), min_size=2, max_size=4))
def test_every_version_restores_bit_identical(rounds: list[list[tuple[int, int, int]]]) -> None:
    work = Path(tempfile.mkdtemp(prefix="vmdp-h-", dir="/tmp"))
    vm = ThrowawayVM(work, "hyp", {"vda": DISK}).start()
    try:
        repo = Repository.open(work / "repo", chunk_size=CHUNK)
        model = DiskModel(vm)
        versions = []
        for i, writes in enumerate(rounds):
            for off, length, pattern in writes:
                model.write("vda", off, length, pattern)
            version = backup(vm, repo, work / "scratch")
            assert version.mode is (Mode.IFFULL if i == 0 else Mode.IFINCR)
            if i:
                # an incremental reads only the slots the writes touched
                assert version.disks[0].read_bytes <= len(touched_slots(writes, CHUNK)) * CHUNK
            assert_clean(vm, work / "scratch", {"vda": version.disks[0].tracking_point or ""})
            versions.append((version, model.snapshot()))
        for version, expected in versions:
            assert restored(repo, version, work / "out") == expected
    finally:
        vm.stop(kill=True)
        shutil.rmtree(work, ignore_errors=True)


def test_incremental_reads_changed_chunks_only(vms, workdir: Path) -> None:
    vm = vms(disks={"vda": 256 * MiB})
    repo = Repository.open(workdir / "repo")
    model = DiskModel(vm)
    for i in range(0, 256 * MiB, 16 * MiB):
        model.write("vda", i, 4 * MiB, 1 + i // MiB)
    full = backup(vm, repo, workdir / "scratch")
    assert full.mode is Mode.IFFULL and full.disks[0].read_bytes == 16 * 4 * MiB
    model.write("vda", 100 * MiB + 12345, 1000, 0x77)  # within one 4 MiB chunk
    model.write("vda", 8 * MiB - 10, 20, 0x78)  # straddles two chunks
    incr = backup(vm, repo, workdir / "scratch")
    assert incr.mode is Mode.IFINCR and incr.reason is None
    assert incr.disks[0].read_bytes <= 3 * 4 * MiB
    assert 0 < incr.disks[0].stored_bytes < 3 * 4 * MiB
    assert restored(repo, incr, workdir / "out") == model.snapshot()


class WriteDuringBackup:
    """A progress sink that writes to the VM once the backup is reading: as a guest would."""

    def __init__(self, model: DiskModel, disk: str) -> None:
        self.model, self.disk, self.done = model, disk, False

    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        if not self.done:
            self.done = True
            self.model.write(self.disk, 0, len(self.model.data[self.disk]), 0xEE)

    def finish(self) -> None:
        pass


def test_writes_during_backup_go_to_the_next_version(vms, workdir: Path) -> None:
    vm = vms(disks={"vda": 64 * MiB})
    repo = Repository.open(workdir / "repo", chunk_size=CHUNK)
    model = DiskModel(vm)
    for i in range(0, 64 * MiB, 2 * MiB):
        model.write("vda", i, MiB, i // MiB % 200 + 1)
    before = model.snapshot()
    sink = WriteDuringBackup(model, "vda")
    first = backup(vm, repo, workdir / "scratch", progress=sink, workers=1)
    assert sink.done, "the write did not happen while the backup ran"
    assert restored(repo, first, workdir / "out") == before
    second = backup(vm, repo, workdir / "scratch")
    assert second.mode is Mode.IFINCR
    assert restored(repo, second, workdir / "out") == model.snapshot() == {"vda": b"\xee" * 64 * MiB}


class FailMidway(WriteDuringBackup):
    def advance(self, nbytes: int) -> None:
        super().advance(nbytes)
        raise RuntimeError("injected failure")


def test_failed_backup_leaves_nothing_and_loses_no_change(vms, workdir: Path) -> None:
    vm = vms(disks={"vda": 32 * MiB, "vdb": 16 * MiB})
    repo = Repository.open(workdir / "repo", chunk_size=CHUNK)
    model = DiskModel(vm)
    model.write("vda", 3 * MiB, MiB, 0x11)
    first = backup(vm, repo, workdir / "scratch")
    points = {d.name: d.tracking_point or "" for d in first.disks}
    model.write("vdb", 5 * MiB + 7, 300000, 0x22)
    try:
        backup(vm, repo, workdir / "scratch", progress=FailMidway(model, "vda"))
        raise AssertionError("the injected failure did not stop the backup")
    except RuntimeError as exc:
        assert "injected" in str(exc)
    assert_clean(vm, workdir / "scratch", points)
    assert [v.backup_id for v in repo.versions()] == [first.backup_id]
    third = backup(vm, repo, workdir / "scratch")
    assert third.mode is Mode.IFINCR
    assert restored(repo, third, workdir / "out") == model.snapshot()
    assert restored(repo, first, workdir / "out") == {
        "vda": bytes(3 * MiB) + b"\x11" * MiB + bytes(28 * MiB),
        "vdb": bytes(16 * MiB),
    }
    assert_clean(vm, workdir / "scratch", {d.name: d.tracking_point or "" for d in third.disks})


def test_foreign_bitmaps_are_never_touched(vms, workdir: Path) -> None:
    vm = vms()
    vm.query("block-dirty-bitmap-add", node="d-vda", name="other-tool", persistent=True)
    repo = Repository.open(workdir / "repo", chunk_size=CHUNK)
    for _ in range(3):
        backup(vm, repo, workdir / "scratch")
    names = [b["name"] for b in vm.query("query-block")[0]["inserted"]["dirty-bitmaps"]]  # type: ignore[index]
    assert "other-tool" in names and len([n for n in names if n.startswith("vmdp-")]) == 1
