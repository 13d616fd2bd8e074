"""The manifest: one JSON document per version, the source of truth the catalog is rebuilt from."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from vmdp.errors import CorruptData
from vmdp.model import DiskVersion, ExcludedDisk, Mode, Version

FORMAT = "vmdp-manifest"
FORMAT_VERSION = 1


def to_bytes(version: Version) -> bytes:
    doc: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(version)}
    doc.pop("active")
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def from_bytes(data: bytes, what: str) -> Version:
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        if doc.pop("format") != FORMAT or doc.pop("format_version") != FORMAT_VERSION:
            raise ValueError("unknown format")
        disks = [DiskVersion(**{**d, "mode": Mode(d["mode"])}) for d in doc.pop("disks")]
        excluded = [ExcludedDisk(**d) for d in doc.pop("excluded", [])]
        return Version(**{**doc, "mode": Mode(doc["mode"]), "disks": disks, "excluded": excluded})
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptData(f"{what} is not a valid manifest: {exc}") from exc
