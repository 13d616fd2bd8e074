"""A throwaway VM that boots a real Linux guest running the real QEMU guest agent (qemu-ga).

The guest is a Debian kernel and an initramfs built from Debian packages by
``scripts/build-test-guest.sh`` and cached (see `ensure_guest_image`). Its /init formats the first
disk (/dev/vda) as ext4 unless it holds one already, mounts it on /mnt, starts qemu-ga on the
virtio-serial port ``org.qemu.guest_agent.0``, prints ``vmdp-guest-ready`` on the serial console and
then appends a line to /mnt/log and syncs every 50 ms, so the file system is always busy: what an
application-consistent backup (guest-fsfreeze-freeze / guest-fsfreeze-thaw) is for.

The agent's socket is ``<workdir>/<name>.qga``, the console goes to ``<workdir>/<name>.console.log``.

Accelerator: ``VMDP_TEST_ACCEL=kvm|tcg`` forces one; otherwise KVM when /dev/kvm is usable and the
CPU has hardware virtualization (vmx/svm), else TCG. /dev/kvm without vmx/svm is a software KVM
(e.g. kvm_pvm inside a VM) that boots a stock kernel so slowly that TCG is much faster.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from vmdp.testing.vm import ThrowawayVM

READY = "vmdp-guest-ready"
AGENT_PORT = "org.qemu.guest_agent.0"
CMDLINE = "console=ttyS0 quiet panic=-1"
BUILD_SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "build-test-guest.sh"


class AgentError(RuntimeError):
    """qemu-ga answered a command with an error."""

    def __init__(self, command: str, error: dict[str, Any]) -> None:
        super().__init__(f"qemu-ga refused {command}: {error.get('desc', error)}")
        self.command = command
        self.error = error


def cache_dir() -> Path:
    """Where the build script keeps the guest: as the script itself chooses it."""
    if os.environ.get("VMDP_GUEST_CACHE"):
        return Path(os.environ["VMDP_GUEST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vmdp-test-guest"


def ensure_guest_image() -> tuple[Path, Path]:
    """Build the guest if its cache is missing or stale (a run with a fresh cache takes milliseconds).

    Returns (kernel, initrd). The kernel is the uncompressed ELF ``vmlinux``, which QEMU boots
    through its PVH entry point, skipping the bzImage's decompressor (seconds under TCG), or the
    bzImage ``vmlinuz`` when the script could not uncompress it.
    """
    if not BUILD_SCRIPT.exists():
        raise RuntimeError(f"{BUILD_SCRIPT} is missing: the test guest is built from a source checkout")
    cache = cache_dir()
    proc = subprocess.run(["bash", str(BUILD_SCRIPT), str(cache)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the test guest failed:\n{proc.stderr[-4000:]}")
    kernel = cache / "vmlinux"
    return kernel if kernel.exists() else cache / "vmlinuz", cache / "initrd.img"


def _hardware_virt() -> bool:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return bool({"vmx", "svm"} & set(flags.split()))


def guest_accel() -> str:
    """The accelerator a guest boots with: "kvm" or "tcg" (see the module's docstring)."""
    forced = os.environ.get("VMDP_TEST_ACCEL", "").strip()
    if forced:
        return forced
    if os.access("/dev/kvm", os.R_OK | os.W_OK) and _hardware_virt():
        return "kvm"
    return "tcg"


class GuestVM(ThrowawayVM):
    """A ThrowawayVM that boots the test guest; its first disk is /dev/vda in the guest."""

    def __init__(
        self,
        workdir: Path,
        name: str = "guest",
        disks: dict[str, int] | None = None,
        kernel: Path | None = None,
        initrd: Path | None = None,
        accel: str | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(workdir, name, disks if disks is not None else {"vda": 64 << 20}, **kw)
        if kernel is None or initrd is None:
            kernel, initrd = ensure_guest_image()
        self.kernel = kernel
        self.initrd = initrd
        self.accel = accel or guest_accel()
        self.cmdline = CMDLINE
        self.memory = "256"
        self.console_log = workdir / f"{name}.console.log"
        self.serial = f"file:{self.console_log}"
        self.qga_path = self.qmp_path.with_suffix(".qga")
        self._qga: socket.socket | None = None
        self._qga_buf = b""
        self.started_at = 0.0

    def accel_args(self) -> list[str]:
        return ["-accel", self.accel]

    def extra_args(self) -> list[str]:
        return [
            "-kernel",
            str(self.kernel),
            "-initrd",
            str(self.initrd),
            "-append",
            self.cmdline,
            "-no-reboot",  # a guest panic (panic=-1) ends QEMU instead of booting again
            "-device",
            "virtio-serial-pci,id=vser0",
            "-chardev",
            f"socket,path={self.qga_path},server=on,wait=off,id=qga0",
            "-device",
            f"virtserialport,bus=vser0.0,chardev=qga0,name={AGENT_PORT}",
        ]

    def start(self) -> GuestVM:
        self.console_log.unlink(missing_ok=True)
        self.started_at = time.monotonic()
        super().start()
        return self

    def console(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float | None = None) -> float:
        """Wait for the guest's agent to be up; returns the seconds since start(). Default timeout:
        60 s under KVM, 300 s under TCG."""
        if timeout is None:
            timeout = 60.0 if self.accel == "kvm" else 300.0
        deadline = time.monotonic() + timeout
        while True:
            if READY in self.console():
                return time.monotonic() - self.started_at
            if self.proc is None or self.proc.poll() is not None:
                why = "QEMU exited"
                break
            if time.monotonic() > deadline:
                why = f"no {READY!r} within {timeout:.0f}s ({self.accel})"
                break
            time.sleep(0.05)
        tail = "\n".join(self.console().splitlines()[-40:])
        raise RuntimeError(f"guest {self.name}: {why}; console tail:\n{tail}")

    # --- the guest agent: QMP-like JSON over the virtio-serial port, without greeting

    def _agent_socket(self) -> socket.socket:
        if self._qga is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(self.qga_path))
            self._qga = sock
            self._qga_buf = b""
        return self._qga

    def close_agent(self) -> None:
        """Let another client have the agent's socket (QEMU serves one at a time)."""
        if self._qga is not None:
            self._qga.close()
            self._qga = None
            self._qga_buf = b""

    def _agent_send(self, message: dict[str, Any], prefix: bytes = b"") -> None:
        self._agent_socket().sendall(prefix + json.dumps(message).encode() + b"\n")

    def _agent_line(self, deadline: float) -> bytes:
        sock = self._agent_socket()
        while b"\n" not in self._qga_buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("qemu-ga socket closed")
            self._qga_buf += chunk
        line, _, self._qga_buf = self._qga_buf.partition(b"\n")
        return line

    def _agent_reply(self, deadline: float) -> dict[str, Any] | None:
        # A 0xff byte precedes guest-sync-delimited's answer; the 0xff we send to reset the
        # agent's parser may draw a parse error: neither is JSON to keep.
        line = self._agent_line(deadline).replace(b"\xff", b"").strip()
        if not line:
            return None
        try:
            reply = json.loads(line)
        except ValueError:
            return None
        return reply if isinstance(reply, dict) else None

    def _agent_sync(self, deadline: float) -> None:
        """Resynchronize: drop what earlier, timed-out commands left in the channel."""
        sync_id = random.randrange(1, 1 << 31)
        self._agent_send({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}, prefix=b"\xff")
        while True:
            reply = self._agent_reply(deadline)
            if reply is not None and reply.get("return") == sync_id:
                return

    def agent(self, command: str, *, timeout: float = 30.0, **args: Any) -> Any:
        """Run a qemu-ga command (e.g. "guest-fsfreeze-freeze") and return its "return" value."""
        deadline = time.monotonic() + timeout
        try:
            self._agent_sync(deadline)
            message: dict[str, Any] = {"execute": command}
            if args:
                message["arguments"] = args
            self._agent_send(message)
            while True:
                reply = self._agent_reply(deadline)
                if reply is None:
                    continue
                if "error" in reply:
                    raise AgentError(command, reply["error"])
                if "return" in reply:
                    return reply["return"]
        except TimeoutError:
            self.close_agent()
            raise RuntimeError(f"qemu-ga did not answer {command} within {timeout:.0f}s") from None
        except OSError as exc:
            self.close_agent()
            raise RuntimeError(f"qemu-ga socket {self.qga_path}: {exc}") from None

    def stop(self, kill: bool = False) -> None:
        self.close_agent()
        super().stop(kill=kill)
        self.qga_path.unlink(missing_ok=True)

    def __enter__(self) -> GuestVM:
        return self.start()
