"""Rendering for people (tables, progress bars, summary lines) and for scripts (JSON)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

__all__ = ["Table"]

from vmdp.model import Mode, Version

# A pipe gets wide lines instead of rich's 80 columns, so tables stay greppable.
stdout = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 250)
stderr = Console(stderr=True, highlight=False)


def size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def version_doc(v: Version, detail: bool = False, history: list[Version] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "vm": v.vm,
        "uuid": v.uuid,
        "backup_id": v.backup_id,
        "mode": v.mode.value,
        "started": v.started,
        "finished": v.finished,
        "active": v.active,
        "reason": v.reason,
        "host": v.host,
        "read_bytes": sum(d.read_bytes for d in v.disks),
        "stored_bytes": sum(d.stored_bytes for d in v.disks),
        "disks": [
            {k: (val.value if isinstance(val, Mode) else val) for k, val in asdict(d).items() if k != "chunk_size"}
            for d in v.disks
        ],
        "excluded_disks": [asdict(d) for d in v.excluded],
        "consistency": v.consistency,
        "snapshot_time": v.snapshot_time,
        "group": v.group,
    }
    if detail and history is not None:
        doc["incrementals_since_full"] = incrementals_since_full(v, history)
    return doc


def incrementals_since_full(v: Version, history: list[Version]) -> int:
    """IFINCR versions of the same VM made after its last IFFULL, up to and including `v`."""
    count = 0
    for other in history:
        if other.uuid != v.uuid:
            continue
        count = 0 if other.mode is Mode.IFFULL else count + 1
        if other.backup_id == v.backup_id:
            break
    return count


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


def versions_table(versions: list[Version], detail: bool) -> None:
    table = Table(box=None, pad_edge=False)
    for col in ("VM", "Backup ID", "Mode", "Finished", "Active", "Read", "Stored", "Reason"):
        table.add_column(col, no_wrap=col != "Reason")
    for v in versions:
        table.add_row(
            v.vm,
            v.backup_id,
            v.mode.value,
            v.finished,
            "yes" if v.active else "",
            size(sum(d.read_bytes for d in v.disks)),
            size(sum(d.stored_bytes for d in v.disks)),
            v.reason or "",
        )
    stdout.print(table)
    if not detail:
        return
    for v in versions:
        stdout.print(
            f"\n[bold]{v.vm}[/bold] {v.backup_id} ({v.mode.value}, {v.consistency}-consistent, {v.uuid}, "
            f"host {v.host}, "
            f"{'group ' + v.group + ', ' if v.group else ''}"
            f"incrementals since last IFFULL: {incrementals_since_full(v, versions)})"
        )
        disks = Table(box=None, pad_edge=False)
        for col in ("Disk", "Location", "Capacity", "Mode", "Read", "Stored", "Tracking", "Tracking point", "Reason"):
            disks.add_column(col)
        for d in v.disks:
            disks.add_row(
                d.name,
                d.location,
                size(d.capacity),
                d.mode.value,
                size(d.read_bytes),
                size(d.stored_bytes),
                d.tracking,
                d.tracking_point or "-",
                d.reason or "",
            )
        for x in v.excluded:
            disks.add_row(
                x.name, x.location, "-", "excluded", "-", "-", "excluded", "-", "excluded by include/exclude rules"
            )
        stdout.print(disks)


def summary_line(v: Version, seconds: float) -> str:
    read = sum(d.read_bytes for d in v.disks)
    stored = sum(d.stored_bytes for d in v.disks)
    reason = f" ({v.reason})" if v.reason else ""
    return (
        f"{v.vm}: {v.mode.value}{reason} {v.backup_id}: read {size(read)}, stored {size(stored)} "
        f"in {seconds:.1f}s ({size(int(read / seconds)) if seconds > 0 else '-'}/s)"
    )


class ProgressBoard:
    """One set of rich progress bars on stderr (bytes, rate, ETA), shared by VMs backed up at once."""

    def __init__(self) -> None:
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=stderr,
        )

    def __enter__(self) -> ProgressBoard:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def task(self) -> BarProgress:
        return BarProgress(self._bar)


class BarProgress:
    """One bar at a time on a board: the engine's Progress for one VM, disk after disk."""

    def __init__(self, bar: Progress) -> None:
        self._bar = bar
        self._task: Any = None

    def start(self, label: str, total: int) -> None:
        self._task = self._bar.add_task(label, total=total or 1)
        if not total:
            self._bar.update(self._task, completed=1)

    def advance(self, nbytes: int) -> None:
        if self._task is not None:
            self._bar.advance(self._task, nbytes)

    def finish(self) -> None:
        self._task = None


def summary_table(outcomes: list[Any]) -> None:
    """After a multi-VM run: one row per VM (mode, bytes read and stored, duration, result)."""
    table = Table(box=None, pad_edge=False)
    for col in ("VM", "Mode", "Read", "Stored", "Duration", "Result"):
        table.add_column(col)
    for o in outcomes:
        v = o.version
        table.add_row(
            o.vm,
            v.mode.value if v else "-",
            size(sum(d.read_bytes for d in v.disks)) if v else "-",
            size(sum(d.stored_bytes for d in v.disks)) if v else "-",
            f"{o.seconds:.1f}s",
            "ok" if v else f"failed: {o.error}",
        )
    stdout.print(table)


def preview_report(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        stdout.print(
            f"[bold]{doc['vm']}[/bold] ({doc['uuid']}): {doc['mode']}, {doc['consistency']}-consistent, "
            f"{doc['snapshot']} snapshot"
        )
        table = Table(box=None, pad_edge=False)
        for col in ("Disk", "Location", "Format", "Capacity", "Allocated", "Mode", "Tracking", "Why"):
            table.add_column(col)
        excluded = {"mode": "excluded", "tracking": "-", "reason": "excluded by include/exclude rules"}
        for d in [*doc["disks"], *({**x, **excluded} for x in doc["excluded_disks"])]:
            table.add_row(
                d["name"],
                d["location"],
                d["format"],
                size(d["capacity"]),
                size(d["allocated"]),
                d["mode"],
                d["tracking"],
                d["reason"],
            )
        stdout.print(table)
        for problem in doc["problems"]:
            stdout.print(f"  [red]would stop the backup:[/red] {problem}")
