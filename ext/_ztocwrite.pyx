# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled zTOC writer: the flatbuffer of a ``Ztoc``, byte-identical to ``soci_fs.ztoc``'s Python writer.

Emulates the Go flatbuffers ``Builder`` (release 25.12.19, formats spec 5.1) on one C buffer filled back to
front: ``Prep`` padding relative to the end of the buffer, the largest alignment kept for ``Finish``,
NUL-terminated strings, vtables with trailing zeros trimmed and de-duplicated against every vtable written
before. The call sequence is the one of ``soci_fs.ztoc`` (entries last to first, PAX records sorted by key
bytes, defaults not written, gzip left out as the default algorithm).

Only the common, valid case is handled here: when a value is not what the writer expects (text that is not
``str``, numbers that are not ``int`` or do not fit their field, PAX values that are not ``bytes``, keys out of
order), :func:`serialize_or_none` returns ``None`` and ``soci_fs.ztoc.serialize`` runs its Python writer,
which then produces the bytes or raises its usual exceptions. So both paths return the same bytes and raise
the same errors. Import it only through ``soci_fs.ztoc`` (``SOCI_PUREPYTHON=1`` keeps the Python writer).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport PyLong_Check
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_Check
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset

import types

__all__ = ["serialize_or_none"]


cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)
    void *PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    long long PyLong_AsLongLongAndOverflow(object o, int *overflow) except? -1


cdef enum:
    MAX_SLOTS = 16
    VT_HASH = 4096  # open-addressing table of vtable ids (a zTOC has a few hundred distinct vtables)
    GZIP = 1


cdef uint64_t FNV_OFFSET = 0xCBF29CE484222325ULL
cdef uint64_t FNV_PRIME = 0x100000001B3ULL


class _Unsupported(Exception):
    """A value the compiled writer leaves to the Python writer."""


# ------------------------------------------------------------------------------------------- builder


cdef class _Builder:
    """A flatbuffer written back to front: bytes live in ``buf[cap - off : cap]``."""

    cdef unsigned char *buf
    cdef Py_ssize_t cap
    cdef Py_ssize_t off
    cdef Py_ssize_t minalign
    # the table being built
    cdef Py_ssize_t obj_end
    cdef Py_ssize_t field_at[MAX_SLOTS]
    cdef int nslots
    # vtables written so far: entries pooled as (count, e0, e1, ...); hash -> index + 1
    cdef uint16_t *vt_pool
    cdef Py_ssize_t vt_pool_len, vt_pool_cap
    cdef Py_ssize_t *vt_start  # index into vt_pool of each vtable
    cdef Py_ssize_t *vt_offset  # builder offset of each vtable
    cdef Py_ssize_t vt_count, vt_cap
    cdef Py_ssize_t vt_hash[VT_HASH]

    def __cinit__(self, Py_ssize_t size_hint):
        self.cap = max(size_hint, 1024)
        self.buf = <unsigned char *>malloc(self.cap)
        self.vt_pool_cap = 4096
        self.vt_pool = <uint16_t *>malloc(self.vt_pool_cap * sizeof(uint16_t))
        self.vt_cap = 256
        self.vt_start = <Py_ssize_t *>malloc(self.vt_cap * sizeof(Py_ssize_t))
        self.vt_offset = <Py_ssize_t *>malloc(self.vt_cap * sizeof(Py_ssize_t))
        if not self.buf or not self.vt_pool or not self.vt_start or not self.vt_offset:
            raise MemoryError()
        self.off = 0
        self.minalign = 1
        self.vt_pool_len = 0
        self.vt_count = 0
        memset(self.vt_hash, 0, sizeof(self.vt_hash))

    def __dealloc__(self):
        free(self.buf)
        free(self.vt_pool)
        free(self.vt_start)
        free(self.vt_offset)

    cdef inline int ensure(self, Py_ssize_t n) except -1:
        """Room for ``n`` more bytes in front of the data."""
        if self.off + n <= self.cap:
            return 0
        return self.grow(n)

    cdef int grow(self, Py_ssize_t n) except -1:
        cdef Py_ssize_t new_cap
        cdef unsigned char *p
        new_cap = self.cap * 2
        while new_cap < self.off + n:
            new_cap *= 2
        p = <unsigned char *>malloc(new_cap)
        if p == NULL:
            raise MemoryError()
        memcpy(p + new_cap - self.off, self.buf + self.cap - self.off, self.off)
        free(self.buf)
        self.buf = p
        self.cap = new_cap
        return 0

    cdef inline unsigned char *front(self) noexcept:
        return self.buf + self.cap - self.off

    cdef inline int pad(self, Py_ssize_t n) except -1:
        self.ensure(n)
        self.off += n
        memset(self.front(), 0, n)
        return 0

    cdef inline int prep(self, Py_ssize_t size, Py_ssize_t additional) except -1:
        """Go ``Prep``: pad so that after ``additional`` bytes the next element is ``size``-aligned."""
        if size > self.minalign:
            self.minalign = size
        self.pad(-(self.off + additional) & (size - 1))
        return 0

    cdef inline void put_u32(self, uint32_t v) noexcept:
        self.off += 4
        cdef unsigned char *p = self.front()
        p[0] = v & 0xFF
        p[1] = (v >> 8) & 0xFF
        p[2] = (v >> 16) & 0xFF
        p[3] = (v >> 24) & 0xFF

    cdef inline void put_u64(self, uint64_t v) noexcept:
        self.off += 8
        cdef unsigned char *p = self.front()
        cdef int k
        for k in range(8):
            p[k] = v & 0xFF
            v >>= 8

    cdef Py_ssize_t string(self, const char *data, Py_ssize_t n) except -1:
        """``CreateString``: NUL-terminated, length-prefixed, 4-aligned. Returns its offset."""
        self.prep(4, n + 1)
        self.ensure(n + 5)
        self.off += 1
        self.front()[0] = 0
        self.off += n
        memcpy(self.front(), data, n)
        self.put_u32(<uint32_t>n)
        return self.off

    cdef Py_ssize_t text(self, object s) except -1:
        """A ``str`` field written as UTF-8 with surrogateescape (ASCII text without a copy)."""
        if not PyUnicode_Check(s):
            raise _Unsupported()
        if PyUnicode_IS_ASCII(s):
            return self.string(<const char *>PyUnicode_DATA(s), PyUnicode_GET_LENGTH(s))
        raw = (<str>s).encode("utf-8", "surrogateescape")
        return self.string(PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))

    cdef Py_ssize_t byte_vector(self, bytes data) except -1:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        self.prep(4, n)
        self.ensure(n + 4)
        self.off += n
        memcpy(self.front(), PyBytes_AS_STRING(data), n)
        self.put_u32(<uint32_t>n)
        return self.off

    cdef Py_ssize_t offset_vector(self, Py_ssize_t *targets, Py_ssize_t n) except -1:
        """``StartVector(4, n, 4)``, the offsets of ``targets`` (element order) prepended last to first."""
        cdef Py_ssize_t i
        self.prep(4, 4 * n)
        self.ensure(4 * n + 4)
        for i in range(n - 1, -1, -1):
            self.put_u32(<uint32_t>(self.off + 4 - targets[i]))
        self.put_u32(<uint32_t>n)
        return self.off

    cdef inline void start(self, int nslots) noexcept:
        self.obj_end = self.off
        self.nslots = nslots
        memset(self.field_at, 0, sizeof(self.field_at))

    cdef inline int add_offset(self, int slot, Py_ssize_t target) except -1:
        self.prep(4, 0)
        self.ensure(4)
        self.put_u32(<uint32_t>(self.off + 4 - target))
        self.field_at[slot] = self.off
        return 0

    cdef inline int add_i64(self, int slot, int64_t v) except -1:
        self.prep(8, 0)
        self.ensure(8)
        self.put_u64(<uint64_t>v)
        self.field_at[slot] = self.off
        return 0

    cdef inline int add_u32(self, int slot, uint32_t v) except -1:
        self.prep(4, 0)
        self.ensure(4)
        self.put_u32(v)
        self.field_at[slot] = self.off
        return 0

    cdef inline int add_i8(self, int slot, int v) except -1:
        self.prep(1, 0)
        self.ensure(1)
        self.off += 1
        self.front()[0] = <unsigned char>(v & 0xFF)
        self.field_at[slot] = self.off
        return 0

    cdef Py_ssize_t end(self) except -1:
        """``EndObject``: the soffset, then a new vtable or a reference to an identical earlier one."""
        cdef uint16_t entries[MAX_SLOTS]
        cdef Py_ssize_t obj, n = 0, i, h, idx, vt
        cdef uint64_t hv = FNV_OFFSET
        cdef unsigned char *p
        self.prep(4, 0)
        self.ensure(4)
        self.put_u32(0)
        obj = self.off
        for i in range(self.nslots):
            entries[i] = <uint16_t>(obj - self.field_at[i]) if self.field_at[i] else 0
            if entries[i]:
                n = i + 1
        for i in range(n):
            hv = (hv ^ entries[i]) * FNV_PRIME
        hv = (hv ^ <uint64_t>n) * FNV_PRIME
        h = <Py_ssize_t>(hv & (VT_HASH - 1))
        while True:
            idx = self.vt_hash[h]
            if idx == 0:
                break
            idx -= 1
            if self.vt_pool[self.vt_start[idx]] == n and memcmp(
                self.vt_pool + self.vt_start[idx] + 1, entries, n * sizeof(uint16_t)
            ) == 0:
                vt = self.vt_offset[idx]
                self._put_soffset(obj, <int64_t>vt - <int64_t>obj)
                return obj
            h = (h + 1) & (VT_HASH - 1)
        # a new vtable: uint16 [vtable bytes, object size, entries...], right in front of the object
        self.ensure(2 * (n + 2))
        for i in range(n - 1, -1, -1):
            self._put_u16(entries[i])
        self._put_u16(<uint16_t>(obj - self.obj_end))
        self._put_u16(<uint16_t>(2 * (n + 2)))
        self._put_soffset(obj, <int64_t>(self.off - obj))
        self._remember(entries, n, h)
        return obj

    cdef inline void _put_u16(self, uint16_t v) noexcept:
        self.off += 2
        cdef unsigned char *p = self.front()
        p[0] = v & 0xFF
        p[1] = v >> 8

    cdef inline void _put_soffset(self, Py_ssize_t obj, int64_t v) noexcept:
        cdef unsigned char *p = self.buf + self.cap - obj
        cdef uint32_t u = <uint32_t>v
        p[0] = u & 0xFF
        p[1] = (u >> 8) & 0xFF
        p[2] = (u >> 16) & 0xFF
        p[3] = (u >> 24) & 0xFF

    cdef int _remember(self, uint16_t *entries, Py_ssize_t n, Py_ssize_t h) except -1:
        if self.vt_count >= VT_HASH // 2:
            raise _Unsupported()  # never with a zTOC (a few hundred layouts at most)
        if self.vt_count == self.vt_cap:
            self.vt_cap *= 2
            self.vt_start = <Py_ssize_t *>realloc(self.vt_start, self.vt_cap * sizeof(Py_ssize_t))
            self.vt_offset = <Py_ssize_t *>realloc(self.vt_offset, self.vt_cap * sizeof(Py_ssize_t))
            if not self.vt_start or not self.vt_offset:
                raise MemoryError()
        if self.vt_pool_len + n + 1 > self.vt_pool_cap:
            self.vt_pool_cap = 2 * (self.vt_pool_cap + n + 1)
            self.vt_pool = <uint16_t *>realloc(self.vt_pool, self.vt_pool_cap * sizeof(uint16_t))
            if not self.vt_pool:
                raise MemoryError()
        self.vt_start[self.vt_count] = self.vt_pool_len
        self.vt_pool[self.vt_pool_len] = <uint16_t>n
        memcpy(self.vt_pool + self.vt_pool_len + 1, entries, n * sizeof(uint16_t))
        self.vt_pool_len += n + 1
        self.vt_offset[self.vt_count] = self.off
        self.vt_count += 1
        self.vt_hash[h] = self.vt_count
        return 0

    cdef bytes finish(self, Py_ssize_t root):
        """``Finish(root)`` without identifier."""
        self.prep(self.minalign, 4)
        self.prep(4, 0)
        self.ensure(4)
        self.put_u32(<uint32_t>(self.off + 4 - root))
        return PyBytes_FromStringAndSize(<const char *>self.front(), self.off)



# ------------------------------------------------------------------------------------------- values


cdef inline int64_t _i64(object v) except? -1:
    cdef int overflow = 0
    cdef long long x
    if not PyLong_Check(v):
        raise _Unsupported()
    x = PyLong_AsLongLongAndOverflow(v, &overflow)
    if overflow:
        raise _Unsupported()
    return x


cdef inline int64_t _ranged(object v, int64_t lo, int64_t hi) except? -1:
    """An int in [lo, hi)."""
    cdef int64_t x = _i64(v)
    if x < lo or x >= hi:
        raise _Unsupported()
    return x


cdef Py_ssize_t _xattrs(_Builder b, object pax, Py_ssize_t *scratch, Py_ssize_t cap) except -1:
    """The Xattr tables of one entry and their vector; the vector's offset.

    The records must already be in strictly ascending key-byte order (the scanner and the parser keep them
    so); otherwise the Python writer, which sorts, takes over.
    """
    cdef Py_ssize_t n, i, key_off, val_off, klen, plen = 0, m
    cdef const char *kp
    cdef const char *pp = NULL
    cdef tuple records
    cdef int c
    if type(pax) is not tuple:
        raise _Unsupported()
    records = <tuple>pax
    n = len(records)
    if n > cap:
        raise _Unsupported()
    prev = None
    for i in range(n):
        rec = records[i]
        if type(rec) is not tuple or len(<tuple>rec) != 2:
            raise _Unsupported()
        key, value = <tuple>rec
        if not PyBytes_CheckExact(value) or not PyUnicode_Check(key):
            raise _Unsupported()
        if PyUnicode_IS_ASCII(key):
            holder = key
            kp = <const char *>PyUnicode_DATA(key)
            klen = PyUnicode_GET_LENGTH(key)
        else:
            holder = (<str>key).encode("utf-8", "surrogateescape")
            kp = PyBytes_AS_STRING(holder)
            klen = PyBytes_GET_SIZE(holder)
        if i:
            m = klen if klen < plen else plen
            c = memcmp(pp, kp, m)
            if c > 0 or (c == 0 and plen >= klen):
                raise _Unsupported()
        key_off = b.string(kp, klen)
        val_off = b.string(PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value))
        b.start(2)
        b.add_offset(0, key_off)
        b.add_offset(1, val_off)
        scratch[i] = b.end()
        prev = holder  # keeps pp alive
        pp = kp
        plen = klen
    return b.offset_vector(scratch, n)


cdef enum:
    MAX_RECORDS = 256
    N_FIELDS = 14

# FileMetadata's fields are plain object slots: when every descriptor checks out, entries of exactly that
# class are read through the slot offsets instead of 14 attribute lookups each.
cdef Py_ssize_t _fm_offsets[N_FIELDS]
cdef object _fm_class = None  # the class whose slots _fm_offsets describes (None: look up by name)
cdef bint _fm_checked = False
_FM_ORDER = (
    "name", "type", "uncompressed_offset", "uncompressed_size", "linkname", "mode", "uid", "gid", "uname",
    "gname", "mod_time", "devmajor", "devminor", "pax",
)


cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        const char *name
        int type
        Py_ssize_t offset
        int flags
    ctypedef struct PyMemberDescrObject:
        PyMemberDef *d_member


cdef void _fm_init():
    global _fm_class, _fm_checked
    cdef int k
    cdef Py_ssize_t offsets[N_FIELDS]
    _fm_checked = True
    from soci_fs.ztoc import FileMetadata  # here: soci_fs.ztoc imports this module while it loads

    if tuple(getattr(FileMetadata, "__dataclass_fields__", ())) != _FM_ORDER:
        return
    for k in range(N_FIELDS):
        attr = FileMetadata.__dict__.get(_FM_ORDER[k])
        if type(attr) is not types.MemberDescriptorType:
            return
        if (<PyMemberDescrObject *>attr).d_member.type != 16:  # T_OBJECT_EX: NULL reads raise
            return
        offsets[k] = (<PyMemberDescrObject *>attr).d_member.offset
    for k in range(N_FIELDS):
        _fm_offsets[k] = offsets[k]
    _fm_class = FileMetadata


cdef inline object _slot(object f, int k):
    cdef PyObject *v = (<PyObject **>((<char *>(<PyObject *>f)) + _fm_offsets[k]))[0]
    if v == NULL:
        raise AttributeError(_FM_ORDER[k])
    return <object>v


cdef class _Fields:
    """The 14 field values of an entry that is not exactly a FileMetadata (read by name)."""

    cdef tuple values

    def __cinit__(self, tuple values):
        self.values = values


cdef inline object _slot_or(object f, int k):
    if type(f) is _Fields:
        return (<_Fields>f).values[k]
    return _slot(f, k)


def _debug_serialize(z):
    """Test hook: the compiled writer with its internal exceptions visible."""
    return _serialize(z)


def serialize_or_none(z):
    """The zTOC flatbuffer of ``z``, or ``None`` when a value needs the Python writer (see the module doc)."""
    try:
        return _serialize(z)
    except (_Unsupported, UnicodeEncodeError, AttributeError, TypeError, ValueError, OverflowError):
        return None


cdef bytes _serialize(z):
    cdef _Builder b
    cdef Py_ssize_t version, tool, i, n, name, kind, link, uname, gname, mtime, xattrs, toc, vec
    cdef Py_ssize_t checkpoints, digests, compression, root
    cdef Py_ssize_t *entries
    cdef Py_ssize_t scratch[MAX_RECORDS]
    cdef int64_t uoff, usize, mode, dmaj, dmin, csize, usize_all
    cdef int64_t uid, gid, algorithm, max_span_id
    cdef tuple files = z.files
    if type(files) is not tuple:
        raise _Unsupported()
    n = len(files)
    ci = z.compression
    cp = ci.checkpoints
    if not PyBytes_CheckExact(cp):
        cp = bytes(cp)
    b = _Builder(n * 192 + PyBytes_GET_SIZE(cp) + 4096)
    version = b.text(z.version)
    tool = b.text(z.build_tool_identifier)
    entries = <Py_ssize_t *>malloc((n + 1) * sizeof(Py_ssize_t))
    if entries == NULL:
        raise MemoryError()
    try:
        if not _fm_checked:
            _fm_init()
        for i in range(n - 1, -1, -1):
            f = files[i]
            if type(f) is not _fm_class:
                fields = (
                    f.name, f.type, f.uncompressed_offset, f.uncompressed_size, f.linkname, f.mode, f.uid,
                    f.gid, f.uname, f.gname, f.mod_time, f.devmajor, f.devminor, f.pax,
                )
                f = _Fields(fields)
            name = b.text(_slot_or(f, 0))
            kind = b.text(_slot_or(f, 1))
            link = b.text(_slot_or(f, 4))
            uname = b.text(_slot_or(f, 8))
            gname = b.text(_slot_or(f, 9))
            mtime = b.text(_slot_or(f, 10))
            xattrs = _xattrs(b, _slot_or(f, 13), scratch, MAX_RECORDS)
            uoff = _i64(_slot_or(f, 2))
            usize = _i64(_slot_or(f, 3))
            mode = _i64(_slot_or(f, 5))
            uid = _ranged(_slot_or(f, 6), 0, <int64_t>1 << 32)
            gid = _ranged(_slot_or(f, 7), 0, <int64_t>1 << 32)
            dmaj = _i64(_slot_or(f, 11))
            dmin = _i64(_slot_or(f, 12))
            b.start(14)
            b.add_offset(0, name)
            b.add_offset(1, kind)
            if uoff:
                b.add_i64(2, uoff)
            if usize:
                b.add_i64(3, usize)
            b.add_offset(4, link)
            if mode:
                b.add_i64(5, mode)
            if uid:
                b.add_u32(6, <uint32_t>uid)
            if gid:
                b.add_u32(7, <uint32_t>gid)
            b.add_offset(8, uname)
            b.add_offset(9, gname)
            b.add_offset(10, mtime)
            if dmaj:
                b.add_i64(11, dmaj)
            if dmin:
                b.add_i64(12, dmin)
            b.add_offset(13, xattrs)
            entries[i] = b.end()
        vec = b.offset_vector(entries, n)
    finally:
        free(entries)
    b.start(1)
    b.add_offset(0, vec)
    toc = b.end()

    algorithm = _ranged(ci.algorithm, -128, 128)
    max_span_id = _ranged(ci.max_span_id, -(<int64_t>1 << 31), <int64_t>1 << 31)
    checkpoints = b.byte_vector(cp)
    span_digests = ci.span_digests
    if type(span_digests) is not tuple:
        span_digests = tuple(span_digests)
    n = len(span_digests)
    entries = <Py_ssize_t *>malloc((n + 1) * sizeof(Py_ssize_t))
    if entries == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            entries[i] = b.text(span_digests[i])
        digests = b.offset_vector(entries, n)
    finally:
        free(entries)
    b.start(4)
    if max_span_id != 0:
        b.add_u32(1, <uint32_t>max_span_id)
    b.add_offset(2, digests)
    b.add_offset(3, checkpoints)
    if algorithm != GZIP:
        b.add_i8(0, <int>algorithm)
    compression = b.end()

    csize = _i64(z.compressed_archive_size)
    usize_all = _i64(z.uncompressed_archive_size)
    b.start(6)
    b.add_offset(0, version)
    b.add_offset(1, tool)
    b.add_offset(4, toc)
    if csize:
        b.add_i64(2, csize)
    if usize_all:
        b.add_i64(3, usize_all)
    b.add_offset(5, compression)
    root = b.end()
    return b.finish(root)
