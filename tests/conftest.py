"""Fixtures on real parts: QEMU VMs, a repository directory, the vmdp command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vmdp.hypervisor.qmp import QmpCommandError
from vmdp.testing.vm import ThrowawayVM

VMDP = [sys.executable, "-m", "vmdp"]


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short paths: unix socket paths are limited to 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="vmdp-t-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class VmFactory:
    """Starts throwaway VMs in the test's work dir and stops every one at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[ThrowawayVM] = []

    def __call__(self, name: str = "vm1", disks: dict[str, int] | None = None, **kw: Any) -> ThrowawayVM:
        vm = ThrowawayVM(self.workdir, name, disks or {"vda": 16 << 20}, **kw).start()
        self.started.append(vm)
        return vm

    def restart(self, vm: ThrowawayVM, kill: bool = False, **changes: Any) -> ThrowawayVM:
        """Stop `vm` (cleanly, or as a power loss) and start it again with its disks and UUID."""
        vm.stop(kill=kill)
        args: dict[str, Any] = {"uuid": vm.uuid, "images": vm.images, "fmt": vm.fmt, "compat": vm.compat, **changes}
        disks = args.pop("disks", vm.disks)
        return self(vm.name, disks, **args)

    def stop_all(self) -> None:
        for vm in self.started:
            vm.stop(kill=True)


@pytest.fixture
def vms(workdir: Path) -> Iterator[VmFactory]:
    factory = VmFactory(workdir)
    yield factory
    factory.stop_all()


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def cli_env(workdir: Path, qmp: Path | str | None = None, repo: Path | None = None) -> dict[str, str]:
    """The environment of a vmdp command in a test: repository, sockets and scratch in the work dir."""
    return {
        **os.environ,
        "VMDP_REPO": str(repo or workdir / "repo"),
        "VMDP_QMP": str(qmp or workdir / "*.qmp"),
        "VMDP_SCRATCH": str(workdir / "scratch"),
        "VMDP_CONFIG": "",
    }


def spawn_vmdp(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """Start a vmdp command in the background (to kill it, or to run beside another)."""
    return subprocess.Popen([*VMDP, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_after(proc: subprocess.Popen[str], delay: float) -> None:
    """SIGKILL `proc` after `delay` seconds: no clean-up of its own can run."""
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


@pytest.fixture
def vmdp(workdir: Path) -> Any:
    env = cli_env(workdir)

    def run(*args: str, env_extra: dict[str, str] | None = None) -> Run:
        proc = subprocess.run(
            [*VMDP, *args], capture_output=True, text=True, env={**env, **(env_extra or {})}, timeout=600
        )
        return Run(proc.returncode, proc.stdout, proc.stderr)

    return run


def vmdp_state(vm: ThrowawayVM) -> dict[str, Any]:
    """What of vmdp's QEMU holds: nodes, jobs, exports, NBD server, bitmaps per disk."""
    try:
        vm.query("nbd-server-stop")
        server = True
    except QmpCommandError:
        server = False
    bitmaps = {}
    for dev in vm.query("query-block"):  # type: ignore[union-attr]
        name = dev["qdev"].split("/")[3]
        bitmaps[name] = sorted(b["name"] for b in dev["inserted"].get("dirty-bitmaps", []) if "name" in b)
    return {
        "nodes": [
            n["node-name"]
            for n in vm.query("query-named-block-nodes", flat=True)  # type: ignore[union-attr]
            if n["node-name"].startswith("vmdp-")
        ],
        "jobs": [j["id"] for j in vm.query("query-jobs")],  # type: ignore[union-attr]
        "exports": [e["id"] for e in vm.query("query-block-exports")],  # type: ignore[union-attr]
        "nbd_server": server,
        "bitmaps": bitmaps,
    }


def assert_clean(vm: ThrowawayVM, scratch: Path, points: dict[str, str]) -> None:
    """Nothing of vmdp's is left but the tracking point `points[disk]` on each disk."""
    state = vmdp_state(vm)
    assert state["nodes"] == [] and state["jobs"] == [] and state["exports"] == []
    assert state["nbd_server"] is False
    vmdp_bitmaps = {d: [b for b in names if b.startswith("vmdp-")] for d, names in state["bitmaps"].items()}
    assert vmdp_bitmaps == {d: [p] for d, p in points.items()}
    assert not scratch.exists() or list(scratch.iterdir()) == []
