"""Canonical Go encoding/json: table tests whose expected bytes follow Go's documented rules."""

from __future__ import annotations

import pytest

from soci_fs import gojson
from soci_fs.errors import FormatError
from soci_fs.gojson import Struct

SURR = "surrogateescape"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, b"null"),
        (True, b"true"),
        (False, b"false"),
        (0, b"0"),
        (-42, b"-42"),
        (1 << 62, b"4611686018427387904"),
        ("", b'""'),
        ("plain", b'"plain"'),
        # HTML-safe escaping is on in json.Marshal.
        ("<a href='x'>&</a>", b"\"\\u003ca href='x'\\u003e\\u0026\\u003c/a\\u003e\""),
        # Short escapes (Go >= 1.22 writes \b and \f), other controls as \u00xx with lower-case hex.
        ("\b\f\n\r\t", b'"\\b\\f\\n\\r\\t"'),
        ("\x00\x01\x1f\x1b", b'"\\u0000\\u0001\\u001f\\u001b"'),
        ('"\\', b'"\\"\\\\"'),
        ("\x7f/", b'"\x7f/"'),  # DEL and slash are not escaped
        ("\u2028\u2029", b'"\\u2028\\u2029"'),
        ("é€😀", '"é€😀"'.encode()),  # valid non-ASCII stays raw UTF-8
        ("\ufffd", '"\ufffd"'.encode()),  # a real U+FFFD stays raw
        # Invalid UTF-8: one \ufffd escape per bad byte (utf8.DecodeRune consumes one byte).
        (b"a\xffb".decode("utf-8", SURR), b'"a\\ufffdb"'),
        (b"\xe2\x82".decode("utf-8", SURR), b'"\\ufffd\\ufffd"'),
        (b"\xe2\x82A".decode("utf-8", SURR), b'"\\ufffd\\ufffdA"'),
        (b"\xed\xa0\x80".decode("utf-8", SURR), b'"\\ufffd\\ufffd\\ufffd"'),  # encoded surrogate
        (b"\xc0\xaf".decode("utf-8", SURR), b'"\\ufffd\\ufffd"'),  # overlong
        (b"\xf4\x90\x80\x80".decode("utf-8", SURR), b'"\\ufffd\\ufffd\\ufffd\\ufffd"'),  # > U+10FFFF
        ([], b"[]"),
        ([1, "a", None], b'[1,"a",null]'),
        ({}, b"{}"),
        # Maps: keys sorted bytewise on their UTF-8 bytes ("Z" < "a" < "é").
        ({"b": 1, "a": 2, "Z": 3, "é": 4}, '{"Z":3,"a":2,"b":1,"é":4}'.encode()),
        ({"a<": "x"}, b'{"a\\u003c":"x"}'),
        # Structs: caller's order.
        (Struct(("z", 1), ("a", Struct())), b'{"z":1,"a":{}}'),
        (b"\x00\x01\xfe", b'"AAH+"'),  # []byte is base64
        (1.5, b"1.5"),
        (3.0, b"3"),
        (1e20, b"100000000000000000000"),
        (1e21, b"1e+21"),
        (1e-7, b"1e-7"),
        (0.000001, b"0.000001"),
        (2.5e-10, b"2.5e-10"),
    ],
)
def test_dumps_table(value: object, expected: bytes) -> None:
    assert gojson.dumps(value) == expected


def test_sorted_keys_are_bytewise_not_codepoint_order() -> None:
    # U+FF61 (EF BD A1) sorts before U+10000 (F0 90 80 80) both ways; U+E000 vs U+10000 too. A surrogate-
    # escaped raw byte 0xFF sorts after every valid UTF-8 lead byte.
    raw = b"\xff".decode("utf-8", SURR)
    out = gojson.dumps({raw: 1, "\U00010000": 2, "\uff61": 3})
    assert out == '{"\uff61":3,"\U00010000":2,"\\ufffd":1}'.encode()


def test_nan_refused() -> None:
    with pytest.raises(FormatError):
        gojson.dumps(float("nan"))


def test_indent_like_go() -> None:
    compact = b'{"a":[],"b":{},"c":[1,{"x":"y\\u003c,:{"}],"d":"\\"q"}'
    assert gojson.indent(compact) == (
        b'{\n  "a": [],\n  "b": {},\n  "c": [\n    1,\n    {\n      "x": "y\\u003c,:{"\n    }\n  ],\n'
        b'  "d": "\\"q"\n}'
    )


def test_loads_replaces_invalid_utf8_and_refuses_garbage() -> None:
    assert gojson.loads(b'{"a":"x\xffy"}') == {"a": "x\ufffdy"}
    with pytest.raises(FormatError):
        gojson.loads(b"{")
    with pytest.raises(FormatError):
        gojson.loads(b"[NaN]")


def test_round_trip_of_manifest_shape() -> None:
    v = Struct(("schemaVersion", 2), ("layers", [Struct(("size", 3), ("annotations", {"k": "v"}))]))
    assert gojson.loads(gojson.dumps(v)) == {
        "schemaVersion": 2,
        "layers": [{"size": 3, "annotations": {"k": "v"}}],
    }
