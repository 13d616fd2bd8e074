"""Settings read at the edge: command-line options, then the environment, then a TOML config file.

Nothing below the CLI reads the environment or a config file; what is resolved here is
passed down.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmdp.errors import UsageError

CONFIG_PATHS = (Path("/etc/vmdp/vmdp.toml"), Path("~/.config/vmdp/vmdp.toml"))
_KEYS = {"repository": str, "qmp": list, "scratch": str}


@dataclass
class Settings:
    repository: Path
    qmp: list[str]
    scratch: Path


def _default_repository() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/vmdp")
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share") / "vmdp"


def _default_scratch() -> Path:
    return Path("/var/tmp/vmdp" if os.geteuid() == 0 else f"/var/tmp/vmdp-{os.geteuid()}")


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
    for key, value in doc.items():
        if key not in _KEYS:
            raise UsageError(f"{cfg_path}: unknown key '{key}'", f"allowed keys: {', '.join(sorted(_KEYS))}")
        if key == "qmp" and isinstance(value, str):
            doc[key] = value = [value]
        if not isinstance(value, _KEYS[key]):
            raise UsageError(f"{cfg_path}: '{key}' must be a {_KEYS[key].__name__}")
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
    )
