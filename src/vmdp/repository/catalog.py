"""The SQLite catalog: a queryable cache of the manifests, rebuilt from them when lost or damaged."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from vmdp.errors import RepositoryError
from vmdp.model import Version
from vmdp.repository import manifest

SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    backup_id TEXT PRIMARY KEY,
    uuid      TEXT NOT NULL,
    vm        TEXT NOT NULL,
    finished  TEXT NOT NULL,  -- UTC, so that text order is time order across offset changes
    manifest  BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS versions_by_vm ON versions (uuid, finished);
"""
T = TypeVar("T")


class CatalogDamaged(RepositoryError):
    """SQLite cannot read the catalog file."""


def _utc(stamp: str) -> str:
    return datetime.fromisoformat(stamp).astimezone(UTC).isoformat(timespec="microseconds")


class Catalog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)

        def setup() -> None:
            self._db.execute("PRAGMA synchronous=FULL")
            if self._db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                self._db.executescript(f"DROP TABLE IF EXISTS versions; PRAGMA user_version={SCHEMA_VERSION};")
            self._db.executescript(_SCHEMA)

        self._sql(setup)

    def _sql(self, op: Callable[[], T]) -> T:
        """Run `op`, turning SQLite's errors into messages that name the fix."""
        try:
            return op()
        except sqlite3.OperationalError as exc:
            if "full" in str(exc):
                raise RepositoryError(
                    f"the repository filesystem is full while writing {self.path}",
                    "free space there or use another --repo; the versions already stored are intact",
                ) from exc
            raise CatalogDamaged(f"the catalog {self.path} is unusable: {exc}", "check its permissions") from exc
        except sqlite3.DatabaseError as exc:
            raise CatalogDamaged(
                f"the catalog {self.path} is unreadable: {exc}",
                "move it aside; vmdp rebuilds it from the manifests on next use",
            ) from exc

    def close(self) -> None:
        self._db.close()

    def _insert(self, version: Version) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO versions VALUES (?, ?, ?, ?, ?)",
            (version.backup_id, version.uuid, version.vm, _utc(version.finished), manifest.to_bytes(version)),
        )

    def add(self, version: Version) -> None:
        self._sql(lambda: self._insert(version))

    def replace_all(self, versions: Iterable[Version]) -> None:
        def replace() -> None:
            with self._db:
                self._db.execute("BEGIN")
                self._db.execute("DELETE FROM versions")
                for v in versions:
                    self._insert(v)

        self._sql(replace)

    def remove(self, backup_id: str) -> None:
        self._sql(lambda: self._db.execute("DELETE FROM versions WHERE backup_id = ?", (backup_id,)))

    def backup_ids(self) -> set[str]:
        return self._sql(lambda: {row[0] for row in self._db.execute("SELECT backup_id FROM versions")})

    def versions(self, vm: str | None = None) -> list[Version]:
        """Every version (of `vm`, by name or uuid), oldest first, `active` set on each VM's newest."""
        rows = self._sql(
            lambda: self._db.execute(
                "SELECT backup_id, manifest, active FROM ("
                "  SELECT *, row_number() OVER (PARTITION BY uuid ORDER BY finished DESC, backup_id DESC) = 1"
                "  AS active FROM versions)"
                " WHERE (?1 IS NULL OR vm = ?1 OR uuid = ?1) ORDER BY finished, backup_id",
                (vm,),
            ).fetchall()
        )
        result = []
        for backup_id, blob, active in rows:
            version = manifest.from_bytes(blob, f"catalog entry {backup_id}")
            version.active = bool(active)
            result.append(version)
        return result
