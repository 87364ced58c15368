"""Tests of soci_fs.zinfo: the checkpointing indexer, span extraction, blob formats and span arithmetic.

The selected engine (compiled, or the twin with ``SOCI_PUREPYTHON=1``) is exercised on real data compressed
by gzip and pigz in several ways; the compiled module and the twin are also run side by side on the same
inputs (including hypothesis-generated streams) and must agree byte for byte.
"""

from __future__ import annotations

import ctypes
import gzip
import hashlib
import io
import os
import random
import shutil
import struct
import subprocess
import tarfile
import zlib
from types import ModuleType

import flatbuffers
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from soci_fs import _select, zinfo, zinfo_py
from soci_fs.errors import FormatError, InvalidArgument
from soci_fs.zinfo import CHECKPOINT_SIZE, HEADER_SIZE, WINSIZE, Checkpoint, GzipZinfo, IndexResult, TarZinfo

try:
    from soci_fs._ext import _zinfo as compiled_engine
except ImportError:  # pragma: no cover - the suite builds the extension
    compiled_engine = None

KIB = 1024
MIB = 1024 * KIB

ENGINES = [pytest.param(zinfo_py, id="pure")]
if compiled_engine is not None:
    ENGINES.insert(0, pytest.param(compiled_engine, id="compiled"))

needs_compiled = pytest.mark.skipif(compiled_engine is None, reason="compiled extension not built")


# ---- data --------------------------------------------------------------------------------------------------


def _real_tar(limit: int = 4 * MIB) -> bytes:
    """A tar of real files (the running interpreter's stdlib: sources plus some shared objects)."""
    stdlib = os.path.dirname(os.__file__)
    paths: list[str] = []
    for sub in ("email", "json", "asyncio", "lib-dynload"):
        for root, dirs, files in os.walk(os.path.join(stdlib, sub)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            paths.extend(os.path.join(root, f) for f in sorted(files))
    buf = io.BytesIO()
    total = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for p in paths:
            info = tf.gettarinfo(p, arcname=os.path.relpath(p, "/"))
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            with open(p, "rb") as f:
                tf.addfile(info, f)
            total += info.size
            if total >= limit:
                break
    return buf.getvalue()


def _run(cmd: list[str], data: bytes) -> bytes:
    return subprocess.run(cmd, input=data, stdout=subprocess.PIPE, check=True).stdout


def _inflate_all(blob: bytes) -> bytes:
    """Reference decompression of (possibly concatenated) gzip members with Python's zlib."""
    out = []
    rest = blob
    while rest:
        d = zlib.decompressobj(31)
        out.append(d.decompress(rest))
        out.append(d.flush())
        assert d.eof
        rest = d.unused_data
    return b"".join(out)


def _flushed_stream(data: bytes, flush: int, every: int, level: int = 6) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, 31)
    parts = []
    for i in range(0, len(data), every):
        parts.append(c.compress(data[i : i + every]))
        parts.append(c.flush(flush))
    parts.append(c.flush())
    return b"".join(parts)


def _gzip_with_all_header_fields(data: bytes) -> bytes:
    """A gzip member with FEXTRA, FNAME, FCOMMENT and FHCRC set (Python's gzip writes none of them)."""
    head = bytearray(b"\x1f\x8b\x08" + bytes([4 | 8 | 16 | 2]) + b"\0\0\0\0\x00\x03")
    head += struct.pack("<H", 6) + b"AB\x02\x00xy"
    head += b"name.tar\0" + b"a comment\0"
    head += struct.pack("<H", zlib.crc32(head) & 0xFFFF)
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = c.compress(data) + c.flush()
    return bytes(head) + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


@pytest.fixture(scope="module")
def tar_bytes() -> bytes:
    return _real_tar()


@pytest.fixture(scope="module")
def corpus(tar_bytes: bytes) -> dict[str, bytes]:
    """Compressed streams keyed by a short name; each decompresses (all members) to a known payload."""
    rnd = random.Random(7)
    noise = rnd.randbytes(2 * MIB)
    out: dict[str, bytes] = {}
    for level in (1, 6):
        out[f"gzip-{level}"] = _run(["gzip", f"-{level}", "-n", "-c"], tar_bytes)
    out["gzip-9"] = _run(["gzip", "-9", "-n", "-c"], tar_bytes[: 3 * MIB // 2])  # -9 is slow on binaries
    if shutil.which("pigz"):
        out["pigz"] = _run(["pigz", "-6", "-c"], tar_bytes)
        out["pigz-i"] = _run(["pigz", "-i", "-b", "128", "-c"], tar_bytes)
        half = len(tar_bytes) // 2
        out["concat"] = _run(["gzip", "-6", "-c"], tar_bytes[:half]) + _run(["pigz", "-c"], tar_bytes[half:])
    out["random"] = gzip.compress(noise, 6, mtime=0)
    out["stored"] = gzip.compress(tar_bytes[: 2 * MIB], 0, mtime=0)
    out["full-flush"] = _flushed_stream(tar_bytes[: 2 * MIB], zlib.Z_FULL_FLUSH, 50_000)
    out["sync-flush"] = _flushed_stream(tar_bytes[: 2 * MIB], zlib.Z_SYNC_FLUSH, 7_000, level=1)
    out["empty"] = gzip.compress(b"", mtime=0)
    out["tiny"] = gzip.compress(b"hello, world\n", mtime=0)
    out["header-fields"] = _gzip_with_all_header_fields(tar_bytes[:MIB])
    out["empty-members"] = (
        gzip.compress(b"", mtime=0) + gzip.compress(b"x" * 100_000, mtime=0) + gzip.compress(b"")
    )
    return out


@pytest.fixture(scope="module")
def plain(corpus: dict[str, bytes]) -> dict[str, bytes]:
    return {k: _inflate_all(v) for k, v in corpus.items()}


_indexed_cache: dict[tuple[str, str, int], tuple[IndexResult, bytes]] = {}


def _index(
    engine: ModuleType, blob: bytes, span: int, read_size: int | None = None
) -> tuple[IndexResult, bytes]:
    """Index ``blob`` through ``engine``; returns the result and everything the sink saw."""
    f = io.BytesIO(blob)
    seen: list[bytes] = []

    def read(n: int) -> bytes:
        return f.read(read_size if read_size else n)

    res = engine.index_gzip(read, span, lambda v: seen.append(bytes(v)))
    return res, b"".join(seen)


def _selected_index(name: str, blob: bytes, span: int) -> tuple[IndexResult, bytes]:
    key = (zinfo.IMPLEMENTATION, name, span)
    if key not in _indexed_cache:
        _indexed_cache[key] = _index(zinfo, blob, span)
    return _indexed_cache[key]


def _reference_checkpoints(blob: bytes, span: int) -> list[tuple[int, int, int]]:
    """(in, out, bits) of every checkpoint, straight from formats.md §7: 16 KiB input chunks, ``Z_BLOCK`` on
    every call, the rule applied after each call. Slow and simple on purpose (a test oracle)."""
    z = zinfo_py
    strm, ptr = z._new_stream(z.GZIP_AUTO_WBITS)
    out = ctypes.create_string_buffer(WINSIZE)
    totin = totout = last = 0
    found = []
    pos = 0
    try:
        while pos < len(blob) or strm.avail_in:
            if strm.avail_in == 0:
                chunk = blob[pos : pos + 16 * KIB]
                pos += len(chunk)
                keep = chunk
                strm.next_in = z._address(keep)
                strm.avail_in = len(chunk)
            strm.next_out = ctypes.addressof(out)
            strm.avail_out = WINSIZE
            before_in, before_out = strm.avail_in, strm.avail_out
            ret = z._inflate(ptr, z.Z_BLOCK)
            totin += before_in - strm.avail_in
            totout += before_out - strm.avail_out
            assert ret in (z.Z_OK, z.Z_STREAM_END, z.Z_BUF_ERROR), ret
            dt = strm.data_type
            if dt & 128 and not dt & 64 and (totout == 0 or totout - last > span):
                found.append((totin, totout, dt & 7))
                last = totout
            if ret == z.Z_STREAM_END:
                if strm.avail_in == 0 and pos >= len(blob):
                    break
                z._libz.inflateReset2(ptr, z.GZIP_AUTO_WBITS)
    finally:
        z._libz.inflateEnd(ptr)
    del keep
    return found


def _check_result(blob: bytes, full: bytes, res: IndexResult, span: int) -> GzipZinfo:
    """Every property formats.md §6-§8 promises for an index of ``blob``."""
    assert res.compressed_size == len(blob)
    assert res.uncompressed_size == len(full)
    z = GzipZinfo.parse(res.checkpoints_blob)
    assert z.blob_version == 2 and z.span_size == span
    assert z.serialize() == res.checkpoints_blob
    assert len(res.span_digests) == len(z.checkpoints) == z.max_span_id + 1
    cp0 = z.checkpoints[0]
    assert (cp0.out_offset, cp0.bits, cp0.window) == (0, 0, bytes(WINSIZE))
    last = 0
    for i, cp in enumerate(z.checkpoints):
        assert cp.window == (bytes(WINSIZE) + full[: cp.out_offset])[-WINSIZE:], f"window of checkpoint {i}"
        if i and cp.out_offset:
            assert cp.out_offset - last > span
        last = cp.out_offset
        cs, ce = z.compressed_range(i, len(blob))
        assert res.span_digests[i] == "sha256:" + hashlib.sha256(blob[cs:ce]).hexdigest()
        us, ue = z.uncompressed_range(i, len(full))
        assert zinfo.extract_span(blob[cs:ce], cp, 0, ue - us) == full[us:ue], f"span {i}"
    return z


# ---- the indexer on real data ------------------------------------------------------------------------------

SPANS = [64 * KIB, 1 * MIB, 4 * MIB]
NAMES = [
    "gzip-1",
    "gzip-6",
    "gzip-9",
    "pigz",
    "pigz-i",
    "concat",
    "random",
    "stored",
    "full-flush",
    "sync-flush",
    "empty",
    "tiny",
    "header-fields",
    "empty-members",
]


@pytest.mark.parametrize("span", SPANS, ids=lambda s: f"{s // KIB}k")
@pytest.mark.parametrize("name", NAMES)
def test_index_and_extract_every_span(
    corpus: dict[str, bytes], plain: dict[str, bytes], name: str, span: int
):
    if name not in corpus:
        pytest.skip("pigz not installed")
    blob, full = corpus[name], plain[name]
    res, seen = _selected_index(name, blob, span)
    assert seen == full
    z = _check_result(blob, full, res, span)
    assert [(cp.in_offset, cp.out_offset, cp.bits) for cp in z.checkpoints] == _reference_checkpoints(
        blob, span
    )
    if span == 64 * KIB and len(full) > 3 * MIB:
        assert len(z.checkpoints) > 20


def test_first_checkpoint_follows_the_gzip_header(corpus: dict[str, bytes]):
    res, _ = _selected_index("header-fields", corpus["header-fields"], MIB)
    head_len = corpus["header-fields"].index(b"a comment\0") + len(b"a comment\0") + 2
    assert GzipZinfo.parse(res.checkpoints_blob).checkpoints[0].in_offset == head_len
    res, _ = _selected_index("gzip-6", corpus["gzip-6"], MIB)
    assert GzipZinfo.parse(res.checkpoints_blob).checkpoints[0].in_offset == 10  # gzip -n: no name


def test_bits_spans_share_a_byte(corpus: dict[str, bytes]):
    """With bits != 0 the byte before ``in`` belongs to both neighbouring spans (formats.md §6)."""
    res, _ = _selected_index("gzip-6", corpus["gzip-6"], 64 * KIB)
    z = GzipZinfo.parse(res.checkpoints_blob)
    with_bits = [i for i, cp in enumerate(z.checkpoints) if cp.bits]
    assert with_bits, "expected some checkpoints inside a byte"
    i = with_bits[0]
    assert z.compressed_range(i - 1, len(corpus["gzip-6"]))[1] - 1 == z.compressed_range(i, 0)[0]


def test_partial_extracts(corpus: dict[str, bytes], plain: dict[str, bytes]):
    rnd = random.Random(3)
    for name in ("gzip-6", "concat", "stored", "pigz-i", "empty-members"):
        if name not in corpus:
            continue
        blob, full = corpus[name], plain[name]
        res, _ = _selected_index(name, blob, 64 * KIB)
        z = GzipZinfo.parse(res.checkpoints_blob)
        for _ in range(25):
            i = rnd.randrange(len(z.checkpoints))
            cs, ce = z.compressed_range(i, len(blob))
            us, ue = z.uncompressed_range(i, len(full))
            start = rnd.randrange(0, max(ue - us, 1))
            length = rnd.randrange(0, ue - us - start + 1)
            got = zinfo.extract_span(memoryview(blob)[cs:ce], z.checkpoints[i], start, length)
            assert got == full[us + start : us + start + length]


def test_extract_crosses_member_boundaries():
    """A span that runs over the end of a member (trailer skip, then a fresh member) still extracts."""
    parts = [b"a" * 1000, b"x" * 100_000, b"", b"tail"]
    blob = b"".join(gzip.compress(p, mtime=0) for p in parts)
    full = b"".join(parts)
    res, _ = _index(zinfo, blob, 4 * MIB)
    z = GzipZinfo.parse(res.checkpoints_blob)
    assert len(z.checkpoints) == 1  # one span over four members
    assert zinfo.extract_span(blob[10:], z.checkpoints[0], 0, len(full)) == full
    assert zinfo.extract_span(blob[10:], z.checkpoints[0], 1000, 100_004) == full[1000:]
    with pytest.raises(FormatError, match="span data ended"):
        zinfo.extract_span(blob[10:], z.checkpoints[0], 0, len(full) + 1)


def test_empty_first_member_gives_two_checkpoints_at_zero():
    """``totout == 0`` records a checkpoint after every header until output appears (formats.md §7)."""
    blob = gzip.compress(b"", mtime=0) + gzip.compress(b"x" * 1000, mtime=0)
    z = GzipZinfo.parse(_index(zinfo, blob, MIB)[0].checkpoints_blob)
    assert [(cp.in_offset, cp.out_offset) for cp in z.checkpoints] == [(10, 0), (30, 0)]
    assert z.span_of(0) == 1


def test_sink_view_is_released_after_the_call(corpus: dict[str, bytes]):
    kept: list[memoryview] = []
    zinfo.index_gzip(io.BytesIO(corpus["tiny"]).read, MIB, kept.append)
    assert len(kept) == 1
    with pytest.raises(ValueError):
        bytes(kept[0])
    seen: list[bool] = []
    zinfo.index_gzip(
        io.BytesIO(corpus["tiny"]).read, MIB, lambda v: seen.append(v.readonly and v.format == "B")
    )
    assert seen == [True]


def test_short_reads_do_not_change_the_index(corpus: dict[str, bytes]):
    """Checkpoints depend on block boundaries only, not on how the input arrives."""
    blob = corpus["concat" if "concat" in corpus else "gzip-6"]
    base, _ = _index(zinfo, blob, 64 * KIB)
    rnd = random.Random(11)
    f = io.BytesIO(blob)
    res = zinfo.index_gzip(lambda n: f.read(rnd.randrange(1, 5000)), 64 * KIB)
    assert res == base
    big = zinfo.index_gzip(io.BytesIO(blob).read, 64 * KIB)
    assert big == base


def test_implementation_follows_the_environment():
    assert ("pure" if _select.pure_python_forced() else "compiled") == zinfo.IMPLEMENTATION


# ---- compiled vs twin --------------------------------------------------------------------------------------


@needs_compiled
@pytest.mark.parametrize("span", [64 * KIB, 4 * MIB], ids=["64k", "4m"])
@pytest.mark.parametrize("name", NAMES)
def test_compiled_and_twin_agree(corpus: dict[str, bytes], name: str, span: int):
    if name not in corpus:
        pytest.skip("pigz not installed")
    blob = corpus[name]
    a, seen_a = _index(compiled_engine, blob, span)
    b, seen_b = _index(zinfo_py, blob, span)
    assert a == b
    assert seen_a == seen_b
    z = GzipZinfo.parse(a.checkpoints_blob)
    rnd = random.Random(len(blob))
    for i in range(len(z.checkpoints)):
        cs, ce = z.compressed_range(i, len(blob))
        us, ue = z.uncompressed_range(i, a.uncompressed_size)
        start = rnd.randrange(0, ue - us + 1)
        args = (blob[cs:ce], z.checkpoints[i], start, ue - us - start)
        assert compiled_engine.extract_span(*args) == zinfo_py.extract_span(*args)


@st.composite
def deflate_streams(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(gzip stream, payload): random compressible payloads, levels, strategies, flushes and members."""
    members = draw(st.integers(1, 3))
    blob, payload = [], []
    for _ in range(members):
        seed = draw(st.integers(0, 2**32 - 1))
        rnd = random.Random(seed)
        size = draw(st.integers(0, 300_000))
        alphabet = draw(st.sampled_from([b"ab", b"abcdefgh \n", bytes(range(256))]))
        data = bytes(rnd.choice(alphabet) for _ in range(min(size, 2000))) * (size // 2000 + 1)
        data = bytearray(data[:size])
        for _ in range(size // 5000):
            data[rnd.randrange(size)] = rnd.randrange(256)
        level = draw(st.integers(0, 9))
        strategy = draw(
            st.sampled_from([zlib.Z_DEFAULT_STRATEGY, zlib.Z_FILTERED, zlib.Z_HUFFMAN_ONLY, zlib.Z_RLE])
        )
        flush = draw(st.sampled_from([None, zlib.Z_SYNC_FLUSH, zlib.Z_FULL_FLUSH, zlib.Z_BLOCK]))
        c = zlib.compressobj(level, zlib.DEFLATED, 31, draw(st.integers(1, 9)), strategy)
        step = draw(st.integers(1000, 100_000))
        parts = []
        for i in range(0, size, step):
            parts.append(c.compress(bytes(data[i : i + step])))
            if flush is not None:
                parts.append(c.flush(flush))
        parts.append(c.flush())
        blob.append(b"".join(parts))
        payload.append(bytes(data))
    return b"".join(blob), b"".join(payload)


@needs_compiled
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(stream=deflate_streams(), span=st.integers(1, 100_000), read_size=st.integers(1, 70_000))
def test_generated_streams_agree_and_extract(stream: tuple[bytes, bytes], span: int, read_size: int):
    blob, payload = stream
    a, seen_a = _index(compiled_engine, blob, span, read_size)
    b, seen_b = _index(zinfo_py, blob, span)
    assert a == b
    assert seen_a == seen_b == payload
    z = GzipZinfo.parse(a.checkpoints_blob)
    assert [(cp.in_offset, cp.out_offset, cp.bits) for cp in z.checkpoints] == _reference_checkpoints(
        blob, span
    )
    for i in range(len(z.checkpoints)):
        cs, ce = z.compressed_range(i, len(blob))
        us, ue = z.uncompressed_range(i, len(payload))
        got = compiled_engine.extract_span(blob[cs:ce], z.checkpoints[i], 0, ue - us)
        assert got == zinfo_py.extract_span(blob[cs:ce], z.checkpoints[i], 0, ue - us) == payload[us:ue]
        assert a.span_digests[i] == "sha256:" + hashlib.sha256(blob[cs:ce]).hexdigest()


# ---- bad input ---------------------------------------------------------------------------------------------


def _error(engine: ModuleType, blob: bytes, span: int = 64 * KIB) -> str:
    with pytest.raises(FormatError) as info:
        engine.index_gzip(io.BytesIO(blob).read, span)
    return str(info.value)


@pytest.mark.parametrize("engine", ENGINES)
def test_corrupt_and_truncated_gzip(engine: ModuleType, corpus: dict[str, bytes]):
    blob = corpus["gzip-6"]
    bad = bytearray(blob)
    for k in range(len(blob) // 2, len(blob) // 2 + 64):
        bad[k] ^= 0x5A
    msg = _error(engine, bytes(bad))
    assert msg.startswith("corrupt gzip stream at compressed offset ")
    assert _error(engine, blob[: len(blob) // 3]).startswith(
        "truncated gzip stream: input ended at compressed offset"
    )
    assert "ended at compressed offset 0 " in _error(engine, b"")
    assert _error(engine, blob[:5]).startswith("truncated gzip stream")
    assert "incorrect header check" in _error(engine, b"not gzip at all, clearly" * 10)
    assert "incorrect data check" in _error(engine, blob[:-8] + bytes(8))  # CRC32 of the trailer
    assert _error(engine, blob + b"\0" * 20).startswith("corrupt gzip stream")  # trailing garbage
    with pytest.raises(InvalidArgument):
        engine.index_gzip(io.BytesIO(blob).read, 0)


@needs_compiled
def test_errors_are_the_same_in_both_engines(corpus: dict[str, bytes]):
    blob = corpus["gzip-9"] + corpus["tiny"]
    rnd = random.Random(5)
    for _ in range(12):
        bad = bytearray(blob)
        at = rnd.randrange(len(bad))
        bad[at : at + 8] = rnd.randbytes(8)
        cut = bytes(bad[: rnd.randrange(len(bad) + 1)])
        outcomes = []
        for engine in (compiled_engine, zinfo_py):
            try:
                outcomes.append(engine.index_gzip(io.BytesIO(cut).read, 100_000))
            except FormatError as exc:
                outcomes.append(("FormatError", str(exc)))
        assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("engine", ENGINES)
def test_extract_span_is_strict(engine: ModuleType, corpus: dict[str, bytes], plain: dict[str, bytes]):
    blob, full = corpus["gzip-6"], plain["gzip-6"]
    z = GzipZinfo.parse(_index(engine, blob, 64 * KIB)[0].checkpoints_blob)
    i = next(i for i, cp in enumerate(z.checkpoints) if cp.bits and i < z.max_span_id)
    cs, ce = z.compressed_range(i, len(blob))
    us, ue = z.uncompressed_range(i, len(full))
    cp = z.checkpoints[i]
    assert engine.extract_span(blob[cs:ce], cp, 0, ue - us) == full[us:ue]
    with pytest.raises(FormatError, match=r"span data ended after \d+ of \d+ bytes"):
        engine.extract_span(blob[cs : (cs + ce) // 2], cp, 0, ue - us)
    with pytest.raises(FormatError, match="span data ended"):
        engine.extract_span(blob[cs:ce], cp, 0, ue - us + 100)
    garbage = bytearray(blob[cs:ce])
    garbage[1:200] = bytes(199)
    with pytest.raises(FormatError):
        engine.extract_span(bytes(garbage), cp, 0, ue - us)
    with pytest.raises(FormatError, match="empty"):
        engine.extract_span(b"", cp, 0, 10)
    with pytest.raises(FormatError, match="window"):
        engine.extract_span(blob[cs:ce], Checkpoint(cp.in_offset, cp.out_offset, cp.bits, b"short"), 0, 1)
    with pytest.raises(InvalidArgument):
        engine.extract_span(blob[cs:ce], cp, -1, 10)
    assert engine.extract_span(blob[cs:ce], cp, 5, 0) == b""


@pytest.mark.parametrize("engine", ENGINES)
def test_extract_trailer_cut_short(engine: ModuleType):
    data = b"abc" * 1000
    blob = gzip.compress(data, mtime=0) + gzip.compress(b"more", mtime=0)
    cp0 = Checkpoint(10, 0, 0, bytes(WINSIZE))
    assert engine.extract_span(blob[10:], cp0, 0, len(data) + 4) == data + b"more"
    member = gzip.compress(data, mtime=0)
    with pytest.raises(FormatError, match="trailer cut short"):
        engine.extract_span(member[10:-3], cp0, 0, len(data) + 1)


# ---- member trailers: CRC-32 and ISIZE checked outside zlib ------------------------------------------------

# zlib checks each member's header; for gzip members the indexer switches zlib's data check off and compares
# the CRC-32 and ISIZE of the output with the trailer itself, which may straddle read() calls.

READS = [
    pytest.param(None, id="64k"),
    pytest.param((1,), id="1-byte"),
    pytest.param((3, 7, 5, 11, 2), id="odd"),
    pytest.param((4093, 1, 8191), id="4093-1-8191"),
]


def _trailer_members() -> list[bytes]:
    """Payloads of a multi-member stream: text, an empty member, more text (members of a few KiB)."""
    rnd = random.Random(17)
    words = [bytes(rnd.choice(b"abcdefghij ") for _ in range(rnd.randrange(2, 9))) for _ in range(300)]
    text = b" ".join(rnd.choice(words) for _ in range(3000))
    return [text[:9000], b"", text[9000:], b"tail\n"]


def _members(parts: list[bytes], wbits: int = 31) -> tuple[bytes, list[tuple[int, int]]]:
    """Concatenated members (gzip for ``wbits`` 31, zlib for 15) and each member's [start, end)."""
    blob, bounds = b"", []
    for p in parts:
        c = zlib.compressobj(6, zlib.DEFLATED, wbits)
        m = c.compress(p) + c.flush()
        bounds.append((len(blob), len(blob) + len(m)))
        blob += m
    return blob, bounds


def _chunked_read(blob: bytes, sizes: tuple[int, ...] | None, cuts: tuple[int, ...] = ()):
    """A read() that returns pieces of the given sizes in turn, never a piece across one of ``cuts``."""
    f = io.BytesIO(blob)
    turn = [0]

    def read(n: int) -> bytes:
        want = n if sizes is None else sizes[turn[0] % len(sizes)]
        turn[0] += 1
        pos = f.tell()
        nxt = min((c for c in cuts if c > pos), default=len(blob))
        return f.read(min(want, nxt - pos))

    return read


def _outcomes(
    blob: bytes, sizes: tuple[int, ...] | None = None, cuts: tuple[int, ...] = (), span: int = 4 * KIB
):
    """The result (or FormatError text) of every engine on ``blob``; they must all agree."""
    outs = []
    for engine in (compiled_engine, zinfo_py):
        if engine is None:
            continue
        seen: list[bytes] = []
        try:
            res = engine.index_gzip(
                _chunked_read(blob, sizes, cuts), span, lambda v, seen=seen: seen.append(bytes(v))
            )
            outs.append((res, b"".join(seen)))
        except FormatError as exc:
            outs.append(("FormatError", str(exc)))
    assert all(o == outs[0] for o in outs), outs
    return outs[0]


def _crc_msg(start: int, end: int) -> str:
    return (
        f"corrupt gzip stream at compressed offset {end - 4}: incorrect data check "
        f"(gzip member at compressed offset {start})"
    )


def _len_msg(start: int, end: int) -> str:
    return (
        f"corrupt gzip stream at compressed offset {end}: incorrect length check "
        f"(gzip member at compressed offset {start})"
    )


@pytest.mark.parametrize("sizes", READS)
def test_good_members_index_the_same_under_any_reads(sizes: tuple[int, ...] | None):
    parts = _trailer_members()
    blob, _ = _members(parts)
    res, seen = _outcomes(blob, sizes)
    assert seen == b"".join(parts)
    assert res == _outcomes(blob)[0]
    z = GzipZinfo.parse(res.checkpoints_blob)
    assert [(cp.in_offset, cp.out_offset, cp.bits) for cp in z.checkpoints] == _reference_checkpoints(
        blob, 4 * KIB
    )


@pytest.mark.parametrize("sizes", READS)
@pytest.mark.parametrize("member", [0, 1, 2, 3])
@pytest.mark.parametrize("field", ["crc", "isize"])
def test_bad_trailer_in_any_member(sizes: tuple[int, ...] | None, member: int, field: str):
    blob, bounds = _members(_trailer_members())
    start, end = bounds[member]
    bad = bytearray(blob)
    at = end - 8 if field == "crc" else end - 4
    bad[at + 1] ^= 0x40
    expected = _crc_msg(start, end) if field == "crc" else _len_msg(start, end)
    assert _outcomes(bytes(bad), sizes) == ("FormatError", expected)


@pytest.mark.parametrize("field", ["crc", "isize"])
def test_trailer_straddling_a_read_boundary(field: str):
    """Every cut through the second member's trailer (and around it): good data indexes, bad data fails."""
    blob, bounds = _members(_trailer_members())
    start, end = bounds[2]
    base = _outcomes(blob)
    bad = bytearray(blob)
    bad[end - 8 if field == "crc" else end - 1] ^= 0x01
    expected = _crc_msg(start, end) if field == "crc" else _len_msg(start, end)
    for cut in range(end - 10, end + 2):
        for more in ((), (cut + 1,), (cut + 3,)):
            assert _outcomes(blob, None, (cut, *more)) == base
            assert _outcomes(bytes(bad), None, (cut, *more)) == ("FormatError", expected)


@pytest.mark.parametrize("engine", ENGINES)
def test_truncated_trailer(engine: ModuleType):
    blob, _ = _members(_trailer_members()[:1])
    for keep in range(1, 9):
        assert _error(engine, blob[:-keep]).startswith(
            "truncated gzip stream: input ended at compressed offset"
        )


def test_empty_member_with_bad_trailer():
    blob, bounds = _members([b"", b"x" * 1000])
    bad = bytearray(blob)
    bad[bounds[0][1] - 4] = 1  # ISIZE of the empty member says 1 (its CRC 0 is right)
    assert _outcomes(bytes(bad)) == ("FormatError", _len_msg(*bounds[0]))
    bad = bytearray(blob)
    bad[bounds[0][1] - 8] = 1
    assert _outcomes(bytes(bad)) == ("FormatError", _crc_msg(*bounds[0]))


@pytest.mark.parametrize("sizes", READS)
def test_zlib_wrapped_members_keep_the_adler_check(sizes: tuple[int, ...] | None):
    parts = _trailer_members()
    zblob, zbounds = _members(parts, wbits=15)
    res, seen = _outcomes(zblob, sizes)
    assert seen == b"".join(parts) and res.compressed_size == len(zblob)
    for member in (0, 2):
        bad = bytearray(zblob)
        bad[zbounds[member][1] - 2] ^= 0x10  # Adler-32
        outcome = _outcomes(bytes(bad), sizes)
        assert outcome == (
            "FormatError",
            f"corrupt gzip stream at compressed offset {zbounds[member][1]}: incorrect data check",
        )
    # Mixed: a zlib member, then gzip members whose CRC is checked here again.
    gblob, gbounds = _members(parts[:3])
    mixed = bytearray(zblob[: zbounds[0][1]] + gblob)
    shift = zbounds[0][1]
    mixed[shift + gbounds[2][1] - 6] ^= 0x01
    assert _outcomes(bytes(mixed), sizes) == (
        "FormatError",
        _crc_msg(shift + gbounds[2][0], shift + gbounds[2][1]),
    )


@pytest.mark.parametrize("engine", ENGINES)
def test_header_crc_is_still_checked(engine: ModuleType, tar_bytes: bytes):
    """zlib checks FHCRC only while its data check is on, so the header is parsed before it is turned off."""
    good = _gzip_with_all_header_fields(tar_bytes[:100_000])
    at = good.index(b"a comment\0") + len(b"a comment\0")
    bad = bytearray(good)
    bad[at] ^= 0xFF
    assert (
        _error(engine, bytes(bad))
        == f"corrupt gzip stream at compressed offset {at + 2}: header crc mismatch"
    )
    second = gzip.compress(b"first", mtime=0) + bytes(bad)
    assert _error(engine, second).endswith(": header crc mismatch")
    assert engine.index_gzip(io.BytesIO(good).read, MIB).uncompressed_size == 100_000


# ---- the checkpoint blob -----------------------------------------------------------------------------------


def _v1_from_v2(blob: bytes) -> bytes:
    return blob[:HEADER_SIZE] + blob[HEADER_SIZE + CHECKPOINT_SIZE :]


def test_v1_blob(corpus: dict[str, bytes], plain: dict[str, bytes]):
    blob, full = corpus["gzip-6"], plain["gzip-6"]
    res, _ = _selected_index("gzip-6", blob, MIB)
    v2 = GzipZinfo.parse(res.checkpoints_blob)
    assert v2.checkpoints[0].in_offset == 10
    v1_blob = _v1_from_v2(res.checkpoints_blob)
    v1 = GzipZinfo.parse(v1_blob)
    assert v1.blob_version == 1
    assert v1.checkpoints == v2.checkpoints and v1.span_size == v2.span_size
    assert v1.serialize() == v1_blob
    assert v1.max_span_id == v2.max_span_id
    cs, ce = v1.compressed_range(0, len(blob))
    us, ue = v1.uncompressed_range(0, len(full))
    assert zinfo.extract_span(blob[cs:ce], v1.checkpoints[0], 0, ue - us) == full[us:ue]
    # A v1 blob of one checkpoint is just the header.
    one = GzipZinfo.parse(struct.pack("<iq", 1, 4 * MIB))
    assert one.blob_version == 1 and one.checkpoints == (Checkpoint(10, 0, 0, bytes(WINSIZE)),)


def _blob(n: int, stored: int, span: int = MIB, bits: int = 0) -> bytes:
    cps = b"".join(struct.pack("<qqB", 10 + i, i * 2 * MIB, bits) + bytes(WINSIZE) for i in range(stored))
    return struct.pack("<iq", n, span) + cps


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", "too short"),
        (b"\x01\x00\x00", "too short"),
        (_blob(2, 2) + b"x", "fits neither version"),
        (_blob(3, 1), "fits neither version"),
        (_blob(2, 2)[:-1], "fits neither version"),
        (struct.pack("<iq", 0x7FFFFFFF, MIB) + bytes(100), "fits neither version"),
        (_blob(0, 0), "checkpoint count 0"),
        (_blob(-5, 0), "checkpoint count -5"),
        (_blob(1, 1, span=0), "span size 0"),
        (_blob(2, 2, bits=9), "bits 9"),
        (
            struct.pack("<iq", 2, MIB)
            + struct.pack("<qqB", 50, 0, 0)
            + bytes(WINSIZE) * 1
            + struct.pack("<qqB", 20, 5, 0)
            + bytes(WINSIZE),
            "backwards",
        ),
    ],
)
def test_bad_blobs(blob: bytes, message: str):
    with pytest.raises(FormatError, match=message):
        GzipZinfo.parse(blob)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(-3, 3), st.integers(-(2**63), 2**63 - 1))
def test_fuzz_gzip_zinfo_parse(tail: bytes, count: int, span: int):
    for data in (tail, struct.pack("<iq", count, span) + tail, _blob(2, 2)[: len(tail)] + tail):
        try:
            z = GzipZinfo.parse(data)
        except FormatError:
            continue
        assert z.serialize() == data


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_gzip_zinfo_mutations(data: st.DataObject):
    """Mutate the header and checkpoint fields of a valid two-checkpoint blob (v2, or v1 when cut)."""
    good = bytearray(_blob(2, 2))
    fields = list(range(HEADER_SIZE + 17)) + list(
        range(HEADER_SIZE + CHECKPOINT_SIZE, HEADER_SIZE + CHECKPOINT_SIZE + 17)
    )
    for _ in range(data.draw(st.integers(1, 4))):
        good[data.draw(st.sampled_from(fields))] = data.draw(st.integers(0, 255))
    blob = bytes(good) if data.draw(st.booleans()) else _v1_from_v2(bytes(good))
    try:
        z = GzipZinfo.parse(blob)
    except FormatError:
        return
    assert z.serialize() == blob


# ---- span arithmetic ---------------------------------------------------------------------------------------


def test_gzip_span_arithmetic():
    w = bytes(WINSIZE)
    z = GzipZinfo(
        span_size=100,
        checkpoints=(Checkpoint(10, 0, 0, w), Checkpoint(50, 150, 3, w), Checkpoint(90, 300, 0, w)),
    )
    assert z.max_span_id == 2
    assert [z.span_of(o) for o in (0, 149, 150, 299, 300, 10**9)] == [0, 0, 1, 1, 2, 2]
    assert z.compressed_range(0, 1000) == (10, 50)
    assert z.compressed_range(1, 1000) == (49, 90)
    assert z.compressed_range(2, 1000) == (90, 1000)
    assert z.uncompressed_range(2, 420) == (300, 420)
    with pytest.raises(InvalidArgument):
        z.compressed_range(3, 1000)


def test_tar_span_arithmetic():
    t = TarZinfo(span_size=100, size=300)
    assert t.max_span_id == 2
    assert TarZinfo(span_size=100, size=301).max_span_id == 3
    assert TarZinfo(span_size=100, size=0).max_span_id == -1
    assert t.span_of(299) == 2 and t.span_of(100) == 1
    assert t.compressed_range(2, 300) == (200, 300)
    assert t.uncompressed_range(1, 250) == (100, 200)
    assert t.uncompressed_range(2, 250) == (200, 250)


# ---- TarZinfo ----------------------------------------------------------------------------------------------


def _stock_tarzinfo(version: int, span_size: int, size: int) -> bytes:
    b = flatbuffers.Builder(0)
    b.StartObject(3)
    b.PrependInt32Slot(0, version, 0)
    b.PrependInt64Slot(1, span_size, 0)
    b.PrependInt64Slot(2, size, 0)
    b.Finish(b.EndObject())
    return bytes(b.Output())


@settings(max_examples=200, deadline=None)
@given(
    span=st.one_of(st.sampled_from([1, 64 * KIB, 4 * MIB, 2**63 - 1]), st.integers(1, 2**63 - 1)),
    size=st.one_of(st.sampled_from([0, 1, 4 * MIB, 2**31, 2**63 - 1]), st.integers(0, 2**63 - 1)),
)
def test_tarzinfo_matches_the_stock_builder(span: int, size: int):
    ours = TarZinfo(span_size=span, size=size).serialize()
    assert ours == _stock_tarzinfo(2, span, size)
    assert TarZinfo.parse(ours) == TarZinfo(span_size=span, size=size)


def test_tarzinfo_rejects():
    with pytest.raises(FormatError, match="version 0"):
        TarZinfo.parse(_stock_tarzinfo(0, 5, 5))
    with pytest.raises(FormatError, match="span size 0"):
        TarZinfo.parse(_stock_tarzinfo(2, 0, 5))
    with pytest.raises(FormatError, match="outside"):
        TarZinfo.parse(_stock_tarzinfo(2, 5, 5)[:-4])
    with pytest.raises(FormatError, match="root offset"):
        TarZinfo.parse(b"\x01")
    # The legacy 20-byte raw form (version, span_size, size) is not a flatbuffer.
    with pytest.raises(FormatError):
        TarZinfo.parse(struct.pack("<iqq", 2, 4 * MIB, 10 * MIB))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_fuzz_tarzinfo_parse(data: bytes):
    try:
        TarZinfo.parse(data)
    except FormatError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_tarzinfo_mutations(data: st.DataObject):
    good = bytearray(_stock_tarzinfo(2, 4 * MIB, 123_456_789))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(good) - 1))
        good[at] = data.draw(st.integers(0, 255))
    try:
        TarZinfo.parse(bytes(good))
    except FormatError:
        pass


# ---- index_tar ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 100_000, 3 * 64 * KIB, 3 * 64 * KIB + 1])
def test_index_tar(tar_bytes: bytes, size: int):
    data = tar_bytes[:size]
    seen: list[bytes] = []
    f = io.BytesIO(data)
    res = zinfo.index_tar(lambda n: f.read(min(n, 50_000)), 64 * KIB, lambda v: seen.append(bytes(v)))
    assert b"".join(seen) == data
    t = TarZinfo.parse(res.checkpoints_blob)
    assert t == TarZinfo(span_size=64 * KIB, size=size)
    assert res.compressed_size == res.uncompressed_size == size
    assert len(res.span_digests) == t.max_span_id + 1
    for i, digest in enumerate(res.span_digests):
        cs, ce = t.compressed_range(i, size)
        assert digest == "sha256:" + hashlib.sha256(data[cs:ce]).hexdigest()
    with pytest.raises(InvalidArgument):
        zinfo.index_tar(io.BytesIO(data).read, 0)


@pytest.mark.parametrize("batch", [1, 5000, 1 << 30])
def test_span_hasher_thread_and_inline_agree(
    corpus: dict[str, bytes], monkeypatch: pytest.MonkeyPatch, batch: int
):
    blob = corpus["gzip-6"]
    base, _ = _selected_index("gzip-6", blob, 64 * KIB)
    monkeypatch.setattr(zinfo.SpanHasher, "BATCH", batch)
    monkeypatch.setattr(zinfo.SpanHasher, "MAX_JOBS", 2)
    assert zinfo.index_gzip(io.BytesIO(blob).read, 64 * KIB) == base


def test_span_hasher_reports_worker_errors():
    h = zinfo.SpanHasher()
    h.start_span()
    h.update(memoryview(b"x" * (zinfo.SpanHasher.BATCH + 1)))  # starts the worker
    h._hasher = None  # the next job fails inside the worker
    h.update(memoryview(b"y" * zinfo.SpanHasher.BATCH))
    with pytest.raises(AttributeError):
        h.close()
