"""Differential tests: the compiled zTOC writer (``ext/_ztocwrite.pyx``) against the Python writer.

The same generated ``Ztoc`` values go through both; the bytes must be identical. Values the compiled writer
does not take (wrong types, numbers out of range, unsorted PAX keys) must come back as ``None`` so that
``ztoc.serialize`` gives them to the Python writer, which then raises its usual errors.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from soci_fs import ztoc
from soci_fs.errors import InvalidArgument
from soci_fs.ztoc import CompressionInfo, FileMetadata, Ztoc
from tests.fs.test_ztoc import ztocs

compiled = pytest.importorskip("soci_fs._ext._ztocwrite", reason="the compiled zTOC writer is not built")

ROOT = Path(__file__).resolve().parents[2]


class _SubMetadata(FileMetadata):
    """Not exactly FileMetadata: the compiled writer reads its fields by name."""


def _entry(**changes: object) -> FileMetadata:
    base = FileMetadata("a/b", "reg", 512, 3, "", 0o644, 1000, 1000, "u", "g", "2024-01-02T03:04:05Z", 0, 0)
    return dataclasses.replace(base, **changes)


def _ztoc(*files: FileMetadata, **changes: object) -> Ztoc:
    z = Ztoc("0.9", "tool", 100, 4096, tuple(files), CompressionInfo(1, 0, ("sha256:" + "0" * 64,), b"cp"))
    return dataclasses.replace(z, **changes)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ztocs(max_entries=12))
def test_byte_identical(z):
    data = compiled.serialize_or_none(z)
    assert data is not None, "a valid zTOC must not need the Python writer"
    assert data == ztoc.serialize_python(z)


def test_many_entries_and_shared_vtables():
    files = []
    for i in range(3000):
        pax = ((f"SCHILY.xattr.user.{i % 7}", b"v" * (i % 5)),) if i % 3 else ()
        files.append(
            _entry(
                name=f"dir/{i}" + "é" * (i % 2),
                uncompressed_offset=512 * (2 * i + 1),
                uncompressed_size=i % 4,
                mode=i % 2 * 0o755,
                uid=i % 3,
                gid=0,
                devmajor=i % 5 == 0,
                devminor=i % 11,
                pax=pax,
            )
        )
    z = _ztoc(
        *files,
        uncompressed_archive_size=512 * 6002,
        compression=CompressionInfo(2, 3, tuple(f"sha256:{i:064x}" for i in range(4)), b"x" * 99),
    )
    assert compiled.serialize_or_none(z) == ztoc.serialize_python(z)
    assert ztoc.parse(ztoc.serialize(z)) == z


@pytest.mark.parametrize(
    "z",
    [
        _ztoc(_entry(pax=(("b", b"1"), ("a", b"2")))),  # unsorted keys: the Python writer sorts
        _ztoc(_entry(pax=(("a", b"1"), ("a", b"2")))),  # duplicate keys: stable order
        _ztoc(_entry(pax=(("a", bytearray(b"1")),))),  # not bytes
        _ztoc(_entry(pax=[("a", b"1")])),  # not a tuple
        _ztoc(_entry(uid=True)),
        _ztoc(files=[_entry()]),
        _ztoc(_SubMetadata(*(getattr(_entry(pax=(("k", b"v"),)), k) for k in FileMetadata.__slots__))),
        _ztoc(_entry(), compression=CompressionInfo(1, 0, ["sha256:" + "0" * 64], bytearray(b"cp"))),
    ],
)
def test_unusual_values_give_the_same_bytes(z):
    assert ztoc.serialize(z) == ztoc.serialize_python(z)


@pytest.mark.parametrize(
    "z",
    [
        _ztoc(_entry(uid=-1)),
        _ztoc(_entry(gid=1 << 32)),
        _ztoc(_entry(mode=1 << 63)),
        _ztoc(_entry(name="\ud800x")),  # a lone surrogate that surrogateescape cannot encode
        _ztoc(_entry(pax=(("k", "text"),))),
        _ztoc(_entry(uncompressed_size=1.5)),
        _ztoc(_entry(), compression=CompressionInfo(300, 0, (), b"")),
        _ztoc(_entry(), compression=CompressionInfo(1, 1 << 31, (), b"")),
        _ztoc(_entry(), compressed_archive_size=-(1 << 64)),
    ],
)
def test_values_that_do_not_fit_raise_the_python_errors(z):
    assert compiled.serialize_or_none(z) is None
    with pytest.raises(InvalidArgument) as compiled_error:
        ztoc.serialize(z)
    with pytest.raises(InvalidArgument) as python_error:
        ztoc.serialize_python(z)
    assert str(compiled_error.value) == str(python_error.value)


def test_wrong_attribute_types_raise_the_same_exception():
    z = _ztoc(_entry(name=None))
    with pytest.raises(AttributeError):
        ztoc.serialize_python(z)
    with pytest.raises(AttributeError):
        ztoc.serialize(z)


@pytest.mark.parametrize(("env", "expected"), [("1", "pure"), ("", "compiled")])
def test_selector(env, expected):
    out = subprocess.run(
        [sys.executable, "-c", "import soci_fs.ztoc as z; print(z.WRITER_IMPLEMENTATION)"],
        env={**os.environ, "SOCI_PUREPYTHON": env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == expected
