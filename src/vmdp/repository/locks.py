"""Locks between vmdp processes sharing a repository, all `flock`-based: the kernel releases them
when a process dies, so a killed vmdp can never leave a lock stuck.

- ``locks/vm-<uuid>.lock``: exclusive while a backup or an expiry of that VM runs; holds
  "<pid> <start epoch>" so GC knows how old the oldest running backup is.
- ``locks/objects-<kind>-<xy>.lock``: per object directory (``chunks/xy``). Writers take it shared
  around "exists? then touch : write"; GC takes it exclusive while it sweeps that directory, so
  a chunk a backup just decided to reuse is never deleted under it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from vmdp.errors import LockedError
from vmdp.repository.files import os_error


class SharedDirLocks:
    """Per-directory shared flocks for one process, reference-counted across its threads.

    One open file per directory: flock belongs to the open file, so a thread's unlock would
    drop a lock another thread still relies on without the count.
    """

    def __init__(self, lock_dir: Path) -> None:
        self.lock_dir = lock_dir
        self._mutex = threading.Lock()
        self._fds: dict[str, int] = {}
        self._counts: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, name: str) -> Iterator[None]:
        with self._mutex:
            if name not in self._fds:
                path = self.lock_dir / f"objects-{name}.lock"
                try:
                    self._fds[name] = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                except OSError as exc:
                    raise os_error(exc, path) from exc
            if not self._counts.get(name):
                fcntl.flock(self._fds[name], fcntl.LOCK_SH)
            self._counts[name] = self._counts.get(name, 0) + 1
        try:
            yield
        finally:
            with self._mutex:
                self._counts[name] -= 1
                if not self._counts[name]:
                    fcntl.flock(self._fds[name], fcntl.LOCK_UN)

    def close(self) -> None:
        with self._mutex:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


@contextlib.contextmanager
def exclusive_dir(lock_dir: Path, name: str) -> Iterator[None]:
    fd = os.open(lock_dir / f"objects-{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def vm_lock(lock_dir: Path, vm_uuid: str, vm: str, what: str = "backup") -> Iterator[None]:
    """Hold the VM's lock; raise LockedError naming the holder when another process has it."""
    path = lock_dir / f"vm-{vm_uuid}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise os_error(exc, path) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").split()
            pid = holder[0] if holder else "unknown"
            raise LockedError(
                f"another backup of VM {vm} is running (pid {pid})",
                "wait for it to finish, then retry",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {time.time():.3f} {what}".encode(), 0)
        yield
    finally:
        os.close(fd)


def running_since(lock_dir: Path) -> float | None:
    """When the oldest backup still running on this repository started (epoch), or None."""
    oldest = None
    for path in lock_dir.glob("vm-*.lock"):
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                continue  # nobody holds it
            except BlockingIOError:
                pass
            fields = os.pread(fd, 64, 0).decode(errors="replace").split()
            try:
                started = float(fields[1])
            except (IndexError, ValueError):
                started = 0.0  # being written just now, or unreadable: assume the oldest
            oldest = started if oldest is None else min(oldest, started)
        finally:
            os.close(fd)
    return oldest


@contextlib.contextmanager
def exclusive_lock(lock_dir: Path, name: str, what: str) -> Iterator[None]:
    """A repository-wide operation that must run once at a time (e.g. GC)."""
    path = lock_dir / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise LockedError(f"{what} is already running (pid {pid})", "wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
