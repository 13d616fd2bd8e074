"""Repository lifecycle commands: `expire vm`, `gc`, `verify`, `repo check|info|rebuild-catalog`."""

from __future__ import annotations

import fnmatch
import sys
from dataclasses import asdict
from typing import Any

import click

from vmdp.cli import output
from vmdp.cli.common import common_options, open_repository, resolve
from vmdp.cli.settings import Settings
from vmdp.engine.expire import expire, plan_expiry
from vmdp.engine.retention import KeepPolicy
from vmdp.errors import NotFound, VmdpError
from vmdp.repository import maintenance
from vmdp.repository.locks import exclusive_lock

KEEPS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


@click.group(name="expire")
def expire_group() -> None:
    """Remove versions by name or by a retention policy."""


def _keep_options(func: Any) -> Any:
    for keep in reversed(KEEPS):
        func = click.option(
            f"--keep-{keep}",
            type=click.IntRange(0),
            default=None,
            metavar="N",
            help=f"Keep the newest version of each of the last N {keep} periods."
            if keep != "last"
            else "Keep the N newest versions.",
        )(func)
    return func


@expire_group.command(name="vm")
@click.argument("pattern")
@click.option("--backup-id", multiple=True, metavar="ID", help="Remove this version (repeatable).")
@_keep_options
@click.option("--dry-run", is_flag=True, help="List what would go and why; remove nothing.")
@common_options
def expire_vm_cmd(
    pattern: str,
    backup_id: tuple[str, ...],
    dry_run: bool,
    repo: str | None,
    config: str | None,
    as_json: bool,
    **keeps: int | None,
) -> None:
    """Expire versions of the VMs PATTERN names: by --backup-id, or keeping what a policy selects.

    A policy (--keep-last/hourly/daily/weekly/monthly/yearly, or keep_* in the config) follows
    Proxmox Backup Server's prune rules; the newest version of a VM is never removed by a policy.
    """
    settings = resolve(repo, config=config)
    repository = open_repository(settings, create=False)
    versions = repository.versions()
    by_vm: dict[str, list[Any]] = {}
    for v in versions:
        if fnmatch.fnmatchcase(v.vm, pattern) or v.uuid == pattern:
            by_vm.setdefault(v.uuid, []).append(v)
    if not by_vm:
        raise NotFound(f"no backup of a VM matching {pattern}", "run 'vmdp query vm' to list protected VMs")
    docs = []
    for vm_versions in by_vm.values():
        name = vm_versions[-1].vm
        policy = _policy(settings, name, keeps)
        ids = [b for b in backup_id if b in {v.backup_id for v in vm_versions}] if backup_id else []
        if backup_id and not ids and len(by_vm) > 1:
            continue
        decisions = plan_expiry(vm_versions, list(backup_id) if len(by_vm) == 1 else ids, policy)
        if not dry_run:
            expire(repository, vm_versions[-1].uuid, name, decisions)
        for d in decisions:
            docs.append(
                {
                    "vm": name,
                    "backup_id": d.version.backup_id,
                    "finished": d.version.finished,
                    "action": "keep" if d.keep else ("would remove" if dry_run else "removed"),
                    "why": d.why,
                }
            )
    if as_json:
        output.print_json(docs)
        return
    table = output.Table(box=None, pad_edge=False)
    for col in ("VM", "Backup ID", "Finished", "Action", "Why"):
        table.add_column(col)
    for d in docs:
        table.add_row(d["vm"], d["backup_id"], d["finished"], d["action"], d["why"])
    output.stdout.print(table)
    if not dry_run and any(d["action"] == "removed" for d in docs):
        output.stdout.print("space comes back with 'vmdp gc'")


def _policy(settings: Settings, vm: str, keeps: dict[str, int | None]) -> KeepPolicy:
    table, top = settings.vm(vm), settings.config
    values = {k: keeps.get(f"keep_{k}") for k in KEEPS}
    if all(v is None for v in values.values()):
        values = {k: table.get(f"keep_{k}", top.get(f"keep_{k}")) for k in KEEPS}
    return KeepPolicy(**{k: v or 0 for k, v in values.items()})


@click.command(name="gc")
@click.option("--dry-run", is_flag=True, help="Count what would be freed; remove nothing.")
@click.option(
    "--grace",
    type=click.FloatRange(0),
    default=maintenance.GRACE_SECONDS,
    show_default=True,
    metavar="SECONDS",
    help="Keep unreferenced objects younger than this (before the oldest running backup).",
)
@common_options
def gc_cmd(dry_run: bool, grace: float, repo: str | None, config: str | None, as_json: bool) -> None:
    """Free the chunks and indexes no kept version references. Safe while backups run."""
    repository = open_repository(resolve(repo, config=config), create=False)
    with exclusive_lock(repository.root / "locks", "gc", "a garbage collection"):
        report = maintenance.gc(repository, grace=grace, dry_run=dry_run)
    if as_json:
        output.print_json({**asdict(report), "dry_run": dry_run})
    else:
        verb = "would free" if dry_run else "freed"
        output.stdout.print(
            f"{verb} {output.size(report.bytes_freed)}: {report.chunks_removed} chunks, "
            f"{report.indexes_removed} indexes; {report.objects_kept} objects kept"
        )


@click.command(name="verify")
@click.argument("name", required=False)
@click.option("--backup-id", metavar="ID", help="Verify only this version.")
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True)
@common_options
def verify_cmd(
    name: str | None, backup_id: str | None, workers: int, repo: str | None, config: str | None, as_json: bool
) -> None:
    """Read every chunk the chosen versions reference and check it against its digest."""
    repository = open_repository(resolve(repo, config=config), create=False)
    versions = repository.versions(name)
    if backup_id:
        versions = [v for v in versions if v.backup_id == backup_id]
    if not versions:
        raise NotFound("no version to verify", "run 'vmdp query vm --inactive' to list versions")
    board = output.ProgressBoard() if sys.stderr.isatty() and not as_json else None
    if board:
        with board:
            task = board.task()
            report = maintenance.verify(
                repository, versions, workers, task.advance, lambda n: task.start("verify chunks", n)
            )
    else:
        report = maintenance.verify(repository, versions, workers)
    if as_json:
        output.print_json({**asdict(report), "ok": not report.damaged})
    else:
        output.stdout.print(
            f"verified {report.versions} versions: {report.chunks_checked} chunks, {output.size(report.bytes_checked)}"
        )
        for d in report.damaged:
            ranges = ", ".join(f"{a}-{b}" for a, b in d.ranges[:8]) + (" …" if len(d.ranges) > 8 else "")
            output.stdout.print(f"DAMAGED {d.vm} {d.backup_id} {d.disk}: {d.problem}; bytes {ranges}", markup=False)
    if report.damaged:
        raise VmdpError(
            f"{len(report.damaged)} disk versions are damaged",
            "the next backup of each VM writes the quarantined chunks again if the VM still has that data",
        )


@click.group(name="repo")
def repo_group() -> None:
    """Check, describe and repair the repository."""


@repo_group.command(name="check")
@common_options
def repo_check_cmd(repo: str | None, config: str | None, as_json: bool) -> None:
    """Check the structure quickly (manifests, indexes, chunks present) without reading chunk data."""
    repository = open_repository(resolve(repo, config=config), create=False)
    problems = maintenance.check(repository)
    if as_json:
        output.print_json({"ok": not problems, "problems": problems})
    else:
        for p in problems:
            output.stdout.print(f"PROBLEM {p}", markup=False)
        if not problems:
            output.stdout.print(f"{repository.root}: structure ok ({len(repository.versions())} versions)")
    if problems:
        raise VmdpError(f"{len(problems)} problems found", "run 'vmdp verify' for details on the data")


@repo_group.command(name="info")
@common_options
def repo_info_cmd(repo: str | None, config: str | None, as_json: bool) -> None:
    """Versions, bytes protected and stored, dedup and compression ratios, space per VM."""
    repository = open_repository(resolve(repo, config=config), create=False)
    report = maintenance.info(repository)
    if as_json:
        output.print_json(asdict(report))
        return
    output.stdout.print(
        f"{repository.root}: {report.versions} versions of {report.vms} VMs; "
        f"{output.size(report.logical_bytes)} protected, {output.size(report.stored_bytes)} stored; "
        f"dedup {report.dedup_ratio:.2f}x, compression {report.compression_ratio:.2f}x"
    )
    table = output.Table(box=None, pad_edge=False)
    for col in ("VM", "Versions", "Protected", "Referenced", "Only this VM"):
        table.add_column(col)
    for s in report.per_vm:
        table.add_row(
            s.vm,
            str(s.versions),
            output.size(s.logical_bytes),
            output.size(s.referenced_bytes),
            output.size(s.exclusive_bytes),
        )
    output.stdout.print(table)


@repo_group.command(name="rebuild-catalog")
@common_options
def repo_rebuild_cmd(repo: str | None, config: str | None, as_json: bool) -> None:
    """Recreate the catalog from the manifests alone (after it was lost or damaged)."""
    settings = resolve(repo, config=config)
    catalog = settings.repository / "catalog.sqlite"
    if catalog.exists():
        catalog.rename(catalog.with_name("catalog.sqlite.old"))
    repository = open_repository(settings, create=False)
    count = repository.rebuild_catalog()
    if as_json:
        output.print_json({"versions": count})
    else:
        output.stdout.print(f"catalog rebuilt from {count} manifests")
