# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled gather of cached span buffers into one read reply.

Owns ``gather``: copy a sequence of contiguous buffers back to back into a writable buffer, with the GIL
released around the copies, so a reply that spans several cached spans costs one ``memcpy`` per piece and
other threads keep running. It takes every buffer with the GIL held (the buffer protocol needs it), then
copies without it, then releases the buffers.

Will not: allocate the destination, interpret the bytes, or touch files. The pure-Python twin is
``soci_fs.blockcopy_py``; both raise the same exceptions (``TypeError``, ``BufferError``, ``ValueError``).
Import it through ``soci_fs.cache``.
"""

from cpython.buffer cimport (
    PyBUF_C_CONTIGUOUS,
    PyBUF_WRITABLE,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy


def gather(pieces, out, Py_ssize_t offset=0):
    """Copy ``pieces`` back to back into ``out`` starting at ``offset``; return the offset after the last.

    Raises:
        TypeError: a piece or ``out`` does not support the buffer protocol.
        BufferError: a piece is not contiguous, or ``out`` is read-only or not contiguous.
        ValueError: ``offset`` is negative or the pieces do not fit in ``out``.
    """
    cdef Py_buffer dest
    cdef Py_buffer *bufs = NULL
    cdef Py_ssize_t n, i, got = 0, total = 0, pos = offset
    cdef char *base
    seq = list(pieces)
    n = len(seq)
    try:
        PyObject_GetBuffer(out, &dest, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS)
    except BufferError as exc:
        raise BufferError(f"gather needs a writable C-contiguous destination: {exc}") from None
    try:
        bufs = <Py_buffer *>calloc(n if n > 0 else 1, sizeof(Py_buffer))
        if bufs == NULL:
            raise MemoryError()
        for i in range(n):
            try:
                PyObject_GetBuffer(seq[i], &bufs[i], PyBUF_C_CONTIGUOUS)
            except BufferError as exc:
                raise BufferError(f"gather needs C-contiguous buffers: {exc}") from None
            got += 1
            total += bufs[i].len
        if offset < 0 or offset + total > dest.len:
            raise ValueError(
                f"gather: {total} bytes at offset {offset} do not fit a {dest.len}-byte buffer"
            )
        base = <char *>dest.buf
        with nogil:
            for i in range(n):
                if bufs[i].len:
                    memcpy(base + pos, bufs[i].buf, bufs[i].len)
                pos += bufs[i].len
    finally:
        for i in range(got):
            PyBuffer_Release(&bufs[i])
        free(bufs)
        PyBuffer_Release(&dest)
    return pos
