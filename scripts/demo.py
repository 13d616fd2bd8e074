"""`make demo`: a throwaway VM backed up IFFULL then IFINCR, both versions restored and proven
bit-identical with `qemu-img compare`, then everything cleaned up.

Each step runs the real `vmdp` command and prints it, so the demo doubles as a tutorial.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from vmdp.testing.vm import ThrowawayVM

MiB = 1 << 20
VMDP = str(Path(sys.executable).with_name("vmdp"))


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def run(*args: str, env: dict[str, str]) -> None:
    print("$ vmdp " + " ".join(shlex.quote(a) for a in args), flush=True)
    subprocess.run([VMDP, *args], env=env, check=True)


def compare(a: Path, b: Path) -> None:
    print(f"$ qemu-img compare {a} {b}", flush=True)
    subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], check=True)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="vmdp-demo-", dir="/var/tmp"))
    env = {
        **os.environ,
        "VMDP_REPO": str(work / "repo"),
        "VMDP_QMP": str(work / "*.qmp"),
        "VMDP_SCRATCH": str(work / "scratch"),
    }
    vm = ThrowawayVM(work, "demo", {"vda": 256 * MiB, "vdb": 64 * MiB})
    try:
        step(f"start a throwaway VM 'demo' with two disks in {work}")
        vm.start()
        vm.write_data("vda", 0, os.urandom(8 * MiB))
        vm.write_pattern("vda", 100 * MiB, 16 * MiB, 0x5A)
        vm.write_data("vdb", 3 * MiB + 123, os.urandom(MiB))

        step("first backup: IFFULL (reads every allocated block)")
        run("backup", "vm", "demo", env=env)
        # A copy of each disk as it was: flush QEMU's qcow2 caches, then read the image shared (-U).
        for disk in vm.disks:
            vm.qemu_io(disk, "flush")
            subprocess.run(
                ["qemu-img", "convert", "-U", "-O", "qcow2", str(vm.image(disk)), str(work / f"v1-{disk}.qcow2")],
                check=True,
            )

        step("the guest changes 2 MiB; second backup: IFINCR (reads only changed chunks)")
        vm.write_data("vda", 50 * MiB + 4000, os.urandom(2 * MiB))
        run("backup", "vm", "demo", env=env)

        step("the versions kept")
        run("query", "vm", "demo", "--inactive", "--detail", env=env)

        step("restore both versions and prove them bit-identical")
        vm.stop()  # QEMU flushes the images: they now hold exactly the second version
        versions = subprocess.run(
            [VMDP, "query", "vm", "demo", "--inactive", "--json"], env=env, check=True, capture_output=True, text=True
        ).stdout
        first = json.loads(versions)[0]["backup_id"]
        run("restore", "vm", "demo", "--backup-id", first, "--target-dir", str(work / "r1"), env=env)
        run("restore", "vm", "demo", "--target-dir", str(work / "r2"), env=env)
        for disk in vm.disks:
            compare(work / f"v1-{disk}.qcow2", work / "r1" / f"demo-{disk}.qcow2")
            compare(vm.image(disk), work / "r2" / f"demo-{disk}.qcow2")
        step("demo passed: both versions restored bit-identical")
        return 0
    except subprocess.CalledProcessError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        vm.stop(kill=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
