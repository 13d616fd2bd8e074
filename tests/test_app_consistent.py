"""Application-consistent backups of a real Linux guest, quiesced by the real qemu-guest-agent."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

from vmdp.testing.guest import GuestVM

MiB = 1 << 20
INCOMPAT_RECOVER = 0x4  # ext4 needs_recovery: set while mounted, cleared by a freeze


def needs_recovery(image: Path) -> bool:
    with open(image, "rb") as f:
        f.seek(1024 + 0x38)
        (magic,) = struct.unpack("<H", f.read(2))
        f.seek(1024 + 0x60)
        (incompat,) = struct.unpack("<I", f.read(4))
    assert magic == 0xEF53, "no ext4 file system in the restored image"
    return bool(incompat & INCOMPAT_RECOVER)


def test_guest_frozen_for_the_snapshot(vmdp, workdir: Path) -> None:
    vm = GuestVM(workdir, "g1", {"vda": 64 * MiB})
    vm.start()
    try:
        vm.wait_ready()
        vm.close_agent()  # the agent's socket serves one client at a time: vmdp's turn
        crash = vmdp("backup", "vm", "g1", "--json")
        assert crash.code == 0, crash.err
        assert crash.json()[0]["consistency"] == "crash"
        app = vmdp("backup", "vm", "g1", "--app-consistent", "g1", "--json")
        assert app.code == 0, app.err
        [doc] = app.json()
        assert doc["consistency"] == "application" and doc["mode"] == "IFINCR"
        assert vm.agent("guest-fsfreeze-status") == "thawed"  # thawed right after the snapshot
        vm.close_agent()
        out = workdir / "r"
        for backup_id, name in ((crash.json()[0]["backup_id"], "crash"), (doc["backup_id"], "app")):
            run = vmdp(
                "restore",
                "vm",
                "g1",
                "--backup-id",
                backup_id,
                "--target-dir",
                str(out),
                "--format",
                "raw",
                "--vmname",
                name,
            )
            assert run.code == 0, run.err
        assert needs_recovery(out / "crash-vda.raw")  # the control: a live journal, as after a power cut
        assert not needs_recovery(out / "app-vda.raw")
        fsck = subprocess.run(["e2fsck", "-fn", str(out / "app-vda.raw")], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        detail = vmdp("query", "vm", "g1", "--inactive", "--detail")
        assert "application-consistent" in detail.out and "crash-consistent" in detail.out
        preview = vmdp("backup", "vm", "g1", "--app-consistent", "g1", "--preview", "--json").json()[0]
        assert preview["consistency"] == "application" and preview["problems"] == []
    finally:
        vm.stop(kill=True)
