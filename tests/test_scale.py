"""A multi-disk VM whose disks are far larger than the memory vmdp may use."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conftest import cli_env

MiB = 1 << 20
GiB = 1 << 30
RSS_LIMIT = 200 * MiB


def run_measured(args: list[str], env: dict[str, str]) -> tuple[int, int, str]:
    """Run vmdp; return its exit code, peak RSS in bytes and stderr.

    The peak is the VmHWM of the vmdp process itself, polled until it exits: rusage's
    ru_maxrss would also count the pytest process it was forked from.
    """
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "vmdp", *args], env=env, stdout=subprocess.DEVNULL, stderr=err)
        peak = 0
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                peak = max(peak, int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024)  # type: ignore[union-attr]
            except (OSError, AttributeError):
                pass  # the process is exiting
            time.sleep(0.02)
        err.seek(0)
        return proc.returncode, peak, err.read()


def test_large_sparse_multi_disk_backup_has_bounded_memory(vms, workdir: Path) -> None:
    vm = vms(disks={"vda": 16 * GiB, "vdb": 2 * GiB})
    written = 0
    for i in range(8):
        vm.write_data("vda", i * 2 * GiB + 12345, os.urandom(40 * MiB))
        vm.write_pattern("vda", i * 2 * GiB + GiB, 40 * MiB, i + 1)
        written += 80 * MiB
    vm.write_data("vdb", GiB - 4096, os.urandom(64 * MiB))
    written += 64 * MiB
    env = cli_env(workdir, vm.qmp_path)
    code, rss, err = run_measured(["backup", "vm", "vm1"], env)
    assert code == 0, err
    assert written > 3 * RSS_LIMIT and rss < RSS_LIMIT, f"peak RSS {rss / MiB:.0f} MiB"
    assert list((workdir / "scratch").iterdir()) == []
    vm.stop()  # QEMU flushes the images: they now hold exactly the backed-up state
    code, rss, err = run_measured(["restore", "vm", "vm1", "--target-dir", str(workdir / "r"), "--format", "raw"], env)
    assert code == 0, err
    assert rss < RSS_LIMIT, f"restore peak RSS {rss / MiB:.0f} MiB"
    for disk in ("vda", "vdb"):
        restored = workdir / "r" / f"vm1-{disk}.raw"
        assert restored.stat().st_blocks * 512 < GiB, "the restored image is not sparse"
        cmp = subprocess.run(
            ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(vm.image(disk)), str(restored)],
            capture_output=True,
            text=True,
        )
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
