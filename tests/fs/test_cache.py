"""Tests of soci_fs.cache: both tiers, LRU bounds, restart, corruption, threads, and the gather twins."""

from __future__ import annotations

import importlib
import os
import random
import struct
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from soci_fs import _select, blockcopy_py, cache
from soci_fs.cache import CRC_BLOCK, MAGIC, BlockCache, CacheConfig, encode_header
from soci_fs.errors import InvalidArgument

L1 = "sha256:" + "a" * 64
L2 = "sha256:" + "b" * 64


def data(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def file_size(n: int) -> int:
    return len(encode_header(b"\0" * n)) + n


# ---------------------------------------------------------------------------------------------------------
# gather: compiled vs twin


def _compiled() -> Any:
    try:
        return importlib.import_module("soci_fs._ext._blockcopy")
    except ImportError:
        return None


ENGINES = [pytest.param(blockcopy_py, id="pure")]
if _compiled() is not None:
    ENGINES.append(pytest.param(_compiled(), id="compiled"))


def test_implementation_follows_the_environment() -> None:
    assert ("pure" if _select.pure_python_forced() else "compiled") == cache.IMPLEMENTATION


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(st.binary(max_size=300), max_size=8),
    slack=st.integers(0, 20),
    offset=st.integers(0, 20),
)
def test_gather_twins_agree(pieces: list[bytes], slack: int, offset: int) -> None:
    total = sum(map(len, pieces))
    outs = []
    for engine in (p.values[0] for p in ENGINES):
        out = bytearray(b"\xee" * (offset + total + slack))
        views = [memoryview(p)[1:] if i % 2 and p else p for i, p in enumerate(pieces)]
        end = engine.gather(views, out, offset)
        outs.append((end, bytes(out)))
    want_pieces = [p[1:] if i % 2 and p else p for i, p in enumerate(pieces)]
    want = b"\xee" * offset + b"".join(want_pieces)
    assert outs[0][1].startswith(want)
    assert outs[0][0] == len(want)
    assert all(o == outs[0] for o in outs)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("pieces", "out", "offset", "exc"),
    [
        ([b"abc"], bytearray(2), 0, ValueError),
        ([b"abc"], bytearray(3), 1, ValueError),
        ([b"a"], bytearray(3), -1, ValueError),
        ([b"a"], b"xyz", 0, BufferError),
        ([memoryview(b"abcdef")[::2]], bytearray(10), 0, BufferError),
        ([12], bytearray(10), 0, TypeError),
        ([b"a"], 12, 0, TypeError),
    ],
)
def test_gather_errors_are_the_same(engine: Any, pieces: list[Any], out: Any, offset: int, exc: type) -> None:
    with pytest.raises(exc):
        engine.gather(pieces, out, offset)


@pytest.mark.parametrize("engine", ENGINES)
def test_gather_accepts_other_buffer_shapes(engine: Any) -> None:
    import array

    out = memoryview(bytearray(16))
    end = engine.gather([array.array("I", [1, 2]), memoryview(b"xy")], out[2:])
    assert end == 10 and bytes(out[2:12]) == struct.pack("=II", 1, 2) + b"xy"


# ---------------------------------------------------------------------------------------------------------
# tiers


def test_config_from_section_and_bounds() -> None:
    assert CacheConfig.from_section({}) == CacheConfig()
    cfg = CacheConfig.from_section({"max_memory_bytes": 5, "max_disk_bytes": 7, "verify_every_read": True})
    assert (cfg.max_memory_bytes, cfg.max_disk_bytes, cfg.verify_every_read) == (5, 7, True)
    with pytest.raises(InvalidArgument):
        CacheConfig(max_memory_bytes=-1)


def test_bad_key_is_refused(tmp_path: Path) -> None:
    c = BlockCache(tmp_path)
    with pytest.raises(InvalidArgument, match="not a digest"):
        c.put("../../etc", 0, b"x")


@pytest.mark.parametrize(
    ("size", "start", "length"),
    [
        (10, 0, 10),
        (10, 3, 0),
        (CRC_BLOCK, CRC_BLOCK - 1, 1),
        (3 * CRC_BLOCK + 5, CRC_BLOCK - 3, CRC_BLOCK + 10),
        (3 * CRC_BLOCK + 5, 3 * CRC_BLOCK, 5),
        (200_000, 0, 200_000),
    ],
)
def test_put_read_ranges_both_tiers(tmp_path: Path, size: int, start: int, length: int) -> None:
    payload = data(size, size)
    c = BlockCache(tmp_path, CacheConfig(max_memory_bytes=0))
    c.put(L1, 4, payload)
    assert c.get_memory(L1, 4) is None
    assert bytes(c.read(L1, 4, start, length)) == payload[start : start + length]
    m = BlockCache(None)
    m.put(L1, 4, payload)
    assert bytes(m.read(L1, 4, start, length)) == payload[start : start + length]
    assert m.read(L1, 5, 0, 1) is None
    with pytest.raises(InvalidArgument):
        c.read(L1, 4, size, 1)


def test_file_layout(tmp_path: Path) -> None:
    c = BlockCache(tmp_path)
    payload = data(CRC_BLOCK + 3)
    c.put(L1, 7, payload)
    raw = (tmp_path / "cache" / ("sha256-" + "a" * 64) / "7").read_bytes()
    magic, n, block = struct.unpack_from("<8sQI", raw)
    assert (magic, n, block) == (MAGIC, len(payload), CRC_BLOCK)
    assert raw.endswith(payload) and len(raw) == 20 + 8 + len(payload)
    assert not [p for p in (tmp_path / "cache").rglob(".tmp-*")]


def test_memory_lru_bound() -> None:
    c = BlockCache(None, CacheConfig(max_memory_bytes=300))
    for i in range(4):
        c.put(L1, i, data(100, i))
    assert c.statistics()["memory_bytes"] == 300
    assert c.get_memory(L1, 0) is None and c.get_memory(L1, 1) is not None
    c.put(L1, 9, data(100))  # 1 was just used: 2 goes
    assert c.get_memory(L1, 2) is None and c.get_memory(L1, 1) is not None
    c.put(L1, 10, data(301))  # larger than the whole tier: not kept
    assert c.get_memory(L1, 10) is None and c.statistics()["memory_bytes"] == 300


def test_disk_lru_eviction_under_a_size_bound(tmp_path: Path) -> None:
    one = file_size(1000)
    c = BlockCache(tmp_path, CacheConfig(max_memory_bytes=0, max_disk_bytes=3 * one))
    for i in range(3):
        c.put(L1, i, data(1000, i))
    assert c.read(L1, 0, 0, 1) is not None  # 0 becomes the most recent
    c.put(L2, 0, data(1000, 9))
    assert c.cached_spans(L1) == {0, 2}
    assert not (tmp_path / "cache" / ("sha256-" + "a" * 64) / "1").exists()
    st = c.statistics()
    assert st["disk_bytes"] == 3 * one and st["disk_spans"] == 3 and st["disk_evictions"] == 1
    for i in range(10, 20):
        c.put(L2, i, data(1000, i))
    assert c.statistics()["disk_bytes"] <= 3 * one
    assert len(list((tmp_path / "cache").rglob("[0-9]*"))) == 3


def test_replace_and_discard_and_drop_layer(tmp_path: Path) -> None:
    c = BlockCache(tmp_path)
    c.put(L1, 0, b"old")
    c.put(L1, 0, b"newer")
    assert bytes(c.read(L1, 0, 0, 5)) == b"newer"
    assert c.statistics()["disk_spans"] == 1
    c.discard(L1, 0)
    assert not c.contains(L1, 0) and c.read(L1, 0, 0, 1) is None
    c.put(L1, 1, b"x")
    c.put(L2, 1, b"y")
    c.drop_layer(L1)
    assert c.cached_spans(L1) == frozenset() and c.cached_spans(L2) == {1}
    assert not (tmp_path / "cache" / ("sha256-" + "a" * 64)).exists()


def test_restart_indexes_disk_in_lru_order(tmp_path: Path) -> None:
    c = BlockCache(tmp_path)
    for i in range(5):
        c.put(L1, i, data(500, i))
        os.utime(tmp_path / "cache" / ("sha256-" + "a" * 64) / str(i), (1000 + i, 1000 + i))
    leftover = tmp_path / "cache" / ("sha256-" + "a" * 64) / ".tmp-3-abc"
    leftover.write_bytes(b"partial")
    (tmp_path / "cache" / "not-a-digest!").mkdir()
    again = BlockCache(tmp_path, CacheConfig(max_memory_bytes=0, max_disk_bytes=3 * file_size(500)))
    assert again.cached_spans(L1) == {2, 3, 4}  # the oldest two went over the bound
    assert not leftover.exists()
    for i in (2, 3, 4):
        assert bytes(again.read(L1, i, 0, 500)) == data(500, i)


@pytest.mark.expect_log
@pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "extend"])
def test_corruption_is_detected_and_dropped(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    payload = data(3 * CRC_BLOCK)
    BlockCache(tmp_path).put(L1, 2, payload)
    f = tmp_path / "cache" / ("sha256-" + "a" * 64) / "2"
    raw = bytearray(f.read_bytes())
    if damage == "flip":
        raw[-CRC_BLOCK - 7] ^= 1  # in block 1 only
    elif damage == "truncate":
        del raw[-10:]
    elif damage == "magic":
        raw[0:8] = b"BADMAGIC"
    else:
        raw += b"\0"
    f.write_bytes(raw)
    c = BlockCache(tmp_path, CacheConfig(max_memory_bytes=0))
    if damage == "flip":
        assert bytes(c.read(L1, 2, 0, 100)) == payload[:100]  # block 0 is fine
    assert c.read(L1, 2, CRC_BLOCK, CRC_BLOCK) is None
    assert not f.exists() and not c.contains(L1, 2)
    assert c.statistics()["corrupt"] == 1
    assert any("corrupt" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


@pytest.mark.expect_log
def test_verify_every_read(tmp_path: Path) -> None:
    payload = data(2 * CRC_BLOCK)
    for every, detected in ((False, False), (True, True)):
        c = BlockCache(tmp_path / str(every), CacheConfig(max_memory_bytes=0, verify_every_read=every))
        c.put(L1, 0, payload)
        assert bytes(c.read(L1, 0, 0, 10)) == payload[:10]
        f = tmp_path / str(every) / "cache" / ("sha256-" + "a" * 64) / "0"
        with open(f, "r+b") as fh:
            fh.seek(-2 * CRC_BLOCK, os.SEEK_END)
            fh.write(b"Z")
        assert (c.read(L1, 0, 0, 10) is None) == detected


@pytest.mark.expect_log
def test_write_failure_keeps_memory_copy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = BlockCache(tmp_path)
    (tmp_path / "cache" / ("sha256-" + "a" * 64)).write_bytes(b"a file where the layer directory goes")
    c.put(L1, 0, b"data")
    assert bytes(c.read(L1, 0, 0, 4)) == b"data"
    assert c.statistics()["write_errors"] == 1
    assert any("memory only" in r.getMessage() for r in caplog.records)


def test_concurrent_readers_and_writers(tmp_path: Path) -> None:
    spans = {i: data(30_000 + i, i) for i in range(40)}
    c = BlockCache(tmp_path, CacheConfig(max_memory_bytes=100_000, max_disk_bytes=10 * file_size(30_040)))
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        rnd = random.Random(1)
        while not stop.is_set():
            i = rnd.randrange(40)
            c.put(L1, i, spans[i])

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            for _ in range(400):
                i = rnd.randrange(40)
                start = rnd.randrange(len(spans[i]))
                n = rnd.randrange(len(spans[i]) - start + 1)
                got = c.read(L1, i, start, n)
                if got is not None and bytes(got) != spans[i][start : start + n]:
                    raise AssertionError(f"span {i} [{start}, {start + n}) differs")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(2)]
    threads += [threading.Thread(target=reader, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads[2:]:
        t.join()
    stop.set()
    for t in threads[:2]:
        t.join()
    assert errors == []
    st = c.statistics()
    assert st["corrupt"] == 0 and st["disk_bytes"] <= 10 * file_size(30_040)
