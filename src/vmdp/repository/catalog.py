"""The SQLite catalog: a queryable cache of the manifests, rebuilt from them when lost."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

from vmdp.errors import RepositoryError
from vmdp.model import Version
from vmdp.repository import manifest

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    backup_id TEXT PRIMARY KEY,
    uuid      TEXT NOT NULL,
    vm        TEXT NOT NULL,
    mode      TEXT NOT NULL,
    started   TEXT NOT NULL,
    finished  TEXT NOT NULL,
    manifest  BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS versions_by_vm ON versions (uuid, finished);
"""


class Catalog:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise RepositoryError(
                f"the catalog {path} is unreadable: {exc}",
                "move it aside; vmdp rebuilds it from the manifests on next use",
            ) from exc

    def close(self) -> None:
        self._db.close()

    def add(self, version: Version) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO versions VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                version.backup_id,
                version.uuid,
                version.vm,
                version.mode.value,
                version.started,
                version.finished,
                manifest.to_bytes(version),
            ),
        )

    def replace_all(self, versions: Iterable[Version]) -> None:
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM versions")
            for v in versions:
                self.add(v)

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM versions").fetchone()[0])

    def versions(self, vm: str | None = None) -> list[Version]:
        """Every version, oldest first, with `active` set on each VM's newest one."""
        rows = self._db.execute(
            "SELECT backup_id, manifest,"
            " row_number() OVER (PARTITION BY uuid ORDER BY finished DESC, backup_id DESC) = 1"
            " FROM versions WHERE (?1 IS NULL OR vm = ?1 OR uuid = ?1) ORDER BY finished, backup_id",
            (vm,),
        ).fetchall()
        result = []
        for backup_id, blob, active in rows:
            version = manifest.from_bytes(blob, f"catalog entry {backup_id}")
            version.active = bool(active)
            result.append(version)
        return result
