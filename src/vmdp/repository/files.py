"""Atomic, durable file writes: temp file + fsync + rename, then the directory is fsynced."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from vmdp.errors import RepositoryError


def os_error(exc: OSError, path: Path | str) -> RepositoryError:
    """Turn an OSError from the repository into one message that names the fix."""
    if exc.errno == errno.ENOSPC:
        return RepositoryError(
            f"the repository filesystem is full while writing {path}",
            "free space there or use another --repo; the versions already stored are intact",
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return RepositoryError(
            f"no permission to write {path}",
            "run as a user who may write the repository, or choose another --repo",
        )
    return RepositoryError(f"cannot write {path}: {exc.strerror}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: Path, data: bytes | memoryview | Sequence[bytes | memoryview], tmp_dir: Path, sync_dir: bool = True
) -> None:
    """Write `data` (one buffer or several, written in order) to `path`: readers see nothing or all of it."""
    parts = [memoryview(data)] if isinstance(data, bytes | memoryview) else [memoryview(p) for p in data]
    tmp = tmp_dir / f".{path.name}.{os.getpid()}.{threading.get_ident():x}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            while parts:
                written = os.writev(fd, parts)
                while parts and written >= len(parts[0]):
                    written -= len(parts.pop(0))
                if parts:
                    parts[0] = parts[0][written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        if sync_dir:
            fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise os_error(exc, path) from exc
