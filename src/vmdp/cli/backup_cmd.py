"""`vmdp backup vm`: back up running VMs (alone, in parallel or as a group), or preview it."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import click

from vmdp.cli import output
from vmdp.cli.common import common_options, open_repository, resolve
from vmdp.cli.settings import Settings
from vmdp.engine.backup import BackupOptions, VmPolicy, backup_group, backup_vm
from vmdp.engine.preview import Preview, preview_vm
from vmdp.engine.selection import select_vms
from vmdp.errors import UsageError, VmdpError
from vmdp.hypervisor.qemu import discover
from vmdp.model import VM, Disk, Mode, Version
from vmdp.repository import Repository

log = logging.getLogger("vmdp")


@dataclass
class Outcome:
    vm: str
    seconds: float
    version: Version | None = None
    error: BaseException | None = None


@click.group(name="backup")
def backup() -> None:
    """Back up virtual machines."""


@backup.command(name="vm")
@click.argument("names", nargs=-1, metavar="[NAME|PATTERN]...")
@click.option(
    "--mode",
    type=click.Choice(["iffull", "ifincr"], case_sensitive=False),
    default="ifincr",
    show_default=True,
    help="IFFULL reads every allocated block; IFINCR only what changed.",
)
@click.option("--preview", is_flag=True, help="Show what a backup would do; take no snapshot, write nothing.")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Leave out VMs matching PATTERN (repeatable).")
@click.option("--exclude-disk", multiple=True, metavar="DISK", help="Leave out disks by device id or image path.")
@click.option("--include-disk", multiple=True, metavar="DISK", help="Back up only these disks (id or path).")
@click.option("--group", is_flag=True, help="Snapshot all selected VMs at one instant (pause, snapshot, resume).")
@click.option(
    "--app-consistent",
    multiple=True,
    metavar="NAME",
    help="Quiesce this VM with the guest agent; it is snapshotted on its own.",
)
@click.option(
    "--max-parallel",
    type=click.IntRange(1, 64),
    default=None,
    help="VMs backed up at once [config max_parallel; default 1].",
)
@click.option(
    "--allow-transient-tracking",
    is_flag=True,
    help="Back up disks that cannot hold a persistent bitmap, with tracking that ends with QEMU.",
)
@click.option("--qmp", multiple=True, metavar="GLOB", help="QMP socket glob, repeatable [env VMDP_QMP, ':'-separated].")
@click.option(
    "--scratch-dir", metavar="DIR", help="Where snapshot overlays live [env VMDP_SCRATCH; default /var/tmp/vmdp]."
)
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="Parallel readers per disk [default 4].")
@common_options
def backup_vm_cmd(
    names: tuple[str, ...],
    mode: str,
    preview: bool,
    exclude: tuple[str, ...],
    exclude_disk: tuple[str, ...],
    include_disk: tuple[str, ...],
    group: bool,
    app_consistent: tuple[str, ...],
    max_parallel: int | None,
    allow_transient_tracking: bool,
    qmp: tuple[str, ...],
    scratch_dir: str | None,
    workers: int | None,
    repo: str | None,
    config: str | None,
    as_json: bool,
) -> None:
    """Back up the VMs NAME or PATTERN selects (with none: the config's domain, else every VM found).

    The first backup of a VM is IFFULL; later ones are IFINCR, reading only what changed.
    """
    settings = resolve(repo, qmp, scratch_dir, config)
    if not settings.qmp:
        raise UsageError("no QMP socket to look for VMs in", "pass --qmp GLOB or set VMDP_QMP")
    cfg = settings.config
    found, problems = discover(settings.qmp)
    for line in problems:
        log.warning("%s", line)
    vms = select_vms(found, list(names) or cfg.get("domain", []), [*exclude, *cfg.get("exclude", [])], problems)
    if not vms:
        raise UsageError("every VM selected is excluded", "check --exclude and the config's exclude")

    def policy(vm: VM) -> VmPolicy:
        table = settings.vm(vm.name)
        return VmPolicy(
            include_disks=list(include_disk) or table.get("include_disks", []),
            exclude_disks=[*table.get("exclude_disks", []), *exclude_disk],
            app_consistent=table.get("app_consistent", False)
            or any(fnmatch.fnmatchcase(vm.name, p) for p in app_consistent),
            fallback=table.get("app_consistent_fallback", "fail"),
            agent_socket=table.get("agent_socket"),
            allow_transient=allow_transient_tracking
            or table.get("allow_transient_tracking", cfg.get("allow_transient_tracking", False)),
        )

    policies = {vm.name: policy(vm) for vm in vms}
    requested = Mode(mode.upper())
    if preview:
        _preview(settings, vms, policies, requested, group, as_json)
        return
    repository = open_repository(settings, create=True)
    parallel = max_parallel or cfg.get("max_parallel", 1)
    per_disk = workers or cfg.get("workers", 4)
    board = output.ProgressBoard() if sys.stderr.isatty() else None
    with board or contextlib.nullcontext():
        budget = threading.Semaphore(2 * per_disk * max(1, parallel))

        def options() -> BackupOptions:
            opts = BackupOptions(mode=requested, scratch=settings.scratch, workers=per_disk, budget=budget)
            if board:
                opts.progress = board.task()
            return opts

        # with bars on the terminal, summary lines wait until the bars are done
        outcomes = _run(vms, policies, repository, options, group, parallel, echo=not as_json and not board)
    if board and not as_json:
        for o in outcomes:
            if o.version:
                output.stdout.print(output.summary_line(o.version, o.seconds), markup=False)
    _report(outcomes, as_json)


def _run(
    vms: list[VM],
    policies: dict[str, VmPolicy],
    repo: Repository,
    options: Any,
    group: bool,
    parallel: int,
    echo: bool,
) -> list[Outcome]:
    """Back up each VM (group first, then the others up to `parallel` at once); `echo` prints
    each VM's summary line as it finishes."""

    def one(vm: VM) -> Outcome:
        begun = time.monotonic()
        if vm.uuid_is_name:
            log.warning("VM %s has no -uuid; its versions are keyed by its name", vm.name)
        try:
            version = backup_vm(vm, repo, options(), policies[vm.name])
        except VmdpError as exc:
            if len(vms) == 1:
                raise
            return Outcome(vm.name, time.monotonic() - begun, error=exc)
        outcome = Outcome(vm.name, time.monotonic() - begun, version=version)
        if echo:
            output.stdout.print(output.summary_line(version, outcome.seconds), markup=False)
        return outcome

    grouped = [vm for vm in vms if group and not policies[vm.name].app_consistent]
    alone = [vm for vm in vms if vm not in grouped]
    outcomes: list[Outcome] = []
    if grouped:
        begun = time.monotonic()
        results = backup_group(grouped, repo, options(), policies)
        for vm, res in zip(grouped, results, strict=True):
            seconds = time.monotonic() - begun
            if isinstance(res, Version):
                outcomes.append(Outcome(vm.name, seconds, version=res))
                if echo:
                    output.stdout.print(output.summary_line(res, seconds), markup=False)
            else:
                outcomes.append(Outcome(vm.name, seconds, error=res))
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="vmdp-vm") as pool:
        outcomes += list(pool.map(one, alone))
    return outcomes


def _report(outcomes: list[Outcome], as_json: bool) -> None:
    failed = [o for o in outcomes if o.error]
    for o in failed:
        output.stderr.print(f"vmdp: {o.vm}: backup failed: {o.error}", markup=False, highlight=False)
    if as_json:
        docs = []
        for o in outcomes:
            if o.version:
                docs.append({**output.version_doc(o.version), "result": "ok", "duration_seconds": round(o.seconds, 3)})
            else:
                docs.append(
                    {"vm": o.vm, "result": "failed", "error": str(o.error), "duration_seconds": round(o.seconds, 3)}
                )
        output.print_json(docs)
    elif len(outcomes) > 1:
        output.summary_table(outcomes)
    if failed:
        raise VmdpError(f"backup failed for {', '.join(o.vm for o in failed)} ({len(failed)} of {len(outcomes)} VMs)")


def _preview(
    settings: Settings, vms: list[VM], policies: dict[str, VmPolicy], requested: Mode, group: bool, as_json: bool
) -> None:
    # a preview writes nothing, so a repository that does not exist yet is just empty
    exists = (settings.repository / "vmdp-repo.json").exists()
    repository = open_repository(settings, create=False) if exists else None
    docs = [_preview_doc(preview_vm(repository, vm, policies[vm.name], requested, group)) for vm in vms]
    if as_json:
        output.print_json(docs)
    else:
        output.preview_report(docs)


def _disk_doc(disk: Disk) -> dict[str, Any]:
    return {
        "name": disk.name,
        "location": disk.location,
        "format": disk.format,
        "capacity": disk.capacity,
        "allocated": disk.allocated,
    }


def _preview_doc(p: Preview) -> dict[str, Any]:
    return {
        "vm": p.vm.name,
        "uuid": p.vm.uuid,
        "mode": p.mode.value,
        "consistency": p.consistency,
        "snapshot": p.snapshot,
        "disks": [
            {
                **_disk_doc(d.disk),
                "mode": d.mode.value,
                "tracking": d.tracking,
                "reason": d.reason or "tracking point ok",
            }
            for d in p.decisions
        ],
        "excluded_disks": [_disk_doc(d) for d in p.excluded],
        "problems": p.problems,
    }
