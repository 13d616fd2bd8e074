"""What every command shares: options read at the edge and opening the repository."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import click

from vmdp.cli.settings import Settings, resolve
from vmdp.errors import RepositoryError
from vmdp.repository import Repository


def common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--repo, --config, --json and --debug on a leaf command."""

    @click.option("--repo", metavar="PATH", help="Repository directory [env VMDP_REPO; default /var/lib/vmdp].")
    @click.option("--config", metavar="FILE", help="TOML config file [env VMDP_CONFIG].")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
    @click.option("--debug", is_flag=True, help="Log QMP traffic and show tracebacks.")
    @functools.wraps(func)
    def wrapper(*args: Any, debug: bool, **kwargs: Any) -> Any:
        if debug:
            logging.getLogger().setLevel(logging.DEBUG)
            click.get_current_context().obj = {"debug": True}
        return func(*args, **kwargs)

    return wrapper


def open_repository(settings: Settings, create: bool) -> Repository:
    try:
        return Repository.open(settings.repository, create=create)
    except PermissionError as exc:
        raise RepositoryError(
            f"no permission to use the repository {settings.repository}", "run as its owner or choose another --repo"
        ) from exc


__all__ = ["common_options", "open_repository", "resolve"]
