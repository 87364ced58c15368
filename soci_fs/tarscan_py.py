"""Pure-Python twin of the compiled tar scanner (``ext/_tarscan.pyx``): tar bytes in, ``FileMetadata`` out.

Import the scanner through :mod:`soci_fs.tarscan`, which picks the compiled module or this twin
(``SOCI_PUREPYTHON=1`` forces the twin); the two give the same results and raise the same exceptions with
the same messages (``tests/fs/test_tarscan_diff.py`` checks it). This module also owns
:class:`TarScanResult`, the one result type both implementations return.

Owns the reading of tar headers with the semantics of Go's ``archive/tar`` reader, which upstream's zTOC
builder uses (formats spec 5.2 and 6): V7, USTAR (prefix joined with ``/``), STAR, GNU (long names ``L`` and
long link names ``K``), PAX extended headers (``path``, ``linkpath``, ``size``, ``mtime`` with sub-second
precision, ``uid``/``gid``/``uname``/``gname``; every record kept in ``pax``), base-256 numbers, the legacy
NUL typeflag (``dir`` when the name ends in ``/``), header checksums (unsigned or signed sum), and the end of
the archive (after two zero blocks, after one zero block followed by the end of the data, or at the end of
the data). Names are not cleaned. Offsets are positions in the stream fed so far.

Data regions are skipped by arithmetic, never copied; only headers and PAX/GNU extension data are kept, so
memory stays bounded whatever the layer size (extension data is limited to 1 MiB as in Go).

Will not: decompress (the caller feeds uncompressed bytes), read file contents, accept entry types the
zTOC cannot describe (global PAX headers ``g``, GNU sparse ``S`` and PAX sparse files, ``7``, vendor types:
:class:`~soci_fs.errors.FormatError` "unsupported input tar entry"), or resolve links.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from soci_fs.errors import FormatError
from soci_fs.ztoc import FileMetadata, format_mod_time

__all__ = ["TarScanResult", "TarScanner"]

BLOCK = 512
MAX_SPECIAL_FILE = 1 << 20  # Go's limit on PAX and GNU long-name data
_ZERO_BLOCK = bytes(BLOCK)
_EIGHT_SPACES = 8 * 32
_ENC = "utf-8"
_ESC = "surrogateescape"
_OCTAL = b"01234567"

# V7/USTAR layout: name mode uid gid size mtime chksum typeflag linkname magic version uname gname
# devmajor devminor prefix(155); STAR keeps only 131 bytes of prefix, GNU keeps atime/ctime there.
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s")

_TYPES = {
    b"0": "reg",
    b"1": "hardlink",
    b"2": "symlink",
    b"3": "char",
    b"4": "block",
    b"5": "dir",
    b"6": "fifo",
}
_HEADER_ONLY = {b"1", b"2", b"3", b"4", b"5", b"6"}  # no data follows, whatever the size field says

_V7, _USTAR, _STAR, _GNU = range(4)


@dataclass(frozen=True)
class TarScanResult:
    """What one pass over a tar stream found."""

    entries: tuple[FileMetadata, ...]  # tar order, upstream semantics
    archive_size: int  # uncompressed_archive_size: the end-of-archive position


class _HeaderError(Exception):
    """A numeric field or PAX record that Go's reader would refuse (ErrHeader)."""


def _cstring(raw: bytes) -> bytes:
    """Bytes up to the first NUL (Go ``parseString``)."""
    end = raw.find(0)
    return raw if end < 0 else raw[:end]


def _octal(raw: bytes) -> int:
    """Go ``parseOctal``: trim spaces and NULs, cut at a NUL, strict base 8, 64-bit wrap."""
    raw = raw.strip(b" \x00")
    if not raw:
        return 0
    end = raw.find(0)
    if end >= 0:
        raw = raw[:end]
    if raw.translate(None, _OCTAL):
        raise _HeaderError(f"bad octal number {raw!r}")
    value = int(raw, 8)
    if value >= 1 << 64:
        raise _HeaderError(f"octal number {raw!r} overflows")
    return value - (1 << 64) if value >= 1 << 63 else value


def _numeric(raw: bytes) -> int:
    """Go ``parseNumeric``: base-256 when the top bit of the first byte is set, else octal."""
    if raw and raw[0] & 0x80:
        negative = raw[0] & 0x40
        body = bytes([raw[0] & 0x7F ^ (0x7F if negative else 0)]) + (
            bytes(b ^ 0xFF for b in raw[1:]) if negative else raw[1:]
        )
        body = body.lstrip(b"\x00")
        if len(body) > 8 or (len(body) == 8 and body[0] & 0x80):
            raise _HeaderError("base-256 number overflows")
        value = int.from_bytes(body, "big")
        return ~value if negative else value
    return _octal(raw)


_NUMERIC_CACHE: dict[bytes, int] = {}


def _num(raw: bytes) -> int:
    """:func:`_numeric` through a bounded cache: header fields repeat a lot (modes, ids, sizes, times)."""
    value = _NUMERIC_CACHE.get(raw)
    if value is None:
        value = _numeric(raw)
        if len(_NUMERIC_CACHE) >= 1 << 16:
            _NUMERIC_CACHE.clear()
        _NUMERIC_CACHE[raw] = value
    return value


def _decimal(text: bytes, what: str) -> int:
    """Go ``strconv.ParseInt(s, 10, 64)``: optional sign, ASCII digits, 64-bit range."""
    digits = text[1:] if text[:1] in (b"+", b"-") else text
    if not digits or digits.translate(None, b"0123456789"):
        raise _HeaderError(f"PAX {what} {text!r} is not a decimal number")
    value = int(text)
    if not -(1 << 63) <= value < 1 << 63:
        raise _HeaderError(f"PAX {what} {text!r} out of range")
    return value


def _pax_time(text: bytes, what: str) -> tuple[int, int]:
    """Go ``parsePAXTime``: seconds, optional fraction truncated to nanoseconds; ``(sec, nsec)``."""
    whole, dot, frac = text.partition(b".")
    seconds = _decimal(whole, what)
    if not dot or not frac:
        return seconds, 0
    if frac.translate(None, b"0123456789"):
        raise _HeaderError(f"PAX {what} {text!r} has a bad fraction")
    nanos = int(frac[:9].ljust(9, b"0"))
    if whole[:1] == b"-":
        nanos = -nanos
    extra, nanos = divmod(nanos, 1_000_000_000)
    return seconds + extra, nanos


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    """Go ``parsePAX``: ``"<len> <key>=<value>\\n"`` records; later keys win; sparse 0.0 offsets folded."""
    records: dict[bytes, bytes] = {}
    sparse_map: list[bytes] = []
    rest = data
    while rest:
        length, space, tail = rest.partition(b" ")
        if not space:
            raise _HeaderError("PAX record without a length")
        n = _decimal(length, "record length") if length else -1
        if n < 5 or n > len(rest):
            raise _HeaderError(f"PAX record length {length!r} is invalid")
        n -= len(length) + 1
        if n <= 0 or tail[n - 1 : n] != b"\n":
            raise _HeaderError("PAX record is not terminated by a newline")
        record, rest = tail[: n - 1], tail[n:]
        key, eq, value = record.partition(b"=")
        if not eq or not key:
            raise _HeaderError(f"PAX record {record[:40]!r} has no key")
        if key in (b"path", b"linkpath", b"uname", b"gname"):
            if 0 in value:
                raise _HeaderError(f"PAX record {key!r} holds a NUL")
        elif 0 in key:
            raise _HeaderError("PAX key holds a NUL")
        if key in (b"GNU.sparse.offset", b"GNU.sparse.numbytes"):
            expect = b"GNU.sparse.offset" if len(sparse_map) % 2 == 0 else b"GNU.sparse.numbytes"
            if key != expect or b"," in value:
                raise _HeaderError("PAX GNU sparse records out of order")
            sparse_map.append(value)
        else:
            records[key] = value
    if sparse_map:
        records[b"GNU.sparse.map"] = b",".join(sparse_map)
    return records


def _is_pax_sparse(pax: dict[bytes, bytes]) -> bool:
    version = (pax.get(b"GNU.sparse.major"), pax.get(b"GNU.sparse.minor"))
    if version in ((b"0", b"0"), (b"0", b"1"), (b"1", b"0")):
        return True
    return b"GNU.sparse.map" in pax or b"GNU.sparse.size" in pax


def _checksum_ok(block: bytes, stored: bytes) -> bool:
    """Go: the stored octal value equals the unsigned or the signed byte sum (checksum field as spaces)."""
    try:
        value = _octal(stored)
    except _HeaderError:
        return False
    # exact unsigned sum of the block from adler32 (sum mod 65521) and the big-int value mod 255
    total = ((zlib.adler32(block) & 0xFFFF) - 1) % 65521
    rem = int.from_bytes(block, "little") % 255
    while total % 255 != rem:
        total += 65521
    unsigned = total - sum(stored) + _EIGHT_SPACES
    if value == unsigned:
        return True
    high = sum(1 for b in block[:148] + block[156:] if b & 0x80)
    return value == unsigned - 256 * high


class TarScanner:
    """Feeds on a tar stream in order, in chunks of any size, and lists its entries.

    ``feed`` raises :class:`FormatError` as soon as a header is invalid; ``finish`` raises it when the
    stream ended inside a header, an extension or a file's data (or its padding).
    """

    def __init__(self) -> None:
        self._pos = 0  # stream position of the next byte fed
        self._skip = 0  # data and padding bytes still to pass over
        self._partial = bytearray()  # an incomplete header block or extension data
        self._special: bytes | None = None  # typeflag of the extension being collected (x, L, K)
        self._special_size = 0
        self._special_pad = 0
        self._zero_seen = False  # one zero block read; a second ends the archive
        self._end: int | None = None  # the archive_size once the end marker was read
        self._entries: list[FileMetadata] = []
        self._pax: dict[bytes, bytes] | None = None
        self._long_name: bytes | None = None
        self._long_link: bytes | None = None
        self._time_cache: dict[tuple[int, int], str] = {}

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Consume the next bytes of the stream (any chunking)."""
        n = len(data)
        i = 0
        while i < n:
            if self._end is not None:
                return  # bytes after the end marker are not part of the archive
            if self._skip:
                take = min(self._skip, n - i)
                self._skip -= take
                self._pos += take
                i += take
                continue
            if self._special is not None:
                need = self._special_size - len(self._partial)
                take = min(need, n - i)
                self._partial += data[i : i + take]
                self._pos += take
                i += take
                if take == need:
                    self._special_done()
                continue
            if not self._partial and n - i >= BLOCK:
                block = bytes(data[i : i + BLOCK])
                i += BLOCK
            else:
                take = min(BLOCK - len(self._partial), n - i)
                self._partial += data[i : i + take]
                i += take
                if len(self._partial) < BLOCK:
                    self._pos += take
                    continue
                self._pos -= BLOCK - take  # _pos counts the block whole below
                block = bytes(self._partial)
                self._partial.clear()
            self._pos += BLOCK
            self._block(block)

    def finish(self) -> TarScanResult:
        """The entries and the archive size; :class:`FormatError` if the stream stopped mid-way."""
        if self._end is None:
            if self._skip:
                raise FormatError(
                    f"tar: truncated: the stream ends {self._skip} bytes short of the data at {self._pos}"
                )
            if self._special is not None:
                raise FormatError(
                    f"tar: truncated: the stream ends inside an extension header at {self._pos}"
                )
            if self._partial:
                raise FormatError(f"tar: truncated: the stream ends inside a header block at {self._pos}")
            self._end = self._pos
        return TarScanResult(tuple(self._entries), self._end)

    # -------------------------------------------------------------------------------------- headers

    def _block(self, block: bytes) -> None:
        """Handle one 512-byte header block that ends at ``self._pos``."""
        fields = _HEADER.unpack_from(block)
        chksum = fields[6]
        if self._zero_seen:
            if block == _ZERO_BLOCK:
                self._end = self._pos
                return
            raise FormatError(f"tar: invalid header at {self._pos - BLOCK}: a zero block is followed by data")
        if chksum == b"\x00\x00\x00\x00\x00\x00\x00\x00" and block == _ZERO_BLOCK:
            self._zero_seen = True
            return
        at = self._pos - BLOCK
        if not _checksum_ok(block, chksum):
            raise FormatError(f"tar: invalid header at {at}: checksum mismatch ({_cstring(fields[0])!r})")
        try:
            self._header(block, fields, at)
        except _HeaderError as exc:
            raise FormatError(f"tar: invalid header at {at} ({_cstring(fields[0])!r}): {exc}") from None

    def _header(self, block: bytes, fields: tuple[bytes, ...], at: int) -> None:
        (name, mode, uid, gid, size, mtime, _chk, typeflag, linkname, magic, version, uname, gname,
         devmajor, devminor, prefix) = fields  # fmt: skip
        if magic == b"ustar\x00":
            fmt = _STAR if block[508:512] == b"tar\x00" else _USTAR
        elif magic == b"ustar " and version == b" \x00":
            fmt = _GNU
        else:
            fmt = _V7
        size_value = _num(size)
        if typeflag in (b"x", b"L", b"K"):
            if size_value < 0:
                raise _HeaderError(f"negative size {size_value}")
            if size_value > MAX_SPECIAL_FILE:
                raise FormatError(f"tar: extension header at {at} holds {size_value} bytes, more than 1 MiB")
            # Go parses the whole header first: bad numbers fail even in an extension header
            _num(mode), _num(uid), _num(gid), _num(mtime)
            if fmt != _V7:
                _num(devmajor), _num(devminor)
            self._special = typeflag
            self._special_size = size_value
            self._special_pad = -size_value & (BLOCK - 1)
            if size_value == 0:
                self._special_done()
            return
        if typeflag not in _TYPES and typeflag != b"\x00":
            label = _cstring(name).decode(_ENC, _ESC)
            raise FormatError(f"tar: unsupported input tar entry {label!r} at {at} (typeflag {typeflag!r})")

        name_b = _cstring(name)
        mode_v = _num(mode)
        uid_v = _num(uid)
        gid_v = _num(gid)
        mtime_s = _num(mtime)
        mtime_ns = 0
        uname_b = gname_b = b""
        dmaj = dmin = 0
        if fmt != _V7:
            uname_b = _cstring(uname)
            gname_b = _cstring(gname)
            dmaj = _num(devmajor)
            dmin = _num(devminor)
            pre = b""
            if fmt == _USTAR:
                pre = _cstring(prefix)
            elif fmt == _STAR:
                pre = _cstring(prefix[:131])
            else:  # GNU: atime and ctime live where the prefix would be
                try:
                    if prefix[0]:
                        _num(prefix[:12])
                    if prefix[12]:
                        _num(prefix[12:24])
                except _HeaderError:
                    cut = _cstring(prefix)  # a pre-Go-1.8 writer put a prefix in a GNU header
                    if cut.isascii():
                        pre = cut
            if pre:
                name_b = pre + b"/" + name_b
        link_b = _cstring(linkname)

        pax = self._pax
        records: tuple[tuple[str, bytes], ...] = ()
        if pax is not None:
            self._pax = None
            if _is_pax_sparse(pax):
                label = name_b.decode(_ENC, _ESC)
                raise FormatError(f"tar: unsupported input tar entry {label!r} at {at} (PAX sparse file)")
            for key, value in pax.items():
                if not value:
                    continue  # an empty record keeps the header's value
                if key == b"path":
                    name_b = value
                elif key == b"linkpath":
                    link_b = value
                elif key == b"uname":
                    uname_b = value
                elif key == b"gname":
                    gname_b = value
                elif key == b"uid":
                    uid_v = _decimal(value, "uid")
                elif key == b"gid":
                    gid_v = _decimal(value, "gid")
                elif key == b"mtime":
                    mtime_s, mtime_ns = _pax_time(value, "mtime")
                elif key in (b"atime", b"ctime"):
                    _pax_time(value, key.decode())
                elif key == b"size":
                    size_value = _decimal(value, "size")
            records = tuple(
                (k.decode(_ENC, _ESC), v) for k, v in sorted(pax.items())
            )  # bytes order = Go's sort.Strings
        if self._long_name is not None:
            if self._long_name:
                name_b = self._long_name
            self._long_name = None
        if self._long_link is not None:
            if self._long_link:
                link_b = self._long_link
            self._long_link = None
        if typeflag == b"\x00":
            typeflag = b"5" if name_b.endswith(b"/") else b"0"
        data_size = 0 if typeflag in _HEADER_ONLY else size_value
        if data_size < 0:
            raise _HeaderError(f"negative size {size_value}")

        key = (mtime_s, mtime_ns)
        text = self._time_cache.get(key)
        if text is None:
            text = format_mod_time(mtime_s, mtime_ns)
            if len(self._time_cache) < 65536:
                self._time_cache[key] = text
        self._entries.append(
            FileMetadata(
                name_b.decode(_ENC, _ESC),
                _TYPES[typeflag],
                self._pos,
                size_value,
                link_b.decode(_ENC, _ESC),
                mode_v,
                uid_v & 0xFFFFFFFF,
                gid_v & 0xFFFFFFFF,
                uname_b.decode(_ENC, _ESC),
                gname_b.decode(_ENC, _ESC),
                text,
                dmaj,
                dmin,
                records,
            )
        )
        self._skip = data_size + (-data_size & (BLOCK - 1))

    def _special_done(self) -> None:
        """An extension's data is complete: remember what it says for the next entry."""
        data = bytes(self._partial)
        self._partial.clear()
        kind = self._special
        self._special = None
        self._skip = self._special_pad
        if kind == b"x":
            try:
                self._pax = _parse_pax(data)
            except _HeaderError as exc:
                raise FormatError(f"tar: invalid PAX header ending at {self._pos}: {exc}") from None
        elif kind == b"L":
            self._long_name = _cstring(data)
        else:
            self._long_link = _cstring(data)
