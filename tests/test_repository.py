"""The repository on real files, real SQLite, a real tmpfs and real processes: no mocks."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmdp.errors import CorruptData, LockedError, NotFound, RepositoryError
from vmdp.model import DiskVersion, Mode, Version
from vmdp.repository import Repository, chunks, manifest
from vmdp.repository.index import DiskIndex

KiB = 1 << 10
CHUNK = 64 * KiB
UUID_A = "0f6b8c1e-0000-4000-8000-00000000000a"
UUID_B = "0f6b8c1e-0000-4000-8000-00000000000b"
UUID_C = "0f6b8c1e-0000-4000-8000-00000000000c"


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    r = Repository.open(tmp_path / "repo", chunk_size=CHUNK)
    yield r
    r.close()


def compressible(size: int = CHUNK) -> bytes:
    return (b"vmdp compresses this line well. " * (size // 32 + 1))[:size]


def incompressible(size: int = CHUNK, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def disk(name: str, index: str = "00" * 32, **kw: object) -> DiskVersion:
    fields: dict[str, object] = {
        "name": name,
        "location": f"/var/lib/images/{name}.qcow2",
        "format": "qcow2",
        "capacity": 10 * CHUNK + 123,
        "chunk_size": CHUNK,
        "index": index,
        "mode": Mode.IFFULL,
        "reason": None,
        **kw,
    }
    return DiskVersion(**fields)  # type: ignore[arg-type]


def version(backup_id: str, finished: str, vm: str = "vm-a", uuid: str = UUID_A, **kw: object) -> Version:
    fields: dict[str, object] = {
        "backup_id": backup_id,
        "vm": vm,
        "uuid": uuid,
        "mode": Mode.IFFULL,
        "started": finished,
        "finished": finished,
        "host": "host1",
        "disks": [disk("vda")],
        **kw,
    }
    return Version(**fields)  # type: ignore[arg-type]


def stored_path(repo: Repository, kind: str, digest: bytes) -> Path:
    """Where repo.py's docstring says an object lives: <kind>/ab/<hex digest>."""
    return repo.root / kind / digest.hex()[:2] / digest.hex()


def object_files(repo: Repository, kind: str) -> list[Path]:
    return sorted(p for p in (repo.root / kind).rglob("*") if p.is_file())


# chunk codec ---------------------------------------------------------------


def test_compressible_chunk_is_stored_zstd_and_reads_back(repo: Repository) -> None:
    data = compressible()
    digest, stored = repo.put_chunk(data)
    assert digest == chunks.digest(data) and len(digest) == chunks.DIGEST_SIZE
    raw = stored_path(repo, "chunks", digest).read_bytes()
    assert raw[:1] == b"Z"
    assert stored == len(raw) < len(data) // 10
    assert repo.get_chunk(digest, "vda slot 0") == data


def test_incompressible_chunk_is_stored_raw_and_reads_back(repo: Repository) -> None:
    data = incompressible()
    digest, stored = repo.put_chunk(memoryview(data))
    raw = stored_path(repo, "chunks", digest).read_bytes()
    assert raw == b"R" + data  # zstd would not shrink it: kept raw, one tag byte of overhead
    assert stored == len(data) + 1
    assert repo.get_chunk(digest, "vda slot 0") == data


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=4 * KiB), st.binary(min_size=1, max_size=64).map(lambda b: b * 50)))
def test_any_bytes_round_trip_through_the_store(repo: Repository, data: bytes) -> None:
    digest, stored = repo.put_chunk(data)
    if not any(data):
        assert (digest, stored) == (chunks.ZERO_DIGEST, 0)
        return
    raw = stored_path(repo, "chunks", digest).read_bytes()
    assert raw[:1] in (b"Z", b"R") and len(raw) <= len(data) + 1
    assert stored in (0, len(raw))  # 0 when hypothesis repeats an example: deduplicated
    assert repo.get_chunk(digest, "w") == data


@pytest.mark.parametrize("kind", ["compressible", "incompressible"])
@pytest.mark.parametrize("where", ["tag", "middle", "last"])
def test_flipped_byte_in_stored_chunk_is_corrupt_data_naming_the_chunk(repo: Repository, kind: str, where: str) -> None:
    data = compressible() if kind == "compressible" else incompressible()
    digest, _ = repo.put_chunk(data)
    path = stored_path(repo, "chunks", digest)
    raw = bytearray(path.read_bytes())
    pos = {"tag": 0, "middle": len(raw) // 2, "last": len(raw) - 1}[where]
    raw[pos] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptData) as err:
        repo.get_chunk(digest, "VM vm-a disk vda")
    assert digest.hex() in str(err.value)
    assert "VM vm-a disk vda" in str(err.value)
    assert err.value.hint and "verify" in err.value.hint


def test_empty_or_truncated_chunk_file_is_corrupt_data(repo: Repository) -> None:
    digest, _ = repo.put_chunk(compressible())
    path = stored_path(repo, "chunks", digest)
    raw = path.read_bytes()
    for damaged in (b"", raw[:1], raw[: len(raw) // 2]):
        path.write_bytes(damaged)
        with pytest.raises(CorruptData, match=digest.hex()):
            repo.get_chunk(digest, "vda")


def test_missing_chunk_is_a_repository_error_naming_it(repo: Repository) -> None:
    digest, _ = repo.put_chunk(incompressible())
    stored_path(repo, "chunks", digest).unlink()
    with pytest.raises(RepositoryError) as err:
        repo.get_chunk(digest, "vda slot 3")
    assert not isinstance(err.value, CorruptData)
    assert digest.hex() in str(err.value) and "missing" in str(err.value) and "vda slot 3" in str(err.value)


@pytest.mark.parametrize("size", [1, CHUNK, CHUNK + 123, (1 << 20) + 5])
def test_all_zero_data_is_stored_as_nothing(repo: Repository, size: int) -> None:
    assert repo.put_chunk(bytes(size)) == (chunks.ZERO_DIGEST, 0)
    assert repo.put_chunk(memoryview(bytearray(size))) == (chunks.ZERO_DIGEST, 0)
    assert object_files(repo, "chunks") == []


def test_zero_detection_sees_one_nonzero_byte_anywhere(repo: Repository) -> None:
    for pos in (0, (1 << 20) - 1, 1 << 20, (2 << 20) + 7):
        data = bytearray((2 << 20) + 8)
        data[pos] = 1
        digest, stored = repo.put_chunk(bytes(data))
        assert digest != chunks.ZERO_DIGEST and stored > 0
        assert repo.get_chunk(digest, "x") == data


def test_identical_data_is_stored_once(repo: Repository) -> None:
    data = incompressible(seed=7)
    first = repo.put_chunk(data)
    second = repo.put_chunk(bytes(data))
    assert first[0] == second[0]
    assert first[1] == len(data) + 1 and second[1] == 0
    assert object_files(repo, "chunks") == [stored_path(repo, "chunks", first[0])]
    other = repo.put_chunk(incompressible(seed=8))
    assert other[1] > 0 and len(object_files(repo, "chunks")) == 2
    repo.sync()
    assert os.listdir(repo.tmp) == []


# DiskIndex -----------------------------------------------------------------


def digest_of(i: int) -> bytes:
    return chunks.digest(i.to_bytes(4, "little"))


def test_index_round_trip_with_a_short_last_slot() -> None:
    capacity = 10 * CHUNK + 123
    index = DiskIndex.empty(capacity, CHUNK)
    assert len(index.digests) == 11 and set(index.digests) == {chunks.ZERO_DIGEST}
    index.digests[3] = digest_of(3)
    index.digests[10] = digest_of(10)
    data = index.to_bytes()
    # the documented layout: magic, capacity, chunk size, count, then 32 bytes per slot
    assert struct.unpack_from("<8sQQQ", data) == (b"VMDPIDX1", capacity, CHUNK, 11)
    assert len(data) == 32 + 11 * 32
    assert data[32 + 3 * 32 : 32 + 4 * 32] == digest_of(3)
    again = DiskIndex.from_bytes(data, "idx")
    assert again == index
    assert again.slot_range(0) == (0, CHUNK)
    assert again.slot_range(9) == (9 * CHUNK, CHUNK)
    assert again.slot_range(10) == (10 * CHUNK, 123)


def test_index_of_an_exact_multiple_has_no_short_slot() -> None:
    index = DiskIndex.empty(4 * CHUNK, CHUNK)
    assert len(index.digests) == 4 and index.slot_range(3) == (3 * CHUNK, CHUNK)
    assert DiskIndex.from_bytes(DiskIndex.empty(0, CHUNK).to_bytes(), "i") == DiskIndex(0, CHUNK, [])


def _with_header(data: bytes, **changes: object) -> bytes:
    magic, capacity, chunk_size, count = struct.unpack_from("<8sQQQ", data)
    fields = {"magic": magic, "capacity": capacity, "chunk_size": chunk_size, "count": count, **changes}
    header = struct.pack("<8sQQQ", fields["magic"], fields["capacity"], fields["chunk_size"], fields["count"])
    return header + data[32:]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda d: d[:31], id="shorter-than-header"),
        pytest.param(lambda d: b"", id="empty"),
        pytest.param(lambda d: d[:-1], id="last-digest-short"),
        pytest.param(lambda d: d[:-32], id="one-digest-missing"),
        pytest.param(lambda d: d + bytes(32), id="one-digest-too-many"),
        pytest.param(lambda d: _with_header(d, magic=b"VMDPIDX2"), id="bad-magic"),
        pytest.param(lambda d: _with_header(d, chunk_size=0), id="zero-chunk-size"),
        pytest.param(lambda d: _with_header(d, capacity=20 * CHUNK), id="capacity-disagrees-with-count"),
        pytest.param(lambda d: _with_header(d, count=12) + bytes(32), id="count-disagrees-with-capacity"),
        pytest.param(lambda d: _with_header(d, chunk_size=CHUNK // 2), id="chunk-size-disagrees-with-count"),
    ],
)
def test_index_rejects_truncated_or_inconsistent_data(damage: Callable[[bytes], bytes]) -> None:
    good = DiskIndex(10 * CHUNK + 123, CHUNK, [digest_of(i) for i in range(11)]).to_bytes()
    assert DiskIndex.from_bytes(good, "idx").capacity == 10 * CHUNK + 123
    with pytest.raises(CorruptData, match="index of vda"):
        DiskIndex.from_bytes(damage(good), "index of vda")


index_st = st.integers(1, 1 << 20).flatmap(
    lambda cs: st.integers(0, 24 * cs).flatmap(
        lambda cap: st.lists(
            st.one_of(st.just(chunks.ZERO_DIGEST), st.binary(min_size=32, max_size=32)),
            min_size=-(-cap // cs),
            max_size=-(-cap // cs),
        ).map(lambda digests: DiskIndex(cap, cs, digests))
    )
)


@settings(max_examples=80, deadline=None)
@given(index=index_st, data=st.data())
def test_index_properties(index: DiskIndex, data: st.DataObject) -> None:
    encoded = index.to_bytes()
    assert DiskIndex.from_bytes(encoded, "i") == index
    # the slots tile the disk exactly; only the last may be shorter than a chunk
    pos = 0
    for slot in range(len(index.digests)):
        offset, length = index.slot_range(slot)
        assert offset == pos and 0 < length <= index.chunk_size
        assert length == index.chunk_size or slot == len(index.digests) - 1
        pos += length
    assert pos == index.capacity
    cut = data.draw(st.integers(0, len(encoded) - 1), label="cut")
    with pytest.raises(CorruptData):
        DiskIndex.from_bytes(encoded[:cut], "i")
    extra = data.draw(st.binary(min_size=1, max_size=64), label="extra")
    with pytest.raises(CorruptData):
        DiskIndex.from_bytes(encoded + extra, "i")


def test_index_is_stored_like_a_chunk_and_checked_on_read(repo: Repository) -> None:
    index = DiskIndex(10 * CHUNK + 123, CHUNK, [digest_of(i) if i % 3 else chunks.ZERO_DIGEST for i in range(11)])
    digest_hex = repo.put_index(index)
    assert digest_hex == chunks.digest(index.to_bytes()).hex()
    assert repo.put_index(index) == digest_hex
    assert object_files(repo, "indexes") == [stored_path(repo, "indexes", bytes.fromhex(digest_hex))]
    assert repo.get_index(digest_hex, "vda of v1") == index
    path = stored_path(repo, "indexes", bytes.fromhex(digest_hex))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptData, match="vda of v1"):
        repo.get_index(digest_hex, "vda of v1")
    path.unlink()
    with pytest.raises(RepositoryError, match=f"index {digest_hex} is missing"):
        repo.get_index(digest_hex, "vda of v1")


# manifest ------------------------------------------------------------------


def rich_version() -> Version:
    return version(
        "20240501T120000Z-1a2b",
        "2024-05-01T14:00:01.250000+02:00",
        mode=Mode.IFINCR,
        started="2024-05-01T14:00:00.000001+02:00",
        reason=None,
        disks=[
            disk(
                "vda",
                index="ab" * 32,
                mode=Mode.IFINCR,
                read_bytes=3 * CHUNK,
                stored_bytes=1234,
                tracking_point="vmdp-1234abcd-2",
                granularity=65536,
            ),
            disk(
                "vdb",
                index="cd" * 32,
                capacity=1 << 30,
                reason="bitmap vmdp-1234abcd-1 is inconsistent",
                tracking_point="vmdp-1234abcd-2",
                granularity=131072,
            ),
            disk("vdc", index="ef" * 32, location="/dev/vg0/data disk ü", format="raw", capacity=0),
        ],
    )


def test_manifest_round_trip_with_several_disks() -> None:
    v = rich_version()
    data = manifest.to_bytes(v)
    doc = json.loads(data)
    assert doc["format"] == "vmdp-manifest" and doc["format_version"] == 1
    assert "active" not in doc  # derived by the catalog, never stored
    assert [d["name"] for d in doc["disks"]] == ["vda", "vdb", "vdc"]
    again = manifest.from_bytes(data, "m")
    assert again == v
    assert again.mode is Mode.IFINCR and all(isinstance(d.mode, Mode) for d in again.disks)
    v.active = True
    assert manifest.to_bytes(v) == data and manifest.from_bytes(data, "m").active is False


def _doc(**changes: object) -> bytes:
    doc = json.loads(manifest.to_bytes(rich_version()))
    doc.update(changes)
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b'{"format": "vmdp-manifest", ', id="truncated-json"),
        pytest.param(b"\xff\xfe\x00garbage", id="not-text"),
        pytest.param(b"[]", id="json-list"),
        pytest.param(_doc(format="other"), id="wrong-format"),
        pytest.param(_doc(format_version=2), id="wrong-format-version"),
        pytest.param(_doc(format=...), id="no-format"),
        pytest.param(_doc(mode="IFDIFF"), id="unknown-mode"),
        pytest.param(_doc(host=...), id="missing-field"),
        pytest.param(_doc(colour="blue"), id="unknown-field"),
        pytest.param(_doc(disks=[{"name": "vda"}]), id="incomplete-disk"),
        pytest.param(_doc(disks=["vda"]), id="disk-not-an-object"),
    ],
)
def test_invalid_manifest_is_corrupt_data(data: bytes) -> None:
    with pytest.raises(CorruptData, match=re.escape("manifests/x.json is not a valid manifest")):
        manifest.from_bytes(data, "manifests/x.json")


@pytest.mark.parametrize("data", [b'"text"', b"42", b"null"])
def test_manifest_that_is_a_json_scalar_is_corrupt_data(data: bytes) -> None:
    with pytest.raises(CorruptData):
        manifest.from_bytes(data, "m")


# Repository: open ----------------------------------------------------------


def test_repository_is_created_on_first_use_with_its_layout(tmp_path: Path) -> None:
    root = tmp_path / "new" / "repo"
    repo = Repository.open(root, chunk_size=CHUNK)
    try:
        assert sorted(p.name for p in root.iterdir()) == sorted(
            ["vmdp-repo.json", "chunks", "indexes", "manifests", "catalog.sqlite", "locks", "tmp"]
        )
        assert all((root / d).is_dir() for d in ("chunks", "indexes", "manifests", "locks", "tmp"))
        config = json.loads((root / "vmdp-repo.json").read_bytes())
        assert config == {
            "format": "vmdp-repo",
            "format_version": 1,
            "id": repo.id,
            "chunk_size": CHUNK,
            "digest": "blake3",
            "compression": "zstd",
        }
        assert len(repo.id) == 32 and repo.chunk_size == CHUNK
        assert os.listdir(root / "tmp") == []
        assert repo.versions() == []
    finally:
        repo.close()
    # reopening keeps the stored identity and chunk size, whatever the caller asks for
    again = Repository.open(root, create=False, chunk_size=4 * CHUNK)
    try:
        assert (again.id, again.chunk_size) == (repo.id, CHUNK)
    finally:
        again.close()


def test_an_empty_existing_directory_becomes_a_repository(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    Repository.open(tmp_path / "empty").close()
    assert (tmp_path / "empty" / "vmdp-repo.json").is_file()


def test_non_empty_directory_that_is_no_repository_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "home"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(RepositoryError) as err:
        Repository.open(root)
    assert str(root) in str(err.value) and "not empty" in str(err.value) and "not a vmdp repository" in str(err.value)
    assert err.value.hint and "--repo" in err.value.hint
    assert os.listdir(root) == ["notes.txt"]  # nothing was written into it


def test_a_regular_file_as_repository_is_a_repository_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(RepositoryError, match="file"):
        Repository.open(tmp_path / "file")


def test_missing_repository_without_create_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound) as err:
        Repository.open(tmp_path / "nowhere", create=False)
    assert err.value.exit_code == 2
    assert str(tmp_path / "nowhere") in str(err.value)
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(b"{not json", id="garbage"),
        pytest.param(json.dumps({"format": "vmdp-repo", "format_version": 2}).encode(), id="newer-format"),
        pytest.param(json.dumps({"format": "borg"}).encode(), id="other-tool"),
    ],
)
def test_unreadable_or_unknown_config_is_a_repository_error(tmp_path: Path, config: bytes) -> None:
    Repository.open(tmp_path / "r").close()
    (tmp_path / "r" / "vmdp-repo.json").write_bytes(config)
    with pytest.raises(RepositoryError, match=re.escape("vmdp-repo.json")):
        Repository.open(tmp_path / "r")


# Repository: versions and catalog -------------------------------------------


def three_versions() -> tuple[Version, Version, Version]:
    # the same second; the backup_id suffixes sort opposite to `finished`, so only `finished` can order them
    older = version("20240501T120000Z-ffff", "2024-05-01T12:00:00.100000+00:00")
    newer = version("20240501T120000Z-0000", "2024-05-01T12:00:00.100001+00:00", mode=Mode.IFINCR)
    other = version("20240501T110000Z-beef", "2024-05-01T11:00:00.000000+00:00", vm="vm-b", uuid=UUID_B)
    return older, newer, other


def summary(versions: list[Version]) -> list[tuple[str, bool]]:
    return [(v.backup_id, v.active) for v in versions]


def test_commit_lists_versions_with_only_the_newest_per_vm_active(repo: Repository) -> None:
    older, newer, other = three_versions()
    for v in (newer, other, older):  # not in time order: the catalog must sort
        repo.commit(v)
    assert summary(repo.versions()) == [(other.backup_id, True), (older.backup_id, False), (newer.backup_id, True)]
    assert summary(repo.versions("vm-a")) == [(older.backup_id, False), (newer.backup_id, True)]
    assert summary(repo.versions(UUID_A)) == summary(repo.versions("vm-a"))
    assert summary(repo.versions("vm-b")) == [(other.backup_id, True)]
    assert repo.versions("vm-z") == []
    listed = {v.backup_id: v for v in repo.versions()}
    assert listed[newer.backup_id].disks == newer.disks and listed[newer.backup_id].mode is Mode.IFINCR
    assert sorted(p.name for p in (repo.root / "manifests").iterdir()) == sorted(
        f"{v.backup_id}.json" for v in (older, newer, other)
    )
    assert os.listdir(repo.tmp) == []
    repo.commit(newer)  # committing again replaces, never duplicates
    assert len(repo.versions()) == 3


def test_a_new_vm_uuid_is_its_own_vm_even_with_the_same_name(repo: Repository) -> None:
    first = version("20240501T100000Z-0001", "2024-05-01T10:00:00.000000+00:00", vm="web", uuid=UUID_A)
    second = version("20240501T110000Z-0002", "2024-05-01T11:00:00.000000+00:00", vm="web", uuid=UUID_C)
    repo.commit(first)
    repo.commit(second)
    assert summary(repo.versions("web")) == [(first.backup_id, True), (second.backup_id, True)]


def test_a_renamed_vms_old_name_does_not_show_an_active_version(repo: Repository) -> None:
    before = version("20240501T100000Z-0001", "2024-05-01T10:00:00.000000+00:00", vm="old-name")
    after = version("20240501T110000Z-0002", "2024-05-01T11:00:00.000000+00:00", vm="new-name")
    repo.commit(before)
    repo.commit(after)
    assert summary(repo.versions(UUID_A)) == [(before.backup_id, False), (after.backup_id, True)]
    assert summary(repo.versions("old-name")) == [(before.backup_id, False)]


def test_newest_version_wins_across_a_utc_offset_change(repo: Repository) -> None:
    # Europe/Berlin, 27 Oct 2024: 02:30+02:00 is 00:30 UTC, and the later 02:10+01:00 is 01:10 UTC
    before = version("20241027T003000Z-0001", "2024-10-27T02:30:00.000000+02:00")
    after = version("20241027T011000Z-0002", "2024-10-27T02:10:00.000000+01:00")
    repo.commit(before)
    repo.commit(after)
    assert summary(repo.versions()) == [(before.backup_id, False), (after.backup_id, True)]


def test_lost_catalog_is_rebuilt_from_manifests(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    repo = Repository.open(root, chunk_size=CHUNK)
    for v in three_versions():
        repo.commit(v)
    before = repo.versions()
    assert repo.rebuild_catalog() == 3 and repo.versions() == before
    repo.close()
    (root / "catalog.sqlite").unlink()
    repo = Repository.open(root, create=False)
    try:
        assert (root / "catalog.sqlite").is_file()
        assert repo.versions() == before
        assert summary(repo.versions()) == summary(before)
    finally:
        repo.close()


def test_garbage_catalog_is_moved_aside_and_rebuilt(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    repo = Repository.open(root, chunk_size=CHUNK)
    for v in three_versions():
        repo.commit(v)
    before = repo.versions()
    repo.close()
    catalog = root / "catalog.sqlite"
    garbage = random.Random(3).randbytes(8 * KiB)
    catalog.write_bytes(garbage)
    repo = Repository.open(root)
    try:
        assert repo.versions() == before
        [aside] = root.glob("catalog.sqlite.damaged-*")
        assert aside.read_bytes() == garbage  # kept for inspection, never deleted
    finally:
        repo.close()


def _damage_catalog_pages(catalog: Path) -> None:
    """Keep the header page (the schema still reads) and overwrite every data page."""
    data = bytearray(catalog.read_bytes())
    page = struct.unpack_from(">H", data, 16)[0]
    assert len(data) >= 3 * page, "the catalog is too small to damage only its data pages"
    data[page:] = b"\xa5" * (len(data) - page)
    catalog.write_bytes(bytes(data))


def test_damaged_catalog_pages_are_rebuilt_or_a_clear_repository_error(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    repo = Repository.open(root, chunk_size=CHUNK)
    for i in range(4):  # a few large manifests: enough catalog pages to damage all but the first
        disks = [disk(f"vd{c}", location="/images/" + "x" * 3000) for c in "abc"]
        repo.commit(version(f"20240501T1200{i:02d}Z-0000", f"2024-05-01T12:00:{i:02d}.000000+00:00", disks=disks))
    before = repo.versions()
    repo.close()
    _damage_catalog_pages(root / "catalog.sqlite")
    repo = None
    try:
        repo = Repository.open(root)
        assert repo.rebuild_catalog() == 4
        assert repo.versions() == before
    except RepositoryError as exc:
        assert "catalog.sqlite" in str(exc) and exc.hint
    finally:
        if repo is not None:
            repo.close()


# lock_vm -------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from pathlib import Path
from vmdp.repository import Repository
repo = Repository.open(Path(sys.argv[1]), create=False)
with repo.lock_vm(sys.argv[2], sys.argv[3]):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def lock_holder() -> Iterator[Callable[[Repository, str, str], subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def hold(repo: Repository, vm_uuid: str, vm: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(repo.root), vm_uuid, vm],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == "locked\n", f"the lock holder did not start: {proc.stderr.read() if proc.stderr else ''}"
        return proc

    yield hold
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_second_lock_on_a_vm_from_another_process_is_refused(repo: Repository, lock_holder) -> None:
    proc = lock_holder(repo, UUID_A, "vm-a")
    with pytest.raises(LockedError) as err, repo.lock_vm(UUID_A, "vm-a"):
        pytest.fail("the same VM was locked twice")
    assert "vm-a" in str(err.value) and f"pid {proc.pid}" in str(err.value)
    assert err.value.hint and "retry" in err.value.hint
    assert proc.poll() is None  # the holder still runs and still holds it
    with pytest.raises(LockedError):
        with repo.lock_vm(UUID_A, "vm-a"):
            pass


def test_different_vms_are_locked_at_once(repo: Repository, lock_holder) -> None:
    lock_holder(repo, UUID_A, "vm-a")
    with repo.lock_vm(UUID_B, "vm-b"), repo.lock_vm(UUID_C, "vm-c"):
        assert (repo.root / "locks" / f"vm-{UUID_B}.lock").read_text().split()[0] == str(os.getpid())
        with pytest.raises(LockedError, match="vm-a"), repo.lock_vm(UUID_A, "vm-a"):
            pass
    # released on exit: the next backup of vm-b may run
    with repo.lock_vm(UUID_B, "vm-b"):
        pass


def test_lock_of_a_killed_process_is_released(repo: Repository, lock_holder) -> None:
    proc = lock_holder(repo, UUID_A, "vm-a")
    with pytest.raises(LockedError), repo.lock_vm(UUID_A, "vm-a"):
        pass
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    with repo.lock_vm(UUID_A, "vm-a"):
        assert (repo.root / "locks" / f"vm-{UUID_A}.lock").read_text().split()[0] == str(os.getpid())


# disk full -----------------------------------------------------------------


@pytest.fixture
def tmpfs() -> Iterator[Path]:
    """A 2 MiB tmpfs: a real filesystem that fills up. Mounting needs root; failing to mount fails."""
    mnt = Path(tempfile.mkdtemp(prefix="vmdp-full-", dir="/tmp"))
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    assert proc.returncode == 0, f"cannot mount a tmpfs on {mnt}: {proc.stderr.strip()}"
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mnt)], check=True)
        shutil.rmtree(mnt)


def fill_with_chunks(repo: Repository, seed: int) -> tuple[bytes, RepositoryError]:
    """Put random chunks until the filesystem is full; return the chunk that did not fit and the error."""
    rng = random.Random(seed)
    for _ in range(200):  # 2 MiB / 64 KiB: it must fill long before this
        data = rng.randbytes(CHUNK)
        try:
            repo.put_chunk(data)
        except RepositoryError as exc:
            return data, exc
    raise AssertionError("the 2 MiB filesystem never filled up")


def test_full_filesystem_is_a_clear_error_and_loses_nothing(tmpfs: Path) -> None:
    repo = Repository.open(tmpfs / "repo", chunk_size=CHUNK)
    try:
        stored = [compressible(), incompressible(seed=11), incompressible(seed=12)]
        digests = [repo.put_chunk(d)[0] for d in stored]
        index = DiskIndex(3 * CHUNK, CHUNK, digests)
        committed = version("20240501T120000Z-0001", "2024-05-01T12:00:00.000000+00:00")
        committed.disks = [disk("vda", index=repo.put_index(index), capacity=3 * CHUNK)]
        repo.commit(committed)

        failed, err = fill_with_chunks(repo, seed=99)
        assert not isinstance(err, CorruptData)
        assert "filesystem is full" in str(err)
        assert err.hint and "intact" in err.hint
        assert os.listdir(repo.tmp) == []  # no temp file left behind
        # no partial object either: it would be taken for a stored copy and deduplicated forever
        assert not stored_path(repo, "chunks", chunks.digest(failed)).exists()
        # everything committed before is still listed and readable
        assert summary(repo.versions()) == [(committed.backup_id, True)]
        assert repo.get_index(committed.disks[0].index, "vda") == index
        assert [repo.get_chunk(d, "vda") for d in digests] == stored
        # a second try fails the same way, cleanly
        with pytest.raises(RepositoryError, match="filesystem is full"):
            repo.put_chunk(failed)
        assert os.listdir(repo.tmp) == []
    finally:
        repo.close()
    repo = Repository.open(tmpfs / "repo", create=False)
    try:
        assert summary(repo.versions()) == [(committed.backup_id, True)]
    finally:
        repo.close()


def test_commit_on_a_full_filesystem_is_a_clear_error_and_keeps_catalog_and_manifests_agreed(tmpfs: Path) -> None:
    ballast = tmpfs / "ballast"
    ballast.write_bytes(b"b" * 4096)
    repo = Repository.open(tmpfs / "repo", chunk_size=CHUNK)
    try:
        fill_with_chunks(repo, seed=5)
        fd = os.open(tmpfs / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            with pytest.raises(OSError):  # take the last partial page too
                while True:
                    os.write(fd, b"f" * 512)
        finally:
            os.close(fd)
        ballast.unlink()  # one page free: room for a manifest, none for SQLite's journal
        with pytest.raises(RepositoryError, match="full"):
            repo.commit(version("20240501T120000Z-0001", "2024-05-01T12:00:00.000000+00:00"))
    finally:
        repo.close()
    (tmpfs / "filler").unlink()  # the user frees space: the catalog catches up with the manifests
    repo = Repository.open(tmpfs / "repo", create=False)
    try:
        listed = {v.backup_id for v in repo.versions()}
        assert listed == {p.stem for p in (tmpfs / "repo" / "manifests").glob("*.json")}
    finally:
        repo.close()
