"""A synchronous QMP session over qemu.qmp's asyncio client, with a timeout on every step.

qemu.qmp's own legacy sync wrapper waits forever for the greeting, and a QMP socket serves
one client at a time, so a busy socket would hang vmdp; this wrapper bounds every wait.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from vmdp.errors import HypervisorError, NotFound

log = logging.getLogger(__name__)


class QmpCommandError(HypervisorError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, desc: str) -> None:
        super().__init__(f"QEMU refused {command}: {desc}")
        self.command = command
        self.desc = desc


class Qmp:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient("vmdp")
        try:
            self._run(self._client.connect(path), timeout)
        except TimeoutError:
            self._close_loop()
            raise HypervisorError(
                f"QMP socket {path} did not answer within {timeout:.0f}s",
                "another client may hold it (QMP serves one at a time): give vmdp its own -qmp socket",
            ) from None
        except ConnectError as exc:
            self._close_loop()
            cause = exc.exc if isinstance(exc.exc, OSError) else exc
            raise NotFound(
                f"cannot connect to QMP socket {path}: {getattr(cause, 'strerror', None) or cause}",
                "check that the VM is running and that --qmp names its socket",
            ) from None

    def _run(self, coro: Any, timeout: float | None) -> Any:
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def cmd(self, command: str, timeout: float | None = None, **args: Any) -> Any:
        log.debug("qmp %s %s", command, args)
        try:
            return self._run(self._client.execute(command, args or None), timeout or self.timeout)
        except ExecuteError as exc:
            raise QmpCommandError(command, str(exc)) from None
        except TimeoutError:
            raise HypervisorError(f"QEMU did not answer {command} within {timeout or self.timeout:.0f}s") from None
        except (QMPError, OSError, EOFError) as exc:
            raise HypervisorError(f"lost the QMP connection to {self.path} during {command}: {exc}") from None

    def _close_loop(self) -> None:
        self._loop.close()

    def close(self) -> None:
        try:
            self._run(self._client.disconnect(), self.timeout)
        except Exception:  # closing a dead connection must not mask the real error
            log.debug("QMP disconnect failed", exc_info=True)
        self._close_loop()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
