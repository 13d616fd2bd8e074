"""`vmdp upgrade disk`: make disk images able to hold persistent bitmaps (the seed's Update-VMVersion)."""

from __future__ import annotations

from pathlib import Path

import click

from vmdp.cli import output
from vmdp.cli.common import common_options
from vmdp.errors import VmdpError
from vmdp.hypervisor.images import upgrade_image


@click.group(name="upgrade")
def upgrade() -> None:
    """Prepare VM disks for resilient change tracking."""


@upgrade.command(name="disk")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@common_options
def upgrade_disk_cmd(paths: tuple[str, ...], repo: str | None, config: str | None, as_json: bool) -> None:
    """Upgrade qcow2 compat 0.10 images to 1.1 so they can hold persistent bitmaps (VM stopped)."""
    results, failed = [], []
    for path in paths:
        try:
            results.append({"path": path, "result": "ok", "detail": upgrade_image(Path(path))})
        except VmdpError as exc:
            failed.append(exc)
            results.append({"path": path, "result": "failed", "detail": str(exc)})
    if as_json:
        output.print_json(results)
    else:
        for r in results:
            if r["result"] == "ok":
                output.stdout.print(f"{r['path']}: {r['detail']}", markup=False)
    if len(failed) == 1 and len(paths) == 1:
        raise failed[0]
    if failed:
        for r in results:
            if r["result"] == "failed" and not as_json:
                output.stderr.print(f"vmdp: {r['path']}: {r['detail']}", markup=False)
        raise VmdpError(f"{len(failed)} of {len(paths)} images were not upgraded")
