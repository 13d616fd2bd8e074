"""Chunk codec: BLAKE3 digest of the plain content, zstd compression, digest check on every read.

A stored chunk is one tag byte then the payload: ``Z`` a zstd frame, ``R`` the raw bytes
(kept raw when zstd would not make it smaller, e.g. encrypted guest data).
"""

from __future__ import annotations

import threading

import blake3
import zstandard

from vmdp.errors import CorruptData

DIGEST_SIZE = 32
ZERO_DIGEST = bytes(DIGEST_SIZE)  # an all-zero slot: nothing is stored for it
_local = threading.local()


def digest(data: bytes | memoryview) -> bytes:
    # blake3 releases the GIL on large inputs, so hashing runs in parallel in a thread pool.
    return blake3.blake3(data, max_threads=1).digest()


def _compressor() -> zstandard.ZstdCompressor:
    # zstd contexts are not thread-safe; one per thread keeps the pool lock-free.
    if not hasattr(_local, "c"):
        _local.c = zstandard.ZstdCompressor(level=3)
        _local.probe = zstandard.ZstdCompressor(level=1)
        _local.d = zstandard.ZstdDecompressor()
    return _local.c


_SAMPLE = 16 << 10
_SAMPLES = 8


def _looks_incompressible(view: memoryview) -> bool:
    """True when samples spread over the chunk do not compress.

    Encrypted or already-compressed guest data is common; zstd on it runs at a third of the
    speed of everything else a backup does per byte, only to keep the data raw.
    """
    if len(view) < 4 * _SAMPLES * _SAMPLE:
        return False
    fast = _local.probe
    step = (len(view) - _SAMPLE) // (_SAMPLES - 1)
    return all(
        len(fast.compress(view[i : i + _SAMPLE])) > _SAMPLE * 0.97 for i in range(0, len(view) - _SAMPLE + 1, step)
    )


def encode(data: bytes | memoryview) -> tuple[bytes, bytes | memoryview]:
    """The tag and the payload to store, kept apart so that writing them copies nothing."""
    compressor = _compressor()
    if _looks_incompressible(memoryview(data).cast("B")):
        return b"R", data
    packed = compressor.compress(data)
    if len(packed) < len(data):
        return b"Z", packed
    return b"R", data


def decode(stored: bytes, expected: bytes, what: str) -> bytes | memoryview:
    """Decompress `stored` and check it against `expected`; raise CorruptData naming `what`."""
    _compressor()
    tag, payload = stored[:1], memoryview(stored)[1:]
    try:
        if tag == b"Z":
            data = _local.d.decompress(payload)
        elif tag == b"R":
            data = payload
        else:
            raise ValueError(f"unknown tag {tag!r}")
    except (ValueError, zstandard.ZstdError) as exc:
        raise CorruptData(f"{what} is damaged: {exc}", "run 'vmdp verify' to find every damaged version") from exc
    if digest(data) != expected:
        raise CorruptData(f"{what} does not match its digest", "run 'vmdp verify' to find every damaged version")
    return data


_ZEROS = memoryview(bytes(1 << 20))


def is_zero(data: bytes | memoryview) -> bool:
    """True when every byte is zero; memoryview comparison is a C memcmp, not a Python loop."""
    view = memoryview(data).cast("B")
    step = len(_ZEROS)
    for pos in range(0, len(view), step):
        part = view[pos : pos + step]
        if part != _ZEROS[: len(part)]:
            return False
    return True
