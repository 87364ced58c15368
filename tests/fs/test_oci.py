"""OCI values, platforms and layouts: decoding like Go, root resolution, verification, safe tars, writers."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from soci_fs import oci
from soci_fs.errors import FormatError, InvalidArgument, NotFound
from soci_fs.oci import Descriptor, ImageIndex, Layout, Manifest, Platform, PlatformMatcher, parse_platform
from tests.fs.ocigen import MT_LAYER_GZIP, Entry, LayoutBuilder, compact, gz, make_tar

AMD64 = Platform("amd64", "linux")
ARM64 = Platform("arm64", "linux", variant="v8")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("linux/amd64", Platform("amd64", "linux")),
        ("linux/x86_64", Platform("amd64", "linux")),
        ("Linux/AMD64", Platform("amd64", "linux")),
        ("linux/arm64", Platform("arm64", "linux", variant="v8")),
        ("linux/aarch64", Platform("arm64", "linux", variant="v8")),
        ("linux/arm64/v8", Platform("arm64", "linux", variant="v8")),
        ("linux/arm", Platform("arm", "linux", variant="v7")),
        ("linux/armhf", Platform("arm", "linux", variant="v7")),
        ("linux/arm/6", Platform("arm", "linux", variant="v6")),
        ("linux/i386", Platform("386", "linux")),
        ("macos/arm64", Platform("arm64", "darwin", variant="v8")),
        ("linux", Platform("amd64", "linux")),
        ("arm64", Platform("arm64", "linux", variant="v8")),
    ],
)
def test_parse_platform(spec: str, expected: Platform) -> None:
    assert parse_platform(spec) == expected


@pytest.mark.parametrize("spec", ["", "linux/", "a/b/c/d", "linux/am d64", "frobnicate"])
def test_parse_platform_rejects(spec: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_platform(spec)


def test_normalize_and_format() -> None:
    assert oci.normalize(Platform("aarch64", "linux", variant="8")) == Platform("arm64", "linux")
    assert oci.normalize(Platform("x86_64", "MacOS", variant="v1")) == Platform("amd64", "darwin")
    assert str(Platform("arm", "linux", variant="v7")) == "linux/arm/v7"
    assert str(AMD64) == "linux/amd64"


def test_matcher_only_and_strict() -> None:
    only = PlatformMatcher(parse_platform("linux/amd64"))
    assert only.rank(Platform("amd64", "linux")) == 0
    assert only.rank(Platform("386", "linux")) == 1
    assert only.rank(Platform("arm64", "linux")) is None
    assert not PlatformMatcher(parse_platform("linux/amd64"), strict=True).match(Platform("386", "linux"))
    arm64 = PlatformMatcher(parse_platform("linux/arm64"))
    assert arm64.match(Platform("arm64", "linux"))  # "" and v8 are the same after normalization
    assert arm64.match(Platform("arm64", "linux", variant="v8"))
    assert arm64.match(Platform("arm", "linux", variant="v7"))
    armv7 = PlatformMatcher(parse_platform("linux/arm/v7"))
    assert armv7.rank(Platform("arm", "linux", variant="v6")) == 1
    assert not armv7.match(Platform("arm", "linux", variant="v8"))


def test_manifest_decodes_like_go_and_encodes_canonically() -> None:
    # Unknown members dropped, member names matched case-insensitively, canonical order and escaping.
    raw = (
        b'{ "Layers": [ {"size": 3, "digest": "sha256:' + b"a" * 64 + b'", "mediaType": "x", "extra": 1,'
        b' "annotations": {"z": "<", "a": "1"}} ],\n "schemaVersion": 2, "config": {"mediaType": "c",'
        b' "digest": "sha256:' + b"b" * 64 + b'", "size": 2}, "foo": {"bar": []} }'
    )
    m = Manifest.parse(raw)
    assert m.marshal() == (
        b'{"schemaVersion":2,"config":{"mediaType":"c","digest":"sha256:' + b"b" * 64 + b'","size":2},'
        b'"layers":[{"mediaType":"x","digest":"sha256:' + b"a" * 64 + b'","size":3,'
        b'"annotations":{"a":"1","z":"\\u003c"}}]}'
    )


def test_manifest_nil_layers_is_null_and_empty_is_array() -> None:
    base = b'{"schemaVersion":2,"config":{"mediaType":"c","digest":"d","size":0}'
    assert Manifest.parse(base + b"}").marshal().endswith(b'"layers":null}')
    assert Manifest.parse(base + b',"layers":[]}').marshal().endswith(b'"layers":[]}')


def test_descriptor_member_order_and_data_base64() -> None:
    d = Descriptor(
        "m",
        "sha256:" + "c" * 64,
        5,
        urls=("http://x",),
        annotations={"k": "v"},
        data=b"hello",
        platform=Platform("arm", "linux", os_version="1", os_features=("f",), variant="v7"),
        artifact_type="t",
    )
    from soci_fs import gojson

    assert gojson.dumps(d.to_go()) == (
        b'{"mediaType":"m","digest":"sha256:' + b"c" * 64 + b'","size":5,"urls":["http://x"],'
        b'"annotations":{"k":"v"},"data":"aGVsbG8=","platform":{"architecture":"arm","os":"linux",'
        b'"os.version":"1","os.features":["f"],"variant":"v7"},"artifactType":"t"}'
    )
    assert Descriptor.from_json(gojson.loads(gojson.dumps(d.to_go()))) == d


@pytest.mark.parametrize(
    "raw",
    [
        b"[]",
        b'{"schemaVersion":"2"}',
        b'{"config":{"size":1.5}}',
        b'{"layers":{}}',
        b'{"config":{"digest":1}}',
    ],
)
def test_manifest_type_errors(raw: bytes) -> None:
    with pytest.raises(FormatError):
        Manifest.parse(raw)


# ---------------------------------------------------------------------------------------------------------
# Layouts


def _layer() -> bytes:
    return gz(make_tar([Entry("a.txt", b"hello\n")]))


def test_resolve_root_single_manifest_and_own_platform(tmp_path: Path) -> None:
    b = LayoutBuilder(tmp_path)
    m = b.image([(MT_LAYER_GZIP, _layer())], platform=ARM64)
    b.write_index_json(m, ref_names=["v1"])
    lay = Layout(tmp_path)
    root = lay.resolve_root()
    assert not root.is_index and root.descriptor.digest == m.digest and root.ref_name == "v1"
    sel = lay.select(root, None, False)
    assert [str(s.platform) for s in sel] == ["linux/arm64/v8"]
    with pytest.raises(NotFound):
        lay.select(root, [parse_platform("linux/amd64")], False)
    with pytest.raises(NotFound):
        lay.resolve_root("nope")


def test_resolve_root_nested_index_and_platform_selection(tmp_path: Path) -> None:
    b = LayoutBuilder(tmp_path)
    m1 = b.image([(MT_LAYER_GZIP, _layer())], platform=AMD64)
    m2 = b.image([(MT_LAYER_GZIP, _layer() + b"")], platform=ARM64)
    idx = b.index([(m1, AMD64), (m2, Platform("arm64", "linux"))])
    b.write_index_json(idx)
    lay = Layout(tmp_path)
    root = lay.resolve_root()
    assert root.is_index and root.descriptor.digest == idx.digest
    assert [s.descriptor.digest for s in lay.select(root, None, False)] == [m1.digest]  # host: linux/amd64
    sel = lay.select(root, [parse_platform("linux/arm64")], False)
    assert sel[0].descriptor.digest == m2.digest and str(sel[0].platform) == "linux/arm64/v8"
    assert [str(s.platform) for s in lay.select(root, None, True)] == ["linux/amd64", "linux/arm64"]
    with pytest.raises(NotFound):
        lay.select(root, [parse_platform("linux/s390x")], False)


def test_index_json_as_list_drops_absent_entries(tmp_path: Path) -> None:
    b = LayoutBuilder(tmp_path)
    m1 = b.image([(MT_LAYER_GZIP, _layer())], platform=AMD64)
    m2 = b.image([(MT_LAYER_GZIP, _layer())], platform=ARM64)
    ghost = Descriptor(oci.MT_OCI_MANIFEST, "sha256:" + "0" * 64, 10)
    b.write_index_json(m1, m2, ghost)
    root = Layout(tmp_path).resolve_root()
    assert root.is_index and [d.digest for d in root.index.manifests] == [m1.digest, m2.digest]
    # Only one entry left after dropping the ghost: that manifest is the root.
    b.write_index_json(m1, ghost)
    assert Layout(tmp_path).resolve_root().descriptor.digest == m1.digest
    b.write_index_json(ghost)
    with pytest.raises(NotFound):
        Layout(tmp_path).resolve_root()


def test_blob_reads_verify_digest_and_size(tmp_path: Path) -> None:
    b = LayoutBuilder(tmp_path)
    d = b.blob(b"payload")
    lay = Layout(tmp_path)
    assert lay.read_blob(d) == b"payload"
    with pytest.raises(FormatError, match="size 7 does not match"):
        lay.read_blob(Descriptor("", d.digest, 8))
    lay.blob_path(d.digest).write_bytes(b"PAYLOAD")
    with pytest.raises(FormatError, match=d.digest + r".*digest mismatch"):
        lay.read_blob(d)
    with pytest.raises(FormatError, match="digest mismatch"), lay.open_blob(d) as r:
        r.finish()
    with pytest.raises(NotFound, match="not present"):
        lay.read_blob(Descriptor("", "sha256:" + "1" * 64, 1))
    with pytest.raises(FormatError, match="invalid digest"):
        lay.read_blob(Descriptor("", "sha256:../../etc/passwd", 1))


def _tar_with(members: list[tarfile.TarInfo]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for m in members:
            tf.addfile(m, io.BytesIO(b"x" * m.size) if m.isfile() else None)
    return buf.getvalue()


def _member(name: str, type_: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type = type_
    m.linkname = linkname
    m.size = 1 if type_ == tarfile.REGTYPE else 0
    return m


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (_member("/abs"), "unsafe member path"),
        (_member("blobs/../../x"), "unsafe member path"),
        (_member("evil", tarfile.SYMTYPE, "../../etc"), "leaves the archive"),
        (_member("evil", tarfile.SYMTYPE, "/etc/passwd"), "leaves the archive"),
        (_member("evil", tarfile.LNKTYPE, "../x"), "leaves the archive"),
        (_member("dev", tarfile.CHRTYPE), "unsupported member type"),
    ],
)
def test_extract_refuses_unsafe_members(tmp_path: Path, member: tarfile.TarInfo, message: str) -> None:
    archive = tmp_path / "a.tar"
    archive.write_bytes(_tar_with([member]))
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(FormatError, match=message):
        oci.extract_tar(archive, dest)
    assert not (tmp_path / "x").exists()


def test_layout_open_tar_and_truncated_tar(tmp_path: Path) -> None:
    src = tmp_path / "lay"
    b = LayoutBuilder(src)
    m = b.image([(MT_LAYER_GZIP, _layer())])
    b.write_index_json(m)
    archive = tmp_path / "lay.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(src, arcname=".")
    with Layout.open(archive) as lay:
        assert lay.resolve_root().descriptor.digest == m.digest
        extracted = lay.root
    assert not extracted.exists()  # temp dir removed
    data = archive.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(FormatError, match="not a readable tar"), Layout.open(tmp_path / "cut.tar"):
        pass
    with pytest.raises(NotFound), Layout.open(tmp_path / "missing.tar"):
        pass


def test_write_layout_dir_and_tar_atomic(tmp_path: Path) -> None:
    src = tmp_path / "src"
    b = LayoutBuilder(src)
    good = b.blob(b"good")
    bad = b.blob(b"bad")
    Layout(src).blob_path(bad.digest).write_bytes(b"tampered")
    idx = oci.index_json_for(good)
    out = tmp_path / "out"
    oci.write_layout_dir(out, [(good.digest, Layout(src).blob_path(good.digest))], idx)
    assert (out / "index.json").read_bytes() == idx
    assert (out / "oci-layout").read_bytes() == b'{"imageLayoutVersion":"1.0.0"}'
    assert Layout(out).read_blob(good) == b"good"
    # A failing write leaves the previous output and no temp files.
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(FormatError, match=bad.digest):
        oci.write_layout_dir(out, [(bad.digest, Layout(src).blob_path(bad.digest))], idx)
    assert (out / "index.json").read_bytes() == idx
    assert sorted(os.listdir(tmp_path)) == before
    tar = tmp_path / "out.tar"
    with pytest.raises(FormatError, match=bad.digest):
        oci.write_layout_tar(tar, [(bad.digest, Layout(src).blob_path(bad.digest))], idx)
    assert not tar.exists() and sorted(os.listdir(tmp_path)) == before
    oci.write_layout_tar(tar, [(good.digest, Layout(src).blob_path(good.digest))], idx)
    with tarfile.open(tar) as tf:
        names = tf.getnames()
    assert names == ["blobs", "blobs/sha256", "blobs/sha256/" + good.digest[7:], "index.json", "oci-layout"]
    assert oci.index_json_for(good) == compact(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": "application/octet-stream", "digest": good.digest, "size": 4}],
        }
    )


def test_image_index_round_trip() -> None:
    raw = compact({"schemaVersion": 2, "manifests": [], "annotations": {"b": "1", "a": "2"}, "x": 1})
    assert (
        ImageIndex.parse(raw).marshal()
        == b'{"schemaVersion":2,"manifests":[],"annotations":{"a":"2","b":"1"}}'
    )
