# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled incremental tar scanner: uncompressed tar bytes in, zTOC ``FileMetadata`` out.

Same API, results and exceptions as the pure-Python twin ``soci_fs.tarscan_py`` (Go ``archive/tar`` reader
semantics, formats spec 5.2 and 6): header blocks, checksums (unsigned or signed sum), numeric fields (octal
and base-256), PAX records, GNU long names and links, USTAR/STAR prefixes and the end-of-archive rules are
handled on C buffers; Python objects are made only for what the entry keeps (its text fields, its PAX
records) and for error messages, which are built exactly as the twin builds them.

Data regions are skipped by arithmetic; at most one header block and one extension's data (<= 1 MiB) are
buffered, so memory stays bounded whatever the layer size.

Will not: decompress, read file contents, accept entry types the zTOC cannot describe, or resolve links.
Import it through ``soci_fs.tarscan``, which picks this module or its twin (``SOCI_PUREPYTHON=1``).
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memchr, memcmp, memcpy

import types

from soci_fs.errors import FormatError
from soci_fs.tarscan_py import TarScanResult  # one result type for both implementations
from soci_fs.ztoc import FileMetadata

__all__ = ["TarScanResult", "TarScanner"]


cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        const char *name
        int type
        Py_ssize_t offset
        int flags
    ctypedef struct PyMemberDescrObject:
        PyMemberDef *d_member
    object PyType_GenericAlloc(PyTypeObject *tp, Py_ssize_t nitems)
    void PyObject_GC_UnTrack(void *op)
    PyObject *PyUnicode_FromStringAndSize(const char *u, Py_ssize_t size) except NULL


cdef enum:
    BLOCK = 512
    MAX_SPECIAL = 1048576  # Go's limit on PAX and GNU long-name data
    T_OBJECT_EX = 16  # structmember.h: a slot holding an object reference
    N_FIELDS = 14


cdef enum Fmt:
    FMT_V7
    FMT_USTAR
    FMT_STAR
    FMT_GNU


class _HeaderError(Exception):
    """A numeric field or PAX record that Go's reader would refuse (ErrHeader)."""


_TYPE_NAMES = ("reg", "hardlink", "symlink", "char", "block", "dir", "fifo")  # typeflags '0'..'6'
_ENC = "utf-8"
_ESC = "surrogateescape"

# ------------------------------------------------------------------------------- FileMetadata fast path
# FileMetadata is a frozen dataclass with __slots__: its __init__ stores each field with object.__setattr__,
# which costs about 3 us per entry. When the class has exactly the expected plain object slots (and no
# __post_init__), entries are allocated and their slots filled directly; otherwise the class is called.
# (Entries are untracked by the cyclic GC as well: see _make_entry.)

cdef Py_ssize_t _fm_offsets[N_FIELDS]
cdef bint _fm_fast = False
_FM_ORDER = (
    "name", "type", "uncompressed_offset", "uncompressed_size", "linkname", "mode", "uid", "gid", "uname",
    "gname", "mod_time", "devmajor", "devminor", "pax",
)


cdef void _fm_init():
    global _fm_fast
    cdef PyMemberDescrObject *descr
    cdef int k
    if not isinstance(FileMetadata, type) or hasattr(FileMetadata, "__post_init__"):
        return
    if getattr(FileMetadata, "__slots__", None) is None or tuple(FileMetadata.__dataclass_fields__) != _FM_ORDER:
        return
    for k in range(N_FIELDS):
        attr = FileMetadata.__dict__.get(_FM_ORDER[k])
        if type(attr) is not types.MemberDescriptorType:
            return
        descr = <PyMemberDescrObject *>attr
        if descr.d_member.type != T_OBJECT_EX or descr.d_member.flags != 0:
            return
        _fm_offsets[k] = descr.d_member.offset
    _fm_fast = True


_fm_init()


cdef object _make_entry(object name, object kind, int64_t offset, object size, object link, object mode,
                        object uid, object gid, object uname, object gname, object mtime, object dmaj,
                        object dmin, object pax):
    cdef PyObject *values[N_FIELDS]
    cdef PyObject *raw
    cdef int k
    if not _fm_fast:
        return FileMetadata(name, kind, offset, size, link, mode, uid, gid, uname, gname, mtime, dmaj,
                            dmin, pax)
    cdef object off = offset
    values[0] = <PyObject *>name
    values[1] = <PyObject *>kind
    values[2] = <PyObject *>off
    values[3] = <PyObject *>size
    values[4] = <PyObject *>link
    values[5] = <PyObject *>mode
    values[6] = <PyObject *>uid
    values[7] = <PyObject *>gid
    values[8] = <PyObject *>uname
    values[9] = <PyObject *>gname
    values[10] = <PyObject *>mtime
    values[11] = <PyObject *>dmaj
    values[12] = <PyObject *>dmin
    values[13] = <PyObject *>pax
    entry = PyType_GenericAlloc(<PyTypeObject *>FileMetadata, 0)  # slots start NULL
    raw = <PyObject *>entry
    for k in range(N_FIELDS):
        Py_INCREF(<object>values[k])
        (<PyObject **>((<char *>raw) + _fm_offsets[k]))[0] = values[k]
    # Its fields are str, int and a tuple of (str, bytes) pairs: the entry can never be part of a cycle, so
    # the cyclic GC need not traverse the tens of thousands of entries a layer holds (as it does for
    # tuples of atoms, which CPython untracks itself).
    PyObject_GC_UnTrack(raw)
    return entry


# ------------------------------------------------------------------------------------------ numbers


cdef inline Py_ssize_t _clen(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    """Length up to the first NUL (Go parseString)."""
    cdef Py_ssize_t i
    for i in range(n):
        if p[i] == 0:
            return i
    return n


cdef bytes _cbytes(const unsigned char *p, Py_ssize_t n):
    return PyBytes_FromStringAndSize(<const char *>p, _clen(p, n))


cdef int _octal_c(const unsigned char *p, Py_ssize_t n, int64_t *out, Py_ssize_t *start,
                  Py_ssize_t *length) noexcept nogil:
    """Go parseOctal: 0 ok, 1 bad digit; ``start``/``length`` frame the trimmed, NUL-cut text."""
    cdef Py_ssize_t a = 0, b = n, i
    cdef uint64_t v = 0
    while a < b and (p[a] == 32 or p[a] == 0):
        a += 1
    while b > a and (p[b - 1] == 32 or p[b - 1] == 0):
        b -= 1
    for i in range(a, b):
        if p[i] == 0:
            b = i
            break
    start[0] = a
    length[0] = b - a
    if a == b:
        out[0] = 0
        return 0
    for i in range(a, b):
        if p[i] < 48 or p[i] > 55:
            return 1
        if v >> 61:
            return 2  # more than 64 bits (only reachable with fields longer than any tar field)
        v = (v << 3) | <uint64_t>(p[i] - 48)
    out[0] = <int64_t>v
    return 0


cdef int _numeric_c(const unsigned char *p, Py_ssize_t n, int64_t *out) noexcept nogil:
    """Go parseNumeric: base-256 when the top bit is set, else octal. 0 ok, 1 bad octal, 2/3 overflow."""
    cdef Py_ssize_t i, s, l
    cdef unsigned char inv = 0, c
    cdef uint64_t x = 0
    if n > 0 and p[0] & 0x80:
        if p[0] & 0x40:
            inv = 0xFF
        for i in range(n):
            c = p[i] ^ inv
            if i == 0:
                c &= 0x7F
            if x >> 56:
                return 3
            x = (x << 8) | c
        if x >> 63:
            return 3
        out[0] = <int64_t>(~x) if inv else <int64_t>x
        return 0
    return _octal_c(p, n, out, &s, &l)


cdef int64_t _numeric(const unsigned char *p, Py_ssize_t n) except? -1:
    """:func:`_numeric_c`, raising the twin's ``_HeaderError`` messages."""
    cdef int64_t v
    cdef Py_ssize_t s, l
    cdef int rc = _numeric_c(p, n, &v)
    if rc == 0:
        return v
    if rc == 3:
        raise _HeaderError("base-256 number overflows")
    _octal_c(p, n, &v, &s, &l)
    raw = PyBytes_FromStringAndSize(<const char *>(p + s), l)
    if rc == 1:
        raise _HeaderError(f"bad octal number {raw!r}")
    raise _HeaderError(f"octal number {raw!r} overflows")


cdef int _decimal_c(const unsigned char *p, Py_ssize_t n, int64_t *out) noexcept nogil:
    """Go strconv.ParseInt(s, 10, 64): 0 ok, 1 not a number, 2 out of range."""
    cdef Py_ssize_t i = 0
    cdef bint neg = False
    cdef uint64_t v = 0, d
    if n > 0 and (p[0] == 43 or p[0] == 45):
        neg = p[0] == 45
        i = 1
    if i == n:
        return 1
    cdef int rc = 0
    while i < n:
        if p[i] < 48 or p[i] > 57:
            return 1
        d = p[i] - 48
        if rc == 0:
            if v > (<uint64_t>0xFFFFFFFFFFFFFFFF - d) // 10:
                rc = 2
            else:
                v = v * 10 + d
        i += 1
    if rc:
        return rc
    if neg:
        if v > (<uint64_t>1 << 63):
            return 2
        out[0] = <int64_t>(0 - v)
    else:
        if v >= (<uint64_t>1 << 63):
            return 2
        out[0] = <int64_t>v
    return 0


cdef int64_t _decimal(const unsigned char *p, Py_ssize_t n, str what) except? -1:
    cdef int64_t v
    cdef int rc = _decimal_c(p, n, &v)
    if rc == 0:
        return v
    text = PyBytes_FromStringAndSize(<const char *>p, n)
    if rc == 1:
        raise _HeaderError(f"PAX {what} {text!r} is not a decimal number")
    raise _HeaderError(f"PAX {what} {text!r} out of range")


cdef int _pax_time(const unsigned char *p, Py_ssize_t n, str what, int64_t *sec, int64_t *nsec) except -1:
    """Go parsePAXTime: seconds and nanoseconds in [0, 1e9); ``sec`` may need one more second borrowed
    (``nsec`` < 0 is folded by the caller through :func:`_format_time`)."""
    cdef Py_ssize_t dot = -1, i
    cdef int64_t nanos = 0
    cdef int digits = 0
    for i in range(n):
        if p[i] == 46:
            dot = i
            break
    if dot < 0:
        sec[0] = _decimal(p, n, what)
        nsec[0] = 0
        return 0
    sec[0] = _decimal(p, dot, what)
    if dot + 1 == n:
        nsec[0] = 0
        return 0
    for i in range(dot + 1, n):
        if p[i] < 48 or p[i] > 57:
            value = PyBytes_FromStringAndSize(<const char *>p, n)
            raise _HeaderError(f"PAX {what} {value!r} has a bad fraction")
        if digits < 9:
            nanos = nanos * 10 + (p[i] - 48)
            digits += 1
    while digits < 9:
        nanos *= 10
        digits += 1
    nsec[0] = -nanos if p[0] == 45 else nanos
    return 0


# --------------------------------------------------------------------------------------------- time


cdef inline int64_t _floordiv(int64_t a, int64_t b) noexcept nogil:
    cdef int64_t q = a / b
    if (a % b != 0) and ((a < 0) != (b < 0)):
        q -= 1
    return q


cdef str _format_time(int64_t seconds, int64_t nanos):
    """Go MarshalText of a UTC time (same text as ``soci_fs.ztoc.format_mod_time``); ``nanos`` in
    (-1e9, 1e9). Years outside 0..9999 give ``""``."""
    cdef char buf[48]
    cdef int64_t days, secs, z, era, doe, yoe, doy, mp, day, month, year, hh, mm, ss
    cdef int end
    if seconds < -(<int64_t>1 << 40) or seconds > (<int64_t>1 << 40):
        return ""  # far outside years 0..9999 (and safe from overflow below)
    if nanos < 0:
        nanos += 1000000000
        seconds -= 1
    days = _floordiv(seconds, 86400)
    secs = seconds - days * 86400
    z = days + 719468
    era = _floordiv(z, 146097)
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (1 if month <= 2 else 0)
    if year < 0 or year > 9999:
        return ""
    hh = secs // 3600
    mm = (secs % 3600) // 60
    ss = secs % 60
    _digits(buf, year, 4)
    buf[4] = 45
    _digits(buf + 5, month, 2)
    buf[7] = 45
    _digits(buf + 8, day, 2)
    buf[10] = 84
    _digits(buf + 11, hh, 2)
    buf[13] = 58
    _digits(buf + 14, mm, 2)
    buf[16] = 58
    _digits(buf + 17, ss, 2)
    end = 19
    if nanos:
        buf[19] = 46
        _digits(buf + 20, nanos, 9)
        end = 29
        while buf[end - 1] == 48:
            end -= 1
    buf[end] = 90
    return <str>PyUnicode_FromStringAndSize(buf, end + 1)


cdef inline void _digits(char *p, int64_t v, int width) noexcept nogil:
    cdef int k
    for k in range(width - 1, -1, -1):
        p[k] = <char>(48 + v % 10)
        v //= 10


def format_mod_time(seconds, nanoseconds=0):
    """Test hook: the compiled formatter for ``nanoseconds`` in [0, 1e9)."""
    return _format_time(seconds, nanoseconds)


# ---------------------------------------------------------------------------------------------- PAX


cdef dict _parse_pax(const unsigned char *data, Py_ssize_t size, bint *sparse):
    """Go parsePAX: ``"<len> <key>=<value>\\n"`` records; later keys win; sparse 0.0 offsets folded."""
    cdef dict records = {}
    cdef list sparse_map = []
    cdef Py_ssize_t pos = 0, rest, sp, i, eq, n, klen, vlen, llen
    cdef const unsigned char *r
    cdef const unsigned char *rec
    cdef int64_t length_v
    cdef bint nul
    while pos < size:
        r = data + pos
        rest = size - pos
        sp = -1
        for i in range(rest):
            if r[i] == 32:
                sp = i
                break
        if sp < 0:
            raise _HeaderError("PAX record without a length")
        llen = sp
        if llen:
            length_v = _decimal(r, llen, "record length")
        else:
            length_v = -1
        if length_v < 5 or length_v > rest:
            length = PyBytes_FromStringAndSize(<const char *>r, llen)
            raise _HeaderError(f"PAX record length {length!r} is invalid")
        n = <Py_ssize_t>length_v - (llen + 1)
        if n <= 0 or r[sp + n] != 10:
            raise _HeaderError("PAX record is not terminated by a newline")
        rec = r + sp + 1
        n -= 1  # record bytes without the newline
        eq = -1
        for i in range(n):
            if rec[i] == 61:
                eq = i
                break
        if eq <= 0:
            record = PyBytes_FromStringAndSize(<const char *>rec, n if n < 40 else 40)
            raise _HeaderError(f"PAX record {record!r} has no key")
        if eq >= 11 and memcmp(rec, b"GNU.sparse.", 11) == 0:
            sparse[0] = True
        key = PyBytes_FromStringAndSize(<const char *>rec, eq)
        value = PyBytes_FromStringAndSize(<const char *>(rec + eq + 1), n - eq - 1)
        klen = eq
        vlen = n - eq - 1
        if key == b"path" or key == b"linkpath" or key == b"uname" or key == b"gname":
            for i in range(vlen):
                if rec[eq + 1 + i] == 0:
                    raise _HeaderError(f"PAX record {key!r} holds a NUL")
        else:
            for i in range(klen):
                if rec[i] == 0:
                    raise _HeaderError("PAX key holds a NUL")
        if key == b"GNU.sparse.offset" or key == b"GNU.sparse.numbytes":
            expect = b"GNU.sparse.offset" if len(sparse_map) % 2 == 0 else b"GNU.sparse.numbytes"
            if key != expect or b"," in value:
                raise _HeaderError("PAX GNU sparse records out of order")
            sparse_map.append(value)
        else:
            records[key] = value
        pos += <Py_ssize_t>length_v
    if sparse_map:
        records[b"GNU.sparse.map"] = b",".join(sparse_map)
    return records


cdef enum:
    MAX_FAST_RECORDS = 32


cdef struct PaxRecords:
    Py_ssize_t n
    Py_ssize_t key[MAX_FAST_RECORDS]
    Py_ssize_t key_len[MAX_FAST_RECORDS]
    Py_ssize_t val[MAX_FAST_RECORDS]
    Py_ssize_t val_len[MAX_FAST_RECORDS]


cdef int _parse_pax_fast(const unsigned char *data, Py_ssize_t size, PaxRecords *out) noexcept nogil:
    """The common case of :func:`_parse_pax` without Python objects: 0 when ``out`` holds the records
    (positions into ``data``, a later duplicate key replacing the value in the first one's place), 1 when
    :func:`_parse_pax` must run instead (a malformed record, whose error it reports; a ``GNU.sparse.`` key;
    too many records)."""
    cdef Py_ssize_t pos = 0, rest, sp, i, eq, n, llen, j
    cdef const unsigned char *r
    cdef int64_t length_v
    out.n = 0
    while pos < size:
        r = data + pos
        rest = size - pos
        sp = -1
        for i in range(rest):
            if r[i] == 32:
                sp = i
                break
        llen = sp
        if sp <= 0 or _decimal_c(r, llen, &length_v) != 0 or length_v < 5 or length_v > rest:
            return 1
        n = <Py_ssize_t>length_v - (llen + 1)
        if n <= 0 or r[sp + n] != 10:
            return 1
        n -= 1
        eq = -1
        for i in range(n):
            if r[sp + 1 + i] == 61:
                eq = i
                break
        if eq <= 0:
            return 1
        if eq >= 11 and memcmp(r + sp + 1, b"GNU.sparse.", 11) == 0:
            return 1
        if memchr(r + sp + 1, 0, n):
            return 1  # a NUL in a key or a text value: let _parse_pax decide and word the error
        for j in range(out.n):
            if out.key_len[j] == eq and memcmp(data + out.key[j], r + sp + 1, eq) == 0:
                break
        else:
            if out.n == MAX_FAST_RECORDS:
                return 1
            j = out.n
            out.n += 1
            out.key[j] = pos + sp + 1
            out.key_len[j] = eq
        out.val[j] = pos + sp + 2 + eq
        out.val_len[j] = n - eq - 1
        pos += <Py_ssize_t>length_v
    return 0


cdef inline bint _key_is(const unsigned char *data, PaxRecords *rec, Py_ssize_t j, const char *key,
                         Py_ssize_t n) noexcept nogil:
    return rec.key_len[j] == n and memcmp(data + rec.key[j], key, n) == 0


cdef inline bint _key_less(const unsigned char *data, PaxRecords *rec, Py_ssize_t a,
                           Py_ssize_t b) noexcept nogil:
    """Key ``a`` sorts before key ``b`` (bytes order, as Python compares bytes)."""
    cdef Py_ssize_t la = rec.key_len[a], lb = rec.key_len[b]
    cdef int c = memcmp(data + rec.key[a], data + rec.key[b], la if la < lb else lb)
    return c < 0 or (c == 0 and la < lb)


cdef inline bint _same(object known, const unsigned char *p, Py_ssize_t n):
    """``known`` is a bytes object equal to ``p[:n]``."""
    return (
        known is not None
        and PyBytes_GET_SIZE(known) == n
        and memcmp(PyBytes_AS_STRING(known), p, n) == 0
    )


cdef bint _is_pax_sparse(dict pax):
    major = pax.get(b"GNU.sparse.major")
    minor = pax.get(b"GNU.sparse.minor")
    if (major, minor) in ((b"0", b"0"), (b"0", b"1"), (b"1", b"0")):
        return True
    return b"GNU.sparse.map" in pax or b"GNU.sparse.size" in pax


cdef inline bint _checksum_ok(const unsigned char *blk) noexcept nogil:
    """Go: the stored octal value equals the unsigned or the signed byte sum (checksum field as spaces)."""
    cdef int64_t value, unsigned_sum = 0, signed_sum
    cdef Py_ssize_t i, s, l
    cdef unsigned int acc = 0
    if _octal_c(blk + 148, 8, &value, &s, &l) != 0:
        return False
    for i in range(BLOCK):  # a plain loop the compiler vectorizes
        acc += blk[i]
    for i in range(148, 156):
        acc -= blk[i]
    unsigned_sum = acc + 8 * 32
    if value == unsigned_sum:
        return True
    signed_sum = unsigned_sum
    for i in range(BLOCK):
        if blk[i] & 0x80 and not (148 <= i < 156):
            signed_sum -= 256
    return value == signed_sum


cdef inline bint _all_zero(const unsigned char *blk) noexcept nogil:
    cdef Py_ssize_t i
    cdef unsigned char acc = 0
    for i in range(BLOCK):
        acc |= blk[i]
    return acc == 0


# ------------------------------------------------------------------------------------------ scanner


cdef class TarScanner:
    """Feeds on a tar stream in order, in chunks of any size, and lists its entries.

    ``feed`` raises :class:`FormatError` as soon as a header is invalid; ``finish`` raises it when the
    stream ended inside a header, an extension or a file's data (or its padding).
    """

    cdef int64_t _pos  # stream position of the next byte fed
    cdef int64_t _skip  # data and padding bytes still to pass over
    cdef unsigned char _hdr[BLOCK]  # an incomplete header block
    cdef Py_ssize_t _hdr_len
    cdef unsigned char *_ext  # extension data being collected
    cdef Py_ssize_t _ext_len, _ext_cap
    cdef int _special  # typeflag of the extension being collected (x, L, K), 0 when none
    cdef int64_t _special_size, _special_pad
    cdef bint _zero_seen  # one zero block read; a second ends the archive
    cdef int64_t _end  # the archive_size once the end marker was read, -1 before
    cdef list _entries
    cdef object _pax  # dict of the pending PAX records, or None
    cdef bint _pax_sparse  # _pax has a GNU.sparse.* key
    cdef object _pax_data  # bytes of the pending PAX records when _pax_fast describes them, or None
    cdef PaxRecords _pax_fast
    cdef list _key_texts  # [(key bytes, key str)] of the PAX keys met so far (a few at most)
    cdef object _long_name  # bytes or None
    cdef object _long_link
    cdef dict _key_cache  # PAX key bytes -> str
    cdef object _last_uname_b, _last_uname, _last_gname_b, _last_gname
    cdef int64_t _last_sec, _last_nsec
    cdef object _last_time

    def __cinit__(self):
        self._pos = 0
        self._skip = 0
        self._hdr_len = 0
        self._ext = NULL
        self._ext_len = 0
        self._ext_cap = 0
        self._special = 0
        self._zero_seen = False
        self._end = -1
        self._entries = []
        self._pax = None
        self._long_name = None
        self._long_link = None
        self._key_cache = {}
        self._pax_data = None
        self._key_texts = []
        self._last_uname_b = self._last_gname_b = None
        self._last_time = None

    def __dealloc__(self):
        free(self._ext)

    def feed(self, data):
        """Consume the next bytes of the stream (any chunking)."""
        cdef Py_buffer view
        try:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        except BufferError:
            data = bytes(data)  # a non-contiguous memoryview
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._feed(<const unsigned char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef int _feed(self, const unsigned char *buf, Py_ssize_t n) except -1:
        cdef Py_ssize_t i = 0, take, need
        cdef const unsigned char *blk
        while i < n:
            if self._end >= 0:
                return 0  # bytes after the end marker are not part of the archive
            if self._skip:
                take = <Py_ssize_t>min(self._skip, <int64_t>(n - i))
                self._skip -= take
                self._pos += take
                i += take
                continue
            if self._special:
                need = <Py_ssize_t>self._special_size - self._ext_len
                take = min(need, n - i)
                memcpy(self._ext + self._ext_len, buf + i, take)
                self._ext_len += take
                self._pos += take
                i += take
                if take == need:
                    self._special_done()
                continue
            if self._hdr_len == 0 and n - i >= BLOCK:
                blk = buf + i
                i += BLOCK
            else:
                take = min(BLOCK - self._hdr_len, n - i)
                memcpy(self._hdr + self._hdr_len, buf + i, take)
                self._hdr_len += take
                i += take
                if self._hdr_len < BLOCK:
                    self._pos += take
                    continue
                self._pos -= BLOCK - take  # _pos counts the block whole below
                blk = self._hdr
                self._hdr_len = 0
            self._pos += BLOCK
            self._block(blk)
        return 0

    def finish(self):
        """The entries and the archive size; :class:`FormatError` if the stream stopped mid-way."""
        if self._end < 0:
            if self._skip:
                raise FormatError(
                    f"tar: truncated: the stream ends {self._skip} bytes short of the data at {self._pos}"
                )
            if self._special:
                raise FormatError(
                    f"tar: truncated: the stream ends inside an extension header at {self._pos}"
                )
            if self._hdr_len:
                raise FormatError(f"tar: truncated: the stream ends inside a header block at {self._pos}")
            self._end = self._pos
        return TarScanResult(tuple(self._entries), self._end)

    # -------------------------------------------------------------------------------------- headers

    cdef int _block(self, const unsigned char *blk) except -1:
        """Handle one 512-byte header block that ends at ``self._pos``."""
        cdef int64_t at = self._pos - BLOCK
        if self._zero_seen:
            if _all_zero(blk):
                self._end = self._pos
                return 0
            raise FormatError(f"tar: invalid header at {at}: a zero block is followed by data")
        if blk[148] == 0 and _all_zero(blk):
            self._zero_seen = True
            return 0
        if not _checksum_ok(blk):
            raise FormatError(f"tar: invalid header at {at}: checksum mismatch ({_cbytes(blk, 100)!r})")
        try:
            self._header(blk, at)
        except _HeaderError as exc:
            raise FormatError(f"tar: invalid header at {at} ({_cbytes(blk, 100)!r}): {exc}") from None
        return 0

    cdef int _header(self, const unsigned char *blk, int64_t at) except -1:
        cdef Fmt fmt
        cdef int typeflag = blk[156]
        cdef int64_t size_v, mode_v, uid_v, gid_v, mtime_s, mtime_ns = 0, dmaj = 0, dmin = 0, data_size
        cdef int64_t scratch
        cdef unsigned char name_buf[260]
        cdef Py_ssize_t name_len, pre_len = 0, link_len, uname_len = 0, gname_len = 0, k
        cdef const unsigned char *pre = NULL
        cdef const unsigned char *name_p
        cdef const unsigned char *link_p
        cdef const unsigned char *uname_p
        cdef const unsigned char *gname_p
        cdef const unsigned char *vp
        cdef const unsigned char *base
        cdef PaxRecords *rec
        cdef Py_ssize_t vlen
        cdef bint ascii
        if memcmp(blk + 257, b"ustar\x00", 6) == 0:
            fmt = FMT_STAR if memcmp(blk + 508, b"tar\x00", 4) == 0 else FMT_USTAR
        elif memcmp(blk + 257, b"ustar ", 6) == 0 and blk[263] == 32 and blk[264] == 0:
            fmt = FMT_GNU
        else:
            fmt = FMT_V7
        size_v = _numeric(blk + 124, 12)
        if typeflag == 120 or typeflag == 76 or typeflag == 75:  # x L K
            if size_v < 0:
                raise _HeaderError(f"negative size {size_v}")
            if size_v > MAX_SPECIAL:
                raise FormatError(f"tar: extension header at {at} holds {size_v} bytes, more than 1 MiB")
            # Go parses the whole header first: bad numbers fail even in an extension header
            _numeric(blk + 100, 8)
            _numeric(blk + 108, 8)
            _numeric(blk + 116, 8)
            _numeric(blk + 136, 12)
            if fmt != FMT_V7:
                _numeric(blk + 329, 8)
                _numeric(blk + 337, 8)
            self._special = typeflag
            self._special_size = size_v
            self._special_pad = -size_v & (BLOCK - 1)
            self._ext_len = 0
            if size_v > self._ext_cap:
                self._grow(<Py_ssize_t>size_v)
            if size_v == 0:
                self._special_done()
            return 0
        if not (48 <= typeflag <= 54) and typeflag != 0:
            label = _cbytes(blk, 100).decode(_ENC, _ESC)
            flag = PyBytes_FromStringAndSize(<const char *>(blk + 156), 1)
            raise FormatError(f"tar: unsupported input tar entry {label!r} at {at} (typeflag {flag!r})")

        name_p = blk
        name_len = _clen(blk, 100)
        mode_v = _numeric(blk + 100, 8)
        uid_v = _numeric(blk + 108, 8)
        gid_v = _numeric(blk + 116, 8)
        mtime_s = _numeric(blk + 136, 12)
        if fmt != FMT_V7:
            uname_len = _clen(blk + 265, 32)
            gname_len = _clen(blk + 297, 32)
            dmaj = _numeric(blk + 329, 8)
            dmin = _numeric(blk + 337, 8)
            if fmt == FMT_USTAR:
                pre = blk + 345
                pre_len = _clen(pre, 155)
            elif fmt == FMT_STAR:
                pre = blk + 345
                pre_len = _clen(pre, 131)
            else:  # GNU: atime and ctime live where the prefix would be
                if (blk[345] and _numeric_c(blk + 345, 12, &scratch) != 0) or (
                    blk[357] and _numeric_c(blk + 357, 12, &scratch) != 0
                ):
                    # a pre-Go-1.8 writer put a prefix in a GNU header
                    pre = blk + 345
                    pre_len = _clen(pre, 155)
                    ascii = True
                    for k in range(pre_len):
                        if pre[k] >= 0x80:
                            ascii = False
                            break
                    if not ascii:
                        pre_len = 0
            if pre_len:
                memcpy(name_buf, pre, pre_len)
                name_buf[pre_len] = 47
                memcpy(name_buf + pre_len + 1, blk, name_len)
                name_p = name_buf
                name_len += pre_len + 1
        link_len = _clen(blk + 157, 100)

        # text fields as (pointer, length); ``owner`` objects keep PAX and GNU long-name bytes alive
        link_p = blk + 157
        uname_p = blk + 265
        gname_p = blk + 297
        pax_owner = name_owner = link_owner = None
        records = ()
        if self._pax_data is not None:
            pax_owner = self._pax_data
            self._pax_data = None
            base = <const unsigned char *>PyBytes_AS_STRING(pax_owner)
            rec = &self._pax_fast
            for k in range(rec.n):
                vlen = rec.val_len[k]
                if not vlen:
                    continue  # an empty record keeps the header's value
                vp = base + rec.val[k]
                if _key_is(base, rec, k, "path", 4):
                    name_p, name_len = vp, vlen
                elif _key_is(base, rec, k, "linkpath", 8):
                    link_p, link_len = vp, vlen
                elif _key_is(base, rec, k, "uname", 5):
                    uname_p, uname_len = vp, vlen
                elif _key_is(base, rec, k, "gname", 5):
                    gname_p, gname_len = vp, vlen
                elif _key_is(base, rec, k, "uid", 3):
                    uid_v = _decimal(vp, vlen, "uid")
                elif _key_is(base, rec, k, "gid", 3):
                    gid_v = _decimal(vp, vlen, "gid")
                elif _key_is(base, rec, k, "mtime", 5):
                    _pax_time(vp, vlen, "mtime", &mtime_s, &mtime_ns)
                elif _key_is(base, rec, k, "atime", 5):
                    _pax_time(vp, vlen, "atime", &scratch, &scratch)
                elif _key_is(base, rec, k, "ctime", 5):
                    _pax_time(vp, vlen, "ctime", &scratch, &scratch)
                elif _key_is(base, rec, k, "size", 4):
                    size_v = _decimal(vp, vlen, "size")
            records = self._records_fast(base, rec)
        elif self._pax is not None:
            pax = <dict>self._pax
            self._pax = None
            if self._pax_sparse and _is_pax_sparse(pax):
                label = PyUnicode_DecodeUTF8(<const char *>name_p, name_len, "surrogateescape")
                raise FormatError(f"tar: unsupported input tar entry {label!r} at {at} (PAX sparse file)")
            for key, value in pax.items():
                if not value:
                    continue  # an empty record keeps the header's value
                vp = <const unsigned char *>PyBytes_AS_STRING(value)
                vlen = PyBytes_GET_SIZE(value)
                if key == b"path":
                    name_p, name_len, name_owner = vp, vlen, value
                elif key == b"linkpath":
                    link_p, link_len, link_owner = vp, vlen, value
                elif key == b"uname":
                    uname_p, uname_len, pax_owner = vp, vlen, pax
                elif key == b"gname":
                    gname_p, gname_len, pax_owner = vp, vlen, pax
                elif key == b"uid":
                    uid_v = _decimal(vp, vlen, "uid")
                elif key == b"gid":
                    gid_v = _decimal(vp, vlen, "gid")
                elif key == b"mtime":
                    _pax_time(vp, vlen, "mtime", &mtime_s, &mtime_ns)
                elif key == b"atime" or key == b"ctime":
                    _pax_time(vp, vlen, key.decode(), &scratch, &scratch)
                elif key == b"size":
                    size_v = _decimal(vp, vlen, "size")
            records = self._records(pax)
        if self._long_name is not None:
            if self._long_name:
                name_owner = self._long_name
                name_p = <const unsigned char *>PyBytes_AS_STRING(name_owner)
                name_len = PyBytes_GET_SIZE(name_owner)
            self._long_name = None
        if self._long_link is not None:
            if self._long_link:
                link_owner = self._long_link
                link_p = <const unsigned char *>PyBytes_AS_STRING(link_owner)
                link_len = PyBytes_GET_SIZE(link_owner)
            self._long_link = None
        if typeflag == 0:
            typeflag = 53 if name_len and name_p[name_len - 1] == 47 else 48
        data_size = size_v if typeflag == 48 else 0
        if data_size < 0:
            raise _HeaderError(f"negative size {size_v}")

        if mtime_s != self._last_sec or mtime_ns != self._last_nsec or self._last_time is None:
            self._last_time = _format_time(mtime_s, mtime_ns)
            self._last_sec = mtime_s
            self._last_nsec = mtime_ns
        name = PyUnicode_DecodeUTF8(<const char *>name_p, name_len, "surrogateescape")
        link = PyUnicode_DecodeUTF8(<const char *>link_p, link_len, "surrogateescape")
        if not _same(self._last_uname_b, uname_p, uname_len):
            self._last_uname_b = PyBytes_FromStringAndSize(<const char *>uname_p, uname_len)
            self._last_uname = PyUnicode_DecodeUTF8(<const char *>uname_p, uname_len, "surrogateescape")
        if not _same(self._last_gname_b, gname_p, gname_len):
            self._last_gname_b = PyBytes_FromStringAndSize(<const char *>gname_p, gname_len)
            self._last_gname = PyUnicode_DecodeUTF8(<const char *>gname_p, gname_len, "surrogateescape")
        self._entries.append(
            _make_entry(
                name,
                _TYPE_NAMES[typeflag - 48],
                self._pos,
                size_v,
                link,
                mode_v,
                uid_v & 0xFFFFFFFF,
                gid_v & 0xFFFFFFFF,
                self._last_uname,
                self._last_gname,
                self._last_time,
                dmaj,
                dmin,
                records,
            )
        )
        self._skip = data_size + (-data_size & (BLOCK - 1))
        return 0

    cdef tuple _records_fast(self, const unsigned char *base, PaxRecords *rec):
        """:meth:`_records` of records described by ``rec`` (positions into ``base``)."""
        cdef Py_ssize_t order[MAX_FAST_RECORDS]
        cdef Py_ssize_t i, j, k, n = rec.n
        for i in range(n):  # insertion sort by key bytes (shorter first on a common prefix)
            k = order[i] = i
            j = i
            while j > 0 and _key_less(base, rec, k, order[j - 1]):
                order[j] = order[j - 1]
                j -= 1
            order[j] = k
        out = PyTuple_New(n)
        for i in range(n):
            k = order[i]
            pair = (
                self._key_text(base + rec.key[k], rec.key_len[k]),
                PyBytes_FromStringAndSize(<const char *>(base + rec.val[k]), rec.val_len[k]),
            )
            PyObject_GC_UnTrack(<PyObject *>pair)  # holds a str and a bytes
            Py_INCREF(pair)
            PyTuple_SET_ITEM(out, i, pair)
        PyObject_GC_UnTrack(<PyObject *>out)  # holds untracked pairs only
        return out

    cdef str _key_text(self, const unsigned char *p, Py_ssize_t n):
        """The text of a PAX key, shared between entries (a layer uses a handful of keys)."""
        for known, text in self._key_texts:
            if _same(known, p, n):
                return text
        text = PyUnicode_DecodeUTF8(<const char *>p, n, "surrogateescape")
        if len(self._key_texts) < 16:
            self._key_texts.append((PyBytes_FromStringAndSize(<const char *>p, n), text))
        return text

    cdef tuple _records(self, dict pax):
        """Every record as ``(key text, value bytes)``, sorted by key bytes (Go's sort.Strings)."""
        cdef dict cache = self._key_cache
        out = []
        for key in sorted(pax):
            text = cache.get(key)
            if text is None:
                text = (<bytes>key).decode(_ENC, _ESC)
                if len(cache) < 4096:
                    cache[key] = text
            pair = (text, pax[key])
            PyObject_GC_UnTrack(<PyObject *>pair)  # holds a str and a bytes
            out.append(pair)
        result = tuple(out)
        PyObject_GC_UnTrack(<PyObject *>result)  # holds untracked pairs only
        return result

    cdef int _grow(self, Py_ssize_t size) except -1:
        cdef unsigned char *p = <unsigned char *>realloc(self._ext, size)
        if p == NULL:
            raise MemoryError()
        self._ext = p
        self._ext_cap = size
        return 0

    cdef int _special_done(self) except -1:
        """An extension's data is complete: remember what it says for the next entry."""
        cdef int kind = self._special
        cdef Py_ssize_t n = self._ext_len
        self._special = 0
        self._ext_len = 0
        self._skip = self._special_pad
        if kind == 120:
            self._pax = self._pax_data = None
            if _parse_pax_fast(self._ext, n, &self._pax_fast) == 0:
                self._pax_data = PyBytes_FromStringAndSize(<const char *>self._ext, n)
                return 0
            try:
                self._pax_sparse = False
                self._pax = _parse_pax(self._ext, n, &self._pax_sparse)
            except _HeaderError as exc:
                raise FormatError(f"tar: invalid PAX header ending at {self._pos}: {exc}") from None
        elif kind == 76:
            self._long_name = _cbytes(self._ext, n)
        else:
            self._long_link = _cbytes(self._ext, n)
        return 0
