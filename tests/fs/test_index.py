"""SOCI index manifests: exact bytes, parsing, the layer rules of formats.md §2.1 and the v2 image of §4."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest

from soci_fs import gojson
from soci_fs import index as si
from soci_fs.errors import FormatError, NotFound, SociError
from soci_fs.oci import Descriptor, ImageIndex, Layout, Manifest, Platform, parse_platform
from tests.fs.ocigen import (
    MT_LAYER_GZIP,
    MT_LAYER_TAR,
    Entry,
    LayoutBuilder,
    generated_tree,
    gz,
    make_tar,
)

A, B, C = "sha256:" + "a" * 64, "sha256:" + "b" * 64, "sha256:" + "c" * 64


@pytest.mark.parametrize(
    ("media_type", "expected"),
    [
        ("application/vnd.oci.image.layer.v1.tar+gzip", "gzip"),
        ("application/vnd.oci.image.layer.v1.tar+zstd", "zstd"),
        ("application/vnd.oci.image.layer.v1.tar", "uncompressed"),
        ("application/vnd.oci.image.layer.v1.tar+foo", "none"),  # printed as "" in the skip line
        ("application/vnd.oci.image.layer.v1.tar+zstd+gzip", "zstd"),  # suffixes sorted, last counts
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", "gzip"),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar", "none"),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", "gzip"),
        ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "gzip"),
        ("application/vnd.docker.image.rootfs.diff.tar", "unknown"),
        ("application/vnd.docker.image.rootfs.diff.tar.zstd", "zstd"),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip+x", "none"),
    ],
)
def test_diff_compression(media_type: str, expected: str) -> None:
    assert si.is_layer_type(media_type)
    assert si.diff_compression(media_type) == expected


def test_unknown_layer_subtype_is_an_error() -> None:
    mt = "application/vnd.oci.image.layer.v2.tar+gzip"
    assert si.is_layer_type(mt)
    with pytest.raises(FormatError, match="could not determine layer compression"):
        si.diff_compression(mt)
    assert not si.is_layer_type("application/vnd.example.thing")


def test_v1_index_bytes_match_upstream_form() -> None:
    layer = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", B, 5)
    z = si.ztoc_descriptor(A, 912345, layer, 4194304, False)
    subject = Descriptor("application/vnd.oci.image.manifest.v1+json", C, 1234, annotations={"x": "y"})
    m = si.index_manifest([z], version=1, subject=subject)
    expected = (
        '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":'
        '"application/vnd.amazon.soci.index.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe'
        '77e8310c060f61caaff8a","size":2},"layers":[{"mediaType":"application/octet-stream","digest":"'
        + A
        + '",'
        '"size":912345,"annotations":{"com.amazon.soci.image-layer-digest":"'
        + B
        + '","com.amazon.soci.image-'
        'layer-mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","com.amazon.soci.span-size":"4194304"}}],'
        '"subject":{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"'
        + C
        + '","size":1234},'
        '"annotations":{"com.amazon.soci.build-tool-identifier":"AWS SOCI CLI v0.2"}}'
    )
    assert m.marshal() == expected.encode()
    assert hashlib.sha256(si.EMPTY_CONFIG).hexdigest() == si.EMPTY_CONFIG_DIGEST[7:]


def test_v2_index_has_no_subject_and_xattr_annotation_sorted() -> None:
    layer = Descriptor("application/vnd.oci.image.layer.v1.tar", B, 5)
    z = si.ztoc_descriptor(A, 7, layer, 65536, True)
    data = si.index_manifest([z], version=2, subject=Descriptor("m", C, 1)).marshal()
    assert b'"subject"' not in data and b"index.v2+json" in data
    assert (
        b'"annotations":{"com.amazon.soci.disable-xattrs":"true","com.amazon.soci.image-layer-digest":'
        in data
    )


def test_parse_index() -> None:
    layer = Descriptor(MT_LAYER_GZIP, B, 5)
    z = si.ztoc_descriptor(A, 7, layer, 65536, False)
    pf = Descriptor(si.MT_PREFETCH, C, 3, annotations={si.ANN_LAYER_DIGEST: B})
    data = si.index_manifest([z, pf], version=1, subject=Descriptor("m", C, 1)).marshal()
    idx = si.parse_index(data)
    assert idx.version == 1 and idx.subject is not None and idx.build_tool == si.BUILD_TOOL
    assert idx.ztoc_for_layer(B) is not None and idx.ztoc_for_layer(B).span_size == 65536
    assert idx.prefetches == (pf,)
    bad = Manifest(config=Descriptor("application/vnd.oci.image.config.v1+json", A, 2), layers=[]).marshal()
    with pytest.raises(FormatError, match="unknown index version"):
        si.parse_index(bad)
    assert not si.is_soci_index(b"not json")


# ---------------------------------------------------------------------------------------------------------
# Building (real zTOC builder)


def _build(
    layout: Layout, manifest_desc: Descriptor, **opts: object
) -> tuple[si.BuiltIndex, list[str], dict]:
    lines: list[str] = []
    blobs: dict[str, bytes] = {}
    built = si.build_index(
        manifest_desc,
        layout.read_manifest(manifest_desc),
        version=int(opts.pop("version", 1)),  # type: ignore[call-overload]
        open_layer=layout.open_blob,
        put_blob=lambda b: blobs.__setitem__(si.sha256_digest(b), b),
        lookup_ztoc=opts.pop("lookup", lambda d, s: None),  # type: ignore[arg-type]
        options=si.BuildOptions(**opts),  # type: ignore[arg-type]
        emit=lines.append,
    )
    return built, lines, blobs


# A fixed, generated layer; its zTOC and index digests are recorded below. If the zTOC writer or the
# tar/gzip conventions change, these change: recompute only after checking against upstream bytes.
# The tar and gzip digests pin the generator (Python's tarfile and zlib at level 6, mtime 0).
GOLDEN_TAR = make_tar(generated_tree(7, n_files=30, max_size=150_000))
GOLDEN_GZ = gz(GOLDEN_TAR, level=6)
GOLDEN = {
    "tar_digest": "sha256:ed09e4555b66ec729deb7724f816eefedda5ccbe0f480328d28748ee6608b689",
    "gz_digest": "sha256:ef28e37d30aa85977ec71774a50c847d432846c4c47ff287471a178922117150",
    "ztoc_gz_64k": "sha256:56be54ae99fb1ab8789d25cbb57410e0161a31a3fd48ac3a8ef6f6613c31a27d",
    "ztoc_tar_64k": "sha256:5152f12516b2db42c613699e8ac4f7478633be77952c7d3e473a3827eb65b38c",
    "index_v1": "sha256:ea3599d1052930ad89c810b21f45323fd8a0a1225baa36dc80e5b3bd731d1f53",
}


def test_golden_layer_index(tmp_path: Path) -> None:
    b = LayoutBuilder(tmp_path)
    m = b.image([(MT_LAYER_GZIP, GOLDEN_GZ), (MT_LAYER_TAR, GOLDEN_TAR)])
    b.write_index_json(m)
    built, lines, blobs = _build(Layout(tmp_path), m, span_size=65536, min_layer_size=0)
    got = {
        "tar_digest": si.sha256_digest(GOLDEN_TAR),
        "gz_digest": si.sha256_digest(GOLDEN_GZ),
        "ztoc_gz_64k": built.outcomes[0].ztoc.digest,
        "ztoc_tar_64k": built.outcomes[1].ztoc.digest,
        "index_v1": built.descriptor.digest,
    }
    assert got == GOLDEN
    assert lines == [
        f"layer {got['gz_digest']} -> ztoc {got['ztoc_gz_64k']}",
        f"layer {got['tar_digest']} -> ztoc {got['ztoc_tar_64k']}",
    ]
    assert set(blobs) == {got["ztoc_gz_64k"], got["ztoc_tar_64k"], si.EMPTY_CONFIG_DIGEST, got["index_v1"]}
    idx = si.parse_index(blobs[got["index_v1"]])
    assert idx.subject == m.short()


def test_layer_rules_messages(tmp_path: Path) -> None:
    b = LayoutBuilder(tmp_path)
    small = gz(make_tar([Entry("s", b"x")]))
    big = gz(make_tar(generated_tree(1, n_files=5)))
    zstd_like = b"not really zstd" * 100
    m = b.image(
        [
            (MT_LAYER_GZIP, small),
            ("application/vnd.oci.image.layer.v1.tar+zstd", zstd_like),
            (si.MT_PREFETCH, b"{}"),
            (MT_LAYER_GZIP, big),
        ]
    )
    built, lines, _ = _build(Layout(tmp_path), m, span_size=65536, min_layer_size=len(small) + 1)
    d_small, d_z, _, d_big = (x.digest for x in Layout(tmp_path).read_manifest(m).layers)
    assert lines[0] == (
        f"ztoc skipped - layer {d_small} ({MT_LAYER_GZIP}) size {len(small)} is less than min-layer-size "
        f"{len(small) + 1}"
    )
    assert lines[1] == (
        f"ztoc skipped - layer {d_z} (application/vnd.oci.image.layer.v1.tar+zstd) is compressed in an "
        'unsupported format. expect: [tar, gzip, unknown] but got "zstd"'
    )
    assert lines[2].startswith(f"layer {d_big} -> ztoc sha256:")
    assert [o.layer.digest for o in built.ztocs] == [d_big]
    # Reuse: the lookup answers, the line says so and the digest is the same.
    z_bytes = built.ztocs[0].ztoc_bytes
    built2, lines2, _ = _build(
        Layout(tmp_path), m, span_size=65536, min_layer_size=len(small) + 1, lookup=lambda d, s: z_bytes
    )
    assert lines2[2].endswith("(already exists)") and built2.descriptor == built.descriptor
    # --force ignores the lookup.
    _, lines3, _ = _build(
        Layout(tmp_path),
        m,
        span_size=65536,
        min_layer_size=len(small) + 1,
        force=True,
        lookup=lambda d, s: b"junk",
    )
    assert not lines3[2].endswith("(already exists)")


def test_no_ztocs_and_whole_build_failures(tmp_path: Path) -> None:
    b = LayoutBuilder(tmp_path)
    m = b.image([(MT_LAYER_GZIP, gz(make_tar([Entry("a", b"1")])))])
    with pytest.raises(
        si.NoZtocsError, match="no ztocs created, all layers either skipped or produced errors"
    ):
        _build(Layout(tmp_path), m, min_layer_size=1 << 20)
    bad = b.image([(MT_LAYER_GZIP, b"\x1f\x8b\x08\x00" + b"\x00" * 6 + b"garbage that is not deflate" * 20)])
    with pytest.raises(SociError, match="errors encountered while building soci layers; layer sha256:"):
        _build(Layout(tmp_path), bad, min_layer_size=0)
    odd = b.image([("application/vnd.example.notalayer", b"x" * 100)])
    with pytest.raises(SociError, match="is not a layer type"):
        _build(Layout(tmp_path), odd, min_layer_size=0)
    unk = b.image([("application/vnd.oci.image.layer.v9.tar+gzip", b"x" * 100)])
    with pytest.raises(SociError, match="could not determine layer compression"):
        _build(Layout(tmp_path), unk, min_layer_size=0)


def test_missing_and_tampered_layer_blobs(tmp_path: Path) -> None:
    b = LayoutBuilder(tmp_path)
    layer = gz(make_tar(generated_tree(3, n_files=5)))
    m = b.image([(MT_LAYER_GZIP, layer)])
    lay = Layout(tmp_path)
    path = lay.blob_path(si.sha256_digest(layer))
    path.write_bytes(layer[:4] + b"\x01\x02\x03\x04" + layer[8:])  # gzip mtime: still valid gzip
    with pytest.raises(SociError, match="digest mismatch"):
        _build(lay, m, min_layer_size=0)
    path.unlink()
    with pytest.raises(NotFound, match="not present"):
        _build(lay, m, min_layer_size=0)


def test_truncated_tar_layer_fails(tmp_path: Path) -> None:
    b = LayoutBuilder(tmp_path)
    full = make_tar([Entry("big", bytes(range(256)) * 400)])
    m = b.image([(MT_LAYER_GZIP, gz(full[:20000]))])
    with pytest.raises(SociError, match="errors encountered while building soci layers"):
        _build(Layout(tmp_path), m, min_layer_size=0)


def test_xattr_optimization(tmp_path: Path) -> None:
    b = LayoutBuilder(tmp_path)
    plain = gz(make_tar([Entry("a", b"1")]))
    with_x = gz(make_tar([Entry("b", b"2", pax={"SCHILY.xattr.user.k": "v"})]))
    opaque = gz(make_tar([Entry("d/", type=tarfile.DIRTYPE), Entry("d/.wh..wh..opq")]))
    m = b.image([(MT_LAYER_GZIP, plain), (MT_LAYER_GZIP, with_x), (MT_LAYER_GZIP, opaque)])
    built, _, _ = _build(Layout(tmp_path), m, min_layer_size=0, optimizations=frozenset({"xattr"}))
    flags = [(o.ztoc.annotations or {}).get(si.ANN_DISABLE_XATTRS) for o in built.ztocs]
    assert flags == ["true", None, None]
    built, _, _ = _build(Layout(tmp_path), m, min_layer_size=0)
    assert all(si.ANN_DISABLE_XATTRS not in (o.ztoc.annotations or {}) for o in built.ztocs)


def test_bad_options() -> None:
    with pytest.raises(SociError, match=r"optimization foo is not a valid optimization \[xattr\]"):
        si.BuildOptions(optimizations=frozenset({"foo"}))


# ---------------------------------------------------------------------------------------------------------
# The v2 SOCI-enabled image (§4)


def _built(digest: str, size: int = 10) -> si.BuiltIndex:
    m = si.index_manifest([], version=2)
    return si.BuiltIndex(
        2,
        m,
        b"",
        Descriptor(
            si.MT_OCI_MANIFEST if False else "application/vnd.oci.image.manifest.v1+json", digest, size
        ),
    )


def test_convert_single_manifest() -> None:
    plat = Platform("amd64", "linux")
    man = gojson.dumps(
        gojson.Struct(
            ("schemaVersion", 2),
            ("mediaType", "application/vnd.docker.distribution.manifest.v2+json"),
            (
                "config",
                {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": A, "size": 3},
            ),
            ("layers", []),
        )
    )
    root = Descriptor("application/vnd.docker.distribution.manifest.v2+json", si.sha256_digest(man), len(man))
    put: dict[str, bytes] = {}
    conv = si.convert_image(
        root,
        None,
        [si.PlatformIndex(plat, root, _built(B))],
        read_manifest=lambda d: man,
        put_blob=lambda b: put.__setitem__(si.sha256_digest(b), b),
        root_platform=plat,
    )
    new_m = Manifest.parse(put[conv.manifest_digests[root.digest]])
    assert new_m.media_type == "application/vnd.oci.image.manifest.v1+json"
    assert new_m.config.media_type == "application/vnd.oci.image.config.v1+json"
    assert new_m.annotations == {si.ANN_INDEX_DIGEST: B}
    new_digest = conv.manifest_digests[root.digest]
    assert (
        conv.data
        == (
            '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":['
            '{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"'
            + new_digest
            + '","size":'
            + str(len(put[new_digest]))
            + ',"annotations":{"com.amazon.soci.index-digest":"'
            + B
            + '"},"platform":{"architecture":"amd64",'
            '"os":"linux"}},{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"'
            + B
            + '","size":10,'
            '"annotations":{"com.amazon.soci.image-manifest-digest":"'
            + new_digest
            + '"},"platform":{"architecture":'
            '"amd64","os":"linux"},"artifactType":"application/vnd.amazon.soci.index.v2+json"}]}'
        ).encode()
    )
    assert conv.descriptor.digest == si.sha256_digest(conv.data) and put[conv.descriptor.digest] == conv.data


def test_convert_index_replaces_existing_soci_entry_and_keeps_missing_manifests() -> None:
    arm = parse_platform("linux/arm64")
    man = (
        b'{"schemaVersion":2,"config":{"mediaType":"x","digest":"' + A.encode() + b'","size":1},"layers":[]}'
    )
    md = si.sha256_digest(man)
    old_soci = Descriptor(
        "application/vnd.oci.image.manifest.v1+json",
        C,
        5,
        platform=Platform("arm64", "linux"),
        artifact_type=si.ARTIFACT_TYPE_V2,
    )
    missing = Descriptor(
        "application/vnd.oci.image.manifest.v1+json",
        "sha256:" + "d" * 64,
        7,
        platform=Platform("s390x", "linux"),
    )
    idx = ImageIndex(
        manifests=[
            Descriptor(
                "application/vnd.oci.image.manifest.v1+json",
                md,
                len(man),
                platform=Platform("arm64", "linux", variant="v8"),
            ),
            missing,
            old_soci,
        ],
        media_type="application/vnd.docker.distribution.manifest.list.v2+json",
        annotations={"keep": "me"},
    )
    root = Descriptor(idx.media_type, "sha256:" + "e" * 64, 1)
    conv = si.convert_image(
        root,
        idx,
        [si.PlatformIndex(arm, idx.manifests[0], _built(B))],
        read_manifest=lambda d: man if d.digest == md else None,
        put_blob=lambda b: None,
    )
    out = conv.index
    assert out.media_type == "application/vnd.oci.image.index.v1+json" and out.annotations == {"keep": "me"}
    assert len(out.manifests) == 3
    assert out.manifests[1] == missing  # kept unchanged
    assert (
        out.manifests[2].digest == B and out.manifests[2].platform == arm
    )  # replaced in place, as requested
    assert out.manifests[2].annotations == {si.ANN_MANIFEST_DIGEST: out.manifests[0].digest}


def test_unknown_suffix_skip_line_prints_empty_algorithm(tmp_path: Path) -> None:
    b = LayoutBuilder(tmp_path)
    mt = "application/vnd.oci.image.layer.v1.tar+foo"
    m = b.image([(mt, b"x" * 50), (MT_LAYER_GZIP, gz(make_tar([Entry("a", b"1")])))])
    _, lines, _ = _build(Layout(tmp_path), m, min_layer_size=0)
    d = Layout(tmp_path).read_manifest(m).layers[0].digest
    assert lines[0] == (
        f"ztoc skipped - layer {d} ({mt}) is compressed in an unsupported format. "
        'expect: [tar, gzip, unknown] but got ""'
    )
