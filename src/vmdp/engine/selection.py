"""Choosing VMs by name or pattern, as `backup vm` does with its arguments and the config's domain."""

from __future__ import annotations

import fnmatch
import glob

from vmdp.errors import NotFound
from vmdp.model import VM


def _hits(vm: VM, pattern: str) -> bool:
    return fnmatch.fnmatchcase(vm.name, pattern) or vm.uuid == pattern


def select_vms(found: list[VM], patterns: list[str], excludes: list[str], problems: list[str]) -> list[VM]:
    """The VMs the patterns name (all found VMs when there is none), less the excluded ones.

    A pattern that matches no running VM is an error naming what was found and what did not answer.
    """
    chosen: list[VM] = []
    for pattern in patterns or ["*"]:
        hits = [vm for vm in found if _hits(vm, pattern)]
        if not hits and (patterns or not found):
            known = ", ".join(sorted(v.name for v in found)) or "none"
            detail = "; ".join(problems)
            what = f"no running VM matches {pattern}" if glob.has_magic(pattern) else f"no running VM named {pattern}"
            raise NotFound(
                f"{what} (found: {known}){'; ' + detail if detail else ''}",
                "check the name (QEMU's -name) and that --qmp or VMDP_QMP matches its QMP socket",
            )
        chosen += [vm for vm in hits if vm not in chosen]
    return [vm for vm in chosen if not any(_hits(vm, x) for x in excludes)]
