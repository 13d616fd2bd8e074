"""A seeded, bounded random mix of writes, backups, kills of QEMU and of vmdp, host moves,
foreign bitmaps and resizes: after each successful backup, the newest and a random older
version restore bit-identical."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from conftest import VmFactory, assert_clean, cli_env, kill_after, spawn_vmdp
from disk_model import DiskModel
from engine_helpers import backup, restored
from vmdp.hypervisor.qmp import QmpCommandError
from vmdp.model import Version
from vmdp.repository import Repository

MiB = 1 << 20
STEPS = 24
OPS = ["write"] * 6 + ["backup"] * 5 + ["kill-qemu", "kill-vmdp", "kill-vmdp", "move", "foreign", "resize"]


@pytest.mark.parametrize("seed", [11, 29, 47])
def test_random_fault_sequence(vms: VmFactory, workdir: Path, seed: int) -> None:
    rng = random.Random(seed)
    vm = vms(disks={"vda": 24 * MiB, "vdb": 8 * MiB})
    model = DiskModel(vm)
    repo_path, scratch = workdir / "repo", workdir / "scratch"
    repo = Repository.open(repo_path, chunk_size=MiB)
    history: list[tuple[Version, dict[str, bytes]]] = []
    log: list[str] = []

    def check(version: Version) -> None:
        history.append((version, model.snapshot()))
        older = rng.choice(history)
        for v, expected in {id(history[-1]): history[-1], id(older): older}.values():
            assert restored(repo, v, workdir / "out") == expected, f"seed {seed}: {v.backup_id} after {log}"

    for step in range(STEPS):
        op = rng.choice(OPS)
        log.append(op)
        if op == "write":
            for _ in range(rng.randint(1, 4)):
                disk = rng.choice(sorted(model.data))
                size = len(model.data[disk])
                off = rng.randrange(size)
                model.write(disk, off, rng.randint(1, min(2 * MiB, size - off)), rng.randrange(256))
        elif op == "backup":
            check(backup(vm, repo, scratch))
            assert_clean(vm, scratch, {d.name: d.tracking_point or "" for d in history[-1][0].disks})
        elif op == "kill-qemu":
            vm.flush()  # a power loss keeps what the guest flushed
            vm = model.vm = vms.restart(vm, kill=True)
        elif op == "kill-vmdp":
            known = {v.backup_id for v in repo.versions()}
            env = cli_env(workdir, vm.qmp_path, repo_path)
            kill_after(spawn_vmdp("backup", "vm", vm.name, "--workers", "1", env=env), rng.uniform(0.2, 0.9))
            repo.close()
            repo = Repository.open(repo_path, create=False)  # a killed commit may need the catalog caught up
            for v in repo.versions():
                if v.backup_id not in known:  # the killed backup had finished: it must be complete
                    check(v)
        elif op == "move":
            vm = model.vm = vms.restart(vm, socket_name=f"{vm.name}-host{step}")
        elif op == "foreign":
            node = f"d-{rng.choice(sorted(model.data))}"
            vm.query("block-dirty-bitmap-add", node=node, name=f"foreign-{step}", persistent=rng.random() < 0.5)
            if rng.random() < 0.5:
                vm.query("block-dirty-bitmap-remove", node=node, name=f"foreign-{step}")
        elif op == "resize":
            disk = rng.choice(sorted(model.data))
            grow = rng.randint(1, 4) * MiB
            try:
                vm.query("block_resize", **{"node-name": f"d-{disk}"}, size=len(model.data[disk]) + grow)
            except QmpCommandError as exc:
                # a killed vmdp's snapshot job blocks resizing until the next backup sweeps it
                assert "in use" in exc.desc and "kill-vmdp" in log, exc
                continue
            model.data[disk].extend(bytes(grow))
            vm.disks[disk] += grow
    check(backup(vm, repo, scratch))
    assert_clean(vm, scratch, {d.name: d.tracking_point or "" for d in history[-1][0].disks})
    repo.close()
