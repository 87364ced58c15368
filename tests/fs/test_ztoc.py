"""zTOC: byte identity with the stock builder, a golden digest, other legal layouts, validation, fuzzing,
and the mod_time text rules."""

from __future__ import annotations

import hashlib
import struct
import tracemalloc

import flatbuffers
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from soci_fs import ztoc
from soci_fs.errors import FormatError, InvalidArgument
from soci_fs.ztoc import (
    CompressionInfo,
    FileMetadata,
    Ztoc,
    format_mod_time,
    parse,
    parse_mod_time,
    serialize,
)
from tests.fs.ztoc_reference import reference_bytes

_odd_text = st.one_of(
    st.text(max_size=12),
    st.binary(max_size=12).map(lambda b: b.decode("utf-8", "surrogateescape")),
)
_u32 = st.integers(0, 2**32 - 1)
_i64 = st.one_of(st.just(0), st.integers(-(2**63), 2**63 - 1))


@st.composite
def _entry(draw, offset: int, size: int) -> FileMetadata:
    keys = draw(st.lists(_odd_text, unique_by=lambda k: k.encode("utf-8", "surrogateescape"), max_size=5))
    pax = tuple(
        sorted(
            ((k, draw(st.binary(max_size=8))) for k in keys),
            key=lambda kv: kv[0].encode("utf-8", "surrogateescape"),
        )
    )
    return FileMetadata(
        name=draw(_odd_text),
        type=draw(st.sampled_from(["reg", "dir", "symlink", "hardlink", "char", "block", "fifo", ""])),
        uncompressed_offset=offset,
        uncompressed_size=size,
        linkname=draw(_odd_text),
        mode=draw(st.one_of(st.just(0), st.just(0o100644), _i64)),
        uid=draw(st.one_of(st.just(0), _u32)),
        gid=draw(st.one_of(st.just(0), _u32)),
        uname=draw(_odd_text),
        gname=draw(_odd_text),
        mod_time=draw(st.sampled_from(["", "2024-01-02T03:04:05Z", "1970-01-01T00:00:00.5Z"])),
        devmajor=draw(st.one_of(st.just(0), _i64)),
        devminor=draw(st.one_of(st.just(0), _i64)),
        pax=pax,
    )


@st.composite
def ztocs(draw, max_entries: int = 8) -> Ztoc:
    n = draw(st.integers(0, max_entries))
    files = []
    header = 0
    for _ in range(n):
        offset = header + 512 * draw(st.integers(1, 3))
        size = draw(st.integers(0, 3000))
        files.append(draw(_entry(offset, size)))
        header = -(-(offset + size) // 512) * 512
    max_span_id = draw(st.integers(-1, 4))
    return Ztoc(
        version=draw(st.sampled_from(["0.9", "", "1.0"])),
        build_tool_identifier=draw(_odd_text),
        compressed_archive_size=draw(st.integers(0, 2**40)),
        uncompressed_archive_size=header + draw(st.integers(0, 2048)),
        files=tuple(files),
        compression=CompressionInfo(
            algorithm=draw(st.sampled_from([1, 2, 0, 7, -3])),
            max_span_id=max_span_id,
            span_digests=tuple(f"sha256:{i:064x}" for i in range(max_span_id + 1)),
            checkpoints=draw(st.binary(max_size=40)),
        ),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ztocs())
def test_serialize_matches_stock_builder_and_round_trips(z):
    data = serialize(z)
    assert data == reference_bytes(z)
    assert parse(data) == z


def _fixed_ztoc() -> Ztoc:
    files = []
    header = 0
    kinds = ["dir", "reg", "symlink", "hardlink", "char", "block", "fifo"]
    for i in range(40):
        offset = header + 512 * (1 + i % 3)
        kind = kinds[i % len(kinds)]
        size = (i * 997) % 5000 if kind == "reg" else 0
        pax: tuple[tuple[str, bytes], ...] = ()
        if i % 5 == 0:
            pax = (
                ("SCHILY.xattr.user.k", bytes([i, 0, 255])),
                ("mtime", b"1700000000.25"),
                ("path", b"x" * i),
            )
        files.append(
            FileMetadata(
                name=f"dir{i % 4}/file\udcff{i}" + ("/" if kind == "dir" else ""),
                type=kind,
                uncompressed_offset=offset,
                uncompressed_size=size,
                linkname="target" if kind in ("symlink", "hardlink") else "",
                mode=0o755 if kind == "dir" else 0o644,
                uid=i % 3 * 1000,
                gid=0,
                uname="root" if i % 2 else "",
                gname="wheel",
                mod_time=format_mod_time(1_700_000_000 + i, 250_000_000 if i % 5 == 0 else 0),
                devmajor=8 if kind in ("char", "block") else 0,
                devminor=i if kind in ("char", "block") else 0,
                pax=pax,
            )
        )
        header = -(-(offset + size) // 512) * 512
    return Ztoc(
        "0.9",
        "AWS SOCI CLI v0.2",
        123456,
        header + 1024,
        tuple(files),
        CompressionInfo(1, 1, ("sha256:" + "ab" * 32, "sha256:" + "cd" * 32), bytes(range(64))),
    )


GOLDEN_SHA256 = "54aef1159b5cffb5a4da34a9cae9bff817abeba7edd476ffcfe92c055369d3d3"


def test_golden_digest():
    data = serialize(_fixed_ztoc())
    assert data == reference_bytes(_fixed_ztoc())
    assert hashlib.sha256(data).hexdigest() == GOLDEN_SHA256


def test_uncompressed_writes_algorithm_and_gzip_omits_it():
    z = _fixed_ztoc()
    gz = serialize(z)
    tar = serialize(
        Ztoc(**{**z.__dict__, "compression": CompressionInfo(2, 1, z.compression.span_digests, b"")})
    )
    root_gz = ztoc.flatbuf.root(gz, "z").table(5, "ci")
    root_tar = ztoc.flatbuf.root(tar, "z").table(5, "ci")
    assert root_gz is not None and root_tar is not None
    assert root_gz.field(0) == 0
    assert root_tar.scalar(0, struct.Struct("<b"), 1, "alg") == 2


def test_empty_ztoc():
    z = Ztoc("", "", 0, 0, (), CompressionInfo(1, -1, (), b""))
    assert parse(serialize(z)) == z
    assert serialize(z) == reference_bytes(z)


def test_xattrs_property_strips_prefix():
    f = _fixed_ztoc().files[0]
    assert f.xattrs == {"user.k": bytes([0, 0, 255])}


def test_serialize_refuses_values_that_do_not_fit():
    z = _fixed_ztoc()
    bad = FileMetadata(**{**{k: getattr(z.files[0], k) for k in FileMetadata.__slots__}, "uid": -1})
    with pytest.raises(InvalidArgument, match=r"toc.metadata\[0\].uid: -1 out of range"):
        serialize(Ztoc(**{**z.__dict__, "files": (bad,)}))


# ------------------------------------------------------------------------------- other legal layouts


def _build_other_layout(z: Ztoc, *, force_defaults: bool, share_strings: bool, drop_empty: bool) -> bytes:
    """The same content written in another order: root fields first, entries first to last, fields in
    reverse id order, optionally with defaults forced, equal strings shared and empty strings absent."""
    b = flatbuffers.Builder(0)
    b.ForceDefaults(force_defaults)
    cache: dict[bytes, int] = {}

    def s(text: str | bytes) -> int | None:
        raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
        if drop_empty and raw == b"":
            return None
        if share_strings and raw in cache:
            return cache[raw]
        cache[raw] = b.CreateString(raw)
        return cache[raw]

    def add(slot: int, off: int | None) -> None:
        if off is not None:
            b.PrependUOffsetTRelativeSlot(slot, off, 0)

    ci = z.compression
    digests = [s(d) for d in ci.span_digests]
    b.StartVector(4, len(digests), 4)
    for d in reversed(digests):
        b.PrependUOffsetTRelative(d)
    digest_vec = b.EndVector()
    checkpoints = b.CreateByteVector(ci.checkpoints)
    b.StartObject(6)  # more slots than the schema has: still legal
    b.PrependUOffsetTRelativeSlot(3, checkpoints, 0)
    b.PrependUOffsetTRelativeSlot(2, digest_vec, 0)
    b.PrependInt8Slot(0, ci.algorithm, 1)
    b.PrependInt32Slot(1, ci.max_span_id, 0)
    compression = b.EndObject()
    entries = []
    for f in z.files:
        strs = [s(getattr(f, a)) for a in ("mod_time", "gname", "uname", "linkname", "type", "name")]
        recs = []
        for key, value in f.pax:
            v = s(value)
            k = s(key)
            b.StartObject(2)
            add(1, v)
            add(0, k)
            recs.append(b.EndObject())
        xvec = None
        if recs or not drop_empty:
            b.StartVector(4, len(recs), 4)
            for r in reversed(recs):
                b.PrependUOffsetTRelative(r)
            xvec = b.EndVector()
        mod_time, gname, uname, linkname, type_, name = strs
        b.StartObject(14)
        add(13, xvec)
        b.PrependInt64Slot(12, f.devminor, 0)
        b.PrependInt64Slot(11, f.devmajor, 0)
        add(10, mod_time)
        add(9, gname)
        add(8, uname)
        b.PrependUint32Slot(7, f.gid, 0)
        b.PrependUint32Slot(6, f.uid, 0)
        b.PrependInt64Slot(5, f.mode, 0)
        add(4, linkname)
        b.PrependInt64Slot(3, f.uncompressed_size, 0)
        b.PrependInt64Slot(2, f.uncompressed_offset, 0)
        add(1, type_)
        add(0, name)
        entries.append(b.EndObject())
    b.StartVector(4, len(entries), 4)
    for e in reversed(entries):
        b.PrependUOffsetTRelative(e)
    vec = b.EndVector()
    b.StartObject(1)
    b.PrependUOffsetTRelativeSlot(0, vec, 0)
    toc = b.EndObject()
    version = s(z.version)
    tool = s(z.build_tool_identifier)
    b.StartObject(6)
    add(5, compression)
    b.PrependInt64Slot(3, z.uncompressed_archive_size, 0)
    b.PrependInt64Slot(2, z.compressed_archive_size, 0)
    add(4, toc)
    add(1, tool)
    add(0, version)
    b.Finish(b.EndObject())
    return bytes(b.Output())


@pytest.mark.parametrize("force_defaults", [False, True])
@pytest.mark.parametrize("share_strings", [False, True])
@pytest.mark.parametrize("drop_empty", [False, True])
def test_other_layouts_parse_to_the_same_ztoc(force_defaults, share_strings, drop_empty):
    z = _fixed_ztoc()
    data = _build_other_layout(
        z, force_defaults=force_defaults, share_strings=share_strings, drop_empty=drop_empty
    )
    assert data != serialize(z)
    assert parse(data) == z


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ztocs(), st.booleans(), st.booleans())
def test_other_layouts_property(z, force, share):
    assert parse(_build_other_layout(z, force_defaults=force, share_strings=share, drop_empty=True)) == z


def test_absent_tables_read_as_defaults():
    b = flatbuffers.Builder(0)
    b.StartObject(6)
    b.Finish(b.EndObject())
    with pytest.raises(FormatError, match="0 digests for max_span_id 0"):
        parse(bytes(b.Output()))
    b = flatbuffers.Builder(0)
    b.StartObject(4)
    b.PrependInt32Slot(1, -1, 0)
    ci = b.EndObject()
    b.StartObject(6)
    b.PrependUOffsetTRelativeSlot(5, ci, 0)
    b.Finish(b.EndObject())
    assert parse(bytes(b.Output())) == Ztoc("", "", 0, 0, (), CompressionInfo(1, -1, (), b""))


# ---------------------------------------------------------------------------------------- validation


def _with(z: Ztoc, i: int, **changes) -> Ztoc:
    files = list(z.files)
    files[i] = FileMetadata(**{**{k: getattr(files[i], k) for k in FileMetadata.__slots__}, **changes})
    return Ztoc(**{**z.__dict__, "files": tuple(files)})


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda z: _with(z, 3, uncompressed_size=-1), r"toc.metadata\[3\].uncompressed_size: negative"),
        (lambda z: _with(z, 3, uncompressed_offset=-512), r"toc.metadata\[3\].uncompressed_offset: negative"),
        (
            lambda z: _with(z, 2, uncompressed_offset=z.files[1].uncompressed_offset + 1),
            r"toc.metadata\[2\]: invalid toc entry",
        ),
        (
            lambda z: _with(z, 39, uncompressed_size=10**9),
            r"toc.metadata\[39\]: data .* ends beyond uncompressed_archive_size",
        ),
        (
            lambda z: Ztoc(**{**z.__dict__, "compression": CompressionInfo(1, 5, ("sha256:x",), b"")}),
            r"compression_info.span_digests: 1 digests for max_span_id 5",
        ),
        (
            lambda z: Ztoc(**{**z.__dict__, "compression": CompressionInfo(1, -7, (), b"")}),
            r"compression_info.max_span_id: -7",
        ),
        (
            lambda z: Ztoc(**{**z.__dict__, "uncompressed_archive_size": -1}),
            "uncompressed_archive_size: negative",
        ),
    ],
)
def test_validation(change, message):
    with pytest.raises(FormatError, match=message):
        parse(serialize(change(_fixed_ztoc())))


def test_entries_out_of_order_are_checked_in_offset_order():
    z = _fixed_ztoc()
    files = list(z.files)
    files[2], files[7] = files[7], files[2]
    swapped = Ztoc(**{**z.__dict__, "files": tuple(files)})
    assert parse(serialize(swapped)) == swapped


def test_unknown_algorithm_is_kept():
    z = _fixed_ztoc()
    odd = Ztoc(**{**z.__dict__, "compression": CompressionInfo(9, 1, z.compression.span_digests, b"")})
    assert parse(serialize(odd)).compression.algorithm == 9


def _field_pos(data: bytes, i: int, slot: int) -> int:
    root = ztoc.flatbuf.root(data, "z")
    toc = root.table(4, "toc")
    assert toc is not None
    t = ztoc.flatbuf.Table(data, toc.offsets(0, "metadata")[i], "e")
    return t.pos + t.field(slot)


def test_bad_string_offset_names_the_field():
    data = bytearray(serialize(_fixed_ztoc()))
    struct.pack_into("<I", data, _field_pos(bytes(data), 17, 0), 123456789)
    with pytest.raises(FormatError, match=r"^ztoc: toc.metadata\[17\].name: offset \d+ out of bounds"):
        parse(bytes(data))


def test_absurd_xattr_count_names_the_field():
    data = bytearray(serialize(_fixed_ztoc()))
    at = _field_pos(bytes(data), 5, 13)
    target = at + struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, target, 0x7FFFFFFF)
    with pytest.raises(FormatError, match=r"toc.metadata\[5\].xattrs: vector of 2147483647 elements"):
        parse(bytes(data))


def test_absurd_metadata_count_names_the_field():
    data = bytearray(serialize(_fixed_ztoc()))
    toc = ztoc.flatbuf.root(bytes(data), "z").table(4, "toc")
    assert toc is not None
    at = toc.pos + toc.field(0)
    struct.pack_into("<I", data, at + struct.unpack_from("<I", data, at)[0], 0xFFFFFFFF)
    with pytest.raises(FormatError, match=r"ztoc: toc.metadata: vector of 4294967295 elements"):
        parse(bytes(data))


# ----------------------------------------------------------------------------------------------- fuzz

_SAMPLE = serialize(_fixed_ztoc())


def _parse_only_format_errors(data: bytes) -> None:
    try:
        parse(data)
    except FormatError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(_SAMPLE)))
def test_fuzz_truncation(n):
    _parse_only_format_errors(_SAMPLE[:n])


@settings(max_examples=600, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_SAMPLE) - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_fuzz_byte_flips(flips):
    data = bytearray(_SAMPLE)
    for at, value in flips:
        data[at] = value
    tracemalloc.start()
    try:
        _parse_only_format_errors(bytes(data))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * len(_SAMPLE) + (1 << 20)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    _parse_only_format_errors(data)


# ------------------------------------------------------------------------------------------- mod_time


@pytest.mark.parametrize(
    "seconds, nanos, text",
    [
        (0, 0, "1970-01-01T00:00:00Z"),
        (1_700_000_000, 0, "2023-11-14T22:13:20Z"),
        (1_700_000_000, 500_000_000, "2023-11-14T22:13:20.5Z"),
        (1_700_000_000, 123_456_789, "2023-11-14T22:13:20.123456789Z"),
        (1_700_000_000, 1_000, "2023-11-14T22:13:20.000001Z"),
        (-1, 0, "1969-12-31T23:59:59Z"),
        (951_782_400, 0, "2000-02-29T00:00:00Z"),
        (-62_135_596_800, 0, "0001-01-01T00:00:00Z"),
        (-62_167_219_200, 0, "0000-01-01T00:00:00Z"),
        (253_402_300_799, 0, "9999-12-31T23:59:59Z"),
        (253_402_300_800, 0, ""),
        (-62_167_219_201, 0, ""),
    ],
)
def test_format_mod_time(seconds, nanos, text):
    assert format_mod_time(seconds, nanos) == text
    if text:
        assert parse_mod_time(text) == (seconds, nanos)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", ztoc.ZERO_TIME),
        ("2023-11-14T23:13:20+01:00", (1_700_000_000, 0)),
        ("2023-11-14T17:13:20.25-05:00", (1_700_000_000, 250_000_000)),
        ("2023-11-14t22:13:20.1234567891z", (1_700_000_000, 123_456_789)),
    ],
)
def test_parse_mod_time_offsets(text, expected):
    assert parse_mod_time(text) == expected


@pytest.mark.parametrize(
    "text",
    ["2023-13-01T00:00:00Z", "2023-02-29T00:00:00Z", "2023-01-01T24:00:00Z", "2023-01-01 00:00:00Z", "x"],
)
def test_parse_mod_time_rejects(text):
    with pytest.raises(FormatError, match="mod_time"):
        parse_mod_time(text)


@given(st.integers(-62_167_219_200, 253_402_300_799), st.integers(0, 999_999_999))
def test_mod_time_round_trip(seconds, nanos):
    assert parse_mod_time(format_mod_time(seconds, nanos)) == (seconds, nanos)
