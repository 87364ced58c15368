# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled checkpoint engine: the streaming gzip indexer and the one-span extractor.

Owns the zlib calls behind ``soci_fs.zinfo.index_gzip`` and ``soci_fs.zinfo.extract_span``: it drives
libz's C API directly (``Z_BLOCK`` stops, ``inflatePrime``, ``inflateSetDictionary``) and releases the GIL
around every inflate call. It does not parse or serialize checkpoint blobs beyond writing the v2 blob of a
fresh index, and it does no I/O of its own: input comes from the ``read`` callable, output goes to ``sink``.

Import it through ``soci_fs.zinfo`` (which picks this module or its pure-Python twin ``soci_fs.zinfo_py``);
the two raise the same errors and produce byte-identical results.
"""



from cpython.buffer cimport PyBUF_READ
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.memoryview cimport PyMemoryView_FromMemory
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memmove, memset

from soci_fs.errors import FormatError, InvalidArgument


cdef extern from "zlib.h" nogil:
    ctypedef struct z_stream:
        const unsigned char *next_in
        unsigned int avail_in
        unsigned long total_in
        unsigned char *next_out
        unsigned int avail_out
        unsigned long total_out
        const char *msg
        int data_type

    const char *ZLIB_VERSION
    int Z_OK
    int Z_STREAM_END
    int Z_NEED_DICT
    int Z_STREAM_ERROR
    int Z_DATA_ERROR
    int Z_MEM_ERROR
    int Z_BUF_ERROR
    int Z_NO_FLUSH
    int Z_BLOCK

    int inflateInit2_(z_stream *strm, int windowBits, const char *version, int stream_size)
    int inflate(z_stream *strm, int flush)
    int inflateEnd(z_stream *strm)
    int inflateReset2(z_stream *strm, int windowBits)
    int inflatePrime(z_stream *strm, int bits, int value)
    int inflateSetDictionary(z_stream *strm, const unsigned char *dictionary, unsigned int dictLength)
    int inflateValidate(z_stream *strm, int check)


cdef extern from "isa-l/crc.h" nogil:
    uint32_t crc32_gzip_refl(uint32_t init_crc, const unsigned char *buf, uint64_t len)


cdef enum:
    WINSIZE = 32768
    CHECKPOINT_SIZE = 32785  # int64 in + int64 out + uint8 bits + window
    HEADER_SIZE = 12  # int32 N + int64 span_size
    OUT_CHUNK = 1048576  # uncompressed bytes handed to the sink at a time (the last piece may be shorter)
    SKIP_CHUNK = 131072  # scratch buffer for output that extract_span discards
    MAX_FEED = 1073741824  # at most this much input or output per inflate call (32-bit counters)
    GZIP_MAGIC0 = 0x1F  # first byte of a gzip member; never the first byte of a zlib header (CM would be 15)

# Input is read in pieces of this size. The checkpoints do not depend on it: inflate stops at every block
# boundary whatever the input chunking (see tests/fs/test_zinfo.py, which feeds tiny random reads).
IN_CHUNK = 65536

GZIP_AUTO_WBITS = 47  # 32 (gzip/zlib header auto-detect) + 15
RAW_WBITS = -15


cdef inline void _put_le64(unsigned char *p, uint64_t v) noexcept nogil:
    cdef int k
    for k in range(8):
        p[k] = <unsigned char>(v & 0xFF)
        v >>= 8


cdef inline uint32_t _get_le32(const unsigned char *p) noexcept nogil:
    return <uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef str _zmsg(z_stream *strm, int ret):
    if strm.msg != NULL:
        return (<bytes>strm.msg).decode("utf-8", "replace")
    return f"zlib error {ret}"


cdef class _Window:
    """Output buffer: WINSIZE bytes of history, then OUT_CHUNK bytes that inflate writes into."""

    cdef unsigned char *buf
    cdef Py_ssize_t pos  # bytes of fresh output after the history

    def __cinit__(self):
        self.buf = <unsigned char *>malloc(WINSIZE + OUT_CHUNK)
        if self.buf == NULL:
            raise MemoryError()
        memset(self.buf, 0, WINSIZE)
        self.pos = 0

    def __dealloc__(self):
        free(self.buf)

    cdef flush(self, sink):
        """Hand the fresh output to ``sink`` and keep the last WINSIZE bytes as history."""
        cdef object view
        if self.pos == 0:
            return
        if sink is not None:
            view = PyMemoryView_FromMemory(<char *>(self.buf + WINSIZE), self.pos, PyBUF_READ)
            try:
                sink(view)
            finally:
                try:
                    view.release()
                except BufferError:
                    pass
        # buf[pos : pos + WINSIZE] is the last WINSIZE bytes of output (history included when pos < WINSIZE).
        memmove(self.buf, self.buf + self.pos, WINSIZE)
        self.pos = 0


cdef bytes _checkpoint_record(int64_t totin, int64_t totout, int bits, const unsigned char *window_end):
    cdef bytes rec = PyBytes_FromStringAndSize(NULL, CHECKPOINT_SIZE)
    cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(rec)
    _put_le64(p, <uint64_t>totin)
    _put_le64(p + 8, <uint64_t>totout)
    p[16] = <unsigned char>bits
    memcpy(p + 17, window_end - WINSIZE, WINSIZE)
    return rec


cdef bytes _blob_header(Py_ssize_t n, int64_t span_size):
    cdef bytes head = PyBytes_FromStringAndSize(NULL, HEADER_SIZE)
    cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(head)
    cdef uint64_t v = <uint64_t>n
    cdef int k
    for k in range(4):
        p[k] = <unsigned char>(v & 0xFF)
        v >>= 8
    _put_le64(p + 4, <uint64_t>span_size)
    return head


def index_gzip(read, span_size, sink=None):
    """Inflate a gzip stream once, recording checkpoints and span digests (see ``soci_fs.zinfo``).

    Integrity: zlib validates each member's header (including FHCRC) as usual; once a gzip member's header
    is parsed, zlib's own check is switched off (``inflateValidate(0)``: it still consumes the trailer) and
    the CRC-32 of the member's output is computed here with ISA-L, then compared, with ISIZE, against the
    trailer bytes zlib consumed. zlib-wrapped members keep zlib's Adler-32 check.
    """
    if not isinstance(span_size, int) or isinstance(span_size, bool) or span_size <= 0:
        raise InvalidArgument(f"span size must be a positive integer, got {span_size!r}")
    if span_size >= 1 << 63:
        raise InvalidArgument(f"span size {span_size} does not fit in int64")
    from soci_fs.zinfo import IndexResult, SpanHasher

    cdef int64_t span = span_size
    cdef z_stream strm
    cdef int ret
    cdef int dtype
    cdef int flush_mode
    cdef unsigned int avail_in_before
    cdef unsigned int avail_out_before
    cdef int64_t totin = 0
    cdef int64_t totout = 0
    cdef int64_t last = 0
    cdef int64_t chunk_start = 0  # absolute offset of chunk[0]
    cdef int64_t hpos = 0  # compressed bytes before this offset are hashed (or belong to no span)
    cdef Py_ssize_t chunk_len = 0
    cdef int prev_last_byte = -1
    cdef unsigned char tail[8]  # the last 8 input bytes before chunk_start (a trailer may straddle reads)
    cdef unsigned char trailer[8]
    cdef unsigned char *out_before
    cdef int member_first = -1  # first byte of the current member, once seen
    cdef int64_t member_start = 0  # compressed offset of the current member
    cdef bint header_pending = True  # the current member's header is not parsed yet
    cdef bint own_check = False  # the current member is gzip: its CRC-32 and ISIZE are checked here
    cdef uint32_t member_crc = 0
    cdef uint64_t member_len = 0
    cdef int k
    cdef int64_t off
    cdef bint input_eof = False
    cdef bint member_done = False
    cdef const unsigned char *chunk_ptr = NULL
    cdef _Window win = _Window()
    cdef bytes chunk = b""
    cdef object chunk_view = memoryview(b"")
    cdef list records = []
    cdef bint in_span = False
    cdef object digests
    hasher = SpanHasher()
    cdef Py_ssize_t rel

    memset(tail, 0, 8)
    memset(&strm, 0, sizeof(z_stream))
    ret = inflateInit2_(&strm, GZIP_AUTO_WBITS, ZLIB_VERSION, sizeof(z_stream))
    if ret != Z_OK:
        raise MemoryError(f"inflateInit2 failed: {_zmsg(&strm, ret)}")
    try:
        while True:
            if win.pos == OUT_CHUNK:
                win.flush(sink)
            strm.next_out = win.buf + WINSIZE + win.pos
            strm.avail_out = <unsigned int>(OUT_CHUNK - win.pos)
            # Until the output passes last + span no block boundary can take a checkpoint, so inflate runs
            # without stopping at boundaries, capped so that it cannot run past that point. A member's header
            # is always inflated with Z_BLOCK, which stops right after it (no output, no checkpoint: the
            # output is short of last + span there) so that zlib's check can be switched off for the data.
            if 0 < totout < last + span and not header_pending:
                flush_mode = Z_NO_FLUSH
                if last + span - totout < strm.avail_out:
                    strm.avail_out = <unsigned int>(last + span - totout)
            else:
                flush_mode = Z_BLOCK
            if strm.avail_in == 0 and not input_eof:
                if in_span and hpos < chunk_start + chunk_len:
                    hasher.update(chunk_view[hpos - chunk_start :])
                    hpos = chunk_start + chunk_len
                if chunk_len:
                    prev_last_byte = chunk_ptr[chunk_len - 1]
                    if chunk_len >= 8:
                        memcpy(tail, chunk_ptr + chunk_len - 8, 8)
                    else:
                        memmove(tail, tail + chunk_len, 8 - chunk_len)
                        memcpy(tail + 8 - chunk_len, chunk_ptr, chunk_len)
                chunk_start += chunk_len
                data = read(IN_CHUNK)
                if not isinstance(data, bytes):
                    data = bytes(data)
                chunk = <bytes>data
                chunk_len = len(chunk)
                if chunk_len > MAX_FEED:
                    raise InvalidArgument(f"read() returned {chunk_len} bytes at once; at most {MAX_FEED} allowed")
                chunk_view = memoryview(chunk)
                chunk_ptr = <const unsigned char *>PyBytes_AS_STRING(chunk)
                if chunk_len == 0:
                    input_eof = True
                else:
                    strm.next_in = chunk_ptr
                    strm.avail_in = <unsigned int>chunk_len
            if member_done:
                if strm.avail_in == 0 and input_eof:
                    break
                ret = inflateReset2(&strm, GZIP_AUTO_WBITS)
                if ret != Z_OK:
                    raise FormatError(f"cannot restart inflate at compressed offset {totin}: {_zmsg(&strm, ret)}")
                member_done = False

            if member_first < 0 and strm.avail_in > 0:
                member_first = strm.next_in[0]
            avail_in_before = strm.avail_in
            avail_out_before = strm.avail_out
            out_before = strm.next_out
            with nogil:
                ret = inflate(&strm, flush_mode)
                if own_check and strm.next_out != out_before:
                    member_crc = crc32_gzip_refl(member_crc, out_before, <uint64_t>(strm.next_out - out_before))
            totin += avail_in_before - strm.avail_in
            totout += avail_out_before - strm.avail_out
            win.pos += avail_out_before - strm.avail_out
            member_len += avail_out_before - strm.avail_out

            if ret == Z_STREAM_END:
                member_done = True
                if own_check:
                    # zlib consumed exactly the member, trailer last; the trailer's bytes are the last 8
                    # consumed, in this chunk or (when it straddles reads) partly in ``tail``.
                    for k in range(8):
                        off = totin - 8 + k
                        if off >= chunk_start:
                            trailer[k] = chunk_ptr[off - chunk_start]
                        else:
                            trailer[k] = tail[8 - (chunk_start - off)]
                    if _get_le32(trailer) != member_crc:
                        raise FormatError(
                            f"corrupt gzip stream at compressed offset {totin - 4}: incorrect data check "
                            f"(gzip member at compressed offset {member_start})"
                        )
                    if _get_le32(trailer + 4) != <uint32_t>member_len:
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
                raise FormatError(f"corrupt gzip stream at compressed offset {totin}: {_zmsg(&strm, ret)}")

            dtype = strm.data_type
            if header_pending and (dtype & 128):
                # The header is parsed (and checked by zlib). For a gzip member the data's CRC-32 and ISIZE
                # are checked here from now on; a zlib-wrapped member keeps zlib's Adler-32 check.
                header_pending = False
                if member_first == GZIP_MAGIC0:
                    inflateValidate(&strm, 0)
                    own_check = True
                    member_crc = 0
                    member_len = 0
            if (dtype & 128) and not (dtype & 64) and (totout == 0 or totout - last > span):
                records.append(_checkpoint_record(totin, totout, dtype & 7, win.buf + WINSIZE + win.pos))
                last = totout
                # Close the running span at totin; the next one starts one byte earlier when bits != 0.
                if in_span:
                    if hpos < totin:
                        hasher.update(chunk_view[hpos - chunk_start : totin - chunk_start])
                    hasher.finish_span()
                hasher.start_span()
                in_span = True
                if dtype & 7:
                    rel = <Py_ssize_t>(totin - 1 - chunk_start)
                    if rel >= 0:
                        hasher.update(chunk_view[rel : rel + 1])
                    else:
                        hasher.update(memoryview(bytes((prev_last_byte,))))
                hpos = totin
        win.flush(sink)
        if in_span:
            hasher.finish_span()
    finally:
        inflateEnd(&strm)
        digests = hasher.close()

    blob = _blob_header(len(records), span) + b"".join(records)
    return IndexResult(
        checkpoints_blob=blob,
        span_digests=digests,
        compressed_size=chunk_start,
        uncompressed_size=totout,
    )


def extract_span(compressed, checkpoint, start, length):
    """Inflate ``length`` bytes starting ``start`` bytes after ``checkpoint`` (see ``soci_fs.zinfo``)."""
    if start < 0 or length < 0:
        raise InvalidArgument(f"span extract needs start >= 0 and length >= 0, got start={start} length={length}")
    cdef int bits = checkpoint.bits
    window = checkpoint.window
    if not isinstance(window, bytes) or len(<bytes>window) != WINSIZE:
        raise FormatError(f"checkpoint window must be {WINSIZE} bytes")
    if bits < 0 or bits > 7:
        raise FormatError(f"checkpoint bits must be 0..7, got {bits}")
    if length == 0:
        return b""

    cdef const unsigned char[::1] src = compressed
    cdef Py_ssize_t n = src.shape[0]
    cdef Py_ssize_t total_in = n
    cdef const unsigned char *p = &src[0] if n > 0 else NULL
    cdef int64_t want = length
    cdef int64_t skip = start
    cdef int64_t produced = 0
    cdef int64_t pending_in  # input not yet given to zlib
    cdef unsigned int step
    cdef unsigned int avail_out_before
    cdef bint raw = True
    cdef int ret
    cdef z_stream strm
    cdef bytes out = PyBytes_FromStringAndSize(NULL, want)
    cdef unsigned char *outp = <unsigned char *>PyBytes_AS_STRING(out)
    cdef unsigned char *scratch = NULL

    memset(&strm, 0, sizeof(z_stream))
    ret = inflateInit2_(&strm, RAW_WBITS, ZLIB_VERSION, sizeof(z_stream))
    if ret != Z_OK:
        raise MemoryError(f"inflateInit2 failed: {_zmsg(&strm, ret)}")
    try:
        if bits:
            if n < 1:
                raise FormatError("span data is empty but the checkpoint needs bits from its first byte")
            inflatePrime(&strm, bits, p[0] >> (8 - bits))
            p += 1
            n -= 1
        ret = inflateSetDictionary(&strm, <const unsigned char *>PyBytes_AS_STRING(window), WINSIZE)
        if ret != Z_OK:
            raise FormatError(f"cannot set the checkpoint window: {_zmsg(&strm, ret)}")
        if skip > 0:
            scratch = <unsigned char *>malloc(SKIP_CHUNK)
            if scratch == NULL:
                raise MemoryError()
        strm.next_in = p
        pending_in = n
        strm.avail_in = 0
        while produced < want:
            if strm.avail_in == 0 and pending_in > 0:
                step = <unsigned int>(pending_in if pending_in < MAX_FEED else MAX_FEED)
                strm.avail_in = step
                pending_in -= step
            if skip > 0:
                strm.next_out = scratch
                strm.avail_out = <unsigned int>(skip if skip < SKIP_CHUNK else SKIP_CHUNK)
            else:
                strm.next_out = outp + produced
                strm.avail_out = <unsigned int>(want - produced if want - produced < MAX_FEED else MAX_FEED)
            avail_out_before = strm.avail_out
            with nogil:
                ret = inflate(&strm, Z_NO_FLUSH)
            if skip > 0:
                skip -= avail_out_before - strm.avail_out
            else:
                produced += avail_out_before - strm.avail_out
            if ret == Z_STREAM_END:
                if skip == 0 and produced == want:
                    break
                if raw:
                    # The member the span started in ends here: skip its CRC32 + ISIZE trailer, which
                    # cannot be checked from mid-member.
                    if strm.avail_in + pending_in < 8:
                        raise FormatError(
                            f"gzip trailer cut short by the end of the span "
                            f"after {produced} of {want} bytes"
                        )
                    while strm.avail_in < 8:
                        step = <unsigned int>(pending_in if pending_in < MAX_FEED else MAX_FEED)
                        strm.avail_in += step
                        pending_in -= step
                    strm.next_in += 8
                    strm.avail_in -= 8
                    raw = False
                if strm.avail_in == 0 and pending_in == 0:
                    raise FormatError(f"span data ended after {produced} of {want} bytes")
                ret = inflateReset2(&strm, GZIP_AUTO_WBITS)
                if ret != Z_OK:
                    raise FormatError(f"cannot restart inflate in the span: {_zmsg(&strm, ret)}")
            elif ret == Z_BUF_ERROR:
                if strm.avail_in == 0 and pending_in == 0:
                    raise FormatError(f"span data ended after {produced} of {want} bytes")
            elif ret == Z_MEM_ERROR:
                raise MemoryError("zlib ran out of memory")
            elif ret != Z_OK:
                raise FormatError(
                    f"corrupt deflate data in span at input byte {total_in - strm.avail_in - pending_in} "
                    f"(after {produced} of {want} bytes): {_zmsg(&strm, ret)}"
                )
    finally:
        inflateEnd(&strm)
        free(scratch)
    return out
