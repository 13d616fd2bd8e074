"""The QEMU guest agent (qemu-ga): freezing and thawing the guest's filesystems.

The agent speaks QMP-style JSON over the VM's virtio-serial channel, without a greeting and
without a session: a client first sends ``guest-sync-delimited`` and skips everything up to
the 0xFF byte the agent sends back, so a reply left over from an earlier client is never
taken for this one's. No maintained PyPI client exists for this small protocol.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import time
from typing import Any

from vmdp.errors import HypervisorError

log = logging.getLogger(__name__)


class AgentError(HypervisorError):
    """The guest agent is missing, silent, or refused a command."""


class GuestAgent:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._buf = b""
        try:
            self._sock.connect(path)
            self._sync()
        except OSError as exc:
            self.close()
            raise AgentError(f"the guest agent at {path} does not answer: {exc}") from None

    def _send(self, command: str, **args: Any) -> None:
        msg: dict[str, Any] = {"execute": command}
        if args:
            msg["arguments"] = args
        self._sock.sendall(json.dumps(msg).encode() + b"\n")

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while True:
            line, sep, rest = self._buf.partition(b"\n")
            if sep:
                self._buf = rest
                if line.strip():
                    return dict(json.loads(line))
                continue
            if time.monotonic() > deadline:
                raise TimeoutError
            self._sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("the agent closed the connection")
            self._buf += chunk

    def _sync(self) -> None:
        token = secrets.randbelow(2**31)
        self._send("guest-sync-delimited", id=token)
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\xff" not in self._buf:
                if time.monotonic() > deadline:
                    raise TimeoutError("no reply to guest-sync")
                chunk = self._sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the agent closed the connection")
                self._buf += chunk
            self._buf = self._buf.split(b"\xff")[-1]
            reply = self._read_message(deadline)
            if reply.get("return") == token:
                return

    def cmd(self, command: str, timeout: float | None = None, **args: Any) -> Any:
        log.debug("guest agent %s %s", command, args)
        try:
            self._send(command, **args)
            reply = self._read_message(time.monotonic() + (timeout or self.timeout))
        except (OSError, TimeoutError, ValueError) as exc:
            raise AgentError(f"guest agent {command} failed: {exc or type(exc).__name__}") from None
        if "error" in reply:
            raise AgentError(f"guest agent refused {command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def freeze(self) -> int:
        """Freeze every guest filesystem; the number frozen."""
        return int(self.cmd("guest-fsfreeze-freeze", timeout=60))

    def thaw(self) -> int:
        return int(self.cmd("guest-fsfreeze-thaw", timeout=60))

    def close(self) -> None:
        self._sock.close()
