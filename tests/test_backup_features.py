"""The seed's backup features on real QEMU: selection, disk rules, preview, groups, quiescing
policy, the version gate, parallel VMs and the summary."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from conftest import VmFactory, assert_clean
from disk_model import DiskModel
from engine_helpers import restored
from vmdp.engine.backup import BackupOptions, backup_group
from vmdp.hypervisor.qemu import QemuSession, find_vm
from vmdp.model import Mode
from vmdp.repository import Repository

MiB = 1 << 20
KiB = 1 << 10


def names(run) -> list[str]:  # type: ignore[no-untyped-def]
    return [doc["vm"] for doc in run.json()]


def test_selecting_vms_by_pattern_domain_and_exclude(vms: VmFactory, vmdp, workdir: Path) -> None:
    for name in ("web1", "web2", "db1"):
        vms(name, disks={"vda": 4 * MiB})
    run = vmdp("backup", "vm", "web*", "--exclude", "web2", "--json")
    assert run.code == 0, run.err
    assert names(run) == ["web1"]
    cfg = workdir / "vmdp.toml"
    cfg.write_text('domain = ["db*", "web2"]\nexclude = ["web2"]\n')
    run = vmdp("backup", "vm", "--json", env_extra={"VMDP_CONFIG": str(cfg)})
    assert run.code == 0, run.err
    assert names(run) == ["db1"]
    everything = vmdp("backup", "vm", "--json", "--max-parallel", "2")
    assert everything.code == 0, everything.err
    assert sorted(names(everything)) == ["db1", "web1", "web2"]
    none = vmdp("backup", "vm", "mail*")
    assert none.code == 2 and "no running VM matches mail*" in none.err and "web1" in none.err


def test_config_is_validated_whole(vms: VmFactory, vmdp, workdir: Path) -> None:
    cfg = workdir / "vmdp.toml"
    cfg.write_text('[vm.web1]\nexclude_disks = ["vdb"]\ncolour = "blue"\n')
    bad = vmdp("backup", "vm", "web1", "--config", str(cfg))
    assert bad.code == 2 and str(cfg) in bad.err and "'vm.web1.colour'" in bad.err and "exclude_disks" in bad.err
    cfg.write_text("max_parallel = 0\n")
    bad = vmdp("backup", "vm", "web1", "--config", str(cfg))
    assert bad.code == 2 and "bad value for 'max_parallel'" in bad.err and "1 or more" in bad.err
    cfg.write_text('[vm.web1]\napp_consistent_fallback = "maybe"\n')
    bad = vmdp("backup", "vm", "web1", "--config", str(cfg))
    assert bad.code == 2 and "'vm.web1.app_consistent_fallback'" in bad.err and "'crash'" in bad.err


def test_disk_include_exclude(vms: VmFactory, vmdp, workdir: Path) -> None:
    vm = vms(disks={"vda": 8 * MiB, "vdb": 8 * MiB, "vdc": 4 * MiB})
    model = DiskModel(vm)
    model.write("vda", 0, MiB, 1)
    model.write("vdb", 0, MiB, 2)
    cfg = workdir / "vmdp.toml"
    cfg.write_text(f'[vm.vm1]\nexclude_disks = ["{vm.image("vdc")}"]\n')
    env = {"VMDP_CONFIG": str(cfg)}
    run = vmdp("backup", "vm", "vm1", "--exclude-disk", "vdb", "--json", env_extra=env)
    assert run.code == 0, run.err
    [doc] = run.json()
    assert [d["name"] for d in doc["disks"]] == ["vda"]
    assert [d["name"] for d in doc["excluded_disks"]] == ["vdb", "vdc"]
    assert doc["disks"][0]["read_bytes"] == MiB
    detail = vmdp("query", "vm", "vm1", "--detail")
    assert "excluded" in detail.out and str(vm.image("vdb")) in detail.out
    only = vmdp("backup", "vm", "vm1", "--include-disk", "vdb", "--json", env_extra=env).json()[0]
    assert [d["name"] for d in only["disks"]] == ["vdb"] and only["disks"][0]["mode"] == "IFFULL"
    out = vmdp("restore", "vm", "vm1", "--backup-id", doc["backup_id"], "--target-dir", str(workdir / "r"), "--json")
    assert [d["name"] for d in out.json()["disks"]] == ["vda"]


def test_preview_shows_disks_modes_and_problems(vms: VmFactory, vmdp, workdir: Path) -> None:
    vm = vms(disks={"vda": 8 * MiB, "vdb": 4 * MiB})
    vm.write_pattern("vda", 0, 2 * MiB, 1)
    raw = vms("rawvm", disks={"vda": 4 * MiB}, fmt="raw")
    assert vmdp("backup", "vm", "vm1").code == 0
    run = vmdp("backup", "vm", "vm1", "rawvm", "--preview", "--exclude-disk", "vdb", "--json")
    assert run.code == 0, run.err
    first, second = run.json()
    assert first["mode"] == "IFINCR" and first["problems"] == []
    assert first["disks"] == [
        {
            "name": "vda",
            "location": str(vm.image("vda")),
            "format": "qcow2",
            "capacity": 8 * MiB,
            "allocated": first["disks"][0]["allocated"],
            "mode": "IFINCR",
            "tracking": "ok",
            "reason": "tracking point ok",
        }
    ]
    assert first["disks"][0]["allocated"] > 2 * MiB
    assert [d["name"] for d in first["excluded_disks"]] == ["vdb"]
    assert second["mode"] == "IFFULL" and second["disks"][0]["reason"] == "no earlier version of this VM"
    assert "cannot hold a persistent bitmap" in second["problems"][0] and str(raw.image("vda")) in second["problems"][0]
    repo = Repository.open(workdir / "repo", create=False)
    with repo.lock_vm(vm.uuid, "vm1"):
        locked = vmdp("backup", "vm", "vm1", "--preview", "--json").json()[0]
    assert "another backup of VM vm1 is running" in locked["problems"][0]
    text = vmdp("backup", "vm", "rawvm", "--preview")
    assert "would stop the backup" in text.out and "IFFULL" in text.out
    state = vm.query("query-block")[0]["inserted"]["dirty-bitmaps"]  # type: ignore[index]
    assert len(state) == 1  # the preview created nothing


class AlternatingWriter(threading.Thread):
    """Writes k = 0, 1, 2… to VM k % 2, each at its own 64 KiB slot, only while that VM runs:
    as guests would, which cannot write while paused."""

    def __init__(self, a, b) -> None:  # type: ignore[no-untyped-def]
        super().__init__(daemon=True)
        self.targets = (a, b)
        self.done = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            k = 0
            while not self.stop.is_set() and k < 1000:
                vm = self.targets[k % 2]
                while not vm.query("query-status")["running"]:
                    pass
                vm.write_pattern("vda", (k // 2) * 64 * KiB, 64 * KiB, k % 251 + 1)
                k += 1
                self.done = k
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def test_group_snapshot_is_one_instant(vms: VmFactory, workdir: Path) -> None:
    a, b = vms("vmA", disks={"vda": 64 * MiB}), vms("vmB", disks={"vda": 64 * MiB})
    repo = Repository.open(workdir / "repo", chunk_size=MiB)
    writer = AlternatingWriter(a, b)
    writer.start()
    while writer.done < 40:
        assert writer.error is None, writer.error
    found = [find_vm([str(vm.qmp_path)], vm.name) for vm in (a, b)]
    va, vb = backup_group(found, repo, BackupOptions(scratch=workdir / "scratch"), {})
    after = writer.done
    writer.stop.set()
    writer.join()
    assert writer.error is None, writer.error
    assert va.group and va.group == vb.group  # type: ignore[union-attr]
    assert va.snapshot_time and va.snapshot_time == vb.snapshot_time  # type: ignore[union-attr]
    disks = {0: restored(repo, va, workdir / "ra")["vda"], 1: restored(repo, vb, workdir / "rb")["vda"]}  # type: ignore[arg-type]
    present = []
    for k in range(writer.done):
        off = (k // 2) * 64 * KiB
        present.append(disks[k % 2][off : off + 64 * KiB] == bytes([k % 251 + 1]) * 64 * KiB)
    cut = present.index(False) if False in present else len(present)
    assert 40 <= cut <= after and not any(present[cut:]), f"not a prefix: writes {present.count(True)}, cut {cut}"
    assert a.query("query-status")["running"] and b.query("query-status")["running"]
    assert_clean(a, workdir / "scratch", {"vda": va.disks[0].tracking_point or ""})  # type: ignore[union-attr]


def test_group_resumes_only_what_it_paused_even_on_failure(
    vms: VmFactory, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = vms("vmA"), vms("vmB")
    b.query("stop")
    repo = Repository.open(workdir / "repo", chunk_size=MiB)
    found = [find_vm([str(vm.qmp_path)], vm.name) for vm in (a, b)]
    results = backup_group(found, repo, BackupOptions(scratch=workdir / "scratch"), {})
    assert all(r.mode is Mode.IFFULL for r in results)  # type: ignore[union-attr]
    assert a.query("query-status")["running"] is True
    assert b.query("query-status")["running"] is False  # it was paused before: it stays paused
    b.query("cont")
    original = QemuSession.trigger

    def fail_on_b(self: QemuSession, snap) -> None:  # type: ignore[no-untyped-def]
        if self.vm.name == "vmB":
            assert a.query("query-status")["running"] is False  # the group is paused
            raise RuntimeError("injected")
        original(self, snap)

    monkeypatch.setattr(QemuSession, "trigger", fail_on_b)
    with pytest.raises(RuntimeError):
        backup_group(found, repo, BackupOptions(scratch=workdir / "scratch"), {})
    assert a.query("query-status")["running"] is True and b.query("query-status")["running"] is True
    for vm, prev in zip((a, b), results, strict=True):
        assert_clean(vm, workdir / "scratch", {"vda": prev.disks[0].tracking_point or ""})  # type: ignore[union-attr]


def test_app_consistent_without_agent_fails_or_falls_back(vms: VmFactory, vmdp, workdir: Path) -> None:
    vms()
    run = vmdp("backup", "vm", "vm1", "--app-consistent", "vm1")
    assert run.code == 1 and "cannot quiesce VM vm1" in run.err and "guest agent" in run.err
    cfg = workdir / "vmdp.toml"
    cfg.write_text('[vm.vm1]\napp_consistent = true\napp_consistent_fallback = "crash"\n')
    ok = vmdp("backup", "vm", "vm1", "--json", env_extra={"VMDP_CONFIG": str(cfg)})
    assert ok.code == 0, ok.err
    assert ok.json()[0]["consistency"] == "crash" and "crash-consistent snapshot instead" in ok.err
    grouped = vmdp("backup", "vm", "vm1", "--group", "--json", env_extra={"VMDP_CONFIG": str(cfg)})
    assert grouped.code == 0 and grouped.json()[0]["group"] is None  # snapshotted on its own


def test_version_gate_upgrade_and_transient_tracking(vms: VmFactory, vmdp, workdir: Path) -> None:
    old = vms("old", disks={"vda": 8 * MiB}, compat="0.10")
    refused = vmdp("backup", "vm", "old")
    assert refused.code == 1 and "qcow2" in refused.err and "vmdp upgrade disk" in refused.err
    busy = vmdp("upgrade", "disk", str(old.image("vda")))
    assert busy.code == 2 and "in use by a running VM" in busy.err
    old.stop()
    done = vmdp("upgrade", "disk", str(old.image("vda")))
    assert done.code == 0 and "upgraded" in done.out
    assert vmdp("upgrade", "disk", str(old.image("vda"))).out.strip().endswith("nothing to do")
    old = vms.restart(old)
    assert vmdp("backup", "vm", "old").code == 0

    raw = vms("raw", disks={"vda": 8 * MiB}, fmt="raw")
    model = DiskModel(raw)
    not_qcow = vmdp("upgrade", "disk", str(raw.image("vda")))
    assert not_qcow.code == 2 and "raw image" in not_qcow.err and "qemu-img convert" in not_qcow.err
    model.write("vda", 0, MiB, 1)
    first = vmdp("backup", "vm", "raw", "--allow-transient-tracking", "--json").json()[0]
    model.write("vda", 3 * MiB, 100, 2)
    second = vmdp("backup", "vm", "raw", "--allow-transient-tracking", "--json").json()[0]
    assert (first["mode"], second["mode"]) == ("IFFULL", "IFINCR")
    assert second["disks"][0]["tracking"] == "transient"
    repo = Repository.open(workdir / "repo", create=False)
    assert restored(repo, repo.versions("raw")[-1], workdir / "out") == model.snapshot()
    raw = model.vm = vms.restart(raw)
    third = vmdp("backup", "vm", "raw", "--allow-transient-tracking", "--json").json()[0]
    assert third["mode"] == "IFFULL" and "QEMU restarted" in third["reason"]


def test_parallel_vms_one_failing(vms: VmFactory, vmdp) -> None:
    for name in ("p1", "p2"):
        vm = vms(name, disks={"vda": 32 * MiB})
        vm.write_pattern("vda", 0, 8 * MiB, 3)
    vms("p3", disks={"vda": 4 * MiB}, fmt="raw")
    run = vmdp("backup", "vm", "p*", "--max-parallel", "2", "--json")
    assert run.code == 1
    results = {d["vm"]: d["result"] for d in run.json()}
    assert results == {"p1": "ok", "p2": "ok", "p3": "failed"}
    assert "backup failed for p3 (1 of 3 VMs)" in run.err
    table = vmdp("backup", "vm", "p*", "--max-parallel", "2")
    assert table.code == 1
    assert "Duration" in table.out and "failed" in table.out and "IFINCR" in table.out


def test_upgrade_of_a_missing_image(vmdp, workdir: Path) -> None:
    run = vmdp("upgrade", "disk", str(workdir / "nope.qcow2"))
    assert run.code == 2 and "does not exist" in run.err
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(workdir / "a.qcow2"), "1M"], check=True
    )
    both = vmdp("upgrade", "disk", str(workdir / "a.qcow2"), str(workdir / "nope.qcow2"), "--json")
    assert both.code == 1 and [r["result"] for r in both.json()] == ["ok", "failed"]
