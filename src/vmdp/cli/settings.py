"""Settings read at the edge: command-line options, then the environment, then a TOML config file.

Nothing below the CLI reads the environment or a config file; what is resolved here is
passed down. The config file is validated whole: an unknown key or a bad value is an error
that names the file, the key and what is allowed.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmdp.errors import UsageError

CONFIG_PATHS = (Path("/etc/vmdp/vmdp.toml"), Path("~/.config/vmdp/vmdp.toml"))
FALLBACKS = ("fail", "crash")

# key: (type, description of what is allowed)
TOP_KEYS: dict[str, tuple[type, str]] = {
    "repository": (str, "a directory path"),
    "qmp": (list, "a list of QMP socket globs"),
    "scratch": (str, "a directory path"),
    "domain": (list, "a list of VM name patterns that 'backup vm' with no names selects"),
    "exclude": (list, "a list of VM name patterns never selected"),
    "max_parallel": (int, "a number of VMs backed up at once, 1 or more"),
    "workers": (int, "a number of parallel readers per disk, 1 to 64"),
    "allow_transient_tracking": (bool, "true or false"),
    "vm": (dict, "tables [vm.NAME] of per-VM options"),
    **{
        f"keep_{k}": (int, "a number of versions or periods, 1 or more")
        for k in ("last", "hourly", "daily", "weekly", "monthly", "yearly")
    },
}
VM_KEYS: dict[str, tuple[type, str]] = {
    "include_disks": (list, "a list of disk ids or image paths (patterns allowed)"),
    "exclude_disks": (list, "a list of disk ids or image paths (patterns allowed)"),
    "app_consistent": (bool, "true or false"),
    "app_consistent_fallback": (str, "'fail' or 'crash'"),
    "agent_socket": (str, "the path of the guest agent's unix socket"),
    "allow_transient_tracking": (bool, "true or false"),
    **{
        f"keep_{k}": (int, "a number of versions or periods, 1 or more")
        for k in ("last", "hourly", "daily", "weekly", "monthly", "yearly")
    },
}


@dataclass
class Settings:
    repository: Path
    qmp: list[str]
    scratch: Path
    config: dict[str, Any] = field(default_factory=dict)

    def vm(self, name: str) -> dict[str, Any]:
        """The [vm.NAME] table for a VM, empty when there is none."""
        return dict(self.config.get("vm", {}).get(name, {}))


def _default_repository() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/vmdp")
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share") / "vmdp"


def _default_scratch() -> Path:
    return Path("/var/tmp/vmdp" if os.geteuid() == 0 else f"/var/tmp/vmdp-{os.geteuid()}")


def _check(path: Path, table: dict[str, Any], keys: dict[str, tuple[type, str]], prefix: str) -> None:
    for key, value in table.items():
        where = f"{prefix}{key}"
        if key not in keys:
            raise UsageError(f"{path}: unknown key '{where}'", f"allowed keys: {', '.join(sorted(keys))}")
        kind, allowed = keys[key]
        if key == "qmp" and isinstance(value, str):
            table[key] = value = [value]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is list and ok:
            ok = all(isinstance(v, str) for v in value)
        if kind is int and ok:
            ok = value >= 1 and (key != "workers" or value <= 64)
        if key == "app_consistent_fallback" and ok:
            ok = value in FALLBACKS
        if not ok:
            raise UsageError(f"{path}: bad value for '{where}': {value!r}", f"it must be {allowed}")


def load_config(path: str | None) -> dict[str, Any]:
    """The config file's settings: an explicit path must exist; the default paths may not."""
    explicit = path or os.environ.get("VMDP_CONFIG")
    if explicit:
        candidates = [Path(explicit)]
        if not candidates[0].exists():
            raise UsageError(f"config file {explicit} does not exist", "fix --config or VMDP_CONFIG")
    else:
        candidates = [p.expanduser() for p in CONFIG_PATHS if p.expanduser().exists()]
    if not candidates:
        return {}
    cfg_path = candidates[0]
    try:
        doc = tomllib.loads(cfg_path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read config file {cfg_path}: {exc}", "fix the TOML syntax") from exc
    _check(cfg_path, doc, TOP_KEYS, "")
    for name, table in doc.get("vm", {}).items():
        if not isinstance(table, dict):
            raise UsageError(f"{cfg_path}: 'vm.{name}' must be a table", "write it as [vm.NAME] with per-VM keys")
        _check(cfg_path, table, VM_KEYS, f"vm.{name}.")
    return doc


def resolve(
    repo: str | None, qmp: tuple[str, ...] = (), scratch: str | None = None, config: str | None = None
) -> Settings:
    cfg = load_config(config)
    repository = repo or os.environ.get("VMDP_REPO") or cfg.get("repository")
    env_qmp = [g for g in os.environ.get("VMDP_QMP", "").split(":") if g]
    return Settings(
        repository=Path(repository).expanduser() if repository else _default_repository(),
        qmp=list(qmp) or env_qmp or cfg.get("qmp", []),
        scratch=Path(scratch or os.environ.get("VMDP_SCRATCH") or cfg.get("scratch") or _default_scratch()),
        config=cfg,
    )
