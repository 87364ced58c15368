"""Tests of soci_fs.spanread: reads over a layer's uncompressed tar through its span index.

The zTOC is a small stand-in with the attributes ``LayerSpans.from_ztoc`` reads (the real ``Ztoc`` dataclass
lives in ``soci_fs.ztoc``); the fetch function serves byte ranges of an in-memory blob and records them.
"""

from __future__ import annotations

import gzip
import io
import os
import random
import struct
import tarfile
import zlib
from dataclasses import dataclass, field, replace

import pytest

from soci_fs import zinfo
from soci_fs.errors import FormatError, InvalidArgument
from soci_fs.spanread import LayerSpans, check_gzip_header
from soci_fs.zinfo import GzipZinfo

KIB = 1024
SPAN = 64 * KIB


@dataclass(frozen=True)
class _Compression:
    algorithm: int
    checkpoints: bytes
    span_digests: tuple[str, ...]
    max_span_id: int | None = None


@dataclass(frozen=True)
class _Ztoc:
    compression: _Compression
    compressed_archive_size: int
    uncompressed_archive_size: int


@dataclass
class _Blob:
    data: bytes
    calls: list[tuple[int, int]] = field(default_factory=list)

    def fetch(self, start: int, end: int) -> bytes:
        self.calls.append((start, end))
        return self.data[start:end]


def _tar(limit: int = 1_500_000) -> bytes:
    stdlib = os.path.dirname(os.__file__)
    buf = io.BytesIO()
    total = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name in sorted(os.listdir(os.path.join(stdlib, "email"))):
            path = os.path.join(stdlib, "email", name)
            if not os.path.isfile(path):
                continue
            info = tf.gettarinfo(path, arcname="email/" + name)
            info.mtime = 0
            with open(path, "rb") as f:
                tf.addfile(info, f)
            total += info.size
        rnd = random.Random(1)
        while total < limit:  # some incompressible files too
            blob = rnd.randbytes(rnd.randrange(1, 200_000))
            info = tarfile.TarInfo(f"noise/{total}")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
            total += len(blob)
    return buf.getvalue()


@pytest.fixture(scope="module")
def layer() -> tuple[bytes, bytes, _Ztoc, list[tarfile.TarInfo]]:
    """(gzip blob, tar bytes, zTOC stand-in, tar members) of a small real layer."""
    tar = _tar()
    blob = gzip.compress(tar, 6, mtime=0)
    res = zinfo.index_gzip(io.BytesIO(blob).read, SPAN)
    assert res.uncompressed_size == len(tar)
    z = GzipZinfo.parse(res.checkpoints_blob)
    comp = _Compression(1, res.checkpoints_blob, res.span_digests, z.max_span_id)
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        members = tf.getmembers()
    return blob, tar, _Ztoc(comp, len(blob), len(tar)), members


def test_read_every_span_and_random_ranges(layer):
    blob, tar, z, _ = layer
    src = _Blob(blob)
    spans = LayerSpans.from_ztoc(z, src.fetch)
    assert src.calls == [(0, 10)]  # the header check
    assert spans.is_gzip and spans.max_span_id > 10
    assert b"".join(spans.read_span(i) for i in range(spans.max_span_id + 1)) == tar
    rnd = random.Random(2)
    for _ in range(60):
        off = rnd.randrange(len(tar))
        n = rnd.randrange(0, min(3 * SPAN, len(tar) - off) + 1)
        assert spans.read(off, n) == tar[off : off + n]
    assert spans.read(0, len(tar)) == tar
    assert spans.read(len(tar), 0) == b""


def test_read_inside_one_span_fetches_one_range(layer):
    blob, tar, z, _ = layer
    src = _Blob(blob)
    spans = LayerSpans.from_ztoc(z, src.fetch, check_header=False)
    us, _ue = spans.uncompressed_range(3)
    assert spans.read(us + 10, 100) == tar[us + 10 : us + 110]
    assert src.calls == [spans.compressed_range(3)]


def test_files_read_back(layer):
    blob, tar, z, members = layer
    spans = LayerSpans.from_ztoc(z, _Blob(blob).fetch)
    for m in members[:: max(1, len(members) // 40)]:
        assert spans.read(m.offset_data, m.size) == tar[m.offset_data : m.offset_data + m.size]


def test_span_range_pulls_the_next_span_on_a_boundary(layer):
    blob, _, z, _ = layer
    spans = LayerSpans.from_ztoc(z, _Blob(blob).fetch)
    us1, ue1 = spans.uncompressed_range(1)
    assert spans.span_range(us1, ue1 - us1) == (1, 2)  # ends exactly on the boundary
    assert spans.span_range(us1, ue1 - us1 - 1) == (1, 1)
    assert spans.span_range(us1 - 1, 1) == (0, 1)
    assert spans.span_range(0, 0) == (0, 0)
    last = spans.max_span_id
    assert spans.span_range(z.uncompressed_archive_size - 5, 5) == (last, last)


def test_archive_size_shorter_than_the_stream(layer):
    """The last span ends at uncompressed_archive_size even when the stream has padding after it."""
    blob, tar, z, _ = layer
    short = replace(z, uncompressed_archive_size=len(tar) - 1024)
    spans = LayerSpans.from_ztoc(short, _Blob(blob).fetch)
    assert spans.read_span(spans.max_span_id) == tar[spans.uncompressed_range(spans.max_span_id)[0] : -1024]
    with pytest.raises(InvalidArgument, match="outside"):
        spans.read(len(tar) - 1024, 1)


def test_digest_mismatch(layer):
    blob, _, z, _ = layer
    bad = bytearray(blob)
    cs, ce = GzipZinfo.parse(z.compression.checkpoints).compressed_range(4, len(blob))
    bad[(cs + ce) // 2] ^= 1
    spans = LayerSpans.from_ztoc(z, _Blob(bytes(bad)).fetch)
    spans.read_span(3)
    with pytest.raises(
        FormatError, match=r"span 4: digest mismatch: expected sha256:[0-9a-f]{64}, got sha256:"
    ):
        spans.read_span(4)
    with pytest.raises(FormatError, match="span 4"):
        spans.read(spans.uncompressed_range(4)[0], 1)


def test_short_fetch(layer):
    blob, _, z, _ = layer
    spans = LayerSpans.from_ztoc(z, lambda s, e: blob[s : e - 1] if s else blob[s:e])
    with pytest.raises(FormatError, match="returned"):
        spans.read_span(2)


def test_bad_ztoc_values(layer):
    blob, _, z, _ = layer
    fetch = _Blob(blob).fetch
    with pytest.raises(FormatError, match=r"unexpected compression algorithm: compressionalgorithm\(3\)"):
        LayerSpans.from_ztoc(replace(z, compression=replace(z.compression, algorithm=3)), fetch)
    fewer = replace(z.compression, span_digests=z.compression.span_digests[:-1])
    with pytest.raises(FormatError, match="span digests"):
        LayerSpans.from_ztoc(replace(z, compression=fewer), fetch)
    with pytest.raises(FormatError, match="does not fit"):
        LayerSpans.from_ztoc(replace(z, compressed_archive_size=100), fetch)
    with pytest.raises(FormatError, match="gzip zinfo blob"):
        LayerSpans.from_ztoc(replace(z, compression=replace(z.compression, checkpoints=b"junk")), fetch)
    with pytest.raises(FormatError, match="max_span_id 0 does not match"):
        LayerSpans.from_ztoc(replace(z, compression=replace(z.compression, max_span_id=0)), fetch)
    with pytest.raises(FormatError, match="empty or reversed"):
        LayerSpans.from_ztoc(replace(z, uncompressed_archive_size=1), fetch)


def test_header_check(layer):
    _, _, z, _ = layer
    with pytest.raises(FormatError, match=r"layer header \[0, 10\): not a gzip header"):
        LayerSpans.from_ztoc(z, lambda s, e: b"\0" * (e - s))
    # A header with every optional field passes; a cut or mismatched one does not.
    head = bytearray(b"\x1f\x8b\x08" + bytes([2 | 4 | 8 | 16]) + bytes(6))
    head += struct.pack("<H", 3) + b"xyz" + b"name\0" + b"comment\0"
    head += struct.pack("<H", zlib.crc32(head) & 0xFFFF)
    check_gzip_header(bytes(head))
    for cut in range(len(head)):
        with pytest.raises(FormatError):
            check_gzip_header(bytes(head[:cut]))
    with pytest.raises(FormatError, match="CRC mismatch"):
        check_gzip_header(bytes(head[:-1]) + bytes([head[-1] ^ 1]))
    with pytest.raises(FormatError, match="first span starts"):
        check_gzip_header(bytes(head) + b"\0")
    with pytest.raises(FormatError, match="method"):
        check_gzip_header(b"\x1f\x8b\x07" + bytes(7))
    with pytest.raises(FormatError, match="reserved"):
        check_gzip_header(b"\x1f\x8b\x08\x20" + bytes(6))


def test_tar_layer():
    tar = _tar(300_000)
    span = 50_000
    res = zinfo.index_tar(io.BytesIO(tar).read, span)
    z = _Ztoc(_Compression(2, res.checkpoints_blob, res.span_digests), len(tar), len(tar) - 512)
    src = _Blob(tar)
    spans = LayerSpans.from_ztoc(z, src.fetch)
    assert src.calls == [] and not spans.is_gzip
    assert spans.max_span_id == (len(tar) - 1) // span
    assert spans.read_span(1) == tar[span : 2 * span]
    assert spans.read_span(spans.max_span_id) == tar[spans.max_span_id * span : -512]
    assert spans.read(span - 10, 20) == tar[span - 10 : span + 10]
    assert spans.span_range(0, span) == (0, 1)
    assert spans.span_range(len(tar) - 600, 88) == (spans.max_span_id, spans.max_span_id)
    bad = bytearray(tar)
    bad[span + 1] ^= 1
    spans = LayerSpans.from_ztoc(z, _Blob(bytes(bad)).fetch)
    with pytest.raises(FormatError, match="span 1: digest mismatch"):
        spans.read(span, 1)


def test_tar_layer_exact_multiple():
    data = bytes(range(256)) * 400  # 102400 = 2 * 51200
    res = zinfo.index_tar(io.BytesIO(data).read, 51_200)
    z = _Ztoc(_Compression(2, res.checkpoints_blob, res.span_digests), len(data), len(data))
    spans = LayerSpans.from_ztoc(z, _Blob(data).fetch)
    assert spans.max_span_id == 1
    assert spans.span_range(51_200, 51_200) == (1, 1)  # clamped: there is no span 2
    assert spans.read(0, len(data)) == data


def test_a_checkpoint_in_the_tar_padding_is_an_empty_span() -> None:
    """tarfile pads to 10240-byte records; ``uncompressed_archive_size`` ends at the end-of-archive marker,
    so the last checkpoint can lie beyond it. That span is empty: every span still reads, and the archive
    reads back whole."""
    from soci_fs.builder import build_ztoc
    from tests.fs.ocigen import gz, make_tar
    from tests.integration.sociimg import data_entries

    tar = make_tar(data_entries("b", 40, 16384, seed=1005))
    blob = gz(tar)
    z = build_ztoc(io.BytesIO(blob).read, span_size=65536, compression="gzip")
    assert z.uncompressed_archive_size < len(tar)
    spans = LayerSpans.from_ztoc(z, lambda a, b: blob[a:b])
    last = spans.max_span_id
    us, ue = spans.uncompressed_range(last)
    assert us > z.uncompressed_archive_size and ue == us
    assert [len(spans.read_span(i)) for i in range(last + 1)][-1] == 0
    assert spans.read(0, z.uncompressed_archive_size) == tar[: z.uncompressed_archive_size]
