"""`vmdp restore vm`: write one image per disk of a chosen version."""

from __future__ import annotations

import contextlib
import sys
from datetime import date, datetime, time
from pathlib import Path

import click

from vmdp.cli import output
from vmdp.cli.common import common_options, open_repository, resolve
from vmdp.engine.restore import FORMATS, restore_version, select_version, target_paths
from vmdp.errors import UsageError


def _parse_pit(pitdate: str | None, pittime: str | None) -> datetime | None:
    if pittime and not pitdate:
        raise UsageError("--pittime needs --pitdate", "add --pitdate YYYY-MM-DD")
    if not pitdate:
        return None
    try:
        day = date.fromisoformat(pitdate)
    except ValueError:
        raise UsageError(f"bad --pitdate {pitdate!r}", "write it as YYYY-MM-DD, e.g. 2026-11-25") from None
    try:
        at = time.fromisoformat(pittime) if pittime else time(23, 59, 59)
    except ValueError:
        raise UsageError(f"bad --pittime {pittime!r}", "write it as HH:MM:SS, e.g. 14:30:00") from None
    return datetime.combine(day, at).astimezone()


@click.group(name="restore")
def restore() -> None:
    """Restore backups."""


@restore.command(name="vm")
@click.argument("name")
@click.option("--backup-id", metavar="ID", help="The version to restore (see 'query vm --inactive').")
@click.option("--pitdate", metavar="YYYY-MM-DD", help="Restore the latest version made at or before this date.")
@click.option("--pittime", metavar="HH:MM:SS", help="With --pitdate: the time of day (local time).")
@click.option("--target-dir", required=True, type=click.Path(file_okay=False), help="Directory for the images.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="qcow2", show_default=True, help="Image format.")
@click.option("--vmname", metavar="NEWNAME", help="Name the images after NEWNAME instead of the VM.")
@click.option("--replace", is_flag=True, help="Overwrite images that already exist.")
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True, help="Parallel chunk readers.")
@common_options
def restore_vm_cmd(
    name: str,
    backup_id: str | None,
    pitdate: str | None,
    pittime: str | None,
    target_dir: str,
    fmt: str,
    vmname: str | None,
    replace: bool,
    workers: int,
    repo: str | None,
    config: str | None,
    as_json: bool,
) -> None:
    """Restore VM NAME's active version, or the one --backup-id or --pitdate names, into --target-dir."""
    if backup_id and pitdate:
        raise UsageError("--backup-id and --pitdate exclude each other", "give one of them")
    pit = _parse_pit(pitdate, pittime)
    repository = open_repository(resolve(repo, config=config), create=False)
    version = select_version(repository.versions(name), name, backup_id, pit)
    targets = target_paths(version, Path(target_dir), fmt, vmname, replace)
    board = output.ProgressBoard() if sys.stderr.isatty() else None
    with board or contextlib.nullcontext():
        restored = restore_version(repository, version, targets, workers, board.task() if board else None)
    if as_json:
        output.print_json(
            {
                "vm": version.vm,
                "backup_id": version.backup_id,
                "disks": [{"name": r.name, "path": str(r.path), "format": r.format} for r in restored],
            }
        )
    else:
        for r in restored:
            output.stdout.print(f"{version.vm} {r.name} ({version.backup_id}) → {r.path}")
