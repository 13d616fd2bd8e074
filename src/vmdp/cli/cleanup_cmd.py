"""`vmdp cleanup vm`: remove a killed run's leftovers without waiting for the next backup."""

from __future__ import annotations

import click

from vmdp.cli import output
from vmdp.cli.common import common_options, open_repository, resolve
from vmdp.engine.backup import cleanup_vm
from vmdp.engine.selection import select_vms
from vmdp.errors import UsageError
from vmdp.hypervisor.qemu import discover


@click.group(name="cleanup")
def cleanup() -> None:
    """Remove leftovers of interrupted runs."""


@cleanup.command(name="vm")
@click.argument("names", nargs=-1, required=True, metavar="NAME|PATTERN...")
@click.option("--qmp", multiple=True, metavar="GLOB", help="QMP socket glob, repeatable [env VMDP_QMP].")
@click.option("--scratch-dir", metavar="DIR", help="Where snapshot overlays live [env VMDP_SCRATCH].")
@common_options
def cleanup_vm_cmd(
    names: tuple[str, ...],
    qmp: tuple[str, ...],
    scratch_dir: str | None,
    repo: str | None,
    config: str | None,
    as_json: bool,
) -> None:
    """Remove the overlays, jobs, NBD exports and temporary bitmaps a killed vmdp left on these VMs.

    The next backup does this too; run it to free QEMU (e.g. to resize a disk) before then.
    """
    settings = resolve(repo, qmp, scratch_dir, config)
    if not settings.qmp:
        raise UsageError("no QMP socket to look for VMs in", "pass --qmp GLOB or set VMDP_QMP")
    found, problems = discover(settings.qmp)
    repository = open_repository(settings, create=False)
    removed = {
        vm.name: cleanup_vm(vm, repository, settings.scratch) for vm in select_vms(found, list(names), [], problems)
    }
    if as_json:
        output.print_json([{"vm": vm, "removed": items} for vm, items in removed.items()])
        return
    for vm, items in removed.items():
        output.stdout.print(f"{vm}: {'removed ' + '; '.join(items) if items else 'nothing left behind'}", markup=False)
