"""The flatbuffers builder against the stock package, the Go vtable rule, and the checked reader."""

from __future__ import annotations

import struct

import flatbuffers
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from soci_fs import flatbuf
from soci_fs.errors import FormatError

_STOCK_SLOT = {
    "b": "PrependInt8Slot",
    "B": "PrependUint8Slot",
    "h": "PrependInt16Slot",
    "H": "PrependUint16Slot",
    "i": "PrependInt32Slot",
    "I": "PrependUint32Slot",
    "q": "PrependInt64Slot",
    "Q": "PrependUint64Slot",
}
_RANGE = {
    "b": (-128, 127),
    "B": (0, 255),
    "h": (-(2**15), 2**15 - 1),
    "H": (0, 2**16 - 1),
    "i": (-(2**31), 2**31 - 1),
    "I": (0, 2**32 - 1),
    "q": (-(2**63), 2**63 - 1),
    "Q": (0, 2**64 - 1),
}


@st.composite
def _table_op(draw):
    slots = draw(st.lists(st.integers(0, 7), unique=True, max_size=6))
    fields = []
    for slot in slots:
        kind = draw(st.sampled_from(["o", *_RANGE]))
        if kind == "o":
            fields.append((slot, kind, None))
        else:
            lo, hi = _RANGE[kind]
            fields.append((slot, kind, draw(st.integers(lo, hi).filter(lambda v: v != 0))))
    return ("table", tuple(fields))


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("string"), st.binary(max_size=20)),
        st.tuples(st.just("bytes"), st.binary(max_size=20)),
        st.tuples(st.just("vector"), st.integers(0, 4)),
        _table_op(),
    ),
    min_size=1,
    max_size=25,
)


def _run_both(ops):
    """Replays ``ops`` on our builder and the stock one; objects made earlier are referred to by index."""
    ours = flatbuf.Builder()
    stock = flatbuffers.Builder(0)
    made_ours: list[int] = []
    made_stock: list[int] = []
    for op, arg in ops:
        if op == "string":
            made_ours.append(ours.string(arg))
            made_stock.append(stock.CreateString(arg))
        elif op == "bytes":
            made_ours.append(ours.byte_vector(arg))
            made_stock.append(stock.CreateByteVector(arg))
        elif op == "vector":
            refs = list(range(len(made_ours)))[-arg:] if arg else []
            made_ours.append(ours.offset_vector([made_ours[r] for r in refs]))
            stock.StartVector(4, len(refs), 4)
            for r in reversed(refs):
                stock.PrependUOffsetTRelative(made_stock[r])
            made_stock.append(stock.EndVector())
        else:
            fields = [(s, k, v) for s, k, v in arg if k != "o" or made_ours]
            values: list[int] = [0] * 8
            stock.StartObject(8)
            for slot, kind, value in fields:
                if kind == "o":
                    values[slot] = made_ours[-1]
                    stock.PrependUOffsetTRelativeSlot(slot, made_stock[-1], 0)
                else:
                    values[slot] = value
                    getattr(stock, _STOCK_SLOT[kind])(slot, value, 0)
            made_ours.append(ours.table(tuple((s, k) for s, k, _ in fields), values))
            made_stock.append(stock.EndObject())
    root_ours = ours.table(((0, "o"),), (made_ours[-1],))
    stock.StartObject(1)
    stock.PrependUOffsetTRelativeSlot(0, made_stock[-1], 0)
    root_stock = stock.EndObject()
    stock.Finish(root_stock)
    return ours.finish(root_ours), bytes(stock.Output()), stock


def _stock_used_size_in_key(stock: flatbuffers.Builder) -> bool:
    """True when the stock (Python) builder kept two vtables that differ only in object size: Go would
    have shared them, so the outputs legitimately differ."""
    entries = [key[:-1] for key in stock.vtables]
    return len(entries) != len(set(entries))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ops)
def test_builder_matches_stock(ops):
    ours, stock_bytes, stock = _run_both(ops)
    assume(not _stock_used_size_in_key(stock))
    assert ours == stock_bytes


def test_vtable_shared_regardless_of_object_size():
    """Go compares vtable entries only: a table whose first field needed padding reuses the vtable."""
    b = flatbuf.Builder()
    first = b.table(((0, "q"),), (7,))  # starts at offset 0: no padding, object size 12
    b.string(b"abc")  # 4 + 3 + NUL = 8 bytes
    b.table(((0, "i"),), (1,))  # 4-byte field + soffset + a 6-byte vtable (+2 padding before the field)
    assert b.offset % 8 == 4
    second = b.table(((0, "q"),), (9,))  # 4 bytes of padding first: object size 16, same entries
    out = b.finish(b.table(((0, "o"), (1, "o")), (first, second)))
    root = flatbuf.root(out, "t")
    t1 = root.table(0, "first")
    t2 = root.table(1, "second")
    assert t1 is not None and t2 is not None
    assert t1.vt == t2.vt
    assert t1.scalar(0, struct.Struct("<q"), 0, "v") == 7
    assert t2.scalar(0, struct.Struct("<q"), 0, "v") == 9


def test_finish_pads_to_largest_alignment_and_empty_table():
    b = flatbuf.Builder()
    b.table(((0, "q"),), (1,))
    b.string(b"abc")
    out = b.finish(b.table((), ()))
    assert len(out) % 8 == 0
    t = flatbuf.root(out, "t")
    assert t.field(0) == 0
    assert t.scalar(0, struct.Struct("<q"), 42, "x") == 42


# ------------------------------------------------------------------------------------------------ reader


def _sample() -> bytes:
    b = flatbuf.Builder()
    s = b.string(b"hello")
    v = b.offset_vector([s, s])
    blob = b.byte_vector(b"\x00\x01\x02")
    return b.finish(b.table(((0, "o"), (1, "o"), (2, "o"), (3, "i")), (s, v, blob, -5)))


def test_reader_reads_fields_and_defaults():
    t = flatbuf.root(_sample(), "thing")
    assert t.bytes_(0, "name") == b"hello"
    assert [flatbuf.string_at(t.buf, x, "p") for x in t.offsets(1, "list")] == [b"hello", b"hello"]
    assert t.bytes_(2, "blob") == b"\x00\x01\x02"
    assert t.scalar(3, struct.Struct("<i"), 0, "n") == -5
    assert t.scalar(9, struct.Struct("<i"), 17, "absent") == 17
    assert t.bytes_(9, "absent") is None
    assert t.offsets(9, "absent") == []
    assert t.table(9, "absent") is None


def test_reader_names_field_on_bad_offset():
    buf = bytearray(_sample())
    t = flatbuf.root(bytes(buf), "thing")
    at = t.pos + t.field(0)
    struct.pack_into("<I", buf, at, 123456)
    with pytest.raises(FormatError, match=r"thing: name: offset \d+ out of bounds"):
        flatbuf.root(bytes(buf), "thing").bytes_(0, "name")


def test_reader_refuses_absurd_vector_length_before_allocating():
    buf = bytearray(_sample())
    t = flatbuf.root(bytes(buf), "thing")
    vec_at = t.pos + t.field(1)
    target = vec_at + struct.unpack_from("<I", buf, vec_at)[0]
    struct.pack_into("<I", buf, target, 0xFFFFFFF0)
    with pytest.raises(FormatError, match=r"thing: list: vector of 4294967280 elements"):
        flatbuf.root(bytes(buf), "thing").offsets(1, "list")


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "too short"),
        (b"\xff\xff\xff\x7f\x00\x00\x00\x00", "out of bounds"),
        (b"\x04\x00\x00\x00\x00\x00\x01\x00", "vtable offset"),  # soffset points past the end
        (b"\x08\x00\x00\x00\x02\x00\x00\x00\x04\x00\x00\x00", "vtable at 4 has bad length"),
    ],
)
def test_reader_bad_roots(data, message):
    with pytest.raises(FormatError, match=message):
        flatbuf.root(data, "x")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_reader_random_bytes_only_format_errors(data):
    try:
        t = flatbuf.root(data, "x")
        for slot in range(4):
            t.bytes_(slot, "f")
            t.offsets(slot, "f")
            t.table(slot, "f")
            t.scalar(slot, struct.Struct("<q"), 0, "f")
    except FormatError:
        pass
