"""The `vmdp` entry point: the command tree, dsmc-style spellings and the one error handler."""

from __future__ import annotations

import ctypes
import logging
import re
import signal
import sys
from typing import Any

import click

from vmdp import __version__
from vmdp.cli.backup_cmd import backup
from vmdp.cli.cleanup_cmd import cleanup
from vmdp.cli.maintenance_cmd import expire_group, gc_cmd, repo_group, verify_cmd
from vmdp.cli.query_cmd import query
from vmdp.cli.restore_cmd import restore
from vmdp.cli.upgrade_cmd import upgrade
from vmdp.errors import VmdpError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vmdp")
def cli() -> None:
    """vmdp: incremental-forever VM backups with resilient change tracking.

    Options may also be spelled dsmc-style: -mode=iffull, -detail, -inactive,
    -preview, -pitdate=2026-11-25, -pittime=14:00:00, -vmname=NEW.
    """


cli.add_command(backup)
cli.add_command(query)
cli.add_command(restore)
cli.add_command(upgrade)
cli.add_command(cleanup)
cli.add_command(expire_group)
cli.add_command(gc_cmd)
cli.add_command(verify_cmd)
cli.add_command(repo_group)


def _long_options(group: click.Group) -> set[str]:
    names: set[str] = set()
    for command in group.commands.values():
        if isinstance(command, click.Group):
            names |= _long_options(command)
        for param in command.params:
            names |= {o[2:] for o in getattr(param, "opts", []) if o.startswith("--")}
    return names


def dsmc_argv(argv: list[str]) -> list[str]:
    """Rewrite dsmc spellings (`-detail`, `-mode=iffull`) of known long options to `--detail`."""
    known = _long_options(cli)
    out = []
    for arg in argv:
        m = re.fullmatch(r"-([a-z][a-z-]+)(=.*)?", arg)
        out.append(f"-{arg}" if m and m.group(1) in known else arg)
    return out


def _tune_malloc() -> None:
    """Keep freed chunk-sized buffers in the heap.

    By default glibc maps every 4 MiB buffer fresh from the kernel and unmaps it when freed,
    so each chunk costs a thousand page faults: half of a backup's time in benchmarks/.
    Two arenas and a modest trim threshold keep what the heap retains (and so RSS) bounded.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: glibc's maximum
        libc.mallopt(-1, 16 << 20)  # M_TRIM_THRESHOLD
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def _terminate(signum: int, frame: Any) -> None:
    # SIGTERM unwinds like Ctrl-C, so snapshots and tracking points are cleaned up.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="vmdp: %(levelname)s: %(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, _terminate)
    _tune_malloc()
    args = dsmc_argv(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        cli.main(args, prog_name="vmdp", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.stderr.write("vmdp: interrupted\n")
        sys.exit(1)
    except VmdpError as exc:
        if debug:
            logging.exception("failed")
        sys.stderr.write(f"vmdp: error: {exc.message}\n")
        if exc.hint:
            sys.stderr.write(f"vmdp: fix: {exc.hint}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("vmdp: interrupted; nothing partial was kept\n")
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        sys.stderr.write(f"vmdp: internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)\n")
        sys.exit(1)
