"""A throwaway QEMU VM with virtio-blk disks, for the demo, the tests and the benchmarks.

It has two QMP sockets: ``<name>.qmp`` for vmdp, and ``<name>.lab.qmp`` for this harness, since
a QMP socket serves one client at a time. Guest writes are simulated with HMP ``qemu-io`` on the
disk's device, so they pass through the fleecing filter exactly like a guest's writes.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

from vmdp.errors import VmdpError
from vmdp.hypervisor.qmp import Qmp


def accel() -> list[str]:
    return ["-accel", "kvm"] if os.access("/dev/kvm", os.R_OK | os.W_OK) else ["-accel", "tcg"]


class ThrowawayVM:
    """`images` puts a disk's image elsewhere; `socket_name` names its QMP sockets (as on another host)."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        disks: dict[str, int],
        uuid: str | None = None,
        fmt: str = "qcow2",
        compat: str = "1.1",
        images: dict[str, Path] | None = None,
        socket_name: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.name = name
        self.uuid = uuid if uuid is not None else str(uuidlib.uuid4())
        self.disks = disks
        self.fmt = fmt
        self.compat = compat
        self.images = images or {}
        self.qmp_path = workdir / f"{socket_name or name}.qmp"
        self.lab_path = workdir / f"{socket_name or name}.lab.sock"
        self.memory = "64"  # MiB; a subclass that boots a guest raises it
        self.serial = "none"  # or e.g. file:PATH for a guest's console
        self.proc: subprocess.Popen[bytes] | None = None
        self._lab: Qmp | None = None

    def image(self, disk: str) -> Path:
        return self.images.get(disk) or self.workdir / f"{self.name}-{disk}.{self.fmt}"

    def start(self) -> ThrowawayVM:
        args = [
            "qemu-system-x86_64",
            "-name",
            self.name,
            *self.accel_args(),
            "-m",
            self.memory,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            self.serial,
            "-boot",
            "menu=off,strict=on",  # boot no disk: tests write random data into sector 0
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            "-qmp",
            f"unix:{self.lab_path},server=on,wait=off",
        ]
        if self.uuid:
            args += ["-uuid", self.uuid]
        for disk, size in self.disks.items():
            path = self.image(disk)
            if not path.exists():
                opts = ["-o", f"compat={self.compat}"] if self.fmt == "qcow2" else []
                subprocess.run(["qemu-img", "create", "-q", "-f", self.fmt, *opts, str(path), str(size)], check=True)
            args += [
                "-blockdev",
                f"driver={self.fmt},node-name=d-{disk},file.driver=file,file.filename={path}",
                "-device",
                f"virtio-blk-pci,drive=d-{disk},id={disk}",
            ]
        args += self.extra_args()
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            self._connect_lab(time.monotonic() + 30)
        except BaseException:
            self.stop(kill=True)  # never leave a QEMU nobody will stop
            raise
        return self

    def _connect_lab(self, deadline: float) -> None:
        assert self.proc is not None
        while not (self.qmp_path.exists() and self.lab_path.exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"QEMU did not start: {err}")
            time.sleep(0.02)
        while True:
            try:
                self._lab = Qmp(str(self.lab_path))
                return
            except VmdpError:  # QEMU creates the socket file just before it listens on it
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def accel_args(self) -> list[str]:
        """The accelerator: KVM when /dev/kvm is usable, TCG otherwise; a subclass may choose."""
        return accel()

    def extra_args(self) -> list[str]:
        """More QEMU arguments: a subclass boots a guest here."""
        return []

    @property
    def lab(self) -> Qmp:
        assert self._lab is not None, "VM not started"
        return self._lab

    def qemu_io(self, disk: str, command: str) -> str:
        out = self.lab.cmd(
            "human-monitor-command",
            **{"command-line": f'qemu-io -d /machine/peripheral/{disk}/virtio-backend "{command}"'},
        )
        if out.strip():
            raise RuntimeError(f"qemu-io {command!r} failed: {out.strip()}")
        return out

    def write_pattern(self, disk: str, offset: int, length: int, pattern: int) -> None:
        self.qemu_io(disk, f"write -P {pattern} {offset} {length}")

    def write_data(self, disk: str, offset: int, data: bytes) -> None:
        with tempfile.NamedTemporaryFile(dir=self.workdir, prefix=".w-") as f:
            f.write(data)
            f.flush()
            self.qemu_io(disk, f"write -s {f.name} {offset} {len(data)}")

    def flush(self) -> None:
        """Make every write so far reach the image files, as a guest's flush would."""
        for disk in self.disks:
            self.qemu_io(disk, "flush")

    def zero(self, disk: str, offset: int, length: int) -> None:
        self.qemu_io(disk, f"write -z {offset} {length}")

    def query(self, command: str, **args: object) -> object:
        return self.lab.cmd(command, **args)

    def stop(self, kill: bool = False) -> None:
        if self._lab is not None:
            if not kill:
                try:
                    self._lab.cmd("quit")
                except Exception:  # noqa: BLE001 - QEMU may close the socket before answering
                    pass
            self._lab.close()
            self._lab = None
        if self.proc is not None:
            if kill:
                self.proc.kill()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None
        for p in (self.qmp_path, self.lab_path):
            p.unlink(missing_ok=True)

    def __enter__(self) -> ThrowawayVM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
