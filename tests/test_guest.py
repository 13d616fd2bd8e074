"""The test guest: a real Linux running the real QEMU guest agent, whose ext4 file system it freezes."""

from __future__ import annotations

import base64
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmdp.hypervisor.agent import GuestAgent
from vmdp.testing.guest import GuestVM

EXT4_MAGIC = 0xEF53
INCOMPAT_RECOVER = 0x4  # needs_recovery: the journal holds what the file system lacks


@pytest.fixture(scope="module")
def guest() -> Iterator[GuestVM]:
    """One booted guest for the module's tests (a boot takes seconds under KVM, more under TCG)."""
    # Short paths: unix socket paths are limited to 107 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="vmdp-g-", dir="/tmp"))
    vm = GuestVM(workdir, "g1", {"vda": 64 << 20})
    vm.start()
    try:
        vm.wait_ready()
        yield vm
    finally:
        vm.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def snapshot(vm: GuestVM, disk: str, dest: Path) -> bytes:
    """The disk as the image files hold it now, once QEMU has flushed what the guest wrote."""
    vm.flush()
    subprocess.run(["qemu-img", "convert", "-U", "-f", vm.fmt, "-O", "raw", str(vm.image(disk)), str(dest)], check=True)
    return dest.read_bytes()


def superblock(raw: bytes) -> tuple[int, int]:
    """(magic, incompatible features) of the ext2/3/4 superblock at byte 1024."""
    (magic,) = struct.unpack_from("<H", raw, 1024 + 0x38)
    (incompat,) = struct.unpack_from("<I", raw, 1024 + 0x60)
    return magic, incompat


def log_lines(vm: GuestVM) -> int:
    """How many lines the guest's writer has appended to /mnt/log."""
    handle = vm.agent("guest-file-open", path="/mnt/log", mode="r")
    data = b""
    try:
        while True:
            chunk = vm.agent("guest-file-read", handle=handle, count=65536)
            data += base64.b64decode(chunk["buf-b64"])
            if chunk["eof"]:
                break
    finally:
        vm.agent("guest-file-close", handle=handle)
    return data.count(b"\n")


def test_guest_agent_freezes_and_thaws_the_guest_file_system(guest: GuestVM, workdir: Path) -> None:
    assert guest.agent("guest-ping") == {}
    fsinfo = guest.agent("guest-get-fsinfo")
    assert [(fs["mountpoint"], fs["type"]) for fs in fsinfo] == [("/mnt", "ext4")]

    # The guest keeps writing: while it runs, its journal is live on disk.
    before = log_lines(guest)
    magic, incompat = superblock(snapshot(guest, "vda", workdir / "live.raw"))
    assert magic == EXT4_MAGIC
    assert incompat & INCOMPAT_RECOVER

    assert guest.agent("guest-fsfreeze-freeze") >= 1
    try:
        assert guest.agent("guest-fsfreeze-status") == "frozen"
        # Frozen: everything is on disk and the journal is empty, so the image is consistent as it is.
        frozen = workdir / "frozen.raw"
        magic, incompat = superblock(snapshot(guest, "vda", frozen))
        assert magic == EXT4_MAGIC
        assert not incompat & INCOMPAT_RECOVER
        e2fsck = shutil.which("e2fsck") or shutil.which("e2fsck", path="/usr/sbin:/sbin") or "e2fsck"
        check = subprocess.run([e2fsck, "-fn", str(frozen)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        thawed = guest.agent("guest-fsfreeze-thaw")
    assert thawed >= 1
    assert guest.agent("guest-fsfreeze-status") == "thawed"

    # And the writer goes on after the thaw.
    assert log_lines(guest) > before


def test_vmdp_agent_client_freezes_the_real_guest(guest: GuestVM) -> None:
    guest.close_agent()  # QEMU serves the agent's socket to one client at a time
    agent = GuestAgent(str(guest.qga_path), timeout=30)
    try:
        assert agent.freeze() >= 1
        try:
            assert agent.cmd("guest-fsfreeze-status") == "frozen"
        finally:
            assert agent.thaw() >= 1
        assert agent.cmd("guest-fsfreeze-status") == "thawed"
    finally:
        agent.close()
    assert guest.agent("guest-ping") == {}
