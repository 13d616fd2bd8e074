"""Benchmark vmdp against the tools that bound it (nbdcopy for reading, qemu-img convert for restoring) and restic.

One run, on a throwaway QEMU VM with one qcow2 v3 disk (default 4 GiB) that holds ~50 %
incompressible random data in scattered extents, the rest unallocated or zero clusters:

1. the disk is filled offline through qemu-nbd, then the VM is started on it;
2. read limit: ``nbdcopy`` of a fleecing export of the disk (made by vmdp's own QemuSession) to ``null:``,
   and to a pipe (the stream restic reads);
3. peer: ``nbdcopy URI - | restic backup --stdin`` of the same export into a fresh restic repository;
4. ``vmdp backup vm`` IFFULL into a fresh repository;
5. 1 % of the disk is rewritten through QEMU (random, non-overlapping writes spread over the disk),
   then ``vmdp backup vm`` IFINCR, and restic again from a new fleecing export (it reads the whole
   disk again and dedups: restic has no change tracking);
6. ``vmdp restore vm`` of the latest version to qcow2 and raw, against ``qemu-img convert`` of the
   source image to the same formats and ``restic dump`` of its latest snapshot to a raw file; each
   restored image is checked with ``qemu-img compare``.

Every measured step is one subprocess (or a two-command pipe), timed wall-clock, with its peak RSS from ``os.wait4``
(taken by a small spawning helper, see `run_timed`), after a ``sync`` that is not timed.
Page caches are not dropped (that needs root and is unreliable on a shared host): the source
image is read once as a warm-up before the first measured step, so every step reads from the
page cache, and each step runs once. See benchmarks/README.md.

Usage: ``.venv/bin/python benchmarks/bench_backup.py [--size 1G] [--json]``; needs ``restic``
(Debian package ``restic``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import nbd

from vmdp.hypervisor.nbd import NbdReader
from vmdp.hypervisor.qemu import DiskPlan, QemuSession, find_vm
from vmdp.testing.vm import ThrowawayVM

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CLUSTER = 64 * KiB  # qcow2's default cluster size: extents are aligned to it
PIECE = 4 * MiB  # bytes per NBD write while filling the disk
VM_NAME = "bench"
DISK = "vda"
NAMESPACE = "vmdp-bench"  # of the read-limit snapshot's tracking point; vmdp's own is vmdp-<repo id>
SOCKET_MAX = 100  # AF_UNIX paths are limited to 107 bytes


class BenchError(Exception):
    pass


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: write e.g. 4G, 512M or 1073741824")
    value = float(m.group(1)) * 1024 ** "BKMGT".index((m.group(2) or "B").upper())
    size = int(value) // MiB * MiB
    if size < 64 * MiB:
        raise argparse.ArgumentTypeError(f"size {text!r} is below 64M")
    return size


def human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


# ---------------------------------------------------------------------------------------------
# measuring subprocesses


@dataclass
class Timed:
    seconds: float
    maxrss_kib: int
    stdout: str
    source_maxrss_kib: int | None = None  # of the `source` command piped into the measured one


# A child's peak RSS (ru_maxrss) starts at its parent's peak when it execs, so the commands are
# spawned by this small helper process instead of by the benchmark (~50 MiB of imports): their
# peak RSS has the helper's (~9 MiB, reported as rss_floor_kib) as a floor instead. The helper
# ignores SIGTERM and the commands get it by default, so stopping the process group lets vmdp
# clean up and the helper still reap it. Its arguments: the report file, the file the last
# command's stdout goes to ("" for the helper's own), then each command as its length and its
# words; consecutive commands are joined by pipes (``a | b``), and each one's status and peak RSS
# are reported separately (wait4 per child).
_SPAWN_HELPER = """\
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
start = time.perf_counter()
defaults = (signal.SIGTERM, signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ)
report, output, rest, cmds = sys.argv[1], sys.argv[2], sys.argv[3:], []
while rest:
    n = int(rest[0])
    cmds.append(rest[1 : n + 1])
    rest = rest[n + 1 :]
pids, prev = [], None
for i, cmd in enumerate(cmds):
    actions = [] if prev is None else [(os.POSIX_SPAWN_DUP2, prev, 0)]
    if i < len(cmds) - 1:
        r, w = os.pipe()
        actions.append((os.POSIX_SPAWN_DUP2, w, 1))
    elif output:
        actions.append((os.POSIX_SPAWN_OPEN, 1, output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
    pids.append(os.posix_spawnp(cmd[0], cmd, os.environ, file_actions=actions, setsigdef=defaults))
    if prev is not None:
        os.close(prev)
    if i < len(cmds) - 1:
        os.close(w)
        prev = r
done = []
for pid in pids:
    _, status, usage = os.wait4(pid, 0)
    done.append((usage.ru_maxrss, os.waitstatus_to_exitcode(status)))
with open(report, "w") as f:
    f.write(" ".join([str(time.perf_counter() - start)] + [f"{rss}:{code}" for rss, code in done]))
sys.exit(1 if any(code for _, code in done) else 0)
"""


def run_timed(
    cmd: Sequence[str],
    logdir: Path,
    *,
    source: Sequence[str] | None = None,
    output: Path | None = None,
    env: dict[str, str] | None = None,
) -> Timed:
    """Run `cmd` to completion; its wall time and peak RSS (the max over it and the children it reaped).

    `source`: a command whose stdout is piped into `cmd` (``source | cmd``); the time is until both
    exit, the peak RSS is `cmd`'s (`source`'s is reported apart). `output`: a file that gets `cmd`'s
    stdout (``cmd > output``) instead of `Timed.stdout`. `env`: the whole environment of the commands.
    Dirty pages are written back (``sync``, not timed) first, so no step pays for an earlier one's.
    """
    logdir.mkdir(parents=True, exist_ok=True)
    report = logdir / "rusage"
    report.unlink(missing_ok=True)
    cmds = [list(source), list(cmd)] if source else [list(cmd)]
    argv = [str(report), str(output) if output else ""]
    for c in cmds:
        argv += [str(len(c)), *c]
    os.sync()
    with tempfile.TemporaryFile(dir=logdir) as out, tempfile.TemporaryFile(dir=logdir) as err:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _SPAWN_HELPER, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            start_new_session=True,
        )
        try:
            proc.wait()
        except BaseException:
            stop_group(proc)
            raise
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    fields = report.read_text().split() if report.exists() else []
    if proc.returncode or len(fields) != len(cmds) + 1:
        try:  # a helper that failed between two spawns leaves the first command alone in the group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        tail = "\n".join(stderr.strip().splitlines()[-10:])
        codes = [int(f.split(":")[1]) for f in fields[1:]] or [proc.returncode] * len(cmds)
        status = ", ".join(f"{c[0]} exited with {code}" for c, code in zip(cmds, codes, strict=False))
        raise BenchError(f"{' | '.join(' '.join(c) for c in cmds)}: {status}:\n{tail}")
    rss = [int(f.split(":")[0]) for f in fields[1:]]
    return Timed(float(fields[0]), rss[-1], stdout, rss[0] if source else None)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop the process group `run_timed` started: SIGTERM (vmdp cleans up), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def check_output(cmd: Sequence[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(list(cmd), stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise BenchError(f"{' '.join(cmd)} exited with {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tree_bytes(path: Path) -> int:
    """The apparent size of every file under `path` (a repository's size, as ``du -sb`` counts it)."""
    total = 0
    for top, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(top, name)).st_size
            except FileNotFoundError:
                pass
    return total


def warm_up(path: Path) -> float:
    """Read the file once so every measured step starts from a warm page cache."""
    start = time.perf_counter()
    buf = bytearray(8 * MiB)
    with path.open("rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - start


def data_bytes(image: Path, fmt: str) -> int:
    """Bytes of the image that hold data (neither unallocated nor zero clusters), from qemu-img map."""
    extents = json.loads(check_output(["qemu-img", "map", "-U", "-f", fmt, "--output=json", str(image)]))
    return sum(e["length"] for e in extents if e["data"] and not e.get("zero"))


# ---------------------------------------------------------------------------------------------
# the disk


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    kind: str  # "data" (random bytes) or "zero" (zero clusters); the rest stays unallocated

    @property
    def end(self) -> int:
        return self.offset + self.length


def draw_length(rng: random.Random, scale: float = 1.0) -> int:
    """A log-uniform length between 64 KiB and 16 MiB (times `scale`), in whole clusters."""
    raw = math.exp(rng.uniform(math.log(64 * KiB), math.log(16 * MiB))) * scale
    return max(CLUSTER, round(raw / CLUSTER) * CLUSTER)


def layout(size: int, fraction: float, rng: random.Random) -> list[Extent]:
    """Alternate data extents and gaps; one gap in four is written as zero clusters."""
    extents, pos, data_next = [], 0, rng.random() < fraction
    while pos < size:
        if data_next:
            length = min(draw_length(rng), size - pos)
            extents.append(Extent(pos, length, "data"))
        else:
            length = min(draw_length(rng, (1 - fraction) / fraction), size - pos)
            if rng.random() < 0.25:
                extents.append(Extent(pos, length, "zero"))
        pos += length
        data_next = not data_next
    return extents


@contextmanager
def qemu_nbd(image: Path, socket: Path, connections: int) -> Iterator[None]:
    proc = subprocess.Popen(
        [
            "qemu-nbd",
            "--persistent",
            "-f",
            "qcow2",
            "--cache=unsafe",
            f"--shared={connections}",
            "--socket",
            str(socket),
            str(image),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr and proc.poll() is not None else ""
                raise BenchError(f"qemu-nbd did not start on {image}: {err.strip()}")
            time.sleep(0.01)
        yield
    finally:
        proc.terminate()  # a clean exit: qemu-nbd writes the qcow2 metadata back
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
        socket.unlink(missing_ok=True)


def fill_disk(image: Path, size: int, extents: list[Extent], threads: int) -> None:
    """Create the qcow2 v3 image and write the extents offline, through qemu-nbd."""
    check_output(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=1.1", str(image), str(size)])
    socket = image.with_suffix(".fill.sock")
    with qemu_nbd(image, socket, threads + 1):
        local = threading.local()
        handles: list[nbd.NBD] = []
        lock = threading.Lock()

        def handle() -> nbd.NBD:
            if not hasattr(local, "h"):
                h = nbd.NBD()
                h.connect_unix(str(socket))
                local.h = h
                with lock:
                    handles.append(h)
            return local.h

        def write(ext: Extent) -> None:
            h = handle()
            if ext.kind == "zero":
                h.zero(ext.length, ext.offset)
                return
            for pos in range(ext.offset, ext.end, PIECE):
                h.pwrite(os.urandom(min(PIECE, ext.end - pos)), pos)

        try:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                for _ in pool.map(write, extents):
                    pass
            for h in handles:
                h.flush()
        finally:
            for h in handles:
                try:
                    h.shutdown()
                except nbd.Error:
                    pass


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class Step:
    key: str
    title: str
    bytes: int
    seconds: float
    maxrss_kib: int | None = None
    stored_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float | None:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else None


@dataclass
class Results:
    config: dict[str, Any]
    host: dict[str, Any]
    steps: list[Step] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def add(self, step: Step) -> Step:
        self.steps.append(step)
        rate = step.mb_per_s
        log(
            f"{step.title}: {human(step.bytes)} in {step.seconds:.2f}s"
            f" ({f'{rate:.1f}' if rate is not None else '-'} MB/s)"
        )
        return step

    def get(self, key: str) -> Step | None:
        return next((s for s in self.steps if s.key == key), None)

    def ratios(self) -> dict[str, float | None]:
        def div(a: float | None, b: float | None) -> float | None:
            return a / b if a is not None and b else None

        def value(key: str, attr: str) -> float | None:
            step = self.get(key)
            return getattr(step, attr) if step is not None else None

        out: dict[str, float | None] = {
            "ifull_rate_vs_nbdcopy": div(value("ifull", "mb_per_s"), value("nbdcopy", "mb_per_s")),
            # read + write + fsync of the same data: the limit when the repository disk is the bottleneck
            "ifull_time_vs_convert": div(value("convert_raw", "seconds"), value("ifull", "seconds")),
            "ifincr_time_vs_ifull": div(value("ifincr", "seconds"), value("ifull", "seconds")),
            "ifincr_read_vs_changed": div(value("ifincr", "bytes"), self.notes.get("changed_bytes")),
            "ifull_stored_vs_read": div(value("ifull", "stored_bytes"), value("ifull", "bytes")),
        }
        for fmt in ("qcow2", "raw"):
            out[f"restore_{fmt}_time_vs_qemu_img"] = div(
                value(f"restore_{fmt}", "seconds"), value(f"convert_{fmt}", "seconds")
            )
        n = self.notes
        out |= {
            "restic_full_time_vs_ifull": div(value("restic_full", "seconds"), value("ifull", "seconds")),
            "restic_incr_time_vs_ifincr": div(value("restic_incr", "seconds"), value("ifincr", "seconds")),
            "restic_repo_vs_vmdp_full": div(n.get("restic_repo_bytes_full"), n.get("vmdp_repo_bytes_full")),
            "restic_repo_vs_vmdp": div(n.get("restic_repo_bytes"), n.get("vmdp_repo_bytes")),
            "restic_dump_time_vs_restore_raw": div(value("restic_dump", "seconds"), value("restore_raw", "seconds")),
        }
        return out

    def to_json(self) -> dict[str, Any]:
        steps = [{**asdict(s), "mb_per_s": s.mb_per_s} for s in self.steps]
        return {"config": self.config, "host": self.host, "steps": steps, "ratios": self.ratios(), "notes": self.notes}


RATIO_TITLES = {
    "ifull_rate_vs_nbdcopy": "vmdp IFFULL MB/s ÷ nbdcopy MB/s (read limit)",
    "ifull_time_vs_convert": "qemu-img convert raw time ÷ vmdp IFFULL time (read+write limit)",
    "ifincr_time_vs_ifull": "vmdp IFINCR time ÷ IFFULL time",
    "ifincr_read_vs_changed": "vmdp IFINCR bytes read ÷ bytes changed",
    "ifull_stored_vs_read": "vmdp IFFULL bytes stored ÷ bytes read",
    "restore_qcow2_time_vs_qemu_img": "vmdp restore qcow2 time ÷ qemu-img convert qcow2 time",
    "restore_raw_time_vs_qemu_img": "vmdp restore raw time ÷ qemu-img convert raw time",
    "restic_full_time_vs_ifull": "restic full time ÷ vmdp IFFULL time",
    "restic_incr_time_vs_ifincr": "restic incremental time ÷ vmdp IFINCR time",
    "restic_repo_vs_vmdp_full": "restic repo size ÷ vmdp repo size, after the full backups",
    "restic_repo_vs_vmdp": "restic repo size ÷ vmdp repo size, after both backups",
    "restic_dump_time_vs_restore_raw": "restic dump → raw time ÷ vmdp restore raw time",
}


def print_table(res: Results, out: TextIO) -> None:
    rows = [("step", "bytes", "stored", "seconds", "MB/s", "peak RSS")]
    for s in res.steps:
        rate = s.mb_per_s
        rows.append(
            (
                s.title,
                human(s.bytes),
                human(s.stored_bytes),
                f"{s.seconds:.2f}",
                f"{rate:.1f}" if rate is not None else "-",
                human(s.maxrss_kib * KiB) if s.maxrss_kib is not None else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(file=out)
    for n, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        print("  ".join(cells), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)
    print(file=out)
    ratios = res.ratios()
    width = max(len(t) for t in RATIO_TITLES.values())
    for key, title in RATIO_TITLES.items():
        value = ratios.get(key)
        print(f"{title.ljust(width)}  {f'{value:.3f}' if value is not None else '-'}", file=out)
    print(file=out)
    c, h, n = res.config, res.host, res.notes
    print(
        f"disk {human(c['size'])} qcow2 v3, {human(n.get('source_data_bytes'))} data at start;"
        f" {n.get('changed_writes')} writes of {human(c['write_size'])} changed"
        f" {human(n.get('changed_bytes'))} in {n.get('chunks_touched')} vmdp chunks of {human(n.get('chunk_size'))}",
        file=out,
    )
    print(
        f"host: {h['cpus']} CPUs, load {h['load_before']} before / {h['load_after']} after,"
        f" work dir on {h.get('workdir_fs', '?')},"
        f" {h['qemu']}, {h['nbdcopy']}; nbdcopy export multi-conn: {n.get('export_multi_conn')};"
        f" vmdp CLI start-up {n.get('cli_startup_seconds', 0):.2f}s (included in vmdp times)",
        file=out,
    )
    print(
        f"repositories after both backups: vmdp {human(n.get('vmdp_repo_bytes'))},"
        f" restic {human(n.get('restic_repo_bytes'))} ({h.get('restic', '?')}, repository format"
        f" v{n.get('restic_repo_version', '?')}, compression at its default);"
        f" restic CLI start-up {n.get('restic_startup_seconds', 0):.2f}s (included in restic times)",
        file=out,
    )
    print(
        "restic backup rows: bytes = the whole disk streamed by `nbdcopy URI -` (zeros included: compare times,"
        " not MB/s), stored = growth of the restic repository; restic rows' peak RSS is restic's"
        " (nbdcopy's is in the JSON)",
        file=out,
    )
    floor = n.get("rss_floor_kib")
    print(
        "page cache warm (source image read once before the first step); each step run once;"
        f" peak RSS has a floor of {human(floor * KiB) if floor else '-'} (the spawning helper's)",
        file=out,
    )


# ---------------------------------------------------------------------------------------------
# the benchmark


@dataclass(frozen=True)
class Export:
    uri: str  # nbd+unix:///vda?socket=…
    capacity: int  # bytes of the disk
    allocated: int  # bytes NBD block status reports as data
    setup_seconds: float  # of the fleecing snapshot and export


def fs_type(path: Path) -> str:
    """The type of the filesystem holding `path`, from the longest matching mount point."""
    best, kind = "", "?"
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return kind
    resolved = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def vmdp_command() -> list[str]:
    exe = Path(sys.executable).with_name("vmdp")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vmdp"]


def host_info() -> dict[str, Any]:
    def first_line(cmd: list[str]) -> str:
        try:
            return check_output(cmd).splitlines()[0].strip()
        except (BenchError, OSError, IndexError):
            return "?"

    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": first_line(["qemu-system-x86_64", "--version"]),
        "nbdcopy": first_line(["nbdcopy", "--version"]),
        "restic": " ".join(first_line(["restic", "version"]).split()[:2]),
        "kvm": os.access("/dev/kvm", os.R_OK | os.W_OK),
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "load_after": None,
    }


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.scratch = work / "scratch"
        self.repo = work / "repo"
        self.restic_repo = work / "restic-repo"
        # restic's own environment: a password, and its cache in the work dir (removed with it)
        self.restic_env = {k: v for k, v in os.environ.items() if not k.startswith("RESTIC_")} | {
            "RESTIC_PASSWORD": "vmdp-bench",
            "RESTIC_CACHE_DIR": str(work / "restic-cache"),
        }
        self.logs = work / "logs"
        self.vmdp = vmdp_command()
        self.rng = random.Random(args.seed)
        self.vm = ThrowawayVM(work, VM_NAME, {DISK: args.size})
        self.res = Results(
            config={
                "size": args.size,
                "data_fraction": args.data_fraction,
                "change_fraction": args.change,
                "write_size": args.write_size,
                "workers": args.workers,
                "seed": args.seed,
                "workdir": str(work),
            },
            host=host_info(),
        )

    def run(self) -> Results:
        a, n = self.args, self.res.notes
        image = self.vm.image(DISK)
        extents = layout(a.size, a.data_fraction, self.rng)
        log(f"filling {image} ({human(a.size)}, {sum(e.kind == 'data' for e in extents)} random extents) offline")
        start = time.perf_counter()
        fill_disk(image, a.size, extents, threads=max(1, min(4, os.cpu_count() or 1)))
        n["fill_seconds"] = round(time.perf_counter() - start, 2)
        n["source_data_bytes"] = data_bytes(image, "qcow2")
        n["source_image_file_bytes"] = image.stat().st_size
        log(f"filled in {n['fill_seconds']}s: {human(n['source_data_bytes'])} of data")

        self.vm.start()
        n["warmup_seconds"] = round(warm_up(image), 2)
        n["cli_startup_seconds"] = round(run_timed([*self.vmdp, "--version"], self.logs).seconds, 3)
        n["rss_floor_kib"] = run_timed(["true"], self.logs).maxrss_kib
        self.restic_init()

        with self.export("readlimit") as export:
            n["snapshot_setup_seconds"] = export.setup_seconds
            self.read_limit(export)
            self.restic_backup("restic_full", "restic backup --stdin (full)", export)
        n["restic_repo_bytes_full"] = tree_bytes(self.restic_repo)
        self.backup("ifull", "vmdp backup IFFULL", expect="IFFULL", mode="iffull")
        n["vmdp_repo_bytes_full"] = tree_bytes(self.repo)
        self.change()
        self.backup("ifincr", "vmdp backup IFINCR (1% changed)", expect="IFINCR", mode="ifincr")
        n["vmdp_repo_bytes"] = tree_bytes(self.repo)
        with self.export("restic") as export:
            self.restic_backup("restic_incr", "restic backup --stdin (1% changed)", export)
        n["restic_repo_bytes"] = tree_bytes(self.restic_repo)
        self.restores()
        self.res.host["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        return self.res

    @contextmanager
    def export(self, point: str) -> Iterator[Export]:
        """A fleecing export of the disk, made by vmdp's own QemuSession as `vmdp backup` makes one."""
        vm_info = find_vm([str(self.vm.qmp_path)], VM_NAME)
        disk = next(d for d in vm_info.disks if d.name == DISK)
        self.scratch.mkdir(parents=True, exist_ok=True)
        session = QemuSession(vm_info, self.scratch, NAMESPACE)
        try:
            start = time.perf_counter()
            snap = session.snapshot([DiskPlan(disk, None)], f"{NAMESPACE}-{point}")
            setup = round(time.perf_counter() - start, 3)
            try:
                ds = snap.disks[0]
                reader = NbdReader(str(snap.socket), ds.export)
                try:
                    allocated = sum(e.length for e in reader.allocation(0, disk.capacity) if e.data)
                finally:
                    reader.close()
                yield Export(f"nbd+unix:///{ds.export}?socket={snap.socket}", disk.capacity, allocated, setup)
            finally:
                session.release(snap)
                session.abort(snap)
        finally:
            session.close()

    def read_limit(self, export: Export) -> None:
        """nbdcopy of the fleecing export to null: (the read limit) and to a pipe (the stream restic reads)."""
        info = json.loads(check_output(["nbdinfo", "--json", export.uri]))
        exports = info.get("exports") or [{}]
        self.res.notes["export_multi_conn"] = exports[0].get("can_multi_conn")
        cmd = ["nbdcopy", export.uri, "null:"]
        timed = run_timed(cmd, self.logs)
        self.res.add(
            Step(
                "nbdcopy",
                "nbdcopy fleecing export → null: (read limit)",
                export.allocated,
                timed.seconds,
                timed.maxrss_kib,
                extra={"command": " ".join(cmd)},
            )
        )
        # What restic gets: the whole disk through a pipe, zeros included, read by a consumer that does nothing.
        source = ["nbdcopy", export.uri, "-"]
        timed = run_timed(["cat"], self.logs, source=source, output=Path(os.devnull))
        self.res.add(
            Step(
                "nbdcopy_pipe",
                "nbdcopy fleecing export → pipe (stream limit)",
                export.capacity,
                timed.seconds,
                timed.source_maxrss_kib,
                extra={"command": f"{' '.join(source)} | cat > /dev/null"},
            )
        )

    # restic ------------------------------------------------------------------------------------

    def restic(self, *args: str) -> list[str]:
        return ["restic", "--repo", str(self.restic_repo), *args]

    def restic_init(self) -> None:
        """A fresh local restic repository (untimed), and restic's start-up time (open, key derivation)."""
        check_output(self.restic("init"), env=self.restic_env)
        config = json.loads(check_output(self.restic("cat", "config"), env=self.restic_env))
        self.res.notes["restic_repo_version"] = config.get("version")
        timed = run_timed(self.restic("cat", "config"), self.logs, env=self.restic_env)
        self.res.notes["restic_startup_seconds"] = round(timed.seconds, 3)

    def restic_backup(self, key: str, title: str, export: Export) -> None:
        """``nbdcopy URI - | restic backup --stdin``: restic reads the whole disk and dedups (no change tracking)."""
        source = ["nbdcopy", export.uri, "-"]
        cmd = self.restic("backup", "--stdin", "--stdin-filename", f"{DISK}.raw", "--host", VM_NAME)
        cmd += ["--json", "--quiet"]
        before = tree_bytes(self.restic_repo)
        timed = run_timed(cmd, self.logs, source=source, env=self.restic_env)
        summaries = [
            doc
            for line in timed.stdout.splitlines()
            if line.startswith("{") and (doc := json.loads(line)).get("message_type") == "summary"
        ]
        if not summaries:
            raise BenchError(f"restic backup printed no summary: {timed.stdout.strip()[-500:]}")
        summary = summaries[-1]
        if summary["total_bytes_processed"] != export.capacity:
            raise BenchError(
                f"restic read {summary['total_bytes_processed']} bytes from the export of {export.capacity} bytes"
            )
        self.res.add(
            Step(
                key,
                title,
                summary["total_bytes_processed"],
                timed.seconds,
                timed.maxrss_kib,
                stored_bytes=tree_bytes(self.restic_repo) - before,
                extra={
                    "snapshot_id": summary.get("snapshot_id"),
                    "data_added": summary.get("data_added"),
                    "data_blobs": summary.get("data_blobs"),
                    "nbdcopy_maxrss_kib": timed.source_maxrss_kib,
                    "command": f"{' '.join(source)} | {' '.join(cmd)}",
                },
            )
        )

    def backup(self, key: str, title: str, expect: str, mode: str) -> None:
        cmd = [
            *self.vmdp,
            "backup",
            "vm",
            VM_NAME,
            "--mode",
            mode,
            "--qmp",
            str(self.vm.qmp_path),
            "--repo",
            str(self.repo),
            "--scratch-dir",
            str(self.scratch),
            "--workers",
            str(self.args.workers),
            "--json",
        ]
        timed = run_timed(cmd, self.logs)
        doc = json.loads(timed.stdout)[0]
        if doc["mode"] != expect:
            raise BenchError(f"expected an {expect} backup, vmdp made {doc['mode']} ({doc.get('reason')})")
        self.res.add(
            Step(
                key,
                title,
                doc["read_bytes"],
                timed.seconds,
                timed.maxrss_kib,
                stored_bytes=doc["stored_bytes"],
                extra={"backup_id": doc["backup_id"], "command": " ".join(cmd[len(self.vmdp) :])},
            )
        )

    def change(self) -> None:
        """Rewrite `--change` of the disk through QEMU: random, non-overlapping writes over the whole disk."""
        a, n = self.args, self.res.notes
        count = max(1, round(a.size * a.change / a.write_size))
        offsets = sorted(s * a.write_size for s in self.rng.sample(range(a.size // a.write_size), count))
        chunk = int(json.loads((self.repo / "vmdp-repo.json").read_text())["chunk_size"])
        start = time.perf_counter()
        for off in offsets:
            self.vm.write_data(DISK, off, os.urandom(a.write_size))
        n["change_seconds"] = round(time.perf_counter() - start, 2)
        n["changed_writes"] = count
        n["changed_bytes"] = count * a.write_size
        n["chunk_size"] = chunk
        n["chunks_touched"] = len({off // chunk for off in offsets})
        log(f"changed {human(n['changed_bytes'])} in {count} writes ({n['chunks_touched']} chunks)")

    def restores(self) -> None:
        image = self.vm.image(DISK)
        self.vm.qemu_io(DISK, "flush")  # the image file now holds what the IFINCR version holds
        size = data_bytes(image, "qcow2")
        self.res.notes["final_data_bytes"] = size
        warm_up(image)
        for fmt in ("qcow2", "raw"):
            target = self.work / f"restore-{fmt}"
            cmd = [
                *self.vmdp,
                "restore",
                "vm",
                VM_NAME,
                "--repo",
                str(self.repo),
                "--target-dir",
                str(target),
                "--format",
                fmt,
                "--workers",
                str(self.args.workers),
                "--json",
            ]
            timed = run_timed(cmd, self.logs)
            restored = Path(json.loads(timed.stdout)["disks"][0]["path"])
            self.res.add(
                Step(
                    f"restore_{fmt}",
                    f"vmdp restore → {fmt}",
                    size,
                    timed.seconds,
                    timed.maxrss_kib,
                    extra={"command": " ".join(cmd[len(self.vmdp) :])},
                )
            )
            self.compare(image, restored, fmt)
            restored.unlink()

            converted = self.work / f"convert.{fmt}"
            cmd = ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", fmt, str(image), str(converted)]
            timed = run_timed(cmd, self.logs)
            start = time.perf_counter()
            fsync_path(converted)  # vmdp restore fsyncs its images: make it even
            self.res.add(
                Step(
                    f"convert_{fmt}",
                    f"qemu-img convert → {fmt} (+ fsync)",
                    size,
                    timed.seconds + time.perf_counter() - start,
                    timed.maxrss_kib,
                    extra={"command": " ".join(cmd)},
                )
            )
            converted.unlink()

        # restic restores a stdin backup as the stream it read: dumped to a (dense) raw image
        dumped = self.work / "restic-dump.raw"
        cmd = self.restic("dump", "latest", f"{DISK}.raw")
        timed = run_timed(cmd, self.logs, output=dumped, env=self.restic_env)
        start = time.perf_counter()
        fsync_path(dumped)  # as for qemu-img convert: restic does not fsync what it dumps
        self.res.add(
            Step(
                "restic_dump",
                "restic dump latest → raw (+ fsync)",
                size,
                timed.seconds + time.perf_counter() - start,
                timed.maxrss_kib,
                extra={"command": f"{' '.join(cmd)} > {dumped.name}", "written_bytes": dumped.stat().st_size},
            )
        )
        self.compare(image, dumped, "raw", "restic_dump_identical")
        dumped.unlink()

    def compare(self, image: Path, restored: Path, fmt: str, note: str | None = None) -> None:
        if self.args.no_verify:
            return
        proc = subprocess.run(
            ["qemu-img", "compare", "-U", "-f", "qcow2", "-F", fmt, str(image), str(restored)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            raise BenchError(f"restored {restored} differs from {image}: {(proc.stdout + proc.stderr).strip()}")
        self.res.notes[note or f"restore_{fmt}_identical"] = True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=parse_size, default=4 * GiB, help="disk size, e.g. 1G for a quick run (4G)")
    p.add_argument("--data-fraction", type=float, default=0.5, help="share of the disk holding random data (0.5)")
    p.add_argument("--change", type=float, default=0.01, help="share of the disk rewritten before IFINCR (0.01)")
    p.add_argument("--write-size", type=parse_size_small, default=256 * KiB, help="size of each change write (256K)")
    p.add_argument("--workers", type=int, default=4, help="vmdp --workers for backup and restore (4)")
    p.add_argument("--seed", type=int, default=1, help="seed of the disk layout and change offsets (1)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="parent of the temp dir (/var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (VM images, repository, logs)")
    p.add_argument("--no-verify", action="store_true", help="skip qemu-img compare of the restored images")
    p.add_argument("--json", action="store_true", help="write the figures as JSON to stdout (table to stderr)")
    args = p.parse_args(argv)
    if not 0 < args.data_fraction <= 1:
        p.error("--data-fraction must be in (0, 1]")
    if not 0 < args.change <= 0.5:
        p.error("--change must be in (0, 0.5]")
    if args.size % args.write_size:
        p.error("--size must be a multiple of --write-size")
    return args


def parse_size_small(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KM]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: write e.g. 256K or 1M")
    size = int(m.group(1)) * 1024 ** " KM".index((m.group(2) or " ").upper())
    if size < 4 * KiB or size % (4 * KiB):
        raise argparse.ArgumentTypeError(f"size {text!r} must be a multiple of 4K")
    return size


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwind through the finally blocks: VM stopped, temp dir removed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vmdp-bench-", dir=args.workdir))
    bench: Bench | None = None
    ok = False
    try:
        if shutil.which("restic") is None:
            raise BenchError(
                "restic not found on PATH: the benchmark compares vmdp with restic;"
                " install the Debian package `restic` (apt-get install restic)"
            )
        longest = max(len(str(work / f"{VM_NAME}.lab.sock")), len(str(work / "scratch" / "123456789012-abcdef.nbd")))
        if longest > SOCKET_MAX:
            raise BenchError(f"--workdir {args.workdir} is too long for unix socket paths: pick a shorter one")
        fstype = fs_type(work)
        if fstype == "tmpfs":
            log(f"warning: {work} is on tmpfs: the figures will not reflect disk writes; use --workdir on a disk")
        log(f"work dir {work} ({fstype})")
        bench = Bench(args, work)
        bench.res.host["workdir_fs"] = fstype
        res = bench.run()
        ok = True
    except BenchError as exc:
        log(f"failed: {exc}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        try:
            if bench is not None:
                bench.vm.stop(kill=not ok)
        finally:
            if args.keep:
                log(f"kept {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print_table(res, sys.stderr)
        json.dump(res.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_table(res, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
