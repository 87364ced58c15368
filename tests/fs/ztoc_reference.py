"""Reference zTOC bytes made with the stock ``flatbuffers`` package, following formats spec 5.1 call by call.

Test helper only: it is the oracle the byte-identity tests compare :func:`soci_fs.ztoc.serialize` against.
"""

from __future__ import annotations

import flatbuffers

from soci_fs.ztoc import Ztoc


def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def reference_bytes(z: Ztoc) -> bytes:
    """The zTOC built with ``flatbuffers.Builder`` (25.12.19) in upstream's call order."""
    b = flatbuffers.Builder(0)
    version = b.CreateString(_b(z.version))
    build_tool = b.CreateString(_b(z.build_tool_identifier))
    offsets = []
    for f in reversed(z.files):
        name = b.CreateString(_b(f.name))
        type_ = b.CreateString(_b(f.type))
        linkname = b.CreateString(_b(f.linkname))
        uname = b.CreateString(_b(f.uname))
        gname = b.CreateString(_b(f.gname))
        mod_time = b.CreateString(_b(f.mod_time))
        xattrs = []
        for key, value in sorted(f.pax, key=lambda kv: _b(kv[0])):
            k = b.CreateString(_b(key))
            v = b.CreateString(bytes(value))
            b.StartObject(2)
            b.PrependUOffsetTRelativeSlot(0, k, 0)
            b.PrependUOffsetTRelativeSlot(1, v, 0)
            xattrs.append(b.EndObject())
        b.StartVector(4, len(xattrs), 4)
        for x in reversed(xattrs):
            b.PrependUOffsetTRelative(x)
        xvec = b.EndVector()
        b.StartObject(14)
        b.PrependUOffsetTRelativeSlot(0, name, 0)
        b.PrependUOffsetTRelativeSlot(1, type_, 0)
        b.PrependInt64Slot(2, f.uncompressed_offset, 0)
        b.PrependInt64Slot(3, f.uncompressed_size, 0)
        b.PrependUOffsetTRelativeSlot(4, linkname, 0)
        b.PrependInt64Slot(5, f.mode, 0)
        b.PrependUint32Slot(6, f.uid, 0)
        b.PrependUint32Slot(7, f.gid, 0)
        b.PrependUOffsetTRelativeSlot(8, uname, 0)
        b.PrependUOffsetTRelativeSlot(9, gname, 0)
        b.PrependUOffsetTRelativeSlot(10, mod_time, 0)
        b.PrependInt64Slot(11, f.devmajor, 0)
        b.PrependInt64Slot(12, f.devminor, 0)
        b.PrependUOffsetTRelativeSlot(13, xvec, 0)
        offsets.append(b.EndObject())
    offsets.reverse()
    b.StartVector(4, len(offsets), 4)
    for o in reversed(offsets):
        b.PrependUOffsetTRelative(o)
    metadata = b.EndVector()
    b.StartObject(1)
    b.PrependUOffsetTRelativeSlot(0, metadata, 0)
    toc = b.EndObject()

    ci = z.compression
    checkpoints = b.CreateByteVector(bytes(ci.checkpoints))
    digests = [b.CreateString(_b(d)) for d in ci.span_digests]
    b.StartVector(4, len(digests), 4)
    for d in reversed(digests):
        b.PrependUOffsetTRelative(d)
    digest_vec = b.EndVector()
    b.StartObject(4)
    b.PrependInt32Slot(1, ci.max_span_id, 0)
    b.PrependUOffsetTRelativeSlot(2, digest_vec, 0)
    b.PrependUOffsetTRelativeSlot(3, checkpoints, 0)
    b.PrependInt8Slot(0, ci.algorithm, 1)
    compression = b.EndObject()

    b.StartObject(6)
    b.PrependUOffsetTRelativeSlot(0, version, 0)
    b.PrependUOffsetTRelativeSlot(1, build_tool, 0)
    b.PrependUOffsetTRelativeSlot(4, toc, 0)
    b.PrependInt64Slot(2, z.compressed_archive_size, 0)
    b.PrependInt64Slot(3, z.uncompressed_archive_size, 0)
    b.PrependUOffsetTRelativeSlot(5, compression, 0)
    b.Finish(b.EndObject())
    return bytes(b.Output())
