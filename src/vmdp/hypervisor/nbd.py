"""Reading an NBD export with libnbd: allocation and dirty-bitmap extents, and data.

libnbd (Debian's python3-libnbd) does the protocol in C and releases the GIL, so several
readers in a thread pool read in parallel, each on its own connection.
"""

from __future__ import annotations

from collections.abc import Iterator

import nbd

from vmdp.errors import HypervisorError
from vmdp.model import Extent

ALLOCATION = "base:allocation"
_MAX_STATUS = 1 << 30  # bytes asked per block-status request
_MAX_READ = 32 << 20  # QEMU's NBD server refuses larger requests


class NbdReader:
    """One connection to one export; `bitmap` names a dirty bitmap exported with it."""

    def __init__(self, socket: str, export: str, bitmap: str | None = None) -> None:
        self.bitmap_context = f"qemu:dirty-bitmap:{bitmap}" if bitmap else None
        self._h = nbd.NBD()
        try:
            self._h.set_export_name(export)
            self._h.add_meta_context(ALLOCATION)
            if self.bitmap_context:
                self._h.add_meta_context(self.bitmap_context)
            self._h.connect_unix(socket)
            self.size = self._h.get_size()
        except nbd.Error as exc:
            raise HypervisorError(f"cannot read NBD export {export} at {socket}: {exc}") from None

    def _status(self, context: str, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """Yield (offset, length, flags) covering [offset, offset+length) for one meta context."""
        end = offset + length
        while offset < end:
            found: list[tuple[int, int, int]] = []

            def collect(meta: str, start: int, entries: list[int], err: object, found: list = found) -> int:
                if meta == context:
                    pos = start
                    for i in range(0, len(entries), 2):
                        found.append((pos, entries[i], entries[i + 1]))
                        pos += entries[i]
                return 0

            try:
                self._h.block_status(min(end - offset, _MAX_STATUS), offset, collect)
            except nbd.Error as exc:
                raise HypervisorError(f"NBD block status failed at offset {offset}: {exc}") from None
            if not found:
                raise HypervisorError(f"NBD server sent no {context} extents at offset {offset}")
            for pos, ext_len, flags in found:
                ext_len = min(ext_len, end - pos)
                if ext_len > 0:
                    yield pos, ext_len, flags
                    offset = pos + ext_len

    def allocation(self, offset: int, length: int) -> Iterator[Extent]:
        """Ranges that hold data (`data=True`) or read as zeros (unallocated or zero clusters)."""
        for pos, ext_len, flags in self._status(ALLOCATION, offset, length):
            yield Extent(pos, ext_len, data=not flags & nbd.STATE_ZERO)

    def dirty(self, offset: int, length: int) -> Iterator[Extent]:
        """Ranges the exported bitmap marks as changed."""
        assert self.bitmap_context
        for pos, ext_len, flags in self._status(self.bitmap_context, offset, length):
            if flags & 1:
                yield Extent(pos, ext_len)

    def read(self, offset: int, length: int) -> bytes:
        parts = []
        try:
            for pos in range(offset, offset + length, _MAX_READ):
                parts.append(self._h.pread(min(_MAX_READ, offset + length - pos), pos))
        except nbd.Error as exc:
            raise HypervisorError(f"NBD read failed at offset {offset}: {exc}") from None
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        try:
            self._h.shutdown()
        except nbd.Error:
            pass
        del self._h
