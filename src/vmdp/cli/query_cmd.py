"""`vmdp query vm`: list the versions the repository holds."""

from __future__ import annotations

import click

from vmdp.cli import output
from vmdp.cli.common import common_options, open_repository, resolve
from vmdp.errors import NotFound


@click.group(name="query")
def query() -> None:
    """List backups."""


@query.command(name="vm")
@click.argument("name", required=False)
@click.option("--detail", is_flag=True, help="Add per-disk location, capacity, bytes, tracking point, reason.")
@click.option("--inactive", is_flag=True, help="List every version kept, not only the active (latest) one.")
@common_options
def query_vm_cmd(
    name: str | None, detail: bool, inactive: bool, repo: str | None, config: str | None, as_json: bool
) -> None:
    """Show the active version of each VM (or of NAME); --inactive shows all versions."""
    repository = open_repository(resolve(repo, config=config), create=False)
    history = repository.versions(name)
    if name and not history:
        raise NotFound(f"no backup of VM {name} in {repository.root}", "run 'vmdp query vm' to list protected VMs")
    shown = history if inactive else [v for v in history if v.active]
    if as_json:
        output.print_json([output.version_doc(v, detail, history) for v in shown])
    elif not shown:
        output.stdout.print(f"no backups in {repository.root}")
    else:
        output.versions_table(shown, detail)
