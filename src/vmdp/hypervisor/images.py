"""Disk image files as restore targets: raw written directly, qcow2 through qemu-nbd.

Both skip all-zero blocks, so a restored image is sparse wherever the disk was
unallocated or zero (a raw file gets holes, a qcow2 unallocated clusters).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Protocol

import nbd

from vmdp.errors import HypervisorError, RepositoryError, UsageError

BLOCK = 64 << 10  # zero runs shorter than this are written; longer ones left as holes
_ZERO_BLOCK = memoryview(bytes(BLOCK))


def nonzero_runs(data: bytes | memoryview, base: int) -> list[tuple[int, memoryview]]:
    """Split `data` at `base` into (offset, bytes) runs, leaving out all-zero 64 KiB blocks."""
    view = memoryview(data)
    runs: list[tuple[int, memoryview]] = []
    run_start = None
    for pos in range(0, len(view), BLOCK):
        block = view[pos : pos + BLOCK]
        if block == _ZERO_BLOCK[: len(block)]:
            if run_start is not None:
                runs.append((base + run_start, view[run_start:pos]))
                run_start = None
        elif run_start is None:
            run_start = pos
    if run_start is not None:
        runs.append((base + run_start, view[run_start:]))
    return runs


class ImageWriter(Protocol):
    def write(self, offset: int, data: bytes | memoryview) -> None: ...

    def close(self) -> None: ...

    def discard(self) -> None: ...


class RawWriter:
    def __init__(self, path: Path, capacity: int) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(self.fd, capacity)
        except OSError as exc:
            raise RepositoryError(f"cannot create {path}: {exc.strerror}", "check --target-dir") from exc

    def write(self, offset: int, data: bytes | memoryview) -> None:
        for pos, run in nonzero_runs(data, offset):
            while run:
                written = os.pwrite(self.fd, run, pos)
                run, pos = run[written:], pos + written

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)

    def discard(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


class Qcow2Writer:
    """A new qcow2 image served by a private qemu-nbd; each thread writes on its own connection."""

    def __init__(self, path: Path, capacity: int, connections: int) -> None:
        self.path = path
        run = subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(capacity)], capture_output=True, text=True
        )
        if run.returncode:
            raise HypervisorError(f"cannot create {path}: {run.stderr.strip()}", "check --target-dir")
        self._dir = tempfile.TemporaryDirectory(prefix="vmdp-nbd-")
        self.socket = os.path.join(self._dir.name, "s")
        self._proc = subprocess.Popen(
            [
                "qemu-nbd",
                "--persistent",
                "-f",
                "qcow2",
                "--cache=writeback",
                f"--shared={connections + 1}",
                "--socket",
                self.socket,
                str(path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while not os.path.exists(self.socket):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                self.discard()
                raise HypervisorError(f"qemu-nbd did not start for {path}: {err.strip()}")
            time.sleep(0.01)
        self._local = threading.local()
        self._handles: list[nbd.NBD] = []
        self._lock = threading.Lock()

    def _handle(self) -> nbd.NBD:
        if not hasattr(self._local, "h"):
            h = nbd.NBD()
            h.connect_unix(self.socket)
            self._local.h = h
            with self._lock:
                self._handles.append(h)
        return self._local.h

    def write(self, offset: int, data: bytes | memoryview) -> None:
        h = self._handle()
        for pos, run in nonzero_runs(data, offset):
            h.pwrite(run, pos)

    def _stop(self) -> None:
        for h in self._handles:
            try:
                h.shutdown()
            except nbd.Error:
                pass
        self._handles.clear()
        self._proc.terminate()
        self._proc.wait(timeout=60)
        if self._proc.stderr:
            self._proc.stderr.close()
        self._dir.cleanup()

    def close(self) -> None:
        if self._handles:
            self._handles[0].flush()
        self._stop()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def discard(self) -> None:
        if hasattr(self, "_handles"):
            self._stop()
        else:
            self._dir.cleanup()
        self.path.unlink(missing_ok=True)


def open_image(path: Path, fmt: str, capacity: int, connections: int) -> ImageWriter:
    if fmt == "raw":
        return RawWriter(path, capacity)
    return Qcow2Writer(path, capacity, connections)


def upgrade_image(path: Path) -> str:
    """Make `path` able to hold persistent bitmaps (qcow2 compat 0.10 → 1.1); what was done.

    Like Hyper-V's Update-VMVersion this is offline: qemu-img refuses an image a running
    VM holds, and that refusal is reported as such.
    """
    if not path.exists():
        raise UsageError(f"{path} does not exist", "give the path of a VM disk image")
    info = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True)
    if info.returncode:
        if "lock" in info.stderr:
            raise UsageError(f"{path} is in use by a running VM", "stop the VM, upgrade, then start it again")
        raise UsageError(f"{path} is not a readable disk image: {info.stderr.strip()}")
    doc = json.loads(info.stdout)
    fmt = doc["format"]
    if fmt == "raw":
        raise UsageError(
            f"{path} is a raw image: it cannot hold a persistent bitmap",
            f"convert it with the VM stopped: qemu-img convert -O qcow2 {path} NEW.qcow2, then use NEW.qcow2",
        )
    if fmt != "qcow2":
        raise UsageError(f"{path} is a {fmt} image", "convert it to qcow2 with qemu-img convert -O qcow2")
    if doc.get("format-specific", {}).get("data", {}).get("compat") == "1.1":
        return "already qcow2 v3 (compat 1.1): nothing to do"
    amend = subprocess.run(
        ["qemu-img", "amend", "-f", "qcow2", "-o", "compat=1.1", str(path)], capture_output=True, text=True
    )
    if amend.returncode:
        if "lock" in amend.stderr:
            raise UsageError(f"{path} is in use by a running VM", "stop the VM, upgrade, then start it again")
        raise HypervisorError(f"cannot upgrade {path}: {amend.stderr.strip()}")
    return "upgraded from qcow2 compat 0.10 to 1.1"
