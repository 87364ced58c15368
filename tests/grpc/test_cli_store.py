"""``soci create --oci-layout`` into the local store, then the store-backed index/ztoc/rebuild-db commands."""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path

import pytest

from soci_fs import index as si
from soci_fs.oci import Layout, Platform
from soci_fs.store import Store
from tests.fs.ocigen import MT_LAYER_GZIP, MT_LAYER_TAR, Entry, LayoutBuilder, generated_tree, gz, make_tar
from tests.grpc.clihelp import ok, run, run_exe, tar_x, umoci_image


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    b = LayoutBuilder(tmp_path / "img")
    rnd = random.Random(3)
    g = gz(make_tar([*generated_tree(31, n_files=25), Entry("gen/big.bin", rnd.randbytes(400_000))]))
    t = make_tar(generated_tree(32, n_files=12))
    amd = b.image([(MT_LAYER_GZIP, g), (MT_LAYER_TAR, t)], platform=Platform("amd64", "linux"))
    arm = b.image([(MT_LAYER_GZIP, g)], platform=Platform("arm64", "linux", variant="v8"))
    idx = b.index([(amd, Platform("amd64", "linux")), (arm, Platform("arm64", "linux", variant="v8"))])
    b.write_index_json(idx, ref_names=["app"])
    return tmp_path / "img", {
        "amd": amd.digest,
        "arm": arm.digest,
        "g": si.sha256_digest(g),
        "t": si.sha256_digest(t),
    }


def test_create_list_info_getfile_remove(tmp_path: Path, image: tuple[Path, dict[str, str]]) -> None:
    src, d = image
    root = tmp_path / "root"
    r = ok(
        run(
            "--root",
            root,
            "create",
            "--oci-layout",
            src,
            "--all-platforms",
            "--min-layer-size",
            "0",
            "--span-size",
            "65536",
        )
    )
    lines = r.text.splitlines()
    assert lines[0].startswith(f"layer {d['g']} -> ztoc ") and lines[1].startswith(f"layer {d['t']} -> ztoc ")
    assert lines[2].endswith("(already exists)")  # the arm64 manifest shares the gzip layer
    assert oct(root.stat().st_mode & 0o777) == "0o700"

    listing = ok(run("index", "list", "--root", root)).text.splitlines()  # global flag after the command
    assert listing[0].split() == [
        "DIGEST",
        "SIZE",
        "IMAGE",
        "REF",
        "PLATFORM",
        "MEDIA",
        "TYPE",
        "MANIFEST",
        "VERSION",
        "CREATED",
    ]
    assert len(listing) == 3 and all(" ago " in line and " v1 " in line for line in listing[1:])
    quiet = ok(run("--root", root, "index", "ls", "-q")).text.split()
    assert len(quiet) == 2
    arm_only = ok(run("--root", root, "index", "ls", "-q", "-p", "linux/arm64")).text.split()
    assert len(arm_only) == 1
    by_ref = ok(run("--root", root, "index", "ls", "-q", "--ref", d["amd"])).text.split()
    assert len(by_ref) == 1 and by_ref[0] != arm_only[0]

    info = ok(run("--root", root, "index", "info", by_ref[0]))
    stored = Store(root).content.read(by_ref[0])
    assert json.loads(info.out) == json.loads(stored) and info.out.startswith(b'{\n  "schemaVersion": 2,')
    soci = si.parse_index(stored)
    assert soci.version == 1 and soci.subject.digest == d["amd"]

    ztocs = ok(run("--root", root, "ztoc", "ls")).text.splitlines()
    assert ztocs[0].split() == ["DIGEST", "SIZE", "LAYER", "DIGEST"] and len(ztocs) == 3
    assert (
        ok(run("--root", root, "ztoc", "ls", "--ztoc-digest", "sha256:" + "0" * 64)).text.splitlines()[1:]
        == []
    )
    r = run(
        "--root",
        root,
        "ztoc",
        "ls",
        "--image-ref",
        d["arm"],
        "--ztoc-digest",
        soci.ztocs[1].descriptor.digest,
    )
    assert r.rc == 3 and "is not associated with the specified image" in r.err

    # Every regular file of both layers reads back through get-file (the layers were stored too).
    lay = Layout(src)
    for z in soci.ztocs:
        files = tar_x(lay.blob_path(z.layer_digest), tmp_path / "x" / z.layer_digest[7:19])
        for name, want in files.items():
            assert ok(run("--root", root, "ztoc", "get-file", z.descriptor.digest, name)).out == want + b"\n"
    # -o writes the file with mode 0600.
    out = tmp_path / "out.bin"
    z0 = soci.ztocs[0].descriptor.digest
    ok(run("--root", root, "ztoc", "get-file", z0, "gen/big.bin", "-o", out))
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_bytes() == tar_x(lay.blob_path(d["g"]), tmp_path / "y")["gen/big.bin"]
    # Links are followed by name.
    link = ok(run("--root", root, "ztoc", "get-file", z0, "gen/link")).out
    assert link == ok(run("--root", root, "ztoc", "get-file", z0, "gen/file001.bin")).out
    r = run("--root", root, "ztoc", "get-file", z0, "no/such")
    assert r.rc == 3 and r.err == "soci: file 'no/such' not found in the zTOC\n"

    # Wrong kinds.
    r = run("--root", root, "index", "info", z0)
    assert r.rc == 2 and 'Use "soci ztoc info"' in r.err
    r = run("--root", root, "ztoc", "info", by_ref[0])
    assert r.rc == 2 and "belongs to a SOCI index" in r.err
    r = run("--root", root, "index", "rm", z0)
    assert r.rc == 2 and r.err == f"soci: the digest {z0} does not correspond to an index\n"
    r = run("--root", root, "index", "rm", "sha256:" + "1" * 64)
    assert r.rc == 3 and r.err == f"soci: the index of the digest sha256:{'1' * 64} doesn't exist\n"
    r = run("--root", root, "index", "rm", by_ref[0], "--ref", d["amd"])
    assert r.rc == 2 and "but not both" in r.err

    ok(run("--root", root, "index", "rm", "--ref", d["arm"]))
    assert ok(run("--root", root, "index", "ls", "-q")).text.split() == by_ref
    ok(run("--root", root, "index", "remove", by_ref[0]))
    assert ok(run("--root", root, "index", "ls", "-q")).text == ""
    # zTOCs stay until rebuild-db finds their... blobs still there, so they stay.
    ok(run("--root", root, "rebuild-db"))
    assert len(ok(run("--root", root, "ztoc", "ls", "-q")).text.split()) == 2


def test_ztoc_info_json(tmp_path: Path, image: tuple[Path, dict[str, str]]) -> None:
    src, _ = image
    root = tmp_path / "root"
    ok(
        run(
            "--root",
            root,
            "create",
            "--oci-layout",
            src,
            "app",
            "--min-layer-size",
            "0",
            "--span-size",
            "65536",
        )
    )
    ztocs = ok(run("--root", root, "ztoc", "ls", "-q")).text.split()
    for zd in ztocs:
        info = json.loads(ok(run("--root", root, "ztoc", "info", zd)).out)
        assert list(info) == [
            "version",
            "build_tool",
            "size",
            "span_size",
            "num_spans",
            "num_files",
            "num_multi_span_files",
            "files",
        ]
        assert (
            info["version"] == "0.9"
            and info["build_tool"] == "AWS SOCI CLI v0.2"
            and info["span_size"] == 65536
        )
        assert info["size"] == Store(root).content.size(zd)
        assert list(info["files"][0]) == ["filename", "offset", "size", "type", "start_span", "end_span"]
        multi = sum(1 for f in info["files"] if f["start_span"] != f["end_span"])
        assert info["num_multi_span_files"] == multi and info["num_files"] == len(info["files"])
        assert all(0 <= f["start_span"] <= f["end_span"] < info["num_spans"] for f in info["files"])


def test_rebuild_db_rediscovers(tmp_path: Path, image: tuple[Path, dict[str, str]]) -> None:
    src, _ = image
    root = tmp_path / "root"
    ok(run("--root", root, "create", "--oci-layout", src, "--min-layer-size", "0"))
    before = ok(run("--root", root, "index", "ls")).text.splitlines()[1].split()
    os.unlink(root / "artifacts.sqlite")
    for extra in ("-wal", "-shm"):
        (root / ("artifacts.sqlite" + extra)).unlink(missing_ok=True)
    assert ok(run("--root", root, "index", "ls", "-q")).text == ""
    ok(run_exe("--root", root, "rebuild-db"))
    after = ok(run("--root", root, "index", "ls")).text.splitlines()[1].split()
    assert after[:3] == before[:3]  # digest, size, platform (manifest and config were stored too)
    assert len(ok(run("--root", root, "ztoc", "ls", "-q")).text.split()) == 2


def test_create_bad_input_leaves_store_empty(tmp_path: Path) -> None:
    b = LayoutBuilder(tmp_path / "img")
    good = gz(make_tar(generated_tree(41, n_files=5)))
    bad = bytearray(gz(make_tar(generated_tree(42, n_files=5))))
    for i in range(100, 300):
        bad[i] ^= 0xFF
    m = b.image([(MT_LAYER_GZIP, good), (MT_LAYER_GZIP, bytes(bad))])
    b.write_index_json(m)
    root = tmp_path / "root"
    r = run("--root", root, "create", "--oci-layout", tmp_path / "img", "--min-layer-size", "0")
    assert r.rc == 1 and r.err.startswith(
        "soci: errors encountered while building soci layers; layer sha256:"
    )
    assert r.out == b""
    assert not list((root / "content" / "blobs" / "sha256").iterdir())
    assert ok(run("--root", root, "ztoc", "ls", "-q")).text == ""


def test_umoci_image_into_store_with_exe(tmp_path: Path) -> None:
    layout = umoci_image(
        tmp_path / "u",
        [{"etc/hello.txt": b"hi\n", "usr/lib/json": Path("/usr/lib/python3.11/json")}],
    )
    root = tmp_path / "root"
    r = run_exe(
        "--root",
        root,
        "create",
        "--oci-layout",
        layout,
        "test",
        "--min-layer-size",
        "0",
        "--span-size",
        "65536",
    )
    assert r.rc == 0, r.err
    zd = r.out.decode().split()[-1]
    got = run_exe("--root", root, "ztoc", "get-file", zd, "etc/hello.txt")
    assert got.rc == 0 and got.out == b"hi\n\n"
    r = run_exe("--root", root, "index", "info", "sha256:" + "2" * 64)
    assert r.rc == 3 and r.err == f"soci: the index of the digest sha256:{'2' * 64} doesn't exist\n"
