"""Expiring versions: by name, or by a retention policy; the newest version is never removed by a policy."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from vmdp.engine.retention import KeepPolicy, decide
from vmdp.errors import NotFound, UsageError
from vmdp.model import Version
from vmdp.repository import Repository


@dataclass
class ExpiryDecision:
    version: Version
    keep: bool
    why: str


def plan_expiry(versions: list[Version], backup_ids: list[str], policy: KeepPolicy | None) -> list[ExpiryDecision]:
    """For one VM's versions: remove the named ones, or what the policy does not keep."""
    if backup_ids:
        known = {v.backup_id for v in versions}
        unknown = [b for b in backup_ids if b not in known]
        if unknown:
            raise NotFound(f"no version {', '.join(unknown)}", "run 'vmdp query vm --inactive' to list versions")
        return [
            ExpiryDecision(
                v, v.backup_id not in backup_ids, "named with --backup-id" if v.backup_id in backup_ids else "not named"
            )
            for v in versions
        ]
    if policy is None or policy.is_empty():
        raise UsageError("nothing says what to expire", "give --backup-id or a --keep-… policy")
    by_id = {v.backup_id: v for v in versions}
    decisions = decide([(v.backup_id, datetime.fromisoformat(v.finished)) for v in versions], policy)
    return [
        ExpiryDecision(by_id[d.backup_id], d.keep, ", ".join(d.reasons) if d.keep else "not selected by the policy")
        for d in decisions
    ]


def expire(repo: Repository, vm_uuid: str, vm: str, decisions: list[ExpiryDecision]) -> None:
    """Remove the versions decided, holding the VM's lock so no backup builds on them meanwhile."""
    with repo.lock_vm(vm_uuid, vm, "expire"):
        for d in decisions:
            if not d.keep:
                repo.remove_version(d.version.backup_id)
