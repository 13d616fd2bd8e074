"""The QEMU/KVM connector: VMs found by QMP socket, persistent dirty bitmaps as tracking
points, a fleecing overlay as the snapshot, and NBD exports to read it.

A snapshot of a VM is one QMP transaction that, for every disk at once:

* (IFINCR) adds a disabled, non-persistent bitmap ``<ns>-tmp-<token>`` and merges the
  previous tracking point into it: a frozen copy of "what changed since the last version";
* adds the new persistent tracking point ``<ns>-<backup_id>``, which records from this instant;
* starts ``blockdev-backup sync=none`` into a qcow2 overlay backed by the disk, so guest
  writes copy the old data to the overlay first (copy-before-write fleecing).

The previous tracking point is never altered: it keeps recording until the new version is
durable and `commit` removes it. If anything fails, `abort` removes the new point and the
previous one still holds every change. Every object vmdp creates is named ``vmdp-…`` and
swept at the start of the next run; bitmaps of other tools are never touched.
"""

from __future__ import annotations

import glob
import logging
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmdp.errors import HypervisorError, NotFound
from vmdp.hypervisor.nbd import NbdReader
from vmdp.hypervisor.qmp import Qmp, QmpCommandError
from vmdp.model import VM, Bitmap, Disk

log = logging.getLogger(__name__)

PREFIX = "vmdp-"
AGENT_CHANNEL = "org.qemu.guest_agent.0"
NO_UUID = "00000000-0000-0000-0000-000000000000"


def _device_name(dev: dict[str, Any]) -> str:
    qdev = dev.get("qdev") or ""
    if qdev.startswith("/machine/peripheral/"):
        return qdev.split("/")[3]
    if qdev and "/" not in qdev:
        return qdev
    return dev.get("device") or dev["inserted"]["node-name"]


# Filter drivers sit above a disk's format node (ours: copy-before-write while a backup runs).
FILTERS = {
    "copy-before-write",
    "throttle",
    "copy-on-read",
    "preallocate",
    "compress",
    "blkdebug",
    "blklogwrites",
    "snapshot-access",
}


def _filter_children(qmp: Qmp) -> dict[str, str]:
    """Map a filter node to the node below it, from QEMU's block graph."""
    graph = qmp.cmd("x-debug-query-block-graph")
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    return {
        names[e["parent"]]: names[e["child"]]
        for e in graph["edges"]
        if e["name"] in ("file", "backing") and names.get(e["parent"])
    }


def _disks(qmp: Qmp) -> tuple[Disk, ...]:
    nodes = {n["node-name"]: n for n in qmp.cmd("query-named-block-nodes", flat=True) if n.get("node-name")}
    children: dict[str, str] | None = None
    disks = []
    for dev in qmp.cmd("query-block"):
        ins = dev.get("inserted")
        if not ins or ins.get("ro"):
            continue  # empty drives and read-only media (ISO images) are not VM disks
        node = ins["node-name"]
        while nodes.get(node, {}).get("drv") in FILTERS:
            children = children if children is not None else _filter_children(qmp)
            node = children[node]
        info = nodes.get(node, ins)
        image = info["image"]
        compat = image.get("format-specific", {}).get("data", {}).get("compat")
        bitmaps = tuple(
            Bitmap(
                b["name"],
                b["granularity"],
                b.get("persistent", False),
                b.get("recording", True),
                b.get("busy", False),
                b.get("inconsistent", False),
                b.get("count", 0),
            )
            for b in info.get("dirty-bitmaps", [])
            if b.get("name")
        )
        disks.append(
            Disk(
                name=_device_name(dev),
                node=node,
                location=info.get("file") or image["filename"],
                format=image["format"],
                capacity=image["virtual-size"],
                persistent_bitmaps=image["format"] == "qcow2" and compat == "1.1",
                bitmaps=bitmaps,
                allocated=image.get("actual-size", 0),
            )
        )
    return tuple(disks)


def agent_socket(qmp: Qmp) -> str | None:
    """The host end of the VM's guest agent channel (org.qemu.guest_agent.0), if it has one."""
    ports = [
        f"{base}/{p['name']}"
        for base in ("/machine/peripheral", "/machine/peripheral-anon")
        for p in qmp.cmd("qom-list", path=base)
        if p["type"].startswith("child<virtserialport")
    ]
    for path in ports:
        if qmp.cmd("qom-get", path=path, property="name") != AGENT_CHANNEL:
            continue
        chardev = qmp.cmd("qom-get", path=path, property="chardev")
        for dev in qmp.cmd("query-chardev"):
            filename = dev["filename"].removeprefix("disconnected:")
            if dev["label"] == chardev and filename.startswith("unix:"):
                return str(filename[5:].split(",")[0])
    return None


def describe(qmp: Qmp) -> VM:
    name = qmp.cmd("query-name").get("name") or Path(qmp.path).stem
    uuid = qmp.cmd("query-uuid")["UUID"]
    no_uuid = uuid == NO_UUID
    return VM(name=name, uuid=name if no_uuid else uuid, qmp=qmp.path, disks=_disks(qmp), uuid_is_name=no_uuid)


def discover(globs: list[str], timeout: float = 10.0) -> tuple[list[VM], list[str]]:
    """Every VM behind the sockets the globs match, and one line per socket that did not answer."""
    vms, problems = [], []
    for pattern in globs:
        matches = sorted(glob.glob(pattern))
        if not matches and not glob.has_magic(pattern):
            problems.append(f"{pattern}: no such QMP socket")
        for path in matches:
            try:
                with Qmp(path, timeout) as qmp:
                    vms.append(describe(qmp))
            except HypervisorError as exc:
                problems.append(str(exc))
    return vms, problems


@dataclass
class DiskPlan:
    """What to snapshot for one disk: `base` is the tracking point to diff against, or None (IFFULL)."""

    disk: Disk
    base: str | None
    persistent: bool = True  # False: transient tracking for a disk that cannot hold a persistent bitmap


@dataclass
class DiskSnapshot:
    plan: DiskPlan
    node: str
    overlay: Path
    job: str
    export: str
    frozen: str | None
    granularity: int | None = None  # of the new tracking point

    @property
    def name(self) -> str:
        return self.plan.disk.name


@dataclass
class Snapshot:
    """A point-in-time view of a VM's disks, readable over NBD until released."""

    token: str
    socket: Path
    new_point: str
    vm_name: str
    disks: list[DiskSnapshot] = field(default_factory=list)
    server: bool = False
    taken: float | None = None  # when the snapshot instant happened (epoch seconds)

    def reader(self, disk: DiskSnapshot) -> NbdReader:
        return NbdReader(str(self.socket), disk.export, disk.frozen)


class QemuSession:
    """One QMP connection to one VM for the length of a backup.

    `namespace` (``vmdp-<repository id>``) prefixes every tracking point, so two repositories
    protecting the same VM never remove each other's points.
    """

    def __init__(self, vm: VM, scratch: Path, namespace: str, timeout: float = 60.0) -> None:
        self.vm = vm
        self.scratch = scratch
        self.namespace = namespace
        self.file_prefix = vm.uuid.replace("-", "")[:12]
        self.qmp = Qmp(vm.qmp, timeout=timeout)

    def close(self) -> None:
        self.qmp.close()

    def refresh(self) -> VM:
        self.vm = describe(self.qmp)
        return self.vm

    # cleanup -------------------------------------------------------------------

    def _try(self, command: str, **args: Any) -> bool:
        try:
            self.qmp.cmd(command, **args)
            return True
        except QmpCommandError as exc:
            log.debug("ignored: %s", exc)
            return False

    def _wait_gone(self, query: str, key: str, ident: str, what: str) -> None:
        deadline = time.monotonic() + 60
        while any(item.get(key) == ident for item in self.qmp.cmd(query)):
            if time.monotonic() > deadline:
                raise HypervisorError(f"QEMU did not remove {what} {ident} within 60s")
            time.sleep(0.02)

    def _remove_export(self, ident: str) -> None:
        if self._try("block-export-del", id=ident, mode="hard"):
            self._wait_gone("query-block-exports", "id", ident, "NBD export")

    def _remove_job(self, ident: str) -> None:
        if self._try("block-job-cancel", device=ident, force=True):
            self._wait_gone("query-block-jobs", "device", ident, "block job")
        for job in self.qmp.cmd("query-jobs"):
            if job["id"] == ident and job["status"] == "concluded":
                self._try("job-dismiss", id=ident)

    def _remove_bitmap(self, node: str, name: str) -> None:
        self._try("block-dirty-bitmap-remove", node=node, name=name)

    def sweep(self, keep: dict[str, str | None]) -> list[str]:
        """Remove what a crashed run left behind; `keep` maps disk name to its current tracking point.

        Returns one line per object removed.
        """
        removed = []
        for export in self.qmp.cmd("query-block-exports"):
            if export["id"].startswith(PREFIX):
                self._remove_export(export["id"])
                removed.append(f"NBD export {export['id']}")
        for sock in self.scratch.glob(f"{self.file_prefix}-*.nbd"):
            if self._try("nbd-server-stop"):
                removed.append("NBD server")
            sock.unlink(missing_ok=True)
        for job in self.qmp.cmd("query-jobs"):
            if job["id"].startswith(PREFIX):
                self._remove_job(job["id"])
                removed.append(f"block job {job['id']}")
        for node in self.qmp.cmd("query-named-block-nodes", flat=True):
            if node.get("node-name", "").startswith(PREFIX):
                if self._try("blockdev-del", **{"node-name": node["node-name"]}):
                    removed.append(f"block node {node['node-name']}")
        for disk in self.refresh().disks:
            for bitmap in disk.bitmaps:
                if bitmap.name.startswith(self.namespace + "-") and bitmap.name != keep.get(disk.name):
                    self._remove_bitmap(disk.node, bitmap.name)
                    removed.append(f"bitmap {bitmap.name} on {disk.name}")
        for leftover in self.scratch.glob(f"{self.file_prefix}-*"):
            leftover.unlink(missing_ok=True)
            removed.append(f"scratch file {leftover}")
        if removed:
            self.refresh()
        return removed

    # snapshot ------------------------------------------------------------------

    def snapshot(self, plans: list[DiskPlan], new_point: str) -> Snapshot:
        """Take the point-in-time snapshot and the new tracking point of every planned disk at once."""
        snap = self.prepare(plans, new_point)
        try:
            self.trigger(snap)
            self.export(snap)
        except BaseException:
            self.release(snap)
            self.abort(snap)
            raise
        return snap

    def prepare(self, plans: list[DiskPlan], new_point: str) -> Snapshot:
        """Create the overlays: everything that may take time, before the snapshot instant."""
        token = secrets.token_hex(3)
        snap = Snapshot(
            token=token,
            socket=self.scratch / f"{self.file_prefix}-{token}.nbd",
            new_point=new_point,
            vm_name=self.vm.name,
        )
        try:
            for i, plan in enumerate(plans):
                ds = DiskSnapshot(
                    plan=plan,
                    node=f"vmdp-ov-{token}-{i}",
                    job=f"vmdp-job-{token}-{i}",
                    overlay=self.scratch / f"{self.file_prefix}-{token}-{i}.qcow2",
                    export=plan.disk.name,
                    frozen=f"{self.namespace}-tmp-{token}" if plan.base else None,
                )
                snap.disks.append(ds)
                self._create_overlay(ds)
        except BaseException:
            self.release(snap)
            raise
        return snap

    def trigger(self, snap: Snapshot) -> None:
        """The snapshot instant: one transaction for every disk; on failure QEMU creates nothing."""
        actions: list[dict[str, Any]] = []
        for ds in snap.disks:
            disk, plan = ds.plan.disk, ds.plan
            if plan.base:
                base = disk.bitmap(plan.base)
                assert base is not None
                actions += [
                    _action(
                        "block-dirty-bitmap-add",
                        node=disk.node,
                        name=ds.frozen,
                        persistent=False,
                        disabled=True,
                        granularity=base.granularity,
                    ),
                    _action("block-dirty-bitmap-merge", node=disk.node, target=ds.frozen, bitmaps=[plan.base]),
                ]
            actions += [
                _action("block-dirty-bitmap-add", node=disk.node, name=snap.new_point, persistent=plan.persistent),
                _action("blockdev-backup", device=disk.node, target=ds.node, sync="none", **{"job-id": ds.job}),
            ]
        self.qmp.cmd("transaction", actions=actions)
        snap.taken = time.time()
        disks = {d.name: d for d in self.refresh().disks}
        for ds in snap.disks:
            point = disks[ds.name].bitmap(snap.new_point)
            ds.granularity = point.granularity if point else None

    def export(self, snap: Snapshot) -> None:
        """Serve the snapshot over NBD on a unix socket in the scratch directory."""
        try:
            self.qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(snap.socket)}})
        except QmpCommandError as exc:
            if "already running" in exc.desc:
                raise HypervisorError(
                    f"VM {self.vm.name} already runs an NBD server that vmdp did not start",
                    "stop it (QMP nbd-server-stop) or let vmdp back up while it is not in use",
                ) from None
            raise
        snap.server = True
        for i, ds in enumerate(snap.disks):
            export: dict[str, Any] = {
                "type": "nbd",
                "id": f"vmdp-exp-{snap.token}-{i}",
                "node-name": ds.node,
                "name": ds.export,
                "writable": False,
            }
            if ds.frozen:
                export["bitmaps"] = [ds.frozen]
            self.qmp.cmd("block-export-add", **export)

    def agent_socket(self) -> str | None:
        return agent_socket(self.qmp)

    def pause(self) -> bool:
        """Pause the VM if it runs; True when this call paused it (so only then resume it)."""
        if not self.qmp.cmd("query-status")["running"]:
            return False
        self.qmp.cmd("stop")
        return True

    def resume(self) -> None:
        self.qmp.cmd("cont")

    def _create_overlay(self, ds: DiskSnapshot) -> None:
        disk = ds.plan.disk
        proc = subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(ds.overlay), str(disk.capacity)],
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            raise HypervisorError(
                f"cannot create the snapshot overlay {ds.overlay}: {proc.stderr.strip()}",
                "check that the scratch directory exists and has free space",
            )
        self.qmp.cmd(
            "blockdev-add",
            driver="qcow2",
            **{"node-name": ds.node},
            file={"driver": "file", "filename": str(ds.overlay)},
            backing=disk.node,
        )

    def release(self, snap: Snapshot) -> None:
        """Remove the snapshot's exports, NBD server, jobs, overlays and frozen bitmaps.

        Every step runs even when an earlier one fails; what still fails is left for the
        next run's sweep and reported.
        """
        steps: list[tuple[str, Any]] = [
            (f"NBD export {i}", lambda i=i: self._remove_export(f"vmdp-exp-{snap.token}-{i}"))
            for i in range(len(snap.disks))
        ]
        if snap.server:
            steps.append(("NBD server", lambda: self._try("nbd-server-stop")))
        steps.append(("NBD socket", lambda: snap.socket.unlink(missing_ok=True)))
        for ds in snap.disks:
            steps += [
                (f"block job {ds.job}", lambda ds=ds: self._remove_job(ds.job)),
                (f"block node {ds.node}", lambda ds=ds: self._try("blockdev-del", **{"node-name": ds.node})),
                (f"overlay {ds.overlay}", lambda ds=ds: ds.overlay.unlink(missing_ok=True)),
            ]
            if ds.frozen:
                steps.append(
                    (f"bitmap {ds.frozen}", lambda ds=ds: self._remove_bitmap(ds.plan.disk.node, ds.frozen or ""))
                )
        failed = []
        for what, step in steps:
            try:
                step()
            except (HypervisorError, OSError) as exc:
                failed.append(f"{what}: {exc}")
        snap.server = False
        if failed:
            log.warning("could not remove (the next run will): %s", "; ".join(failed))

    def commit(self, snap: Snapshot) -> None:
        """The version is durable: the new point becomes the only tracking point of each disk."""
        for disk in self.refresh().disks:
            if disk.bitmap(snap.new_point):
                for bitmap in disk.bitmaps:
                    if bitmap.name.startswith(self.namespace + "-") and bitmap.name != snap.new_point:
                        self._remove_bitmap(disk.node, bitmap.name)

    def abort(self, snap: Snapshot) -> None:
        """The version failed: drop the new point; the previous one still holds every change."""
        for ds in snap.disks:
            self._remove_bitmap(ds.plan.disk.node, snap.new_point)


def _action(kind: str, **data: Any) -> dict[str, Any]:
    return {"type": kind, "data": data}


def find_vm(globs: list[str], name: str) -> VM:
    """The VM called `name` (or with that UUID) behind the sockets the globs match."""
    vms, problems = discover(globs)
    for vm in vms:
        if name in (vm.name, vm.uuid):
            return vm
    known = ", ".join(sorted(v.name for v in vms)) or "none"
    detail = "; ".join(problems)
    raise NotFound(
        f"no running VM named {name} (found: {known}){'; ' + detail if detail else ''}",
        "check the name (QEMU's -name) and that --qmp or VMDP_QMP matches its QMP socket",
    )
