"""The tar scanner against real archives made at test time (GNU tar and Python's tarfile), cross-checked
with tarfile, fed in many chunkings; and the refusals (truncation, bad checksum, garbage, unsupported).

Every test runs against both implementations: the compiled ``soci_fs._ext._tarscan`` (when built) and the
pure-Python twin ``soci_fs.tarscan_py``, whatever ``SOCI_PUREPYTHON`` says (the selector is tested on its
own in ``test_tarscan_diff.py``)."""

from __future__ import annotations

import io
import os
import random
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

from soci_fs import tarscan_py
from soci_fs.errors import FormatError
from soci_fs.tarscan import TarScanner, TarScanResult
from soci_fs.ztoc import format_mod_time

try:
    from soci_fs._ext import _tarscan as compiled_tarscan
except ImportError:  # not built: only the twin runs
    compiled_tarscan = None

IMPLEMENTATIONS = [tarscan_py] + ([compiled_tarscan] if compiled_tarscan is not None else [])


@pytest.fixture(autouse=True, params=IMPLEMENTATIONS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Runs the test once per implementation: ``TarScanner`` below names the one under test."""
    monkeypatch.setitem(globals(), "TarScanner", request.param.TarScanner)
    return request.param


GNU_TAR = shutil.which("tar")
_KIND = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.LNKTYPE: "hardlink",
    tarfile.SYMTYPE: "symlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.DIRTYPE: "dir",
    tarfile.FIFOTYPE: "fifo",
}


def scan(data: bytes, chunk: int | None = None) -> TarScanResult:
    s = TarScanner()
    if chunk is None:
        s.feed(data)
    else:
        view = memoryview(data)
        for i in range(0, len(data), chunk):
            s.feed(view[i : i + chunk])
    return s.finish()


def _supports_user_xattrs(path: Path) -> bool:
    probe = path / ".probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    src = root / "src"
    (src / "dir" / "sub").mkdir(parents=True)
    (src / "dir" / "file.txt").write_bytes(b"hello world\n")
    (src / "dir" / "empty").write_bytes(b"")
    (src / "dir" / "big.bin").write_bytes(random.Random(1).randbytes(70_000))
    (src / "dir" / "hard").hardlink_to(src / "dir" / "file.txt")
    (src / "dir" / "link").symlink_to("file.txt")
    (src / "dir" / ".wh.foo").write_bytes(b"")
    (src / "dir" / "sub" / ".wh..wh..opq").write_bytes(b"")
    long_dir = src / ("d" * 90) / ("e" * 90)
    long_dir.mkdir(parents=True)
    (long_dir / ("f" * 99)).write_bytes(b"long name > 255\n")
    (src / ("n" * 120)).write_bytes(b"long name > 100\n")
    (src / "dir" / "longlink").symlink_to("t" * 150)
    os.mkfifo(src / "dir" / "fifo")
    if os.geteuid() == 0:
        os.mknod(src / "dir" / "chardev", stat.S_IFCHR | 0o600, os.makedev(1, 7))
        os.mknod(src / "dir" / "blockdev", stat.S_IFBLK | 0o600, os.makedev(8, 3))
    if _supports_user_xattrs(src):
        os.setxattr(src / "dir" / "file.txt", "user.greeting", b"hi there")
        os.setxattr(src / "dir" / "empty", "user.bin", b"\x00\xff\x01")
    os.utime(src / "dir" / "file.txt", ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    return root


def _gnu_tar(tree: Path, fmt: str, *extra: str) -> bytes:
    if GNU_TAR is None:
        pytest.skip("GNU tar is not installed")
    out = subprocess.run(
        [GNU_TAR, f"--format={fmt}", *extra, "-C", str(tree), "-cf", "-", "src"],
        check=True,
        capture_output=True,
    )
    return out.stdout


def _pax_value(value: str, name: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


def cross_check(data: bytes) -> TarScanResult:
    """Every entry agrees with tarfile's reading of the same header, and its offset holds its data."""
    result = scan(data)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape") as tf:
        members = tf.getmembers()
        assert len(members) == len(result.entries)
        for m, e in zip(members, result.entries, strict=True):
            assert e.type == _KIND[m.type]
            assert e.name.rstrip("/") == m.name  # tarfile strips the trailing slash of directories
            assert e.name.endswith("/") == (m.type == tarfile.DIRTYPE and e.name.endswith("/"))
            assert e.linkname == m.linkname
            assert e.uncompressed_size == m.size
            assert e.uncompressed_offset == m.offset_data
            assert e.mode == m.mode
            assert (e.uid, e.gid, e.uname, e.gname) == (m.uid, m.gid, m.uname, m.gname)
            assert (e.devmajor, e.devminor) == (m.devmajor, m.devminor)
            assert dict(e.pax).keys() == m.pax_headers.keys()
            for key, value in e.pax:
                if key == "hdrcharset" or not key.startswith("SCHILY.xattr."):
                    assert value.decode("utf-8", "surrogateescape") == m.pax_headers[key]
            if "mtime" not in m.pax_headers:
                assert e.mod_time == format_mod_time(int(m.mtime))
            if m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                content = f.read()
                assert data[e.uncompressed_offset : e.uncompressed_offset + e.uncompressed_size] == content
    return result


@pytest.mark.parametrize("fmt", ["gnu", "pax", "ustar"])
def test_gnu_tar_formats(tree, fmt):
    if fmt == "ustar":
        # ustar cannot hold the long names and links; keep only what fits
        data = _gnu_tar(tree, fmt, "--exclude=" + "d" * 90, "--exclude=" + "n" * 120, "--exclude=longlink")
    else:
        data = _gnu_tar(tree, fmt)
    result = cross_check(data)
    names = {e.name: e for e in result.entries}
    assert names["src/dir/"].type == "dir"  # trailing slash kept
    assert names["src/dir/hard"].type == "hardlink" and names["src/dir/hard"].linkname == "src/dir/file.txt"
    assert names["src/dir/link"].linkname == "file.txt"
    assert names["src/dir/.wh.foo"].type == "reg"
    assert names["src/dir/sub/.wh..wh..opq"].type == "reg"
    assert names["src/dir/fifo"].type == "fifo"
    if os.geteuid() == 0:
        assert (names["src/dir/chardev"].type, names["src/dir/chardev"].devmajor) == ("char", 1)
        assert names["src/dir/chardev"].devminor == 7
        assert (names["src/dir/blockdev"].type, names["src/dir/blockdev"].devmajor) == ("block", 8)
    if fmt != "ustar":
        long_name = "src/" + "d" * 90 + "/" + "e" * 90 + "/" + "f" * 99
        assert long_name in names
        assert names["src/" + "n" * 120].uncompressed_size == 16
        assert names["src/dir/longlink"].linkname == "t" * 150
    if fmt == "pax":
        assert names["src/dir/file.txt"].mod_time == "2023-11-14T22:13:20.123456789Z"
    assert result.archive_size % 512 == 0 and result.archive_size <= len(data)


def test_gnu_tar_xattrs(tree):
    if not _supports_user_xattrs(tree):
        pytest.skip("no user xattrs on this filesystem")
    data = _gnu_tar(tree, "pax", "--xattrs", "--xattrs-include=user.*")
    result = cross_check(data)
    names = {e.name: e for e in result.entries}
    assert names["src/dir/file.txt"].xattrs == {"user.greeting": b"hi there"}
    assert names["src/dir/empty"].xattrs == {"user.bin": b"\x00\xff\x01"}
    keys = [k.encode("utf-8", "surrogateescape") for k, _ in names["src/dir/file.txt"].pax]
    assert keys == sorted(keys)


def test_python_tarfile_pax_subsecond_binary_xattrs_and_overrides():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("a/file")
        info.mtime = 1_700_000_000.25
        info.uid = 5_000_000  # too big for the octal field: PAX uid record
        info.uname = "ünï"
        info.size = 3
        info.pax_headers = {"SCHILY.xattr.user.bin": b"\x00\xfe\xff".decode("utf-8", "surrogateescape")}
        tf.addfile(info, io.BytesIO(b"abc"))
        d = tarfile.TarInfo("a/dir/")
        d.type = tarfile.DIRTYPE
        d.mtime = -1.5
        tf.addfile(d)
        raw_name = tarfile.TarInfo(b"bad\xffname".decode("utf-8", "surrogateescape"))
        tf.addfile(raw_name, io.BytesIO(b""))
    data = buf.getvalue()
    result = cross_check(data)
    f, d, raw = result.entries
    assert f.mod_time == "2023-11-14T22:13:20.25Z"
    assert f.uid == 5_000_000 and f.uname == "ünï"
    assert f.xattrs == {"user.bin": b"\x00\xfe\xff"}
    assert ("hdrcharset", b"BINARY") in f.pax
    assert d.name == "a/dir/" and d.mod_time == "1969-12-31T23:59:58.5Z"
    assert raw.name.encode("utf-8", "surrogateescape") == b"bad\xffname"
    # tarfile pads to 10240 bytes; the archive ends after its two zero blocks
    assert result.archive_size == raw.uncompressed_offset + 1024
    assert len(data) == 10240


def test_archive_size_marker_variants():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("x")
        info.size = 600
        tf.addfile(info, io.BytesIO(b"y" * 600))
    data = buf.getvalue()
    body = 512 + 1024
    assert scan(data).archive_size == body + 1024
    assert scan(data[: body + 512]).archive_size == body + 512  # one zero block then EOF
    assert scan(data[:body]).archive_size == body  # no end marker
    with pytest.raises(FormatError, match="zero block is followed by data"):
        scan(data[: body + 512] + data[:512])


def _header(name: bytes, typeflag: bytes, size: int = 0, **numbers: bytes) -> bytearray:
    info = tarfile.TarInfo(name.decode())
    info.size = size
    block = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    block[156:157] = typeflag
    for field, value in numbers.items():
        at, width = {"uid": (108, 8), "size": (124, 12), "mode": (100, 8)}[field]
        block[at : at + width] = value
    _fix_checksum(block)
    return block


def _fix_checksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)


def test_legacy_nul_typeflag_base256_and_prefix():
    data = _header(b"olddir/", b"\x00") + _header(b"oldfile", b"\x00", 1) + bytes(512)
    data += _header(b"big", b"0", uid=b"\x80\x00\x00\x00\x01\x00\x00\x00") + _header(
        b"neg", b"5", uid=b"\xff" * 8
    )
    long = b"p" * 120 + b"/" + b"q" * 60
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        tf.addfile(tarfile.TarInfo(long.decode()))
    data += buf.getvalue()[:512] + bytes(1024)
    entries = scan(bytes(data)).entries
    assert [(e.name, e.type) for e in entries][:2] == [("olddir/", "dir"), ("oldfile", "reg")]
    assert entries[2].uid == 1 << 24
    assert entries[3].uid == 0xFFFFFFFF  # -1 stored as uint32, as upstream does
    assert entries[4].name == long.decode()


def test_signed_checksum_is_accepted():
    block = _header(b"xxx", b"0")
    block[0:3] = b"\xe9t\xe9"
    block[148:156] = b" " * 8
    signed = sum(b - 256 if b >= 128 else b for b in block)
    block[148:156] = b"%06o\x00 " % signed
    assert scan(bytes(block) + bytes(1024)).entries[0].name == "\udce9t\udce9"


@pytest.mark.parametrize("chunk", [1, 511, 512, 513, 65536, None])
def test_chunkings_agree(tree, chunk):
    data = _gnu_tar(tree, "pax")
    if chunk == 1:
        data = data[:60_000]  # the whole archive byte by byte is slow; a prefix is enough
        with pytest.raises(FormatError, match="truncated"):
            scan(data, 1)
        return
    assert scan(data, chunk) == scan(data)


def test_random_chunkings_agree(tree):
    data = _gnu_tar(tree, "gnu")
    whole = scan(data)
    rnd = random.Random(7)
    for _ in range(20):
        s = TarScanner()
        i = 0
        while i < len(data):
            n = rnd.choice([1, 7, 511, 512, 513, 4096, 70_000])
            s.feed(data[i : i + n])
            i += n
        assert s.finish() == whole


def test_small_chunkings_on_small_archive():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(3):
            info = tarfile.TarInfo("x" * (110 + i))
            info.size = 700
            info.mtime = 1.5
            tf.addfile(info, io.BytesIO(b"z" * 700))
    data = buf.getvalue()
    assert scan(data, 1) == scan(data, 511) == scan(data, 513) == scan(data)


@pytest.mark.parametrize("cut", [100, 512, 700, 1100, 1536 + 100])
def test_truncated(cut):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("y" * 120)
        info.size = 1000
        tf.addfile(info, io.BytesIO(b"d" * 1000))
    with pytest.raises(FormatError, match="truncated"):
        scan(buf.getvalue()[:cut])


def test_bad_checksum_and_garbage():
    block = _header(b"file", b"0")
    block[0:1] = b"g"
    with pytest.raises(FormatError, match="checksum mismatch"):
        scan(bytes(block))
    with pytest.raises(FormatError, match="checksum"):
        scan(random.Random(3).randbytes(4096))
    bad_number = _header(b"file", b"0", mode=b"07x7\x00\x00\x00\x00")
    with pytest.raises(FormatError, match="bad octal"):
        scan(bytes(bad_number))


@pytest.mark.parametrize("typeflag", [b"g", b"S", b"7", b"V"])
def test_unsupported_entries(typeflag):
    data = _header(b"odd-entry", typeflag) + bytes(1024)
    with pytest.raises(FormatError, match="unsupported input tar entry 'odd-entry'"):
        scan(bytes(data))


def test_global_pax_header_from_tarfile_is_unsupported():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "x"}) as tf:
        tf.addfile(tarfile.TarInfo("f"))
    with pytest.raises(FormatError, match="unsupported input tar entry"):
        scan(buf.getvalue())


def test_bad_pax_record():
    payload = b"9 path=\n"  # length 9 does not match the record (8 bytes)
    pax = _header(b"PaxHeader", b"x", len(payload))
    data = bytes(pax) + payload.ljust(512, b"\x00") + bytes(_header(b"f", b"0")) + bytes(1024)
    with pytest.raises(FormatError, match="PAX"):
        scan(data)


def test_gnu_sparse_file_is_unsupported(tmp_path):
    if GNU_TAR is None:
        pytest.skip("GNU tar is not installed")
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.seek(1 << 20)
        f.write(b"end")
    for fmt in ("gnu", "pax"):
        out = subprocess.run(
            [GNU_TAR, f"--format={fmt}", "--sparse", "-C", str(tmp_path), "-cf", "-", "sparse"],
            check=True,
            capture_output=True,
        ).stdout
        with pytest.raises(FormatError, match="unsupported input tar entry"):
            scan(out)
