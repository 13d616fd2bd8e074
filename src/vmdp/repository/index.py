"""The per-disk index: one digest per fixed-size slot, complete for every version.

Binary layout (little endian)::

    magic  b"VMDPIDX1"
    u64    capacity      disk size in bytes
    u64    chunk_size    slot size in bytes (the last slot may be shorter)
    u64    count         number of slots = ceil(capacity / chunk_size)
    count x 32 bytes     BLAKE3 digest of the slot's content; 32 zero bytes for an all-zero slot

Because every version carries a full index, restoring a version never reads another one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmdp.errors import CorruptData
from vmdp.repository.chunks import DIGEST_SIZE, ZERO_DIGEST

MAGIC = b"VMDPIDX1"
_HEADER = struct.Struct("<8sQQQ")


@dataclass
class DiskIndex:
    capacity: int
    chunk_size: int
    digests: list[bytes]

    @classmethod
    def empty(cls, capacity: int, chunk_size: int) -> DiskIndex:
        return cls(capacity, chunk_size, [ZERO_DIGEST] * -(-capacity // chunk_size))

    def slot_range(self, slot: int) -> tuple[int, int]:
        """Offset and length of a slot."""
        offset = slot * self.chunk_size
        return offset, min(self.chunk_size, self.capacity - offset)

    def to_bytes(self) -> bytes:
        return _HEADER.pack(MAGIC, self.capacity, self.chunk_size, len(self.digests)) + b"".join(self.digests)

    @classmethod
    def from_bytes(cls, data: bytes, what: str) -> DiskIndex:
        try:
            magic, capacity, chunk_size, count = _HEADER.unpack_from(data)
        except struct.error as exc:
            raise CorruptData(f"{what} is truncated") from exc
        body = memoryview(data)[_HEADER.size :]
        if magic != MAGIC or chunk_size == 0 or count != -(-capacity // chunk_size) or len(body) != count * DIGEST_SIZE:
            raise CorruptData(f"{what} is not a valid index")
        return cls(capacity, chunk_size, [bytes(body[i : i + DIGEST_SIZE]) for i in range(0, len(body), DIGEST_SIZE)])
