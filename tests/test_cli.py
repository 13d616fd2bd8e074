"""The command line as scripts use it: exit codes, one JSON document on stdout, clear errors."""

from __future__ import annotations

import socket
import time
from datetime import date, datetime, timedelta
from pathlib import Path

from disk_model import DiskModel

MiB = 1 << 20
VERSION_KEYS = {"vm", "uuid", "backup_id", "mode", "started", "finished", "active", "reason", "disks"}
DISK_KEYS = {"name", "location", "capacity", "read_bytes", "stored_bytes"}


def test_backup_query_restore_contract(vms, vmdp, workdir: Path) -> None:
    vm = vms(disks={"vda": 32 * MiB, "vdb": 16 * MiB})
    model = DiskModel(vm)
    model.write("vda", 5 * MiB + 1, 70000, 0x31)
    model.write("vdb", 0, MiB, 0x32)
    first = vmdp("backup", "vm", "vm1", "--json")
    assert first.code == 0, first.err
    [made] = first.json()
    assert VERSION_KEYS <= made.keys() and made["mode"] == "IFFULL" and made["reason"]
    assert datetime.fromisoformat(made["finished"]).tzinfo is not None
    assert [d["name"] for d in made["disks"]] == ["vda", "vdb"]
    assert all(DISK_KEYS <= d.keys() for d in made["disks"])
    assert made["disks"][0]["location"] == str(vm.image("vda")) and made["disks"][0]["capacity"] == 32 * MiB

    model.write("vda", 20 * MiB, 4096, 0x33)
    second = vmdp("backup", "vm", "vm1", "--json").json()[0]
    assert second["mode"] == "IFINCR" and second["reason"] is None
    assert second["disks"][0]["read_bytes"] <= 4 * MiB and second["disks"][1]["read_bytes"] == 0

    active = vmdp("query", "vm", "--json").json()
    assert [v["backup_id"] for v in active] == [second["backup_id"]] and active[0]["active"] is True
    listing = vmdp("query", "vm", "vm1", "-inactive", "-detail", "--json").json()
    assert [v["backup_id"] for v in listing] == [made["backup_id"], second["backup_id"]]
    assert [v["active"] for v in listing] == [False, True]
    assert [v["incrementals_since_full"] for v in listing] == [0, 1]
    assert [v["disks"][0]["tracking"] for v in listing] == ["none", "ok"]
    assert all(VERSION_KEYS <= v.keys() for v in listing)

    table = vmdp("query", "vm", "-detail", "-inactive")
    assert table.code == 0 and "IFINCR" in table.out and str(vm.image("vdb")) in table.out
    assert "Tracking" in table.out and " ok " in table.out

    out = vmdp(
        "restore",
        "vm",
        "vm1",
        f"-pitdate={date.today()}",
        "--target-dir",
        str(workdir / "r"),
        "--format",
        "raw",
        "-vmname=copy",
        "--json",
    )
    assert out.code == 0, out.err
    doc = out.json()
    assert doc["vm"] == "vm1" and doc["backup_id"] == second["backup_id"]
    assert [(d["name"], d["format"]) for d in doc["disks"]] == [("vda", "raw"), ("vdb", "raw")]
    for d in doc["disks"]:
        assert Path(d["path"]).name == f"copy-{d['name']}.raw"
        assert Path(d["path"]).read_bytes() == model.data[d["name"]]

    again = vmdp("restore", "vm", "vm1", "--target-dir", str(workdir / "r"), "--format", "raw", "--vmname", "copy")
    assert again.code == 2 and "already exists" in again.err and "--replace" in again.err
    assert "Traceback" not in again.err
    replaced = vmdp(
        "restore",
        "vm",
        "vm1",
        "--backup-id",
        made["backup_id"],
        "--target-dir",
        str(workdir / "r"),
        "--format",
        "raw",
        "--vmname",
        "copy",
        "--replace",
    )
    assert replaced.code == 0, replaced.err
    assert (workdir / "r" / "copy-vdb.raw").read_bytes() == b"\x32" * MiB + bytes(15 * MiB)


def test_mode_iffull_and_dsmc_spelling(vms, vmdp) -> None:
    vms()
    assert vmdp("backup", "vm", "vm1").code == 0
    forced = vmdp("backup", "vm", "vm1", "-mode=iffull", "--json")
    assert forced.code == 0, forced.err
    assert forced.json()[0]["mode"] == "IFFULL" and "requested" in forced.json()[0]["reason"]


def test_preview_takes_no_snapshot(vms, vmdp, workdir: Path) -> None:
    vm = vms()
    preview = vmdp("backup", "vm", "vm1", "-preview", "--json")
    assert preview.code == 0, preview.err
    [doc] = preview.json()
    assert doc["mode"] == "IFFULL" and doc["disks"][0]["location"] == str(vm.image("vda"))
    assert not (workdir / "repo").exists()
    bitmaps = vm.query("query-block")[0]["inserted"].get("dirty-bitmaps", [])  # type: ignore[index]
    assert bitmaps == []


def test_summary_line_without_terminal(vms, vmdp) -> None:
    vms()
    run = vmdp("backup", "vm", "vm1")
    assert run.code == 0
    [line] = run.out.splitlines()
    assert line.startswith("vm1: IFFULL") and "read" in line and "stored" in line


def test_unknown_vm(vms, vmdp) -> None:
    vms()
    run = vmdp("backup", "vm", "nope")
    assert run.code == 2
    assert "no running VM named nope" in run.err and "vm1" in run.err and "Traceback" not in run.err


def test_unreachable_qmp_socket(vmdp, workdir: Path) -> None:
    missing = vmdp("backup", "vm", "vm1", "--qmp", str(workdir / "gone.qmp"))
    assert missing.code == 2 and "no such QMP socket" in missing.err
    stale = workdir / "stale.qmp"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(stale))
    sock.close()  # a socket file nobody listens on: QEMU died
    refused = vmdp("backup", "vm", "vm1", "--qmp", str(stale))
    assert refused.code == 2 and "cannot connect to QMP socket" in refused.err and "Traceback" not in refused.err
    none = vmdp("backup", "vm", "vm1", env_extra={"VMDP_QMP": ""})
    assert none.code == 2 and "--qmp" in none.err


def test_bad_dates_and_missing_things(vms, vmdp, workdir: Path) -> None:
    missing_repo = vmdp("query", "vm")
    assert missing_repo.code == 2 and "no vmdp repository" in missing_repo.err
    vms()
    assert vmdp("backup", "vm", "vm1").code == 0
    bad = vmdp("restore", "vm", "vm1", "--pitdate", "2026-13-45", "--target-dir", str(workdir / "r"))
    assert bad.code == 2 and "bad --pitdate" in bad.err and "YYYY-MM-DD" in bad.err
    bad_time = vmdp(
        "restore", "vm", "vm1", "--pitdate", "2026-11-01", "--pittime", "25:00", "--target-dir", str(workdir / "r")
    )
    assert bad_time.code == 2 and "bad --pittime" in bad_time.err
    too_early = vmdp(
        "restore", "vm", "vm1", "-pitdate=" + str(date.today() - timedelta(days=1)), "--target-dir", str(workdir / "r")
    )
    assert too_early.code == 2 and "no version made at or before" in too_early.err
    unknown = vmdp("restore", "vm", "ghost", "--target-dir", str(workdir / "r"))
    assert unknown.code == 2 and "no backup of VM ghost" in unknown.err
    bad_id = vmdp("restore", "vm", "vm1", "--backup-id", "nope", "--target-dir", str(workdir / "r"))
    assert bad_id.code == 2 and "no version nope" in bad_id.err
    usage = vmdp("backup", "vm", "vm1", "--mode", "sideways")
    assert usage.code == 2 and "sideways" in usage.err
    assert not (workdir / "r").exists() or list((workdir / "r").iterdir()) == []


def test_not_trackable_disk_is_refused(vms, vmdp) -> None:
    vms(disks={"vda": 8 * MiB}, fmt="raw")
    run = vmdp("backup", "vm", "vm1")
    assert run.code == 1
    assert "cannot hold a persistent bitmap" in run.err and "vda" in run.err and "raw)" in run.err
    assert "vmdp upgrade disk" in run.err and "--allow-transient-tracking" in run.err


def test_config_file_sets_repository_and_sockets(vms, vmdp, workdir: Path) -> None:
    vms()
    cfg = workdir / "vmdp.toml"
    cfg.write_text(f'repository = "{workdir / "cfgrepo"}"\nqmp = ["{workdir / "*.qmp"}"]\n')
    run = vmdp("backup", "vm", "vm1", env_extra={"VMDP_CONFIG": str(cfg), "VMDP_REPO": "", "VMDP_QMP": ""})
    assert run.code == 0, run.err
    assert (workdir / "cfgrepo" / "vmdp-repo.json").exists()
    cfg.write_text('colour = "blue"\n')
    bad = vmdp("query", "vm", "--config", str(cfg))
    assert bad.code == 2 and "unknown key 'colour'" in bad.err and str(cfg) in bad.err


def test_vm_without_uuid_is_keyed_by_name_with_a_warning(vms, vmdp) -> None:
    vms(uuid="")
    run = vmdp("backup", "vm", "vm1", "--json")
    assert run.code == 0, run.err
    assert "has no -uuid" in run.err
    assert run.json()[0]["uuid"] == "vm1"
    again = vmdp("backup", "vm", "vm1", "--json")
    assert again.json()[0]["mode"] == "IFINCR"


def test_pittime_picks_the_latest_version_at_or_before_it(vms, vmdp, workdir: Path) -> None:
    vms()
    first = vmdp("backup", "vm", "vm1", "--json").json()[0]
    finished = datetime.fromisoformat(first["finished"]).astimezone()  # --pittime is local time
    at = finished.replace(microsecond=0) + timedelta(seconds=1)
    while datetime.now().astimezone() < at + timedelta(seconds=1):  # the next version is after `at`
        time.sleep(0.05)
    second = vmdp("backup", "vm", "vm1", "--json").json()[0]
    run = vmdp(
        "restore",
        "vm",
        "vm1",
        "-pitdate=" + at.date().isoformat(),
        "-pittime=" + at.strftime("%H:%M:%S"),
        "--target-dir",
        str(workdir / "r"),
        "--json",
    )
    assert run.code == 0, run.err
    assert run.json()["backup_id"] == first["backup_id"] != second["backup_id"]
    latest = vmdp("restore", "vm", "vm1", "--target-dir", str(workdir / "r2"), "--json")
    assert latest.json()["backup_id"] == second["backup_id"]
