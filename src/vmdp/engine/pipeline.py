"""The streaming data path: slots to read → parallel read, hash, compress, store → index.

Memory in flight is bounded: at most `2 × workers` slots are buffered at any time, whatever
the disk size, and the slot list is produced window by window from NBD block status.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from vmdp.model import Extent
from vmdp.repository import Repository
from vmdp.repository.chunks import ZERO_DIGEST
from vmdp.repository.index import DiskIndex

WINDOW = 1 << 30  # bytes of block status asked at a time


class DiskReader(Protocol):
    def allocation(self, offset: int, length: int) -> Iterator[Extent]: ...

    def dirty(self, offset: int, length: int) -> Iterator[Extent]: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


@dataclass
class DiskResult:
    index: DiskIndex
    read_bytes: int = 0
    stored_bytes: int = 0


def slot_work(
    reader: DiskReader, capacity: int, chunk_size: int, incremental: bool, forced: frozenset[int] = frozenset()
) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    """Yield (slot, data ranges inside it) for every slot to compute: changed slots, or all of them.

    `forced` slots are read even when unchanged: their chunk was lost (quarantined by verify).
    """
    window = max(chunk_size, WINDOW // chunk_size * chunk_size)
    for wstart in range(0, capacity, window):
        wlen = min(window, capacity - wstart)
        alloc = [e for e in reader.allocation(wstart, wlen) if e.data]
        if incremental:
            first, last = wstart // chunk_size, (wstart + wlen - 1) // chunk_size
            slots: list[int] | range = sorted(
                {
                    s
                    for e in reader.dirty(wstart, wlen)
                    for s in range(e.offset // chunk_size, (e.end - 1) // chunk_size + 1)
                }
                | {s for s in forced if first <= s <= last}
            )
        else:
            slots = range(wstart // chunk_size, (wstart + wlen - 1) // chunk_size + 1)
        i = 0
        for slot in slots:
            start, end = slot * chunk_size, min((slot + 1) * chunk_size, capacity)
            while i < len(alloc) and alloc[i].end <= start:
                i += 1
            parts, j = [], i
            while j < len(alloc) and alloc[j].offset < end:
                parts.append((max(alloc[j].offset, start), min(alloc[j].end, end)))
                j += 1
            yield slot, parts


def planned_bytes(
    reader: DiskReader, capacity: int, chunk_size: int, incremental: bool, forced: frozenset[int] = frozenset()
) -> int:
    """Bytes a backup of this disk will read: the total of its progress bar."""
    return sum(b - a for _, parts in slot_work(reader, capacity, chunk_size, incremental, forced) for a, b in parts)


def bounded_map(
    workers: int,
    items: Iterator[tuple[int, list[tuple[int, int]]]] | Iterator[tuple[int, bytes]],
    work: Callable[..., object],
    on_result: Callable[[object], None],
    budget: threading.Semaphore | None = None,
) -> None:
    """Run `work(*item)` in a pool with at most 2 × workers items in flight, results in order.

    `budget`, shared by several disks or VMs running at once, bounds their items in flight
    together: before waiting for a permit, a caller consumes its own oldest result, so every
    caller that holds permits can always give them back.
    """
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vmdp")
    pending: deque[Future[object]] = deque()

    def consume() -> None:
        try:
            on_result(pending.popleft().result())
        finally:
            if budget:
                budget.release()

    try:
        for item in items:
            if budget:
                while not budget.acquire(blocking=False):
                    if pending:
                        consume()
                    else:
                        budget.acquire()
                        break
            pending.append(pool.submit(work, *item))
            if len(pending) >= 2 * workers:
                consume()
        while pending:
            consume()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if budget:
            for _ in pending:
                budget.release()


def backup_disk(
    open_reader: Callable[[], DiskReader],
    repo: Repository,
    capacity: int,
    base: DiskIndex | None,
    workers: int,
    advance: Callable[[int], None],
    control: DiskReader,
    budget: threading.Semaphore | None = None,
    forced: frozenset[int] = frozenset(),
) -> DiskResult:
    """Read the changed (or all allocated) slots of one disk and return its complete new index."""
    chunk_size = repo.chunk_size
    result = DiskResult(
        DiskIndex(capacity, chunk_size, list(base.digests)) if base else DiskIndex.empty(capacity, chunk_size)
    )
    local = threading.local()
    readers: list[DiskReader] = []
    lock = threading.Lock()

    def reader() -> DiskReader:
        if not hasattr(local, "reader"):
            local.reader = open_reader()
            with lock:
                readers.append(local.reader)
        return local.reader

    def work(slot: int, parts: list[tuple[int, int]]) -> tuple[int, bytes, int, int]:
        if not parts:
            return slot, ZERO_DIGEST, 0, 0
        start, length = result.index.slot_range(slot)
        if len(parts) == 1 and parts[0] == (start, start + length):
            data: bytes | bytearray = reader().read(start, length)
        else:
            data = bytearray(length)
            for a, b in parts:
                data[a - start : b - start] = reader().read(a, b - a)
        nread = sum(b - a for a, b in parts)
        digest, stored = repo.put_chunk(data)
        advance(nread)
        return slot, digest, stored, nread

    def on_result(res: object) -> None:
        slot, digest, stored, nread = res  # type: ignore[misc]
        result.index.digests[slot] = digest
        result.stored_bytes += stored
        result.read_bytes += nread

    try:
        bounded_map(
            workers, slot_work(control, capacity, chunk_size, base is not None, forced), work, on_result, budget
        )
    finally:
        for r in readers:
            r.close()
    return result
