"""The local-directory repository: chunks, indexes, manifests, catalog and locks.

Layout under the repository root::

    vmdp-repo.json              format, chunk size, digest and compression
    chunks/ab/<hex digest>      one stored chunk (see chunks.py)
    indexes/ab/<hex digest>     one stored disk index, encoded like a chunk
    manifests/<backup_id>.json  one version
    catalog.sqlite              derived from manifests/, rebuilt when missing
    locks/                      flock files: one per VM
    tmp/                        temp files before their atomic rename

Order of durability: chunks, then index, then manifest, then catalog row.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path

from vmdp.errors import NotFound, RepositoryError
from vmdp.model import Version
from vmdp.repository import chunks, manifest
from vmdp.repository.catalog import Catalog, CatalogDamaged
from vmdp.repository.files import fsync_dir, os_error, write_atomic
from vmdp.repository.index import DiskIndex
from vmdp.repository.locks import SharedDirLocks, vm_lock

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 4 << 20
CONFIG_NAME = "vmdp-repo.json"


class Repository:
    def __init__(self, root: Path, chunk_size: int, repo_id: str) -> None:
        self.root = root
        self.chunk_size = chunk_size
        self.id = repo_id
        self.tmp = root / "tmp"
        self._dirty_dirs: set[Path] = set()
        self._dirty_lock = threading.Lock()
        self._dir_locks = SharedDirLocks(root / "locks")
        self._sweep_tmp()
        self.catalog = self._open_catalog()

    def _sweep_tmp(self) -> None:
        """Remove temp files that a killed vmdp process left (those of live processes stay)."""
        for tmp in self.tmp.glob(".*.tmp"):
            try:
                pid = int(tmp.name.rsplit(".", 3)[1])
                os.kill(pid, 0)
            except ProcessLookupError:
                tmp.unlink(missing_ok=True)
            except (ValueError, IndexError, PermissionError):
                pass  # not ours to judge

    def _open_catalog(self) -> Catalog:
        """Open the catalog, rebuilding it when it lacks a manifest's version or cannot be read."""
        path = self.root / "catalog.sqlite"
        try:
            catalog = Catalog(path)
            if catalog.backup_ids() != {p.stem for p in (self.root / "manifests").glob("*.json")}:
                catalog.replace_all(self._manifests())
            return catalog
        except CatalogDamaged as exc:
            aside = path.with_name(f"catalog.sqlite.damaged-{int(time.time())}")
            log.warning("%s; moved it to %s and rebuilt it from the manifests", exc.message, aside.name)
            path.rename(aside)
            catalog = Catalog(path)
            catalog.replace_all(self._manifests())
            return catalog

    def _manifests(self) -> list[Version]:
        return [manifest.from_bytes(p.read_bytes(), str(p)) for p in sorted((self.root / "manifests").glob("*.json"))]

    @classmethod
    def open(cls, root: Path, create: bool = True, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Repository:
        """Open the repository at `root`, creating it on first use when `create` is set."""
        config = root / CONFIG_NAME
        if root.exists() and not root.is_dir():
            raise RepositoryError(f"{root} is a file, not a repository directory", "give --repo a directory")
        if not config.exists():
            if not create:
                raise NotFound(f"no vmdp repository at {root}", "check --repo or VMDP_REPO")
            if root.exists() and any(root.iterdir()):
                raise RepositoryError(
                    f"{root} is not empty and is not a vmdp repository", "choose an empty or new directory for --repo"
                )
            try:
                for sub in ("chunks", "indexes", "manifests", "locks", "tmp"):
                    (root / sub).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise os_error(exc, root) from exc
            doc = {
                "format": "vmdp-repo",
                "format_version": 1,
                "id": uuid.uuid4().hex,
                "chunk_size": chunk_size,
                "digest": "blake3",
                "compression": "zstd",
            }
            write_atomic(config, json.dumps(doc, indent=1).encode(), root / "tmp")
        try:
            doc = json.loads(config.read_bytes())
        except (OSError, ValueError) as exc:
            raise RepositoryError(f"cannot read {config}: {exc}", "check the path given with --repo") from exc
        if doc.get("format") != "vmdp-repo" or doc.get("format_version") != 1:
            raise RepositoryError(f"{config} is of an unknown format", "use a vmdp version that wrote it")
        return cls(root, int(doc["chunk_size"]), str(doc["id"]))

    def close(self) -> None:
        self.catalog.close()
        self._dir_locks.close()

    # chunks -----------------------------------------------------------------

    def _object_path(self, kind: str, digest: bytes) -> Path:
        name = digest.hex()
        return self.root / kind / name[:2] / name

    def _put(self, kind: str, digest: bytes, data: bytes | memoryview) -> int:
        path = self._object_path(kind, digest)
        with self._dir_locks.hold(f"{kind}-{path.parent.name}"):
            try:
                os.utime(path)  # reused: a newer mtime tells a concurrent GC it is in use again
                return 0
            except FileNotFoundError:
                pass
            try:
                path.parent.mkdir(exist_ok=True)
            except OSError as exc:
                raise os_error(exc, path.parent) from exc
            tag, payload = chunks.encode(data)
            write_atomic(path, (tag, payload), self.tmp, sync_dir=False)
        with self._dirty_lock:
            self._dirty_dirs.add(path.parent)
        return len(tag) + len(payload)

    def put_chunk(self, data: bytes | memoryview) -> tuple[bytes, int]:
        """Store one slot's content; return its digest and the bytes newly stored (0 if deduplicated)."""
        if chunks.is_zero(data):
            return chunks.ZERO_DIGEST, 0
        digest = chunks.digest(data)
        return digest, self._put("chunks", digest, data)

    def get_chunk(self, digest: bytes, what: str) -> bytes | memoryview:
        path = self._object_path("chunks", digest)
        try:
            stored = path.read_bytes()
        except FileNotFoundError as exc:
            raise RepositoryError(f"{what}: chunk {digest.hex()} is missing", "run 'vmdp verify'") from exc
        return chunks.decode(stored, digest, f"{what} (chunk {digest.hex()})")

    def sync(self) -> None:
        """Make every object written so far durable (their directory entries included)."""
        with self._dirty_lock:
            dirs, self._dirty_dirs = self._dirty_dirs, set()
        for d in sorted(dirs | {d.parent for d in dirs}):
            fsync_dir(d)

    # indexes ----------------------------------------------------------------

    def put_index(self, index: DiskIndex) -> str:
        data = index.to_bytes()
        digest = chunks.digest(data)
        self._put("indexes", digest, data)
        return digest.hex()

    def get_index(self, digest_hex: str, what: str) -> DiskIndex:
        digest = bytes.fromhex(digest_hex)
        try:
            stored = self._object_path("indexes", digest).read_bytes()
        except FileNotFoundError as exc:
            raise RepositoryError(f"{what}: index {digest_hex} is missing", "run 'vmdp verify'") from exc
        return DiskIndex.from_bytes(bytes(chunks.decode(stored, digest, what)), what)

    # versions ---------------------------------------------------------------

    def commit(self, version: Version) -> None:
        """Make `version` restorable: objects first, then its manifest, then the catalog row."""
        self.sync()
        write_atomic(self.root / "manifests" / f"{version.backup_id}.json", manifest.to_bytes(version), self.tmp)
        self.catalog.add(version)

    def versions(self, vm: str | None = None) -> list[Version]:
        return self.catalog.versions(vm)

    def rebuild_catalog(self) -> int:
        """Recreate the catalog from the manifests alone; return the number of versions."""
        found = [manifest.from_bytes(p.read_bytes(), str(p)) for p in sorted((self.root / "manifests").glob("*.json"))]
        self.catalog.replace_all(found)
        return len(found)

    def lock_vm(self, vm_uuid: str, vm: str, what: str = "backup") -> contextlib.AbstractContextManager[None]:
        """Hold the VM's lock (backup or expiry); the kernel releases it if this process dies."""
        return vm_lock(self.root / "locks", vm_uuid, vm, what)

    # maintenance ----------------------------------------------------------------

    def manifests(self) -> list[Version]:
        """Every version, from the manifests themselves (the source of truth)."""
        return self._manifests()

    def object_dir(self, kind: str) -> Path:
        return self.root / kind

    def chunk_exists(self, digest: bytes) -> bool:
        return self._object_path("chunks", digest).exists()

    def quarantined(self) -> set[bytes]:
        """Digests of chunks moved aside as damaged and not written again since."""
        qdir = self.root / "quarantine"
        found = {bytes.fromhex(p.name) for p in qdir.glob("*") if len(p.name) == 64} if qdir.exists() else set()
        return {d for d in found if not self.chunk_exists(d)}

    def quarantine(self, digest: bytes) -> None:
        """Move a damaged chunk aside: the next backup that still has its data writes it again."""
        qdir = self.root / "quarantine"
        qdir.mkdir(exist_ok=True)
        path = self._object_path("chunks", digest)
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, qdir / path.name)
            fsync_dir(path.parent)

    def remove_version(self, backup_id: str) -> None:
        """Forget a version: its manifest, then its catalog row; its objects wait for GC."""
        path = self.root / "manifests" / f"{backup_id}.json"
        try:
            path.unlink()
            fsync_dir(path.parent)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise os_error(exc, path) from exc
        self.catalog.remove(backup_id)
