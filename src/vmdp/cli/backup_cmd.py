"""`vmdp backup vm`: back up running VMs, or preview what a backup would do."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import click

from vmdp.cli import output
from vmdp.cli.common import common_options, open_repository, resolve
from vmdp.engine.backup import BackupOptions, backup_vm, preview
from vmdp.errors import UsageError, VmdpError
from vmdp.hypervisor.qemu import find_vm
from vmdp.model import VM, Mode
from vmdp.repository import Repository

log = logging.getLogger("vmdp")


@click.group(name="backup")
def backup() -> None:
    """Back up virtual machines."""


@backup.command(name="vm")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@click.option(
    "--mode",
    type=click.Choice(["iffull", "ifincr"], case_sensitive=False),
    default="ifincr",
    show_default=True,
    help="IFFULL reads every allocated block; IFINCR only what changed.",
)
@click.option("--preview", is_flag=True, help="Show disks and the mode each would get; take no snapshot.")
@click.option("--qmp", multiple=True, metavar="GLOB", help="QMP socket glob, repeatable [env VMDP_QMP, ':'-separated].")
@click.option(
    "--scratch-dir", metavar="DIR", help="Where snapshot overlays live [env VMDP_SCRATCH; default /var/tmp/vmdp]."
)
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True, help="Parallel readers per disk.")
@common_options
def backup_vm_cmd(
    names: tuple[str, ...],
    mode: str,
    preview: bool,
    qmp: tuple[str, ...],
    scratch_dir: str | None,
    workers: int,
    repo: str | None,
    config: str | None,
    as_json: bool,
) -> None:
    """Back up each VM NAME: IFFULL the first time, IFINCR (changed blocks only) after."""
    settings = resolve(repo, qmp, scratch_dir, config)
    if not settings.qmp:
        raise UsageError("no QMP socket to look for VMs in", "pass --qmp GLOB or set VMDP_QMP")
    requested = Mode(mode.upper())
    if preview:
        # a preview writes nothing, so a repository that does not exist yet is just empty
        exists = (settings.repository / "vmdp-repo.json").exists()
        repository = open_repository(settings, create=False) if exists else None
        docs = [_preview(repository, find_vm(settings.qmp, name), requested) for name in names]
        _print_preview(docs, as_json)
        return
    repository = open_repository(settings, create=True)
    progress = output.BarProgress() if sys.stderr.isatty() else None
    made, failed = [], []
    for name in names:
        begun = time.monotonic()
        try:
            vm = find_vm(settings.qmp, name)
            if vm.uuid_is_name:
                log.warning("VM %s has no -uuid; its versions are keyed by its name", vm.name)
            opts = BackupOptions(mode=requested, scratch=settings.scratch, workers=workers)
            if progress:
                opts.progress = progress
            version = backup_vm(vm, repository, opts)
        except VmdpError as exc:
            if len(names) == 1:
                raise
            failed.append(name)
            output.stderr.print(f"vmdp: {name}: backup failed: {exc}")
            continue
        made.append(version)
        if not as_json:
            output.stdout.print(output.summary_line(version, time.monotonic() - begun))
    if as_json:
        output.print_json([output.version_doc(v) for v in made])
    if failed:
        raise VmdpError(f"backup failed for {', '.join(failed)}")


def _preview(repository: Repository | None, vm: VM, requested: Mode) -> dict[str, Any]:
    decisions = preview(vm, repository, requested)
    full = [d for d in decisions if d.base is None]
    return {
        "vm": vm.name,
        "uuid": vm.uuid,
        "mode": (Mode.IFFULL if full else Mode.IFINCR).value,
        "disks": [
            {
                "name": d.disk.name,
                "location": d.disk.location,
                "format": d.disk.format,
                "capacity": d.disk.capacity,
                "mode": d.mode.value,
                "tracking": d.tracking,
                "reason": d.reason or "tracking point ok",
            }
            for d in decisions
        ],
    }


def _print_preview(docs: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        output.print_json(docs)
        return
    for doc in docs:
        output.stdout.print(f"[bold]{doc['vm']}[/bold] ({doc['uuid']}): {doc['mode']}")
        for d in doc["disks"]:
            output.stdout.print(
                f"  {d['name']:6} {d['location']}  {d['format']}  {output.size(d['capacity'])}  "
                f"{d['mode']}: {d['reason']}"
            )
