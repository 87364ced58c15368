"""Minimal flatbuffers support: a builder whose bytes match the stock Go builder, and a checked reader.

Owns:

* :class:`Builder` -- writes a flatbuffer back to front exactly as the Go ``flatbuffers.Builder`` of
  release 25.12.19 does for the same call sequence (formats spec section 5.1): every ``Prep`` pads so the
  next element is aligned relative to the end of the buffer; the largest alignment ever requested is kept
  for the whole build and ``finish`` pads to it; strings are NUL-terminated; a vtable has its trailing
  zero entries trimmed and is replaced by a reference to an earlier vtable with the same entries (the
  object-size field is not compared, as in Go). Tables are written in one call (:meth:`Builder.table`)
  from a field signature, so their layout can be computed once per signature and alignment phase.
* :class:`Table` and :func:`root` -- a reader over ``bytes`` that checks every offset, vtable and length
  against the buffer and raises :class:`~soci_fs.errors.FormatError` naming the field, e.g.
  ``ztoc: toc.metadata[17].name: offset 123456 out of bounds``. Vector lengths are checked against the
  bytes that remain before anything is allocated.

Will not: know any schema (``ztoc.py`` and ``zinfo.py`` say which slot holds what), support structs,
unions, file identifiers or size prefixes, or grow past 2 GiB (the caller's inputs bound the size).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from soci_fs.errors import FormatError

#: struct codes accepted as field kinds in a table signature; ``o`` is an offset (uoffset_t) to an object
#: built earlier, whose value is passed as the builder offset returned when that object was made.
_WIDTH = {"b": 1, "B": 1, "h": 2, "H": 2, "i": 4, "I": 4, "q": 8, "Q": 8, "o": 4, "d": 8, "f": 4}

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U16 = struct.Struct("<H")
_ZEROS = tuple(bytes(n) for n in range(8))

#: A table signature: ``(slot, kind)`` pairs in the order the fields are added.
Signature = tuple[tuple[int, str], ...]


class _Plan:
    """The layout of one table for one signature and one alignment phase of the start offset.

    ``pack(soffset, base, values)`` returns the table's bytes; ``base`` is the builder offset at the start
    of the table minus ``phase``, ``values`` is indexed by slot.
    """

    __slots__ = ("maxalign", "objsize", "pack", "vt_bytes", "vt_key")

    def __init__(self, sig: Signature, phase: int) -> None:
        pos = phase  # offsets from the end of the buffer, relative to (start - phase)
        obj_end = pos
        pads: list[int] = []
        rel: dict[int, int] = {}
        maxalign = 4
        for slot, kind in sig:
            width = _WIDTH[kind]
            maxalign = max(maxalign, width)
            pad = -pos & (width - 1)
            pads.append(pad)
            pos += pad + width
            rel[slot] = pos
        soffset_pad = -pos & 3
        pos += soffset_pad + 4
        obj = pos
        entries = [0] * (max(rel) + 1 if rel else 0)
        for slot, at in rel.items():
            entries[slot] = obj - at
        # memory order, low address first: soffset, its padding, last field added, its padding, ...
        fmt = ["<i", f"{soffset_pad}x" if soffset_pad else ""]
        args = ["soffset"]
        for (slot, kind), pad in zip(reversed(sig), reversed(pads), strict=True):
            fmt.append("I" if kind == "o" else kind)
            if pad:
                fmt.append(f"{pad}x")
            # an offset field holds the distance from its own slot to the object it points at
            args.append(f"base + {rel[slot]} - v[{slot}]" if kind == "o" else f"v[{slot}]")
        packer = struct.Struct("".join(fmt)).pack
        # one generated function per layout: the only per-table work left is a single struct pack
        self.pack = eval(f"lambda soffset, base, v: pack({', '.join(args)})", {"pack": packer})
        self.objsize = obj - obj_end
        self.vt_key = tuple(entries)
        self.vt_bytes = 2 * (len(entries) + 2)
        self.maxalign = maxalign


class Builder:
    """Builds one flatbuffer back to front; offsets returned are measured from the end of the buffer.

    Call order matters for byte identity: make strings, vectors and child tables first, then the table
    that refers to them, then :meth:`finish`.
    """

    __slots__ = ("_minalign", "_off", "_pieces", "_plans", "_vtables")

    def __init__(self) -> None:
        self._pieces: list[bytes] = []  # in reverse memory order
        self._off = 0
        self._minalign = 1
        self._vtables: dict[tuple[int, ...], int] = {}
        self._plans: dict[tuple[Signature, int], _Plan] = {}

    @property
    def offset(self) -> int:
        """Bytes written so far (the builder offset of the object made last)."""
        return self._off

    def _prep(self, size: int, additional: int) -> None:
        if size > self._minalign:
            self._minalign = size
        pad = -(self._off + additional) & (size - 1)
        if pad:
            self._pieces.append(bytes(pad))
            self._off += pad

    def string(self, data: bytes) -> int:
        """``CreateString``: length, bytes, NUL, padded so the length is 4-aligned. Returns its offset."""
        n = len(data)
        pad = -(self._off + n + 1) & 3
        if self._minalign < 4:
            self._minalign = 4
        self._pieces.append(_U32.pack(n) + data + bytes(1 + pad))
        self._off += 5 + n + pad
        return self._off

    def strings(self, items: Sequence[bytes]) -> list[int]:
        """``CreateString`` for each item in order; their offsets."""
        off = self._off
        append = self._pieces.append
        pack = _U32.pack
        out = []
        for data in items:
            n = len(data)
            pad = -(off + n + 1) & 3
            append(pack(n) + data + _ZEROS[1 + pad])
            off += 5 + n + pad
            out.append(off)
        if items and self._minalign < 4:
            self._minalign = 4
        self._off = off
        return out

    def byte_vector(self, data: bytes) -> int:
        """``CreateByteVector``: length then the bytes, no terminator."""
        n = len(data)
        pad = -(self._off + n) & 3
        if self._minalign < 4:
            self._minalign = 4
        self._pieces.append(_U32.pack(n) + data + bytes(pad))
        self._off += 4 + n + pad
        return self._off

    def offset_vector(self, targets: Sequence[int]) -> int:
        """``StartVector(4, n, 4)``, prepend the offsets of ``targets`` from last to first, ``EndVector``.

        ``targets`` are in element order (element 0 first).
        """
        n = len(targets)
        if not n and not self._off & 3 and self._minalign >= 4:
            self._pieces.append(_ZEROS[4])  # the common empty vector: just its count
            self._off += 4
            return self._off
        self._prep(4, 4 * n)
        base = self._off + 4 * n  # offset of element 0's slot
        values = [base - 4 * i - t for i, t in enumerate(targets)]
        self._pieces.append(struct.pack(f"<{n + 1}I", n, *values))
        self._off = base + 4
        return self._off

    def table(self, sig: Signature, values: Sequence[Any]) -> int:
        """``StartObject``, add each field of ``sig`` in order, ``EndObject``; returns the table's offset.

        ``values[slot]`` is the value of field ``slot`` (slots not in ``sig`` are ignored). Fields equal to
        their schema default must be left out of ``sig`` by the caller (defaults are not forced). For kind
        ``o`` the value is the builder offset of an object made earlier.
        """
        off = self._off
        phase = off & 7
        plan = self._plans.get((sig, phase))
        if plan is None:
            plan = self._plans[(sig, phase)] = _Plan(sig, phase)
        if plan.maxalign > self._minalign:
            self._minalign = plan.maxalign
        base = off - phase
        obj = off + plan.objsize
        key = plan.vt_key
        vt = self._vtables.get(key)
        if vt is not None:
            self._pieces.append(plan.pack(vt - obj, base, values))
            self._off = obj
            return obj
        self._pieces.append(plan.pack(plan.vt_bytes, base, values))
        self._pieces.append(struct.pack(f"<{len(key) + 2}H", plan.vt_bytes, plan.objsize, *key))
        self._off = obj + plan.vt_bytes
        self._vtables[key] = self._off
        return obj

    def finish(self, root: int) -> bytes:
        """``Finish(root)`` without identifier: pad to the largest alignment seen, write the root offset."""
        self._prep(self._minalign, 4)
        self._prep(4, 0)
        self._pieces.append(_U32.pack(self._off + 4 - root))
        self._off += 4
        return b"".join(reversed(self._pieces))


# ---------------------------------------------------------------------------------------------- reading


def oob(path: str, offset: int) -> FormatError:
    """The error for an offset that points outside the buffer."""
    return FormatError(f"{path}: offset {offset} out of bounds")


class Table:
    """A table inside ``buf`` at ``pos`` whose vtable has been checked; ``path`` names it in errors."""

    __slots__ = ("buf", "nslots", "path", "pos", "vt")

    def __init__(self, buf: bytes, pos: int, path: str) -> None:
        size = len(buf)
        if pos < 0 or pos + 4 > size:
            raise oob(path, pos)
        vt = pos - _I32.unpack_from(buf, pos)[0]
        if vt < 0 or vt + 4 > size:
            raise FormatError(f"{path}: vtable offset {vt} out of bounds")
        vt_len = _U16.unpack_from(buf, vt)[0]
        if vt_len < 4 or vt + vt_len > size:
            raise FormatError(f"{path}: vtable at {vt} has bad length {vt_len}")
        self.buf = buf
        self.pos = pos
        self.vt = vt
        self.nslots = (vt_len - 4) // 2
        self.path = path

    def name(self, field: str) -> str:
        """How a field of this table is named in errors (``ztoc: toc.metadata[3].name``)."""
        return f"{self.path}.{field}" if ": " in self.path else f"{self.path}: {field}"

    def field(self, slot: int) -> int:
        """The field's offset from the table start, 0 when absent."""
        if slot >= self.nslots:
            return 0
        return _U16.unpack_from(self.buf, self.vt + 4 + 2 * slot)[0]

    def scalar(self, slot: int, fmt: struct.Struct, default: int, name: str) -> int:
        """A scalar field read with ``fmt`` (one value), or ``default`` when absent."""
        o = self.field(slot)
        if not o:
            return default
        at = self.pos + o
        if at + fmt.size > len(self.buf):
            raise oob(self.name(name), at)
        return fmt.unpack_from(self.buf, at)[0]

    def _target(self, slot: int, name: str) -> int | None:
        o = self.field(slot)
        if not o:
            return None
        at = self.pos + o
        buf = self.buf
        if at + 4 > len(buf):
            raise oob(self.name(name), at)
        target = at + _U32.unpack_from(buf, at)[0]
        if target + 4 > len(buf):
            raise oob(self.name(name), target)
        return target

    def bytes_(self, slot: int, name: str) -> bytes | None:
        """A string or ``[ubyte]`` field as bytes (``None`` when absent)."""
        target = self._target(slot, name)
        if target is None:
            return None
        n = _U32.unpack_from(self.buf, target)[0]
        end = target + 4 + n
        if end > len(self.buf):
            raise FormatError(f"{self.name(name)}: length {n} at offset {target} runs out of bounds")
        return self.buf[target + 4 : end]

    def table(self, slot: int, name: str) -> Table | None:
        """A child table (``None`` when absent)."""
        target = self._target(slot, name)
        if target is None:
            return None
        return Table(self.buf, target, self.name(name))

    def vector(self, slot: int, name: str, elem_size: int) -> tuple[int, int] | None:
        """``(first element position, count)`` of a vector field, the count checked against the buffer."""
        target = self._target(slot, name)
        if target is None:
            return None
        n = _U32.unpack_from(self.buf, target)[0]
        if target + 4 + n * elem_size > len(self.buf):
            raise FormatError(
                f"{self.name(name)}: vector of {n} elements at offset {target} does not fit the buffer"
            )
        return target + 4, n

    def offsets(self, slot: int, name: str) -> list[int]:
        """The targets of a vector of offsets (tables or strings); empty when absent."""
        vec = self.vector(slot, name, 4)
        if vec is None:
            return []
        start, n = vec
        buf = self.buf
        size = len(buf)
        out = [start + 4 * i + v for i, v in enumerate(struct.unpack_from(f"<{n}I", buf, start))]
        for i, t in enumerate(out):
            if t + 4 > size:
                raise oob(f"{self.name(name)}[{i}]", t)
        return out


def string_at(buf: bytes, target: int, path: str) -> bytes:
    """The bytes of the string (or byte vector) whose length word is at ``target``."""
    if target < 0 or target + 4 > len(buf):
        raise oob(path, target)
    n = _U32.unpack_from(buf, target)[0]
    end = target + 4 + n
    if end > len(buf):
        raise FormatError(f"{path}: length {n} at offset {target} runs out of bounds")
    return buf[target + 4 : end]


def root(buf: bytes, path: str) -> Table:
    """The root table of a finished buffer without identifier or size prefix."""
    if len(buf) < 8:
        raise FormatError(f"{path}: buffer of {len(buf)} bytes is too short for a flatbuffer")
    return Table(buf, _U32.unpack_from(buf, 0)[0], path)
