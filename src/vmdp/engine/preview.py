"""`backup vm --preview`: what a backup would do and what would stop it, with no snapshot and no write."""

from __future__ import annotations

from dataclasses import dataclass, field

from vmdp.engine.backup import VmPolicy, plan
from vmdp.engine.planning import DiskDecision
from vmdp.errors import LockedError, VmdpError
from vmdp.hypervisor.agent import GuestAgent
from vmdp.hypervisor.qemu import agent_socket
from vmdp.hypervisor.qmp import Qmp
from vmdp.model import VM, Disk, Mode
from vmdp.repository import Repository


@dataclass
class Preview:
    vm: VM
    mode: Mode
    consistency: str
    snapshot: str  # "own" or "group"
    decisions: list[DiskDecision]
    excluded: list[Disk]
    problems: list[str] = field(default_factory=list)


def preview_vm(repo: Repository | None, vm: VM, policy: VmPolicy, requested: Mode, group: bool) -> Preview:
    p = plan(vm, repo, requested, policy)
    problems = p.problems()
    if repo:
        try:
            with repo.lock_vm(vm.uuid, vm.name):
                pass
        except LockedError as exc:
            problems.append(exc.message)
    if policy.app_consistent:
        problem = agent_problem(vm, policy)
        if problem:
            problems.append(
                problem if policy.fallback == "fail" else f"{problem} (would fall back to crash-consistent)"
            )
    return Preview(
        vm=vm,
        mode=Mode.IFFULL if any(d.base is None for d in p.decisions) else Mode.IFINCR,
        consistency="application" if policy.app_consistent else "crash",
        snapshot="own" if policy.app_consistent or not group else "group",
        decisions=p.decisions,
        excluded=p.excluded,
        problems=problems,
    )


def agent_problem(vm: VM, policy: VmPolicy) -> str | None:
    """Why the guest agent could not quiesce this VM now, or None when it answers."""
    try:
        path = policy.agent_socket
        if not path:
            with Qmp(vm.qmp) as qmp:
                path = agent_socket(qmp)
        if not path:
            return "no guest agent channel (org.qemu.guest_agent.0)"
        GuestAgent(path, timeout=5).close()
    except VmdpError as exc:
        return f"guest agent: {exc}"
    return None
