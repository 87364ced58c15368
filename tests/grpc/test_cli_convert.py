"""``soci convert --standalone`` end to end on real images (umoci-made and Python-made layouts)."""

from __future__ import annotations

import os
import random
import tarfile
from pathlib import Path

import pytest

from soci_fs import index as si
from soci_fs.oci import ImageIndex, Layout, Manifest, Platform
from tests.fs.ocigen import MT_LAYER_GZIP, MT_LAYER_TAR, Entry, LayoutBuilder, generated_tree, gz, make_tar
from tests.grpc.clihelp import layout_files, ok, run, run_exe, tar_x, umoci_image


@pytest.fixture(scope="module")
def umoci_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("umoci")
    rnd = random.Random(5)
    return umoci_image(
        work,
        [
            {"usr/lib/json": Path("/usr/lib/python3.11/json"), "etc/hello.txt": b"hello\n"},
            {"data/random.bin": rnd.randbytes(700_000), "data/text.txt": b"lorem ipsum\n" * 30_000},
        ],
    )


def _check_converted(out_layout: Layout, span_size: int, tmp: Path) -> None:
    """The output is a v2 SOCI-enabled image and every file reads back through get-file."""
    top = out_layout.index_json()
    assert (
        len(top.manifests) == 1 and top.manifests[0].media_type == "application/vnd.oci.image.index.v1+json"
    )
    image_index = out_layout.read_index(top.manifests[0])
    images = [d for d in image_index.manifests if d.artifact_type != si.ARTIFACT_TYPE_V2]
    socis = [d for d in image_index.manifests if d.artifact_type == si.ARTIFACT_TYPE_V2]
    assert socis and image_index.manifests[-len(socis) :] == socis  # appended after the images
    for s in socis:
        manifest_digest = s.annotations[si.ANN_MANIFEST_DIGEST]
        img = next(d for d in images if d.digest == manifest_digest)
        assert img.annotations == {si.ANN_INDEX_DIGEST: s.digest}
        m = out_layout.read_manifest(img)
        assert m.annotations[si.ANN_INDEX_DIGEST] == s.digest
        assert m.config.media_type == "application/vnd.oci.image.config.v1+json"
        soci = si.parse_index(out_layout.read_blob(s))
        assert soci.version == 2 and soci.subject is None
        for z in soci.ztocs:
            assert z.span_size == span_size
            layer = next(x for x in m.layers if x.digest == z.layer_digest)
            files = tar_x(out_layout.blob_path(layer.digest), tmp / z.layer_digest[7:19])
            info = ok(run("ztoc", "info", z.descriptor.digest, "--oci-layout", out_layout.root))
            assert b'"span_size": ' + str(span_size).encode() in info.out
            for name, want in files.items():
                r = ok(run("ztoc", "get-file", z.descriptor.digest, name, "--oci-layout", out_layout.root))
                assert r.out == want + b"\n", name


@pytest.mark.parametrize("span_size", [65536, 1 << 20])
def test_convert_umoci_image_dir(umoci_layout: Path, tmp_path: Path, span_size: int) -> None:
    dst = tmp_path / "out"
    r = ok(
        run(
            "convert",
            "--standalone",
            "--format",
            "oci-dir",
            "--span-size",
            span_size,
            "--min-layer-size",
            0,
            umoci_layout,
            dst,
        )
    )
    lines = r.text.splitlines()
    assert len(lines) == 2 and all(
        line.startswith("layer sha256:") and " -> ztoc sha256:" in line for line in lines
    )
    _check_converted(Layout(dst), span_size, tmp_path)
    # The source blobs are all there too (a copy of the layout).
    src_blobs = {p.name for p in (umoci_layout / "blobs" / "sha256").iterdir()}
    assert src_blobs <= {p.name for p in (dst / "blobs" / "sha256").iterdir()}


def test_convert_umoci_image_archive_and_exe(umoci_layout: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out.tar"
    r = run_exe("convert", "--standalone", "--min-layer-size", "0", umoci_layout, dst)
    assert r.rc == 0, r.err
    with tarfile.open(dst) as tf:
        names = tf.getnames()
    assert "oci-layout" in names and "index.json" in names
    with Layout.open(dst) as out:
        _check_converted(out, si.DEFAULT_SPAN_SIZE, tmp_path)
        # Same bytes from the executable and in-process.
        r2 = ok(run("index", "ls", "-q", "--oci-layout", dst))
        assert len(r2.text.split()) == 1
    # Running again gives the same archive (deterministic).
    dst2 = tmp_path / "again.tar"
    ok(run("convert", "--standalone", "--min-layer-size", "0", umoci_layout, dst2))
    assert dst.read_bytes() == dst2.read_bytes()


def _multi_platform_layout(root: Path) -> tuple[Path, dict[str, str]]:
    b = LayoutBuilder(root)
    shared = gz(make_tar(generated_tree(11, n_files=30)))
    amd = b.image(
        [(MT_LAYER_GZIP, shared), (MT_LAYER_TAR, make_tar(generated_tree(12, n_files=10)))],
        platform=Platform("amd64", "linux"),
    )
    arm = b.image([(MT_LAYER_GZIP, shared)], platform=Platform("arm64", "linux", variant="v8"))
    idx = b.index([(amd, Platform("amd64", "linux")), (arm, Platform("arm64", "linux", variant="v8"))])
    b.write_index_json(idx, ref_names=["multi"])
    return root, {"amd": amd.digest, "arm": arm.digest, "shared": si.sha256_digest(shared)}


def test_convert_all_platforms_reuses_ztoc_within_run(tmp_path: Path) -> None:
    src, d = _multi_platform_layout(tmp_path / "src")
    dst = tmp_path / "out"
    r = ok(
        run(
            "convert",
            "--standalone",
            "--format=oci-dir",
            "--all-platforms",
            "--span-size",
            "4194304",
            "--min-layer-size",
            "0",
            src,
            dst,
        )
    )
    lines = r.text.splitlines()
    assert len(lines) == 3
    assert lines[2].startswith(f"layer {d['shared']} -> ztoc") and lines[2].endswith("(already exists)")
    out = Layout(dst)
    image_index = out.read_index(out.index_json().manifests[0])
    socis = [x for x in image_index.manifests if x.artifact_type == si.ARTIFACT_TYPE_V2]
    assert [str(x.platform) for x in socis] == ["linux/amd64", "linux/arm64/v8"]
    _check_converted(out, 4194304, tmp_path)
    # Converting the converted image again replaces the SOCI entries in place instead of adding more.
    dst2 = tmp_path / "out2"
    ok(
        run(
            "convert",
            "--standalone",
            "--format",
            "oci-dir",
            "--all-platforms",
            "--min-layer-size",
            "0",
            dst,
            dst2,
        )
    )
    again = Layout(dst2).read_index(Layout(dst2).index_json().manifests[0])
    assert len(again.manifests) == len(image_index.manifests)


def test_convert_platform_selection(tmp_path: Path) -> None:
    src, _ = _multi_platform_layout(tmp_path / "src")
    dst = tmp_path / "out"
    ok(
        run(
            "convert",
            "--standalone",
            "--format",
            "oci-dir",
            "-p",
            "linux/arm64",
            "--min-layer-size",
            "0",
            src,
            dst,
        )
    )
    out = Layout(dst)
    idx = out.read_index(out.index_json().manifests[0])
    socis = [x for x in idx.manifests if x.artifact_type == si.ARTIFACT_TYPE_V2]
    assert len(socis) == 1 and str(socis[0].platform) == "linux/arm64/v8"
    # The amd64 manifest is rewritten too (OCI types) but gets no index-digest annotation.
    amd_entry = next(x for x in idx.manifests if x.platform and x.platform.architecture == "amd64")
    assert amd_entry.annotations is None
    assert out.read_manifest(amd_entry).media_type == "application/vnd.oci.image.manifest.v1+json"
    # Default for an index: the host platform (linux/amd64 here).
    dst2 = tmp_path / "out2.tar"
    ok(run("convert", "--standalone", "--min-layer-size", "0", src, dst2))
    with Layout.open(dst2) as out2:
        idx2 = out2.read_index(out2.index_json().manifests[0])
        assert [str(x.platform) for x in idx2.manifests if x.artifact_type] == ["linux/amd64"]
    r = run("convert", "--standalone", "-p", "linux/s390x", "--min-layer-size", "0", src, tmp_path / "x.tar")
    assert r.rc == 3 and "no manifest for platform linux/s390x" in r.err
    assert not (tmp_path / "x.tar").exists()


def test_convert_skips_empty_platform_and_fails_when_all_empty(tmp_path: Path) -> None:
    b = LayoutBuilder(tmp_path / "src")
    m = b.image([(MT_LAYER_GZIP, gz(make_tar([Entry("a", b"1")])))])
    b.write_index_json(m)
    r = run(
        "convert", "--standalone", tmp_path / "src", tmp_path / "out.tar"
    )  # default min layer size 10 MiB
    assert r.rc == 1
    assert r.err == "soci: no ztocs created, all layers either skipped or produced errors\n"
    assert r.text.startswith("ztoc skipped - layer ")
    assert not (tmp_path / "out.tar").exists()


# ---------------------------------------------------------------------------------------------------------
# Bad input: clear error, non-zero exit, nothing in DST


def _bad_layouts(root: Path) -> dict[str, tuple[Path, str]]:
    out = {}
    tree = generated_tree(21, n_files=8)
    # missing blob
    b = LayoutBuilder(root / "missing")
    layer = gz(make_tar(tree))
    m = b.image([(MT_LAYER_GZIP, layer)])
    b.write_index_json(m)
    os.unlink(Layout(root / "missing").blob_path(si.sha256_digest(layer)))
    out["missing"] = (root / "missing", "not present")
    # digest mismatch (same size, still valid gzip: the gzip mtime field changed)
    b = LayoutBuilder(root / "mismatch")
    m = b.image([(MT_LAYER_GZIP, layer)])
    b.write_index_json(m)
    Layout(root / "mismatch").blob_path(si.sha256_digest(layer)).write_bytes(
        layer[:4] + b"\x09\x09\x09\x09" + layer[8:]
    )
    out["mismatch"] = (root / "mismatch", "digest mismatch")
    # corrupt gzip (blob and digest agree, the data is broken)
    b = LayoutBuilder(root / "corrupt")
    bad = bytearray(layer)
    for i in range(200, 400):
        bad[i] ^= 0x5A
    m = b.image([(MT_LAYER_GZIP, bytes(bad))])
    b.write_index_json(m)
    out["corrupt"] = (root / "corrupt", "errors encountered while building soci layers; layer sha256:")
    # tar truncated mid-file (valid gzip of a cut tar)
    b = LayoutBuilder(root / "truncated")
    full = make_tar([Entry("big.bin", random.Random(1).randbytes(300_000))])
    m = b.image([(MT_LAYER_GZIP, gz(full[:150_000]))])
    b.write_index_json(m)
    out["truncated"] = (root / "truncated", "errors encountered while building soci layers; layer sha256:")
    # manifest pointing at a blob whose size is wrong
    b = LayoutBuilder(root / "badsize")
    cfg = b.blob(b'{"architecture":"amd64","os":"linux"}', "application/vnd.oci.image.config.v1+json")
    lay = b.blob(layer, MT_LAYER_GZIP)
    man = Manifest(
        config=cfg,
        layers=[si.Descriptor(MT_LAYER_GZIP, lay.digest, lay.size + 1)],
        media_type=si.MT_OCI_MANIFEST,
    )
    md = b.blob(man.marshal(), si.MT_OCI_MANIFEST)
    b.write_index_json(md)
    out["badsize"] = (root / "badsize", "does not match its descriptor size")
    return out


@pytest.mark.parametrize("case", ["missing", "mismatch", "corrupt", "truncated", "badsize"])
@pytest.mark.parametrize("fmt", ["oci-dir", "oci-archive"])
def test_convert_bad_input(tmp_path: Path, case: str, fmt: str) -> None:
    src, message = _bad_layouts(tmp_path / "in")[case]
    before = sorted(os.listdir(tmp_path))
    dst = tmp_path / "dst"
    r = run(
        "convert", "--standalone", "--format", fmt, "--min-layer-size", "0", "--span-size", "65536", src, dst
    )
    assert r.rc != 0 and r.err.startswith("soci: ") and message in r.err, r.err
    assert r.err.count("\n") == 1
    assert not dst.exists() and sorted(os.listdir(tmp_path)) == before


def test_convert_bad_input_keeps_existing_dst_dir(tmp_path: Path) -> None:
    src, _ = _bad_layouts(tmp_path / "in")["corrupt"]
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep").write_text("x")
    r = run("convert", "--standalone", "--format", "oci-dir", "--min-layer-size", "0", src, dst)
    assert r.rc == 1 and layout_files(dst) == ["keep"]


def test_convert_refuses_unsafe_archive(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tf:
        info = tarfile.TarInfo("../escape")
        tf.addfile(info)
    r = run("convert", "--standalone", evil, tmp_path / "out.tar")
    assert r.rc == 1 and "unsafe member path '../escape'" in r.err
    assert not (tmp_path.parent / "escape").exists() and not (tmp_path / "out.tar").exists()


def test_image_index_input_unknown_fields_dropped(tmp_path: Path) -> None:
    src, _ = _multi_platform_layout(tmp_path / "src")
    lay = Layout(src)
    top = lay.index_json().manifests[0]
    raw = lay.read_blob(top)
    assert ImageIndex.parse(raw).marshal() == raw  # our generated input is already canonical


def test_get_file_reads_only_needed_spans(
    umoci_layout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from soci_grpc.cli import cmd_base

    dst = tmp_path / "out"
    ok(
        run(
            "convert",
            "--standalone",
            "--format",
            "oci-dir",
            "--span-size",
            "65536",
            "--min-layer-size",
            "0",
            umoci_layout,
            dst,
        )
    )
    out = Layout(dst)
    image_index = out.read_index(out.index_json().manifests[0])
    soci_desc = next(x for x in image_index.manifests if x.artifact_type == si.ARTIFACT_TYPE_V2)
    soci = si.parse_index(out.read_blob(soci_desc))
    z = soci.ztocs[-1]  # the layer with data/random.bin and data/text.txt
    layer_size = out.blob_path(z.layer_digest).stat().st_size
    reads: list[tuple[int, int]] = []
    real = cmd_base.LayoutSource.read_layer_range

    def spy(self: cmd_base.LayoutSource, layer: object, offset: int, length: int) -> bytes:
        reads.append((offset, length))
        return real(self, layer, offset, length)  # type: ignore[arg-type]

    monkeypatch.setattr(cmd_base.LayoutSource, "read_layer_range", spy)
    r = ok(run("ztoc", "get-file", z.descriptor.digest, "data/text.txt", "--oci-layout", dst))
    assert r.out == b"lorem ipsum\n" * 30_000 + b"\n"
    fetched = sum(n for _, n in reads)
    assert 0 < fetched < layer_size / 2, (fetched, layer_size)
