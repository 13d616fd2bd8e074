"""Calling the engine as the CLI does, for tests that need to look inside or inject faults."""

from __future__ import annotations

from pathlib import Path

from vmdp.engine.backup import BackupOptions, backup_vm
from vmdp.engine.restore import restore_version, target_paths
from vmdp.hypervisor.qemu import find_vm
from vmdp.model import Version
from vmdp.repository import Repository
from vmdp.testing.vm import ThrowawayVM


def backup(vm: ThrowawayVM, repo: Repository, scratch: Path, **kw: object) -> Version:
    return backup_vm(find_vm([str(vm.qmp_path)], vm.name), repo, BackupOptions(scratch=scratch, **kw))  # type: ignore[arg-type]


def restored(repo: Repository, version: Version, out: Path) -> dict[str, bytes]:
    """The disks of `version` restored as raw images, by disk name."""
    targets = restore_version(repo, version, target_paths(version, out, "raw", None, replace=True))
    return {t.name: t.path.read_bytes() for t in targets}
