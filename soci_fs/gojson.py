"""Canonical Go ``encoding/json`` output: the byte form that gives SOCI indexes and manifests their digests.

Owns: :func:`dumps` (what ``json.Marshal`` produces), :func:`indent` (what ``json.Indent`` /
``json.MarshalIndent`` produce from compact JSON), :func:`loads` (``json.Unmarshal`` into untyped values, with
Go's invalid-UTF-8 handling) and :class:`Struct`, the ordered value that stands for a Go struct.

Rules reproduced (formats.md §2): compact output, no trailing newline; Go maps (Python ``dict``) have their
keys sorted bytewise by UTF-8; struct members keep the order the caller gives (omit-if-empty is the caller's
decision: leave the member out); strings escape ``"``, ``\\``, ``\\b``, ``\\f``, ``\\n``, ``\\r``, ``\\t``,
other control bytes as ``\\u00xx``, HTML characters ``<`` ``>`` ``&`` as ``\\u003c`` ``\\u003e`` ``\\u0026``,
U+2028/U+2029 as ``\\u2028``/``\\u2029``; each byte of invalid UTF-8 becomes the escape ``\\ufffd``
(a valid U+FFFD stays raw).

Will not: know any schema (image-spec types live in :mod:`soci_fs.oci`), or encode Go-specific types other
than the ones listed in :func:`dumps`.
"""

from __future__ import annotations

import base64
import codecs
import json
import math
from collections.abc import Iterable, Iterator
from decimal import Decimal
from typing import Any

from soci_fs.errors import FormatError

__all__ = ["Struct", "dumps", "go_bytes", "indent", "loads"]


def _replace_each_byte(exc: UnicodeError) -> tuple[str, int]:
    # Go's utf8.DecodeRune consumes one byte per invalid sequence, so each bad byte becomes one U+FFFD
    # (Python's "replace" would fold a truncated multi-byte sequence into a single U+FFFD).
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    return "\ufffd", exc.start + 1


def _mark_each_byte(exc: UnicodeError) -> tuple[str, int]:
    # For encoding: Go's encoder writes the six characters \ufffd for each invalid byte (while a real
    # U+FFFD in valid input stays raw), so mark the bad byte with a lone surrogate that valid UTF-8 can never
    # produce and translate it afterwards.
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    return _BAD_BYTE, exc.start + 1


_BAD_BYTE = "\ud800"
codecs.register_error("soci-go-replace", _replace_each_byte)
codecs.register_error("soci-go-mark", _mark_each_byte)


class Struct:
    """A Go struct value: members in declaration order, already filtered by ``omitempty``.

    ``Struct(("a", 1), ("b", "x"))`` encodes as ``{"a":1,"b":"x"}``; a plain ``dict`` is a Go map instead
    and has its keys sorted.
    """

    __slots__ = ("members",)

    def __init__(self, *members: tuple[str, Any]) -> None:
        self.members: tuple[tuple[str, Any], ...] = tuple(members)

    def __repr__(self) -> str:
        return f"Struct{self.members!r}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Struct) and self.members == other.members

    def __hash__(self) -> int:
        return hash(self.members)


def go_bytes(s: str | bytes) -> bytes:
    """The bytes of a Go string held in Python: ``str`` as UTF-8, surrogate escapes turned back into bytes."""
    if isinstance(s, bytes):
        return s
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return s.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return s.encode("utf-8", "surrogatepass")


_SHORT = {0x22: '\\"', 0x5C: "\\\\", 0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}
_HEX = "0123456789abcdef"


def _escape_char(c: str) -> str:
    o = ord(c)
    short = _SHORT.get(o)
    if short is not None:
        return short
    return "\\u00" + _HEX[o >> 4] + _HEX[o & 0xF]


# Characters that need work; everything else is copied through.
_SPECIAL = {chr(i): _escape_char(chr(i)) for i in range(0x20)}
_SPECIAL.update({'"': '\\"', "\\": "\\\\", "<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})
_SPECIAL.update({"\u2028": "\\u2028", "\u2029": "\\u2029", _BAD_BYTE: "\\ufffd"})
_TRANS = str.maketrans(_SPECIAL)


def _string(s: str | bytes) -> str:
    text = go_bytes(s).decode("utf-8", "soci-go-mark")
    return '"' + text.translate(_TRANS) + '"'


def _float(f: float) -> str:
    # strconv.AppendFloat(f, 'f' or 'e', -1, 64) as encoding/json's floatEncoder does.
    if math.isnan(f) or math.isinf(f):
        raise FormatError(f"json: unsupported value: {f!r}")
    if f == 0:
        return "-0" if math.copysign(1.0, f) < 0 else "0"
    a = abs(f)
    r = repr(f)
    if a < 1e-6 or a >= 1e21:
        # repr is already the shortest round-trip mantissa in exponent form with >= 2 exponent digits,
        # like Go's 'e' format; Go then shortens "e-0X" to "e-X".
        mant, _, exp = r.partition("e")
        if mant.endswith(".0"):
            mant = mant[:-2]
        if len(exp) == 3 and exp.startswith("-0"):
            exp = "-" + exp[2]
        return f"{mant}e{exp}"
    if "e" in r:
        # Python uses exponent form below 1e-4 and from 1e16; Go only outside [1e-6, 1e21). The shortest
        # digits are the same, only the notation differs.
        r = format(Decimal(r), "f")
    if r.endswith(".0"):
        r = r[:-2]
    return r


def _encode(v: Any, out: list[str]) -> None:
    if v is None:
        out.append("null")
    elif v is True:
        out.append("true")
    elif v is False:
        out.append("false")
    elif isinstance(v, str):
        out.append(_string(v))
    elif isinstance(v, int):
        out.append(str(int(v)))
    elif isinstance(v, float):
        out.append(_float(v))
    elif isinstance(v, Struct):
        out.append("{")
        for i, (k, val) in enumerate(v.members):
            if i:
                out.append(",")
            out.append(_string(k))
            out.append(":")
            _encode(val, out)
        out.append("}")
    elif isinstance(v, dict):
        out.append("{")
        items = sorted(((go_bytes(k), k) for k in v), key=lambda kv: kv[0])
        for i, (_, k) in enumerate(items):
            if i:
                out.append(",")
            out.append(_string(k))
            out.append(":")
            _encode(v[k], out)
        out.append("}")
    elif isinstance(v, (bytes, bytearray, memoryview)):
        # Go []byte: standard base64 with padding.
        out.append('"' + base64.b64encode(bytes(v)).decode("ascii") + '"')
    elif isinstance(v, (list, tuple)):
        out.append("[")
        for i, item in enumerate(v):
            if i:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:
        raise TypeError(f"gojson: cannot encode {type(v).__name__}")


def dumps(value: Any) -> bytes:
    """Encode like Go ``json.Marshal``.

    ``None`` is null; ``bool``, ``int``, ``float`` and ``str`` as Go; ``bytes`` as base64 (Go ``[]byte``);
    ``list``/``tuple`` as arrays (an empty one is ``[]``; pass ``None`` for a nil slice); ``dict`` as a Go
    map with sorted keys; :class:`Struct` as a Go struct.
    """
    out: list[str] = []
    _encode(value, out)
    return "".join(out).encode("utf-8")


def _tokens(data: bytes) -> Iterator[bytes]:
    """Split compact-or-not JSON into structural characters and scalar literals (strings kept verbatim)."""
    i, n = 0, len(data)
    while i < n:
        c = data[i]
        if c in b" \t\r\n":
            i += 1
            continue
        if c in b"{}[],:":
            yield data[i : i + 1]
            i += 1
            continue
        if c == 0x22:
            j = i + 1
            while j < n:
                d = data[j]
                if d == 0x5C:
                    j += 2
                    continue
                if d == 0x22:
                    break
                j += 1
            if j >= n:
                raise FormatError("json: unterminated string")
            yield data[i : j + 1]
            i = j + 1
            continue
        j = i
        while j < n and data[j] not in b' \t\r\n{}[],:"':
            j += 1
        yield data[i:j]
        i = j


def indent(data: bytes, prefix: str = "", indent_with: str = "  ") -> bytes:
    """Re-indent JSON like Go ``json.Indent`` (string literals are copied byte for byte).

    Empty objects and arrays stay ``{}`` / ``[]``; a space follows each ``:``. No trailing newline.
    """
    pre = prefix.encode()
    ind = indent_with.encode()
    out = bytearray()
    depth = 0
    toks = list(_tokens(data))
    k = 0
    while k < len(toks):
        t = toks[k]
        if t in (b"{", b"["):
            close = b"}" if t == b"{" else b"]"
            if k + 1 < len(toks) and toks[k + 1] == close:
                out += t + close
                k += 2
                continue
            depth += 1
            out += t + b"\n" + pre + ind * depth
        elif t in (b"}", b"]"):
            depth -= 1
            out += b"\n" + pre + ind * depth + t
        elif t == b",":
            out += b",\n" + pre + ind * depth
        elif t == b":":
            out += b": "
        else:
            out += t
        k += 1
    return bytes(out)


def loads(data: bytes | str) -> Any:
    """Decode JSON like Go ``json.Unmarshal`` into untyped values.

    Invalid UTF-8 inside the text becomes U+FFFD byte by byte (as Go does); objects keep their member order
    as a ``dict`` (a repeated key keeps its last value). Non-JSON tokens (``NaN``, ``Infinity``) are refused.

    Raises:
        FormatError: not valid JSON.
    """
    text = data.decode("utf-8", "soci-go-replace") if isinstance(data, (bytes, bytearray)) else data

    def bad_constant(name: str) -> Any:
        raise FormatError(f"invalid JSON token {name}")

    try:
        return json.loads(text, parse_constant=bad_constant)
    except json.JSONDecodeError as exc:
        raise FormatError(f"invalid JSON: {exc}") from exc
    except RecursionError as exc:
        raise FormatError("invalid JSON: nested too deeply") from exc


def dumps_indent(value: Any) -> bytes:
    """Go ``json.MarshalIndent(value, "", "  ")``."""
    return indent(dumps(value))


def iter_pairs(obj: dict[str, Any]) -> Iterable[tuple[str, Any]]:
    """Members of a decoded object in document order."""
    return obj.items()
