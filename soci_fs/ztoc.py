"""The zTOC: its dataclasses, its flatbuffer encoding and the mod_time text rules.

Owns:

* :class:`FileMetadata`, :class:`CompressionInfo`, :class:`Ztoc` (frozen dataclasses, docs/design.md).
* :func:`serialize` -- the zTOC flatbuffer, byte-identical to upstream's Go builder (formats spec 5.1:
  entries last to first, PAX records sorted by key bytes, gzip omitted as the default algorithm, empty
  strings written, defaults not forced). It uses the compiled writer ``soci_fs._ext._ztocwrite``
  (``ext/_ztocwrite.pyx``) when it is loaded; its twin is :func:`serialize_python` on
  :class:`soci_fs.flatbuf.Builder` (``SOCI_PUREPYTHON=1`` forces it). The compiled writer hands anything
  unusual (wrong types, values out of range, unsorted PAX keys) back to the Python writer, so both give the
  same bytes and the same exceptions.
* :func:`parse` -- reads any legal layout (absent fields read as defaults, any field order, shared
  vtables), checks every offset and count, and validates the content: entry offsets and derived header
  offsets (spec 5.2, "invalid toc entry"), span digest count against ``max_span_id``, sizes. Every fault is
  a :class:`~soci_fs.errors.FormatError` naming the field, e.g. ``ztoc: toc.metadata[17].name: ...``.
* :func:`format_mod_time` / :func:`parse_mod_time` -- Go ``time.Time.MarshalText`` text in UTC, and
  RFC 3339 text with any offset back to ``(seconds, nanoseconds)``.
* :class:`EntryTable` -- the entries of a served layer packed into a few arrays and one byte string (about
  a quarter of the memory of the ``FileMetadata`` objects), read back one entry at a time; what a mounted
  layer keeps so that its parsed :class:`Ztoc` can be dropped once the inode tree is built.

Will not: refuse unknown compression algorithms (kept as numbers; the layer loader refuses them), look
inside ``checkpoints`` (zinfo.py does), or read tar data (tarscan.py does).
"""

from __future__ import annotations

import re
import struct
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import overload

from soci_fs import _select, flatbuf
from soci_fs.errors import FormatError, InvalidArgument

__all__ = [
    "ALGORITHM_GZIP",
    "ALGORITHM_UNCOMPRESSED",
    "VERSION",
    "ZERO_TIME",
    "CompressionInfo",
    "EntryTable",
    "FileMetadata",
    "Ztoc",
    "format_mod_time",
    "parse",
    "parse_mod_time",
    "serialize",
    "serialize_python",
]

VERSION = "0.9"
ALGORITHM_GZIP = 1
ALGORITHM_UNCOMPRESSED = 2
XATTR_PREFIX = "SCHILY.xattr."
#: Go's zero ``time.Time`` (0001-01-01T00:00:00Z) as ``(unix seconds, nanoseconds)``.
ZERO_TIME = (-62135596800, 0)


@dataclass(frozen=True, slots=True)
class FileMetadata:
    """One tar entry as the zTOC records it. Text is UTF-8 decoded with surrogateescape."""

    name: str
    type: str  # reg, dir, symlink, hardlink, char, block, fifo
    uncompressed_offset: int  # position of the entry's data in the uncompressed tar stream
    uncompressed_size: int  # the tar size field
    linkname: str
    mode: int
    uid: int
    gid: int
    uname: str
    gname: str
    mod_time: str  # RFC 3339 text as stored ("" = zero time)
    devmajor: int
    devminor: int
    pax: tuple[tuple[str, bytes], ...] = ()  # every PAX record of the entry, sorted by key bytes

    @property
    def xattrs(self) -> dict[str, bytes]:
        """The ``SCHILY.xattr.*`` records with the prefix stripped."""
        n = len(XATTR_PREFIX)
        return {k[n:]: v for k, v in self.pax if k.startswith(XATTR_PREFIX)}


@dataclass(frozen=True)
class CompressionInfo:
    """How the layer is compressed and where its spans start."""

    algorithm: int  # 1 gzip, 2 uncompressed; other values are kept and refused at load time
    max_span_id: int
    span_digests: tuple[str, ...]
    checkpoints: bytes


@dataclass(frozen=True)
class Ztoc:
    """A layer's table of contents plus what is needed to decompress any span on its own."""

    version: str
    build_tool_identifier: str
    compressed_archive_size: int
    uncompressed_archive_size: int
    files: tuple[FileMetadata, ...]
    compression: CompressionInfo


# --------------------------------------------------------------------------------------- EntryTable

_PASS = "surrogatepass"  # encodes every str, lone surrogates included, and decodes it back unchanged
_BLOCK = 512


class EntryTable(Sequence[FileMetadata]):
    """The entries of one layer, packed; ``table[i]`` is a new :class:`FileMetadata` equal to entry ``i``.

    Per entry it stores ``uncompressed_offset`` and ``uncompressed_size`` in int64 arrays (read without
    decoding anything), the index of its ``(type, mode, uid, gid, uname, gname, devmajor, devminor)`` in a
    table of the distinct such tuples, and the UTF-8 bytes of its name, linkname and mod_time in one byte
    string (``surrogatepass``, so every ``str`` comes back unchanged). The rare PAX records are kept as they
    are, by index. An entry whose offset or size does not fit int64, or whose text fields are not ``str``,
    makes the table keep the entries as given instead (same answers, no saving).

    Args:
        entries: the layer's entries in zTOC order.
    """

    __slots__ = (
        "_attr",
        "_attrs",
        "_blob",
        "_entries",
        "_headers",
        "_link_len",
        "_name_len",
        "_offsets",
        "_pax",
        "_pos",
        "_sizes",
    )

    def __init__(self, entries: Iterable[FileMetadata] = ()) -> None:
        items = entries if isinstance(entries, tuple | list) else tuple(entries)
        self._headers: Sequence[int] | None = None
        self._entries: tuple[FileMetadata, ...] | None = None
        try:
            self._pack(items)
        except (OverflowError, TypeError, AttributeError):
            self._entries = tuple(items)
            self._offsets: Sequence[int] = [e.uncompressed_offset for e in self._entries]
            self._sizes: Sequence[int] = [e.uncompressed_size for e in self._entries]
            self._blob = b""
            self._pax: dict[int, tuple[tuple[str, bytes], ...]] = {}

    def _pack(self, items: Sequence[FileMetadata]) -> None:
        offsets = array("q")
        sizes = array("q")
        attr = array("I")
        name_len = array("I")
        link_len = array("I")
        pos = array("Q", (0,))
        blob = bytearray()
        attrs: dict[tuple[object, ...], int] = {}
        pax: dict[int, tuple[tuple[str, bytes], ...]] = {}
        for i, e in enumerate(items):
            offsets.append(e.uncompressed_offset)
            sizes.append(e.uncompressed_size)
            key = (e.type, e.mode, e.uid, e.gid, e.uname, e.gname, e.devmajor, e.devminor)
            a = attrs.get(key)
            if a is None:
                a = attrs[key] = len(attrs)
            attr.append(a)
            name = e.name.encode(_ENC, _PASS)
            link = e.linkname.encode(_ENC, _PASS)
            name_len.append(len(name))
            link_len.append(len(link))
            blob += name
            blob += link
            blob += e.mod_time.encode(_ENC, _PASS)
            pos.append(len(blob))
            if e.pax:
                pax[i] = e.pax
        self._offsets, self._sizes, self._attr = offsets, sizes, attr
        self._name_len, self._link_len, self._pos = name_len, link_len, pos
        self._attrs = tuple(attrs)
        self._blob = bytes(blob)
        self._pax = pax

    def __len__(self) -> int:
        return len(self._offsets)

    @overload
    def __getitem__(self, index: int) -> FileMetadata: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[FileMetadata, ...]: ...

    def __getitem__(self, index: int | slice) -> FileMetadata | tuple[FileMetadata, ...]:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        n = len(self._offsets)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"entry {index} of a table of {n}")
        if self._entries is not None:
            return self._entries[index]
        blob = self._blob
        p = self._pos[index]
        q = p + self._name_len[index]
        r = q + self._link_len[index]
        type_, mode, uid, gid, uname, gname, devmajor, devminor = self._attrs[self._attr[index]]
        return FileMetadata(
            blob[p:q].decode(_ENC, _PASS),
            type_,  # type: ignore[arg-type]
            self._offsets[index],
            self._sizes[index],
            blob[q:r].decode(_ENC, _PASS),
            mode,  # type: ignore[arg-type]
            uid,  # type: ignore[arg-type]
            gid,  # type: ignore[arg-type]
            uname,  # type: ignore[arg-type]
            gname,  # type: ignore[arg-type]
            blob[r : self._pos[index + 1]].decode(_ENC, _PASS),
            devmajor,  # type: ignore[arg-type]
            devminor,  # type: ignore[arg-type]
            self._pax.get(index, ()),
        )

    def __iter__(self) -> Iterator[FileMetadata]:
        for i in range(len(self._offsets)):
            yield self[i]

    def __repr__(self) -> str:
        return f"EntryTable({len(self)} entries)"

    def uncompressed_offset(self, index: int) -> int:
        """Entry ``index``'s data offset in the uncompressed tar (no decoding)."""
        return self._offsets[index]

    def uncompressed_size(self, index: int) -> int:
        """Entry ``index``'s tar size field (no decoding)."""
        return self._sizes[index]

    def header_range(self, index: int) -> tuple[int, int]:
        """``[header offset, data offset)`` of entry ``index``: the same derived offsets as
        :func:`soci_fs.verify.header_offsets` (formats.md §5.2), computed once from the arrays.

        Raises:
            FormatError: a derived header offset lies beyond its entry's data offset ("invalid toc entry").
        """
        headers = self._headers
        if headers is None:
            headers = self._headers = self._header_offsets()
        return headers[index], self._offsets[index]

    def _header_offsets(self) -> Sequence[int]:
        offsets, sizes = self._offsets, self._sizes
        n = len(offsets)
        order: Iterable[int] = range(n)
        if any(offsets[k] < offsets[k - 1] for k in range(1, n)):
            order = sorted(order, key=offsets.__getitem__)
        out: list[int] = [0] * n
        pos = 0
        for i in order:
            off = offsets[i]
            if pos > off:
                raise FormatError(
                    f"invalid toc entry {i}: derived header offset {pos} is beyond its data offset {off}"
                )
            out[i] = pos
            end = off + sizes[i]
            pos = end + (-end % _BLOCK)
        if self._entries is None:
            return array("q", out)  # every value is at most an int64 data offset
        return out


# ------------------------------------------------------------------------------------------ mod_time


def _civil_from_days(days: int) -> tuple[int, int, int]:
    """Proleptic Gregorian (year, month, day) of a count of days since 1970-01-01."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def format_mod_time(seconds: int, nanoseconds: int = 0) -> str:
    """Go ``MarshalText`` of the UTC time ``seconds`` (+ ``nanoseconds``) after the Unix epoch.

    Trailing fractional zeros are removed and the fraction is omitted when zero; years outside 0..9999
    give ``""`` (upstream ignores the marshalling error and stores the empty string).
    """
    if not 0 <= nanoseconds < 1_000_000_000:
        extra, nanoseconds = divmod(nanoseconds, 1_000_000_000)
        seconds += extra
    days, secs = divmod(seconds, 86400)
    year, month, day = _civil_from_days(days)
    if not 0 <= year <= 9999:
        return ""
    hh, rem = divmod(secs, 3600)
    mm, ss = divmod(rem, 60)
    frac = f".{nanoseconds:09d}".rstrip("0") if nanoseconds else ""
    return f"{year:04d}-{month:02d}-{day:02d}T{hh:02d}:{mm:02d}:{ss:02d}{frac}Z"


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)


def parse_mod_time(text: str) -> tuple[int, int]:
    """``(unix seconds, nanoseconds)`` of RFC 3339 text with any offset; ``""`` is Go's zero time."""
    if text == "":
        return ZERO_TIME
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise FormatError(f"mod_time {text!r}: not RFC 3339 text")
    year, month, day, hh, mm, ss = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    mdays = (31, 29 if leap else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
    if not (1 <= month <= 12 and 1 <= day <= mdays[month - 1] and hh < 24 and mm < 60 and ss < 60):
        raise FormatError(f"mod_time {text!r}: date or time out of range")
    nanos = int((m.group(7) or "0")[:9].ljust(9, "0"))
    offset = 0
    if m.group(9):
        oh, om = int(m.group(10)), int(m.group(11))
        if oh >= 24 or om >= 60:
            raise FormatError(f"mod_time {text!r}: zone offset out of range")
        offset = (oh * 3600 + om * 60) * (1 if m.group(9) == "+" else -1)
    seconds = _days_from_civil(year, month, day) * 86400 + hh * 3600 + mm * 60 + ss - offset
    return seconds, nanos


# ----------------------------------------------------------------------------------------- serialize

_ENC = "utf-8"
_ESC = "surrogateescape"

# FileMetadata slots: 0 name, 1 type, 2 uncompressed_offset, 3 uncompressed_size, 4 linkname, 5 mode,
# 6 uid, 7 gid, 8 uname, 9 gname, 10 mod_time, 11 devmajor, 12 devminor, 13 xattrs (all PAX records)
_FM_FIELDS = (
    (0, "o"),
    (1, "o"),
    (2, "q"),
    (3, "q"),
    (4, "o"),
    (5, "q"),
    (6, "I"),
    (7, "I"),
    (8, "o"),
    (9, "o"),
    (10, "o"),
    (11, "q"),
    (12, "q"),
    (13, "o"),
)
_FM_OPTIONAL = (2, 3, 5, 6, 7, 11, 12)  # scalars with default 0, left out when zero
_FM_NAMES = (
    "name",
    "type",
    "uncompressed_offset",
    "uncompressed_size",
    "linkname",
    "mode",
    "uid",
    "gid",
    "uname",
    "gname",
    "mod_time",
    "devmajor",
    "devminor",
    "xattrs",
)
_XATTR_SIG: flatbuf.Signature = ((0, "o"), (1, "o"))


def _fm_signatures() -> tuple[flatbuf.Signature, ...]:
    """The FileMetadata table signature for each presence mask of the optional scalars."""
    out = []
    for mask in range(1 << len(_FM_OPTIONAL)):
        absent = {slot for bit, slot in enumerate(_FM_OPTIONAL) if not mask >> bit & 1}
        out.append(tuple(field for field in _FM_FIELDS if field[0] not in absent))
    return tuple(out)


_FM_SIGS = _fm_signatures()


def _key_bytes(record: tuple[str, bytes]) -> bytes:
    return record[0].encode(_ENC, _ESC)


def serialize(z: Ztoc) -> bytes:
    """The zTOC flatbuffer, byte for byte as upstream's builder writes it (spec 5.1 call order).

    Raises:
        InvalidArgument: a value does not fit its field (e.g. a negative uid) or text cannot be encoded.
    """
    if _compiled_serialize is not None:
        data = _compiled_serialize(z)
        if data is not None:
            return data
    return serialize_python(z)


def serialize_python(z: Ztoc) -> bytes:
    """:func:`serialize` by the pure-Python writer (the twin of the compiled one); same bytes, same errors."""
    try:
        return _serialize(z)
    except (struct.error, UnicodeEncodeError, TypeError) as exc:
        raise InvalidArgument(f"ztoc: cannot serialize: {_find_bad_field(z) or exc}") from exc


def _serialize(z: Ztoc) -> bytes:
    b = flatbuf.Builder()
    strings = b.strings
    table = b.table
    offset_vector = b.offset_vector
    version, build_tool = strings((z.version.encode(_ENC, _ESC), z.build_tool_identifier.encode(_ENC, _ESC)))
    files = z.files
    entries = [0] * len(files)
    empty: tuple[int, ...] = ()
    sigs = _FM_SIGS
    for i in range(len(files) - 1, -1, -1):
        f = files[i]
        name, type_, linkname, uname, gname, mod_time = strings(
            (
                f.name.encode(_ENC, _ESC),
                f.type.encode(_ENC, _ESC),
                f.linkname.encode(_ENC, _ESC),
                f.uname.encode(_ENC, _ESC),
                f.gname.encode(_ENC, _ESC),
                f.mod_time.encode(_ENC, _ESC),
            )
        )
        if f.pax:
            records = []
            for key, value in sorted(f.pax, key=_key_bytes):
                records.append(table(_XATTR_SIG, strings((key.encode(_ENC, _ESC), bytes(value)))))
            xattrs = offset_vector(records)
        else:
            xattrs = offset_vector(empty)
        uoff = f.uncompressed_offset
        usize = f.uncompressed_size
        mode = f.mode
        uid = f.uid
        gid = f.gid
        dmaj = f.devmajor
        dmin = f.devminor
        mask = (
            (uoff != 0)
            | (usize != 0) << 1
            | (mode != 0) << 2
            | (uid != 0) << 3
            | (gid != 0) << 4
            | (dmaj != 0) << 5
            | (dmin != 0) << 6
        )
        entries[i] = table(
            sigs[mask],
            (name, type_, uoff, usize, linkname, mode, uid, gid, uname, gname, mod_time, dmaj, dmin, xattrs),
        )
    toc = table(((0, "o"),), (offset_vector(entries),))

    ci = z.compression
    checkpoints = b.byte_vector(bytes(ci.checkpoints))
    digests = offset_vector(strings([d.encode(_ENC, _ESC) for d in ci.span_digests]))
    sig: list[tuple[int, str]] = []
    if ci.max_span_id != 0:
        sig.append((1, "i"))
    sig += [(2, "o"), (3, "o")]
    if ci.algorithm != ALGORITHM_GZIP:
        sig.append((0, "b"))
    compression = table(tuple(sig), (ci.algorithm, ci.max_span_id, digests, checkpoints))

    sig = [(0, "o"), (1, "o"), (4, "o")]
    if z.compressed_archive_size != 0:
        sig.append((2, "q"))
    if z.uncompressed_archive_size != 0:
        sig.append((3, "q"))
    sig.append((5, "o"))
    root = table(
        tuple(sig),
        (version, build_tool, z.compressed_archive_size, z.uncompressed_archive_size, toc, compression),
    )
    return b.finish(root)


def _load_writer() -> Callable[[Ztoc], bytes | None] | None:
    """``serialize_or_none`` of the compiled writer, or ``None`` when the twin (flatbuf) is selected."""
    module = _select.load("soci_fs._ext._ztocwrite", "soci_fs.flatbuf")
    return getattr(module, "serialize_or_none", None)


_compiled_serialize = _load_writer()
#: which writer :func:`serialize` uses: ``"compiled"`` or ``"pure"``
WRITER_IMPLEMENTATION = "pure" if _compiled_serialize is None else "compiled"


def _find_bad_field(z: Ztoc) -> str | None:
    """Names the first value that cannot be written (only called after serialization failed)."""
    limits = {"q": (-(1 << 63), 1 << 63), "I": (0, 1 << 32)}
    for i, f in enumerate(z.files):
        for slot, kind in _FM_FIELDS:
            name = _FM_NAMES[slot]
            if name == "xattrs":
                for key, value in f.pax:
                    try:
                        key.encode(_ENC, _ESC)
                        bytes(value)
                    except (UnicodeEncodeError, TypeError):
                        return f"toc.metadata[{i}].xattrs[{key!r}]: not encodable"
                continue
            value = getattr(f, name)
            if kind == "o":
                try:
                    value.encode(_ENC, _ESC)
                except (UnicodeEncodeError, AttributeError):
                    return f"toc.metadata[{i}].{name}: {value!r} is not encodable text"
            else:
                lo, hi = limits[kind]
                if not isinstance(value, int) or not lo <= value < hi:
                    return f"toc.metadata[{i}].{name}: {value!r} out of range"
    ci = z.compression
    if not -128 <= ci.algorithm < 128:
        return f"compression_info.compression_algorithm: {ci.algorithm!r} out of range"
    if not -(1 << 31) <= ci.max_span_id < 1 << 31:
        return f"compression_info.max_span_id: {ci.max_span_id!r} out of range"
    return None


# --------------------------------------------------------------------------------------------- parse

_I64 = struct.Struct("<q")
_I32 = struct.Struct("<i")
_I8 = struct.Struct("<b")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_WIDTHS = (4, 4, 8, 8, 4, 8, 4, 4, 4, 4, 4, 8, 8, 4)


def _text(raw: bytes | None) -> str:
    return "" if raw is None else raw.decode(_ENC, _ESC)


def parse(data: bytes | bytearray | memoryview) -> Ztoc:
    """Decode and validate a zTOC flatbuffer.

    Raises:
        FormatError: naming the field at fault (bad offset, absurd count, inconsistent content).
    """
    buf = bytes(data)
    root = flatbuf.root(buf, "ztoc")
    version = _text(root.bytes_(0, "version"))
    build_tool = _text(root.bytes_(1, "build_tool_identifier"))
    compressed_size = root.scalar(2, _I64, 0, "compressed_archive_size")
    uncompressed_size = root.scalar(3, _I64, 0, "uncompressed_archive_size")
    toc = root.table(4, "toc")
    files = _parse_files(buf, toc) if toc is not None else ()
    ci = root.table(5, "compression_info")
    if ci is None:
        compression = CompressionInfo(ALGORITHM_GZIP, 0, (), b"")
    else:
        algorithm = ci.scalar(0, _I8, ALGORITHM_GZIP, "compression_algorithm")
        max_span_id = ci.scalar(1, _I32, 0, "max_span_id")
        digests = tuple(
            flatbuf.string_at(buf, t, f"ztoc: compression_info.span_digests[{i}]").decode(_ENC, _ESC)
            for i, t in enumerate(ci.offsets(2, "span_digests"))
        )
        checkpoints = ci.bytes_(3, "checkpoints") or b""
        compression = CompressionInfo(algorithm, max_span_id, digests, checkpoints)
    z = Ztoc(version, build_tool, compressed_size, uncompressed_size, files, compression)
    _validate(z)
    return z


class _Slow(Exception):
    """The fast reader met something odd; the checked reader runs to name the fault."""


def _parse_files(buf: bytes, toc: flatbuf.Table) -> tuple[FileMetadata, ...]:
    """The metadata vector: a fast reader (one vtable decode per distinct vtable, bounds checks folded
    into slicing and ``struct`` errors), falling back to the fully checked reader to name a fault."""
    targets = toc.offsets(0, "metadata")
    try:
        return _parse_files_fast(buf, targets)
    except (_Slow, struct.error):
        pass
    for i, t in enumerate(targets):
        _parse_file_checked(buf, t, i)
    raise FormatError("ztoc: toc.metadata: malformed entry")  # pragma: no cover - the loop names it


def _parse_files_fast(buf: bytes, targets: list[int]) -> tuple[FileMetadata, ...]:
    size = len(buf)
    u32 = _U32.unpack_from
    i32 = _I32.unpack_from
    i64 = _I64.unpack_from
    vtables: dict[int, tuple[tuple[int, ...], int]] = {}
    out = []
    append = out.append
    fm = FileMetadata

    def s(at: int) -> str:
        # ``at`` is within the table (checked through ``need``); u32 raises struct.error past the end
        target = at + u32(buf, at)[0]
        end = target + 4 + u32(buf, target)[0]
        if end > size:
            raise _Slow
        return buf[target + 4 : end].decode("utf-8", "surrogateescape")

    for i, t in enumerate(targets):
        vt = t - i32(buf, t)[0]
        cached = vtables.get(vt)
        if cached is None:
            cached = vtables[vt] = _fm_vtable(flatbuf.Table(buf, t, f"ztoc: toc.metadata[{i}]"))
        fo, need = cached
        if t + need > size:
            raise _Slow
        o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13 = fo
        pax: tuple[tuple[str, bytes], ...] = ()
        if o13:
            at = t + o13
            target = at + u32(buf, at)[0]
            if u32(buf, target)[0]:
                pax = _pax(buf, at, i)
        append(
            fm(
                s(t + o0) if o0 else "",
                s(t + o1) if o1 else "",
                i64(buf, t + o2)[0] if o2 else 0,
                i64(buf, t + o3)[0] if o3 else 0,
                s(t + o4) if o4 else "",
                i64(buf, t + o5)[0] if o5 else 0,
                u32(buf, t + o6)[0] if o6 else 0,
                u32(buf, t + o7)[0] if o7 else 0,
                s(t + o8) if o8 else "",
                s(t + o9) if o9 else "",
                s(t + o10) if o10 else "",
                i64(buf, t + o11)[0] if o11 else 0,
                i64(buf, t + o12)[0] if o12 else 0,
                pax,
            )
        )
    return tuple(out)


def _parse_file_checked(buf: bytes, t: int, i: int) -> None:
    """Reads entry ``i`` with every access checked; raises the FormatError that names the fault."""
    table = flatbuf.Table(buf, t, f"ztoc: toc.metadata[{i}]")
    for slot, kind in _FM_FIELDS:
        name = _FM_NAMES[slot]
        if slot == 13:
            if table.field(13):
                _pax(buf, t + table.field(13), i)
        elif kind == "o":
            table.bytes_(slot, name)
        else:
            table.scalar(slot, _I64 if kind == "q" else _U32, 0, name)


def _fm_vtable(table: flatbuf.Table) -> tuple[tuple[int, ...], int]:
    """Field offsets of a FileMetadata vtable (0 = absent) and the bytes the table needs."""
    fo = tuple(table.field(slot) for slot in range(14))
    need = max([4] + [o + w for o, w in zip(fo, _WIDTHS, strict=True) if o])
    return fo, need


def _pax(buf: bytes, at: int, i: int) -> tuple[tuple[str, bytes], ...]:
    """The Xattr vector of entry ``i`` whose offset field is at ``at`` (checked)."""
    path = f"ztoc: toc.metadata[{i}].xattrs"
    if at + 4 > len(buf):
        raise flatbuf.oob(path, at)
    target = at + _U32.unpack_from(buf, at)[0]
    if target + 4 > len(buf):
        raise flatbuf.oob(path, target)
    n = _U32.unpack_from(buf, target)[0]
    if target + 4 + 4 * n > len(buf):
        raise FormatError(f"{path}: vector of {n} elements at offset {target} does not fit the buffer")
    out = []
    for j in range(n):
        slot = target + 4 + 4 * j
        record = flatbuf.Table(buf, slot + _U32.unpack_from(buf, slot)[0], f"{path}[{j}]")
        key = record.bytes_(0, "key")
        value = record.bytes_(1, "value")
        out.append(("" if key is None else key.decode(_ENC, _ESC), b"" if value is None else value))
    return tuple(out)


def _iter_sorted(files: tuple[FileMetadata, ...]) -> Iterator[tuple[int, FileMetadata]]:
    """(index, entry) by ascending data offset (stable), without sorting when already in order."""
    prev = -1
    for f in files:
        if f.uncompressed_offset < prev:
            order = sorted(range(len(files)), key=lambda k: files[k].uncompressed_offset)
            return ((k, files[k]) for k in order)
        prev = f.uncompressed_offset
    return enumerate(files)


def _validate(z: Ztoc) -> None:
    if z.compressed_archive_size < 0:
        raise FormatError(f"ztoc: compressed_archive_size: negative ({z.compressed_archive_size})")
    total = z.uncompressed_archive_size
    if total < 0:
        raise FormatError(f"ztoc: uncompressed_archive_size: negative ({total})")
    ci = z.compression
    if ci.max_span_id < -1:
        raise FormatError(f"ztoc: compression_info.max_span_id: {ci.max_span_id} is not a span id")
    if len(ci.span_digests) != ci.max_span_id + 1:
        raise FormatError(
            f"ztoc: compression_info.span_digests: {len(ci.span_digests)} digests"
            f" for max_span_id {ci.max_span_id}"
        )
    header = 0
    for i, f in _iter_sorted(z.files):
        off = f.uncompressed_offset
        size = f.uncompressed_size
        if off < 0:
            raise FormatError(f"ztoc: toc.metadata[{i}].uncompressed_offset: negative ({off})")
        if size < 0:
            raise FormatError(f"ztoc: toc.metadata[{i}].uncompressed_size: negative ({size})")
        if off + size > total:
            raise FormatError(
                f"ztoc: toc.metadata[{i}]: data [{off}, {off + size}) ends beyond"
                f" uncompressed_archive_size {total}"
            )
        if header > off:
            raise FormatError(
                f"ztoc: toc.metadata[{i}]: invalid toc entry: derived header offset {header}"
                f" is beyond data offset {off}"
            )
        header = -(-(off + size) // 512) * 512
