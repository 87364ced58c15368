"""Differential tests: the compiled tar scanner (``ext/_tarscan.pyx``) against its pure-Python twin.

Hypothesis builds archives from raw header fields (octal, base-256 and garbage numbers, every magic, STAR
and GNU prefixes, PAX records good and bad, GNU long names and links, legacy and unsupported typeflags,
right, signed and wrong checksums, truncation, byte flips) and feeds both implementations the same bytes
in the same random chunking. They must list the same entries and archive size, or raise the same exception
type with the same message at the same call. Also: the selector honours ``SOCI_PUREPYTHON``, and the
compiled mod_time formatter agrees with ``soci_fs.ztoc.format_mod_time``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from soci_fs import tarscan_py
from soci_fs.ztoc import format_mod_time

compiled = pytest.importorskip("soci_fs._ext._tarscan", reason="the compiled scanner is not built")

ROOT = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------ fields


def _octal(width: int) -> st.SearchStrategy[bytes]:
    """A well-formed octal field: digits, then NUL or space padding (or none), sometimes leading spaces."""
    return st.builds(
        lambda v, lead, tail: (b" " * lead + b"%o" % v + tail)[:width].ljust(width, b"\x00"),
        st.integers(0, 8 ** (width - 1) - 1),
        st.integers(0, 2),
        st.sampled_from([b"\x00", b" ", b" \x00", b""]),
    )


def _base256(width: int) -> st.SearchStrategy[bytes]:
    def make(v: int, raw_tail: bytes) -> bytes:
        body = (v % (1 << (8 * width))).to_bytes(width, "big")
        return bytes([0x80 | (body[0] & 0x7F) | (0x40 if v < 0 else 0)]) + body[1:]

    return st.one_of(
        st.builds(make, st.integers(-(2**40), 2**40), st.just(b"")),
        st.builds(make, st.integers(-(2**70), 2**70), st.just(b"")),
        st.binary(min_size=width, max_size=width).map(lambda b: bytes([b[0] | 0x80]) + b[1:]),
    )


def _small_base256(width: int) -> st.SearchStrategy[bytes]:
    def make(v: int) -> bytes:
        body = (v % (1 << (8 * width))).to_bytes(width, "big")
        return bytes([0x80 | (body[0] & 0x7F) | (0x40 if v < 0 else 0)]) + body[1:]

    return st.builds(make, st.integers(-(2**40), 2**40))


def _number(width: int) -> st.SearchStrategy[bytes]:
    """Mostly valid numbers (octal, base-256 within range); :func:`headers` corrupts some fields itself."""
    return st.one_of(
        _octal(width),
        _small_base256(width),
        st.sampled_from([bytes(width), b" " * width]),
    )


def _bad_number(width: int) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(min_size=width, max_size=width),
        _base256(width),
        st.sampled_from(
            [b"7" * width, b"0" * (width - 1) + b"8", b"\xff" * width, b"\x80" + b"\xff" * (width - 1)]
        ),
    )


# built once: strategies made inside a composite on every draw cost hypothesis a validation each time
_NUM8 = _number(8)
_NUM12 = _number(12)
_BAD = {8: _bad_number(8), 12: _bad_number(12)}
_NUMERIC_FIELDS = [(100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (329, 8), (337, 8), (345, 12)]
_NAMES = st.one_of(
    st.sampled_from([b"a", b"dir/", b"dir/file", b"./x", b"", b"\xffbad", b"x" * 100]),
    st.binary(max_size=100),
)
_PREFIXES = st.one_of(
    st.just(b""),
    st.binary(max_size=155),
    st.tuples(_NUM12, _NUM12).map(lambda t: t[0] + t[1]),  # GNU atime, ctime
)
_CHECKSUMS = st.integers(0, 40).map(
    lambda k: {0: "wrong", 1: "garbage", 2: "signed", 3: "signed"}.get(k, "unsigned")
)
_GNAMES = st.sampled_from([b"root", b"", b"\xe9t\xe9"])
_TYPEFLAGS = st.sampled_from(list(b"0123456") * 3 + [0, 0] + list(b"xLKgS7V"))
_MAGICS = st.sampled_from(
    [(b"ustar\x00", b"00"), (b"ustar ", b" \x00"), (b"\x00" * 6, b"\x00\x00"), (b"ustar\x00", b"tar")]
)


@st.composite
def headers(draw, typeflag: int | None = None, size: int | None = None) -> bytes:
    """One 512-byte header block from drawn raw fields."""
    block = bytearray(512)
    block[0:100] = draw(_NAMES).ljust(100, b"\x00")[:100]
    block[100:108] = draw(_NUM8)
    block[108:116] = draw(_NUM8)
    block[116:124] = draw(_NUM8)
    block[124:136] = (b"%011o\x00" % size) if size is not None else draw(_NUM12)
    block[136:148] = draw(_NUM12)
    block[156] = draw(_TYPEFLAGS) if typeflag is None else typeflag
    block[157:257] = draw(_NAMES).ljust(100, b"\x00")[:100]
    magic, version = draw(_MAGICS)
    block[257:263] = magic
    if version == b"tar":
        block[263:265] = b"00"
        block[508:512] = b"tar\x00"
    else:
        block[263:265] = version
    block[265:297] = draw(st.binary(max_size=32)).ljust(32, b"\x00")
    block[297:329] = draw(_GNAMES).ljust(32, b"\x00")
    block[329:337] = draw(_NUM8)
    block[337:345] = draw(_NUM8)
    prefix = draw(_PREFIXES)
    block[345 : 345 + len(prefix)] = prefix
    checksum = draw(_CHECKSUMS)
    if draw(st.integers(0, 7)) == 0:
        at, width = draw(st.sampled_from(_NUMERIC_FIELDS))
        block[at : at + width] = draw(_BAD[width])
    block[148:156] = b" " * 8
    if checksum == "unsigned":
        block[148:156] = b"%06o\x00 " % sum(block)
    elif checksum == "signed":
        block[148:156] = b"%06o\x00 " % (sum(b - 256 if b >= 128 else b for b in block) & 0o777777)
    elif checksum == "wrong":
        block[148:156] = b"%06o\x00 " % ((sum(block) + 1) & 0o777777)
    else:
        block[148:156] = draw(st.binary(min_size=8, max_size=8))
    return bytes(block)


_PAX_KEYS = st.sampled_from(
    [
        b"path", b"linkpath", b"uname", b"gname", b"uid", b"gid", b"size", b"mtime", b"atime", b"ctime",
        b"SCHILY.xattr.user.a", b"SCHILY.xattr.user.b", b"hdrcharset", b"comment", b"GNU.sparse.major",
        b"GNU.sparse.minor", b"GNU.sparse.offset", b"GNU.sparse.numbytes", b"GNU.sparse.size",
        b"GNU.sparse.map", b"", b"k\x00ey",
    ]
)  # fmt: skip
_PAX_VALUES = st.one_of(
    st.sampled_from(
        [b"", b"0", b"1", b"-1", b"+5", b"1700000000.123456789123", b"-1.5", b"1.", b".5", b"9" * 20]
    ),
    st.sampled_from([b"9223372036854775807", b"-9223372036854775808", b"9223372036854775808", b"1,2"]),
    st.from_regex(rb"\A-?[0-9]{1,12}(\.[0-9]{0,12})?\Z"),
    st.binary(max_size=12),
)


def _record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


@st.composite
def pax_data(draw) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=60))  # garbage
    out = b"".join(_record(k, v) for k, v in draw(st.lists(st.tuples(_PAX_KEYS, _PAX_VALUES), max_size=6)))
    if draw(st.integers(0, 9)) == 0 and out:
        at = draw(st.integers(0, len(out) - 1))
        out = out[:at] + bytes([draw(st.integers(0, 255))]) + out[at + 1 :]
    return out


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) & 511)


@st.composite
def archives(draw) -> bytes:
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            pax = draw(pax_data())
            parts.append(draw(headers(typeflag=ord("x"), size=len(pax))) + _padded(pax))
        for flag in b"LK":
            if draw(st.integers(0, 3)) == 0:
                long = draw(st.binary(max_size=300))
                parts.append(draw(headers(typeflag=flag, size=len(long))) + _padded(long))
        size = None if draw(st.integers(0, 9)) == 0 else draw(st.integers(0, 1500))
        flag = draw(_TYPEFLAGS)
        parts.append(draw(headers(typeflag=flag, size=size)))
        if size is not None and (flag in b"0\x00" or draw(st.integers(0, 5)) == 0):
            parts.append(_padded(b"d" * size))
    parts.append(draw(st.sampled_from([bytes(1024), bytes(512), b"", bytes(512) + b"x" * 512, bytes(2048)])))
    data = b"".join(parts)
    if data and draw(st.integers(0, 4)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    if data and draw(st.integers(0, 4)) == 0:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    return data


def _pieces(data: bytes, sizes: list[int]) -> list[bytes | memoryview]:
    view = memoryview(data)
    out: list[bytes | memoryview] = []
    i = k = 0
    while i < len(data):
        n = sizes[k % len(sizes)] if sizes else len(data)
        out.append(view[i : i + n] if k % 2 else data[i : i + n])
        i += n
        k += 1
    return out


def run(mod: ModuleType, pieces: list[bytes | memoryview]) -> tuple:
    """``("ok", entries, archive_size)`` or ``("error", call index, type, message)``."""
    s = mod.TarScanner()
    for k, piece in enumerate(pieces):
        try:
            s.feed(piece)
        except Exception as exc:
            return ("error", k, type(exc), str(exc))
    try:
        result = s.finish()
    except Exception as exc:
        return ("error", "finish", type(exc), str(exc))
    return ("ok", result.entries, result.archive_size)


# ----------------------------------------------------------------------------------------- the tests


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(archives(), st.lists(st.sampled_from([1, 3, 100, 511, 512, 513, 1024, 5000]), max_size=4))
def test_compiled_and_twin_agree(data, sizes):
    pieces = _pieces(data, sizes)
    assert run(compiled, pieces) == run(tarscan_py, pieces)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048), st.lists(st.integers(1, 700), max_size=3))
def test_agree_on_random_bytes(data, sizes):
    pieces = _pieces(data, sizes)
    assert run(compiled, pieces) == run(tarscan_py, pieces)


@pytest.mark.parametrize("fmt", ["pax", "gnu"])
def test_agree_on_real_archives(fmt: str, tmp_path: Path) -> None:
    """A real tar of parts of /usr, made here with GNU tar (PAX: atime/ctime/mtime records per entry)."""
    tar = tmp_path / f"usr-{fmt}.tar"
    parts = [
        p
        for p in ("usr/share/perl5", "usr/lib/python3/dist-packages", "usr/share/zoneinfo", "usr/share/doc")
        if (Path("/") / p).exists()
    ]
    subprocess.run(["tar", "-C", "/", f"--format={fmt}", "-cf", str(tar), *parts], check=True)
    pieces = _pieces(tar.read_bytes(), [1 << 20, 4095])
    result = run(compiled, pieces)
    assert result == run(tarscan_py, pieces)
    assert result[0] == "ok" and len(result[1]) > 1000


def test_results_are_the_same_type_and_equal():
    data = bytes(1024)
    assert compiled.TarScanner().finish() == tarscan_py.TarScanner().finish()
    a, b = compiled.TarScanner(), tarscan_py.TarScanner()
    a.feed(data)
    b.feed(data)
    assert type(a.finish()) is type(b.finish())


def test_non_contiguous_and_mutable_inputs():
    block = bytearray(512)
    block[0:1] = b"f"
    block[100:108] = b"0000644\x00"
    block[124:136] = b"00000000000\x00"
    block[156] = ord("0")
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    data = bytes(block) + bytes(1024)
    doubled = bytes(b for x in data for b in (x, 0))
    for mod in (compiled, tarscan_py):
        s = mod.TarScanner()
        s.feed(memoryview(doubled)[::2])  # not contiguous
        s.feed(bytearray(b"after the end"))
        assert s.finish().entries[0].name == "f"
    assert run(compiled, [bytearray(data)]) == run(tarscan_py, [bytearray(data)])


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.integers(-(2**63), 2**63 - 1),
        st.integers(-62_167_219_200 - 10, 253_402_300_799 + 10),
        st.sampled_from([-(2**40) - 1, -(2**40), 2**40, 2**40 + 1, -62_167_219_200, 253_402_300_799]),
    ),
    st.integers(-999_999_999, 999_999_999),
)
def test_compiled_mod_time_text(seconds, nanos):
    assert compiled.format_mod_time(seconds, nanos) == format_mod_time(seconds, nanos)


@pytest.mark.parametrize(("env", "expected"), [("1", "pure"), ("0", "compiled"), ("", "compiled")])
def test_selector(env, expected):
    code = (
        "import soci_fs.tarscan as t, soci_fs.tarscan_py as p;"
        "print(t.IMPLEMENTATION, t.TarScanner is p.TarScanner, t.TarScanResult is p.TarScanResult)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "SOCI_PUREPYTHON": env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == [expected, str(expected == "pure"), "True"]
