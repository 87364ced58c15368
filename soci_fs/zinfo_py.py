"""Pure-Python twin of ``ext/_zinfo.pyx``: the streaming gzip indexer and the one-span extractor.

Owns the same two functions as the compiled module, ``index_gzip`` and ``extract_span``, with the same
results byte for byte and the same errors. Python's ``zlib`` module cannot stop at deflate block boundaries
or prime bits, so this drives the system libz (``libz.so.1``) through ``ctypes``; ctypes releases the GIL
around each foreign call, as the compiled module does around inflate. It does no I/O of its own.

Import it through ``soci_fs.zinfo``, which picks the compiled module unless ``SOCI_PUREPYTHON=1``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from soci_fs.errors import FormatError, InvalidArgument

if TYPE_CHECKING:
    from soci_fs.zinfo import Checkpoint, IndexResult

WINSIZE = 32768
OUT_CHUNK = 1 << 20  # uncompressed bytes handed to the sink at a time (the last piece may be shorter)
SKIP_CHUNK = 1 << 17  # scratch buffer for output that extract_span discards
MAX_FEED = 1 << 30  # at most this much input or output per inflate call (32-bit counters)
IN_CHUNK = 65536  # read size; the checkpoints do not depend on it (inflate stops at every block boundary)

GZIP_AUTO_WBITS = 47  # 32 (gzip/zlib header auto-detect) + 15
RAW_WBITS = -15
GZIP_MAGIC0 = 0x1F  # first byte of a gzip member; never the first byte of a zlib header (CM would be 15)

Z_OK = 0
Z_STREAM_END = 1
Z_MEM_ERROR = -4
Z_BUF_ERROR = -5
Z_NO_FLUSH = 0
Z_BLOCK = 5

_CP_HEAD = struct.Struct("<qqB")
_TRAILER = struct.Struct("<II")
_HEADER = struct.Struct("<iq")


class _ZStream(ctypes.Structure):
    """``z_stream`` of zlib.h (LP64 layout)."""

    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


def _load_libz() -> ctypes.CDLL:
    for name in ("libz.so.1", ctypes.util.find_library("z")):
        if not name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise ImportError("soci_fs.zinfo_py needs the zlib shared library (libz.so.1)")


_libz = _load_libz()
_P = ctypes.POINTER(_ZStream)
_libz.zlibVersion.restype = ctypes.c_char_p
_libz.zlibVersion.argtypes = []
_libz.inflateInit2_.argtypes = [_P, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_libz.inflateInit2_.restype = ctypes.c_int
_libz.inflate.argtypes = [_P, ctypes.c_int]
_libz.inflate.restype = ctypes.c_int
_libz.inflateEnd.argtypes = [_P]
_libz.inflateEnd.restype = ctypes.c_int
_libz.inflateReset2.argtypes = [_P, ctypes.c_int]
_libz.inflateReset2.restype = ctypes.c_int
_libz.inflatePrime.argtypes = [_P, ctypes.c_int, ctypes.c_int]
_libz.inflatePrime.restype = ctypes.c_int
_libz.inflateSetDictionary.argtypes = [_P, ctypes.c_char_p, ctypes.c_uint]
_libz.inflateSetDictionary.restype = ctypes.c_int
_libz.inflateValidate.argtypes = [_P, ctypes.c_int]
_libz.inflateValidate.restype = ctypes.c_int
_ZLIB_VERSION = _libz.zlibVersion()
_inflate = _libz.inflate


def _address(data: bytes) -> int:
    """Address of a bytes object's buffer (no copy; the caller keeps ``data`` alive)."""
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0


def _zmsg(strm: _ZStream, ret: int) -> str:
    if strm.msg:
        return strm.msg.decode("utf-8", "replace")
    return f"zlib error {ret}"


def _new_stream(wbits: int) -> tuple[_ZStream, ctypes._Pointer[_ZStream]]:
    strm = _ZStream()
    ptr = ctypes.pointer(strm)
    ret = _libz.inflateInit2_(ptr, wbits, _ZLIB_VERSION, ctypes.sizeof(_ZStream))
    if ret != Z_OK:
        raise MemoryError(f"inflateInit2 failed: {_zmsg(strm, ret)}")
    return strm, ptr


def index_gzip(
    read: Callable[[int], bytes],
    span_size: int,
    sink: Callable[[memoryview], None] | None = None,
) -> IndexResult:
    """Inflate a gzip stream once, recording checkpoints and span digests (see ``soci_fs.zinfo``).

    Integrity: zlib validates each member's header (including FHCRC) as usual; once a gzip member's header
    is parsed, zlib's own check is switched off (``inflateValidate(0)``: it still consumes the trailer) and
    the CRC-32 of the member's output is computed here, then compared, with ISIZE, against the trailer bytes
    zlib consumed. zlib-wrapped members keep zlib's Adler-32 check.
    """
    if not isinstance(span_size, int) or isinstance(span_size, bool) or span_size <= 0:
        raise InvalidArgument(f"span size must be a positive integer, got {span_size!r}")
    if span_size >= 1 << 63:
        raise InvalidArgument(f"span size {span_size} does not fit in int64")
    from soci_fs.zinfo import IndexResult, SpanHasher

    buf = ctypes.create_string_buffer(WINSIZE + OUT_CHUNK)  # WINSIZE of history (zeros), then output
    base = ctypes.addressof(buf)
    rawview = memoryview(buf)
    bufview = rawview.cast("B").toreadonly()  # the sink gets read-only views, as from the compiled module
    pos = 0  # fresh output after the history

    def flush() -> None:
        nonlocal pos
        if pos == 0:
            return
        if sink is not None:
            view = bufview[WINSIZE : WINSIZE + pos]
            try:
                sink(view)
            finally:
                try:
                    view.release()
                except BufferError:
                    pass
        ctypes.memmove(base, base + pos, WINSIZE)
        pos = 0

    totin = totout = last = 0
    chunk_start = 0  # absolute offset of chunk[0]
    hpos = 0  # compressed bytes before this offset are hashed (or belong to no span)
    chunk = b""
    chunk_view = memoryview(chunk)
    prev_last_byte = -1
    tail = bytes(8)  # the last 8 input bytes before chunk_start (a trailer may straddle reads)
    member_first = -1  # first byte of the current member, once seen
    member_start = 0  # compressed offset of the current member
    header_pending = True  # the current member's header is not parsed yet
    own_check = False  # the current member is gzip: its CRC-32 and ISIZE are checked here
    member_crc = member_len = 0
    input_eof = False
    member_done = False
    records: list[bytes] = []
    in_span = False
    hasher = SpanHasher()

    strm, ptr = _new_stream(GZIP_AUTO_WBITS)
    try:
        while True:
            if pos == OUT_CHUNK:
                flush()
            strm.next_out = base + WINSIZE + pos
            # Until the output passes last + span no block boundary can take a checkpoint, so inflate runs
            # without stopping at boundaries, capped so that it cannot run past that point. A member's header
            # is always inflated with Z_BLOCK, which stops right after it (no output, no checkpoint: the
            # output is short of last + span there) so that zlib's check can be switched off for the data.
            if 0 < totout < last + span_size and not header_pending:
                flush_mode = Z_NO_FLUSH
                strm.avail_out = min(OUT_CHUNK - pos, last + span_size - totout)
            else:
                flush_mode = Z_BLOCK
                strm.avail_out = OUT_CHUNK - pos
            if strm.avail_in == 0 and not input_eof:
                chunk_end = chunk_start + len(chunk)
                if in_span and hpos < chunk_end:
                    hasher.update(chunk_view[hpos - chunk_start :])
                    hpos = chunk_end
                if chunk:
                    prev_last_byte = chunk[-1]
                    tail = chunk[-8:] if len(chunk) >= 8 else (tail + chunk)[-8:]
                chunk_start = chunk_end
                data = read(IN_CHUNK)
                chunk = data if isinstance(data, bytes) else bytes(data)
                if len(chunk) > MAX_FEED:
                    raise InvalidArgument(
                        f"read() returned {len(chunk)} bytes at once; at most {MAX_FEED} allowed"
                    )
                chunk_view = memoryview(chunk)
                if not chunk:
                    input_eof = True
                else:
                    strm.next_in = _address(chunk)
                    strm.avail_in = len(chunk)
            if member_done:
                if strm.avail_in == 0 and input_eof:
                    break
                ret = _libz.inflateReset2(ptr, GZIP_AUTO_WBITS)
                if ret != Z_OK:
                    raise FormatError(
                        f"cannot restart inflate at compressed offset {totin}: {_zmsg(strm, ret)}"
                    )
                member_done = False

            if member_first < 0 and strm.avail_in > 0:
                member_first = chunk[totin - chunk_start]
            avail_in_before = strm.avail_in
            avail_out_before = strm.avail_out
            ret = _inflate(ptr, flush_mode)
            totin += avail_in_before - strm.avail_in
            produced = avail_out_before - strm.avail_out
            if own_check and produced:
                member_crc = zlib.crc32(bufview[WINSIZE + pos : WINSIZE + pos + produced], member_crc)
            totout += produced
            pos += produced
            member_len += produced

            if ret == Z_STREAM_END:
                member_done = True
                if own_check:
                    # zlib consumed exactly the member, trailer last; the trailer's bytes are the last 8
                    # consumed, in this chunk or (when it straddles reads) partly in ``tail``.
                    rel = totin - chunk_start
                    trailer = chunk[rel - 8 : rel] if rel >= 8 else tail[rel:] + chunk[:rel]
                    stored_crc, stored_len = _TRAILER.unpack(trailer)
                    if stored_crc != member_crc:
                        raise FormatError(
                            f"corrupt gzip stream at compressed offset {totin - 4}: incorrect data check "
                            f"(gzip member at compressed offset {member_start})"
                        )
                    if stored_len != member_len & 0xFFFFFFFF:
                        raise FormatError(
                            f"corrupt gzip stream at compressed offset {totin}: incorrect length check "
                            f"(gzip member at compressed offset {member_start})"
                        )
                # Any next member starts here; its header is inflated with Z_BLOCK (set before the reset,
                # since the flush mode is chosen at the top of the loop).
                member_start = totin
                member_first = -1
                header_pending = True
                own_check = False
            elif ret == Z_BUF_ERROR:
                # No progress was possible: the input is used up (avail_out is never 0 here).
                if input_eof:
                    raise FormatError(
                        f"truncated gzip stream: input ended at compressed offset {totin} "
                        f"before the end of the stream"
                    )
            elif ret == Z_MEM_ERROR:
                raise MemoryError("zlib ran out of memory")
            elif ret != Z_OK:
                raise FormatError(f"corrupt gzip stream at compressed offset {totin}: {_zmsg(strm, ret)}")

            dtype = strm.data_type
            if header_pending and dtype & 128:
                # The header is parsed (and checked by zlib). For a gzip member the data's CRC-32 and ISIZE
                # are checked here from now on; a zlib-wrapped member keeps zlib's Adler-32 check.
                header_pending = False
                if member_first == GZIP_MAGIC0:
                    _libz.inflateValidate(ptr, 0)
                    own_check = True
                    member_crc = member_len = 0
            if (dtype & 128) and not (dtype & 64) and (totout == 0 or totout - last > span_size):
                end = WINSIZE + pos
                records.append(
                    _CP_HEAD.pack(totin, totout, dtype & 7) + bufview[end - WINSIZE : end].tobytes()
                )
                last = totout
                # Close the running span at totin; the next one starts one byte earlier when bits != 0.
                if in_span:
                    if hpos < totin:
                        hasher.update(chunk_view[hpos - chunk_start : totin - chunk_start])
                    hasher.finish_span()
                hasher.start_span()
                in_span = True
                if dtype & 7:
                    rel = totin - 1 - chunk_start
                    if rel >= 0:
                        hasher.update(chunk_view[rel : rel + 1])
                    else:
                        hasher.update(memoryview(bytes((prev_last_byte,))))
                hpos = totin
        flush()
        if in_span:
            hasher.finish_span()
    finally:
        _libz.inflateEnd(ptr)
        bufview.release()
        rawview.release()
        digests = hasher.close()

    blob = _HEADER.pack(len(records), span_size) + b"".join(records)
    return IndexResult(
        checkpoints_blob=blob,
        span_digests=digests,
        compressed_size=chunk_start,
        uncompressed_size=totout,
    )


def extract_span(compressed: bytes | memoryview, checkpoint: Checkpoint, start: int, length: int) -> bytes:
    """Inflate ``length`` bytes starting ``start`` bytes after ``checkpoint`` (see ``soci_fs.zinfo``)."""
    if start < 0 or length < 0:
        raise InvalidArgument(
            f"span extract needs start >= 0 and length >= 0, got start={start} length={length}"
        )
    bits = checkpoint.bits
    window = checkpoint.window
    if not isinstance(window, bytes) or len(window) != WINSIZE:
        raise FormatError(f"checkpoint window must be {WINSIZE} bytes")
    if bits < 0 or bits > 7:
        raise FormatError(f"checkpoint bits must be 0..7, got {bits}")
    if length == 0:
        return b""

    src = compressed if isinstance(compressed, bytes) else memoryview(compressed).tobytes()
    total_in = n = len(src)
    p = _address(src)
    out = bytearray(length)
    out_addr = ctypes.addressof((ctypes.c_char * length).from_buffer(out))
    skip = start
    produced = 0
    raw = True
    scratch = None

    strm, ptr = _new_stream(RAW_WBITS)
    try:
        if bits:
            if n < 1:
                raise FormatError("span data is empty but the checkpoint needs bits from its first byte")
            _libz.inflatePrime(ptr, bits, src[0] >> (8 - bits))
            p += 1
            n -= 1
        ret = _libz.inflateSetDictionary(ptr, window, WINSIZE)
        if ret != Z_OK:
            raise FormatError(f"cannot set the checkpoint window: {_zmsg(strm, ret)}")
        if skip > 0:
            scratch = ctypes.create_string_buffer(SKIP_CHUNK)
            scratch_addr = ctypes.addressof(scratch)
        strm.next_in = p
        pending_in = n
        strm.avail_in = 0
        while produced < length:
            if strm.avail_in == 0 and pending_in > 0:
                step = min(pending_in, MAX_FEED)
                strm.avail_in = step
                pending_in -= step
            if skip > 0:
                strm.next_out = scratch_addr
                strm.avail_out = min(skip, SKIP_CHUNK)
            else:
                strm.next_out = out_addr + produced
                strm.avail_out = min(length - produced, MAX_FEED)
            avail_out_before = strm.avail_out
            ret = _inflate(ptr, Z_NO_FLUSH)
            if skip > 0:
                skip -= avail_out_before - strm.avail_out
            else:
                produced += avail_out_before - strm.avail_out
            if ret == Z_STREAM_END:
                if skip == 0 and produced == length:
                    break
                if raw:
                    # The member the span started in ends here: skip its CRC32 + ISIZE trailer, which
                    # cannot be checked from mid-member.
                    if strm.avail_in + pending_in < 8:
                        raise FormatError(
                            f"gzip trailer cut short by the end of the span "
                            f"after {produced} of {length} bytes"
                        )
                    while strm.avail_in < 8:
                        step = min(pending_in, MAX_FEED)
                        strm.avail_in += step
                        pending_in -= step
                    strm.next_in += 8
                    strm.avail_in -= 8
                    raw = False
                if strm.avail_in == 0 and pending_in == 0:
                    raise FormatError(f"span data ended after {produced} of {length} bytes")
                ret = _libz.inflateReset2(ptr, GZIP_AUTO_WBITS)
                if ret != Z_OK:
                    raise FormatError(f"cannot restart inflate in the span: {_zmsg(strm, ret)}")
            elif ret == Z_BUF_ERROR:
                if strm.avail_in == 0 and pending_in == 0:
                    raise FormatError(f"span data ended after {produced} of {length} bytes")
            elif ret == Z_MEM_ERROR:
                raise MemoryError("zlib ran out of memory")
            elif ret != Z_OK:
                raise FormatError(
                    f"corrupt deflate data in span at input byte {total_in - strm.avail_in - pending_in} "
                    f"(after {produced} of {length} bytes): {_zmsg(strm, ret)}"
                )
    finally:
        _libz.inflateEnd(ptr)
        del scratch
    return bytes(out)
