"""Tar header verification (soci_fs.verify): header offsets, and every field the check compares."""

from __future__ import annotations

import dataclasses
import io
import tarfile

import pytest

from soci_fs.errors import FormatError
from soci_fs.operations import BufferLayerData
from soci_fs.tarscan import TarScanner
from soci_fs.verify import LayerVerifier, VerificationError, check_header, header_offsets
from soci_fs.ztoc import FileMetadata


def _tar() -> bytes:
    """A PAX tar with the cases that make headers longer than one block: long names, xattrs, ns mtimes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:

        def add(name: str, data: bytes = b"", **kw: object) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 1_600_000_000
            ti.mode = 0o644
            for k, v in kw.items():
                setattr(ti, k, v)
            tf.addfile(ti, io.BytesIO(data) if data else None)

        add("./", type=tarfile.DIRTYPE, mode=0o755)
        add("./small.txt", b"hello\n", uid=1000, gid=1001)
        add("./" + "d" * 150 + "/" + "f" * 120, b"long name\n" * 100)
        add("./xattrs", b"x", pax_headers={"SCHILY.xattr.user.a": "1", "mtime": "1600000000.123456789"})
        add("./big.bin", bytes(range(256)) * 4000, mode=0o4755)
        add("./ln", type=tarfile.SYMTYPE, linkname="small.txt")
        add("./dev", type=tarfile.CHRTYPE, devmajor=8, devminor=300, mode=0o600)
        add("./empty", b"")
    return buf.getvalue()


TAR = _tar()


def _entries() -> tuple[FileMetadata, ...]:
    s = TarScanner()
    s.feed(TAR)
    return s.finish().entries


ENTRIES = _entries()


def _entry(name: str) -> tuple[int, FileMetadata]:
    return next((i, e) for i, e in enumerate(ENTRIES) if e.name == name)


def _raw(index: int) -> bytes:
    start = header_offsets(ENTRIES)[index]
    return TAR[start : ENTRIES[index].uncompressed_offset]


def test_every_entry_of_a_real_tar_verifies() -> None:
    offsets = header_offsets(ENTRIES)
    assert offsets[0] == 0
    assert len(ENTRIES) == 8
    for i, e in enumerate(ENTRIES):
        raw = _raw(i)
        assert len(raw) % 512 == 0 and len(raw) >= 512
        check_header(raw, e)
    # long names and xattrs take PAX blocks before the header
    assert len(_raw(_entry("./xattrs")[0])) > 512


def _pax(e: FileMetadata, key: str, value: bytes) -> tuple[tuple[str, bytes], ...]:
    return tuple(sorted({**dict(e.pax), key: value}.items()))


ALTERED = [
    ("./small.txt", {"uncompressed_size": 7}, "size"),
    ("./small.txt", {"mod_time": "2020-09-13T12:26:41Z"}, "mtime"),
    ("./ln", {"linkname": "other.txt"}, "linkname"),
    ("./small.txt", {"type": "fifo"}, "type"),
    ("./small.txt", {"mode": 0o600}, "mode"),
    ("./big.bin", {"mode": 0o755}, "mode"),
    ("./small.txt", {"uid": 0}, "uid"),
    ("./small.txt", {"gid": 0}, "gid"),
    ("./dev", {"devmajor": 9}, "devmajor"),
    ("./dev", {"devminor": 301}, "devminor"),
    ("./xattrs", "xattr", "xattrs"),
    ("./small.txt", {"name": "small.txt"}, "name"),
]


@pytest.mark.parametrize(("name", "change", "field"), ALTERED, ids=[f"{a[2]}-{a[0]}" for a in ALTERED])
def test_each_compared_field_is_checked(name: str, change: object, field: str) -> None:
    i, e = _entry(name)
    if change == "xattr":
        altered = dataclasses.replace(e, pax=_pax(e, "SCHILY.xattr.user.a", b"2"))
    else:
        assert isinstance(change, dict)
        altered = dataclasses.replace(e, **change)
    with pytest.raises(VerificationError) as info:
        check_header(_raw(i), altered)
    assert info.value.field == field
    assert isinstance(info.value, FormatError)
    assert "hello" not in str(info.value)


def test_same_instant_in_another_zone_is_equal() -> None:
    i, e = _entry("./small.txt")
    check_header(_raw(i), dataclasses.replace(e, mod_time="2020-09-13T14:26:40+02:00"))


def test_a_larger_size_in_the_header_than_in_the_ztoc_is_a_size_mismatch() -> None:
    i, e = _entry("./big.bin")
    with pytest.raises(VerificationError) as info:
        check_header(_raw(i), dataclasses.replace(e, uncompressed_size=1000))
    assert info.value.field == "size"


@pytest.mark.parametrize(
    ("what", "raw"),
    [
        ("two headers", TAR[0:1024]),  # "./" then "./small.txt"'s header: two entries
        ("garbage", b"\x01" * 512),
        ("half a header", TAR[512:768]),
    ],
)
def test_bytes_that_are_not_exactly_one_entry(what: str, raw: bytes) -> None:
    _, e = _entry("./small.txt")
    with pytest.raises(VerificationError) as info:
        check_header(raw, e)
    assert info.value.field == "header", what


def test_header_offsets_follow_data_order_and_refuse_overlaps() -> None:
    shuffled = ENTRIES[::-1]
    want = header_offsets(ENTRIES)[::-1]
    assert header_offsets(shuffled) == want
    bad = list(ENTRIES)
    bad[2] = dataclasses.replace(bad[2], uncompressed_offset=bad[1].uncompressed_offset + 1)
    with pytest.raises(FormatError, match="invalid toc entry"):
        header_offsets(bad)


@pytest.mark.trio
async def test_layer_verifier_reads_through_layer_data() -> None:
    v = LayerVerifier(ENTRIES)
    data = BufferLayerData(TAR)
    for i, e in enumerate(ENTRIES):
        if e.type == "reg":
            await v.verify(data, i)
    altered = list(ENTRIES)
    i, e = _entry("./big.bin")
    altered[i] = dataclasses.replace(e, uid=7)
    with pytest.raises(VerificationError, match="uid"):
        await LayerVerifier(altered).verify(data, i)
