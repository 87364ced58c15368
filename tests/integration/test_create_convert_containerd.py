"""``soci create IMAGE`` and ``soci convert SRC DST`` on images in a real containerd (Debian's 1.6).

Images are OCI layouts made here (gzip layers from :func:`tests.fs.ocigen.make_tar`, configs with
``rootfs.diff_ids``), put into containerd with ``ctr image import`` of a tar of the layout and, where a
registry is involved, pushed to the harness registry (htpasswd auth) as plain images with ``soci push
--oci-layout``. The ``soci`` commands run in this process against that containerd (``--address``,
``--namespace``); ``soci mount`` runs as a child process (the fixture of ``test_lazy_mount``) to show that
what was pushed is found and served lazily. containerd's garbage collector is run on purpose (a lease
deleted with ``sync``, an image deleted with ``sync``) to show which GC labels keep the SOCI artifacts.

One containerd serves the module (each test has its own namespace and ``--root``); it is stopped by PID at
the end, and nothing else here starts containerd, so no two containerd instances run at once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from soci_fs import index as si
from soci_fs.oci import ImageIndex, Manifest, Platform
from soci_fs.store import Store
from soci_grpc.cli import ctrsource
from soci_grpc.cli.cmd_convert import DEST_REF_ERROR
from soci_grpc.cli.cmd_push import V2_WARNING
from soci_grpc.containerd import ContainerdClient
from tests.fs.ocigen import MT_LAYER_GZIP, Entry, LayoutBuilder, gz, make_tar
from tests.grpc.clihelp import Result, ok, run
from tests.harness.containerd import CONTAINERD_BIN, Containerd
from tests.harness.registry import PASSWORD, USER, Registry
from tests.integration.sociimg import ARCH, data_entries
from tests.integration.test_lazy_mount import Mounted, soci_mount  # noqa: F401  (a fixture)

ROOT_ONLY = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(CONTAINERD_BIN) or not os.path.exists("/dev/fuse"),
    reason="needs root, containerd and /dev/fuse",
)
SPAN = 65536
HOST = Platform(ARCH, "linux")
OTHER = Platform("arm64" if ARCH != "arm64" else "amd64", "linux")
_n = itertools.count()


# ---------------------------------------------------------------------------------------------------------
# images


@dataclass
class Img:
    ref: str
    layout: Path
    tar: Path
    manifest: str  # the (host platform's) image manifest digest
    target: str  # what the image record points at (manifest or index)
    layers: list[str]  # host platform's layer digests, base first
    files: dict[str, bytes]  # name -> bytes in the top layer


def base_entries() -> list[Entry]:
    return [Entry("etc/", type=b"5"), Entry("etc/hello.txt", b"hello from the base layer\n")]


def build_image(work: Path, ref: str, *, multi: bool = False) -> Img:
    """A two-layer image named ``ref`` (index.json ref name); ``multi``: an index for HOST and OTHER."""
    top = data_entries("data", 6, 50_000, seed=next(_n))
    files = {e.name: e.data for e in top if e.data}
    layout = work / f"layout-{next(_n)}"
    b = LayoutBuilder(layout)
    manifests = []
    for plat in [HOST, OTHER] if multi else [HOST]:
        tars = [make_tar(base_entries()), make_tar([*top, Entry(f"etc/{plat.architecture}", b"x")])]
        m = b.image(
            [(MT_LAYER_GZIP, gz(t)) for t in tars],
            platform=plat,
            diff_ids=["sha256:" + hashlib.sha256(t).hexdigest() for t in tars],
        )
        manifests.append(m)
    target = (
        b.index([(m, p) for m, p in zip(manifests, [HOST, OTHER], strict=False)]) if multi else manifests[0]
    )
    b.write_index_json(target, ref_names=[ref])
    tar = work / f"{layout.name}.tar"
    subprocess.run(["tar", "-C", str(layout), "-cf", str(tar), "."], check=True)
    doc = json.loads((layout / "blobs" / "sha256" / manifests[0].digest[7:]).read_bytes())
    return Img(
        ref, layout, tar, manifests[0].digest, target.digest, [x["digest"] for x in doc["layers"]], files
    )


@dataclass
class Env:
    containerd: Containerd
    registry: Registry
    ns: str
    root: Path
    work: Path

    def soci(self, *args: str | os.PathLike[str]) -> Result:
        return run("--address", self.containerd.address, "--namespace", self.ns, "--root", self.root, *args)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.containerd.ctr("--namespace", self.ns, *args, check=check)

    def client(self) -> ContainerdClient:
        return ContainerdClient(self.containerd.address, self.ns)

    def import_image(self, img: Img) -> None:
        self.ctr("image", "import", "--no-unpack", "--all-platforms", str(img.tar))

    def push_plain(self, img: Img) -> None:
        """The image as it is into the registry (``soci push`` needs it there)."""
        ok(run("push", "--plain-http", "--user", f"{USER}:{PASSWORD}", "--oci-layout", img.layout, img.ref))

    def gc(self) -> None:
        """Run containerd's garbage collector now (a lease deleted with ``sync`` waits for a collection)."""
        with self.client() as c:
            c.leases.delete(c.leases.create(), sync=True)


@pytest.fixture(scope="module")
def containerd(htpasswd_registry: Registry) -> Iterator[Containerd]:
    c = Containerd(registries=[htpasswd_registry.host])
    try:
        c.start()
        yield c
    finally:
        c.cleanup()


@pytest.fixture
def env(containerd: Containerd, htpasswd_registry: Registry, tmp_path: Path) -> Env:
    return Env(containerd, htpasswd_registry, f"cc-{next(_n)}", tmp_path / "soci-root", tmp_path)


def ztoc_lines(r: Result, layers: list[str], *, reused: bool = False) -> list[str]:
    """The ztoc digests of the per-layer lines, checked to name ``layers`` in order."""
    lines = r.text.splitlines()
    assert [line.split()[1] for line in lines] == layers, r.text
    suffix = " (already exists)" if reused else ""
    assert all(line.endswith(suffix) and " -> ztoc sha256:" in line for line in lines), r.text
    return [line.split()[4] for line in lines]


def table(r: Result) -> list[list[str]]:
    return [line.split() for line in r.text.splitlines()[1:]]


# ---------------------------------------------------------------------------------------------------------
# soci create IMAGE


@ROOT_ONLY
@pytest.mark.integration
def test_create_from_containerd_then_push_and_mount_lazily(
    env: Env,
    soci_mount: Callable[..., Mounted],  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ctrsource, "WINDOW", 65536 + 7)  # layers are streamed in many odd-sized windows
    img = build_image(env.work, f"{env.registry.host}/cc/create{next(_n)}:v1")
    env.push_plain(img)
    env.import_image(img)

    r = ok(env.soci("create", "--min-layer-size", "0", "--span-size", str(SPAN), img.ref))
    ztocs = ztoc_lines(r, img.layers)

    rows = table(ok(env.soci("index", "list")))
    assert len(rows) == 1 and rows[0][2:5] == [f"linux/{ARCH}", si.MT_OCI_MANIFEST, "v1"], rows
    index_digest = rows[0][0]
    # --ref is resolved through containerd, normalized or not
    assert ok(env.soci("index", "list", "-q", "--ref", img.ref)).text == index_digest + "\n"
    assert sorted(table(ok(env.soci("ztoc", "list")))) == sorted(
        [
            [z, str(len(Store(env.root).content.read(z))), layer]
            for z, layer in zip(ztocs, img.layers, strict=True)
        ]
    )
    idx = si.parse_index(ok(env.soci("index", "info", index_digest)).out)
    assert idx.version == 1 and idx.subject is not None and idx.subject.digest == img.manifest
    assert [z.layer_digest for z in idx.ztocs] == img.layers
    # the soci store holds the artifacts, the manifest and config, not the layers (they stay in containerd)
    content = Store(env.root).content
    assert content.has(index_digest) and all(content.has(z) for z in ztocs) and content.has(img.manifest)
    assert not any(content.has(x) for x in img.layers)
    # ... which ztoc get-file reads from containerd
    name, data = next(iter(img.files.items()))
    assert ok(env.soci("ztoc", "get-file", ztocs[1], name)).out == data + b"\n"
    with env.client() as c:
        assert c.images.get(img.ref).labels["containerd.io/gc.ref.content.soci-index"] == index_digest

    # a second create reuses the zTOCs
    ztoc_lines(
        ok(env.soci("create", "--min-layer-size", "0", "--span-size", str(SPAN), img.ref)),
        img.layers,
        reused=True,
    )

    r = ok(env.soci("push", "--plain-http", "--user", f"{USER}:{PASSWORD}", img.ref))
    assert f"pushing soci index with digest: {index_digest}" in r.text.splitlines()
    assert f"successfully pushed artifact with digest: {index_digest}" in r.text.splitlines()

    m = soci_mount(img.ref, "--user", f"{USER}:{PASSWORD}", root=tmp_path / "mount-root")
    assert any(f"soci index {index_digest} (v1, found by v1 referrers)" in line for line in m.lines), m.lines
    for name, data in img.files.items():
        assert (m.mountpoint / name).read_bytes() == data
    assert (m.mountpoint / "etc" / "hello.txt").read_bytes() == b"hello from the base layer\n"
    m.stop()


@ROOT_ONLY
@pytest.mark.integration
def test_create_into_containerds_content_store_is_kept_by_gc_labels(env: Env) -> None:
    img = build_image(env.work, f"example.test/cc/gc{next(_n)}:v1", multi=True)
    env.import_image(img)
    flags = ["--min-layer-size", "0", "--span-size", str(SPAN)]

    r = ok(env.soci("--content-store", "containerd", "create", *flags, "--all-platforms", img.ref))
    lines = r.text.splitlines()
    assert len(lines) == 4 and [x.split()[1] for x in lines[:2]] == img.layers, r.text

    rows = table(ok(env.soci("--content-store", "containerd", "index", "list")))
    by_platform = {row[2]: row[0] for row in rows}
    assert sorted(by_platform) == sorted([f"linux/{ARCH}", str(OTHER)]) and {row[4] for row in rows} == {"v1"}
    assert not (env.root / "content" / "blobs" / "sha256" / by_platform[str(HOST)][7:]).exists()
    with env.client() as c:
        labels = c.images.get(img.ref).labels
        for plat, digest in by_platform.items():
            assert labels[f"containerd.io/gc.ref.content.soci-index.{plat.replace('/', '-')}"] == digest
        assert labels["containerd.io/gc.ref.content.soci-index"] in by_platform.values()
        artifacts: set[str] = set()
        for digest in by_platform.values():
            idx = si.parse_index(c.content.read(digest))
            want = {"containerd.io/gc.ref.content.config": si.EMPTY_CONFIG_DIGEST}
            want |= {
                f"containerd.io/gc.ref.content.ztoc.{i}": z.descriptor.digest for i, z in enumerate(idx.ztocs)
            }
            got = c.content.info(digest).labels
            assert {k: v for k, v in got.items() if k.startswith("containerd.io/gc.")} == want
            artifacts |= {digest, *(z.descriptor.digest for z in idx.ztocs)}
    # the read-only commands read the blobs from containerd
    host_index = by_platform[str(HOST)]
    info = si.parse_index(ok(env.soci("--content-store", "containerd", "index", "info", host_index)).out)
    z0 = info.ztocs[0].descriptor.digest
    assert b'"span_size": 65536' in ok(env.soci("--content-store", "containerd", "ztoc", "info", z0)).out
    name, data = next(iter(img.files.items()))
    r = ok(
        env.soci("--content-store", "containerd", "ztoc", "get-file", info.ztocs[1].descriptor.digest, name)
    )
    assert r.out == data + b"\n"

    # convert reuses the zTOCs recorded by create (same span size), read back from containerd
    dst = f"example.test/cc/gc-soci{next(_n)}:v1"
    r = ok(env.soci("--content-store", "containerd", "convert", *flags, img.ref, dst))
    ztoc_lines(r, img.layers, reused=True)

    env.gc()  # the lease of the commands is gone: only the labels keep the artifacts now
    with env.client() as c:
        assert all(c.content.has(d) for d in artifacts)
        c.images.delete(img.ref, sync=True)
        # the v1 indexes went with the image; the host zTOCs are still used by the converted image
        assert not any(c.content.has(d) for d in by_platform.values())
        assert all(c.content.has(z.descriptor.digest) for z in info.ztocs)
        c.images.delete(dst, sync=True)
        assert not any(c.content.has(d) for d in artifacts)


# ---------------------------------------------------------------------------------------------------------
# soci convert SRC DST


@ROOT_ONLY
@pytest.mark.integration
def test_convert_in_containerd_then_ctr_push_gives_a_soci_enabled_image(
    env: Env,
    soci_mount: Callable[..., Mounted],  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
) -> None:
    img = build_image(env.work, f"example.test/cc/src{next(_n)}:v1")
    env.import_image(img)
    dst = f"{env.registry.host}/cc/converted{next(_n)}:soci"

    r = ok(env.soci("convert", "--min-layer-size", "0", "--span-size", str(SPAN), img.ref, dst))
    ztocs = ztoc_lines(r, img.layers)
    assert dst in env.ctr("image", "ls", "-q").stdout.split()

    with env.client() as c:
        target = c.images.get(dst).target
        assert target.media_type == si.MT_OCI_INDEX
        index = ImageIndex.parse(c.content.read(target.digest))
        image_desc, soci_desc = index.manifests
        assert soci_desc.artifact_type == si.ARTIFACT_TYPE_V2 and soci_desc.platform == HOST
        assert image_desc.platform == HOST
        assert image_desc.annotations == {si.ANN_INDEX_DIGEST: soci_desc.digest}
        assert soci_desc.annotations == {si.ANN_MANIFEST_DIGEST: image_desc.digest}
        manifest = Manifest.parse(c.content.read(image_desc.digest))
        assert manifest.annotations == {si.ANN_INDEX_DIGEST: soci_desc.digest}
        assert [x.digest for x in manifest.layers] == img.layers
        soci = si.parse_index(c.content.read(soci_desc.digest))
        assert soci.version == 2 and [z.descriptor.digest for z in soci.ztocs] == ztocs

        # GC labels: index -> manifests, manifest -> config and layers, SOCI index -> config and zTOCs
        def gc(digest: str) -> dict[str, str]:
            return {
                k: v for k, v in c.content.info(digest).labels.items() if k.startswith("containerd.io/gc.")
            }

        assert gc(target.digest) == {
            "containerd.io/gc.ref.content.m.0": image_desc.digest,
            "containerd.io/gc.ref.content.m.1": soci_desc.digest,
        }
        assert gc(image_desc.digest) == {
            "containerd.io/gc.ref.content.config": manifest.config.digest,
            **{f"containerd.io/gc.ref.content.l.{i}": d for i, d in enumerate(img.layers)},
        }
        assert gc(soci_desc.digest) == {
            "containerd.io/gc.ref.content.config": si.EMPTY_CONFIG_DIGEST,
            **{f"containerd.io/gc.ref.content.ztoc.{i}": z for i, z in enumerate(ztocs)},
        }
        # the source image can go: the converted one keeps everything it uses
        c.images.delete(img.ref, sync=True)
        assert all(c.content.has(d) for d in [*img.layers, manifest.config.digest, *ztocs, soci_desc.digest])

    rows = table(ok(env.soci("index", "list")))
    assert [[row[0], row[2], row[4]] for row in rows] == [[soci_desc.digest, f"linux/{ARCH}", "v2"]]
    assert ok(env.soci("index", "list", "-q", "--ref", dst)).text == soci_desc.digest + "\n"

    p = env.ctr("image", "push", "--plain-http", "--user", f"{USER}:{PASSWORD}", dst, check=False)
    assert p.returncode == 0, p.stderr

    m = soci_mount(dst, "--user", f"{USER}:{PASSWORD}", root=tmp_path / "mount-root")
    assert any(f"soci index {soci_desc.digest} (v2, found by v2 annotation)" in line for line in m.lines), (
        m.lines
    )
    for name, data in img.files.items():
        assert (m.mountpoint / name).read_bytes() == data
    m.stop()

    # soci push pushes v1 indexes only: upstream's warning, and nothing to push
    r = env.soci("push", "--plain-http", "--user", f"{USER}:{PASSWORD}", dst)
    assert r.rc == 3 and V2_WARNING in r.text and "could not find any soci index manifest v1" in r.err


# ---------------------------------------------------------------------------------------------------------
# errors


@ROOT_ONLY
@pytest.mark.integration
def test_image_not_in_containerd_is_exit_3_naming_image_and_namespace(env: Env) -> None:
    for argv in (
        ["create", "example.test/none:v1"],
        ["convert", "example.test/none:v1", "example.test/x:v1"],
    ):
        r = env.soci(*argv)
        assert r.rc == 3, r.err
        assert (
            "image 'example.test/none:v1' not found in containerd" in r.err
            and f"(namespace '{env.ns}')" in r.err
        )
    r = env.soci("create", "busybox")  # the normalized name is looked up too
    assert r.rc == 3 and "'busybox' or 'docker.io/library/busybox:latest'" in r.err


def test_containerd_not_running_is_exit_5(tmp_path: Path) -> None:
    sock = tmp_path / "no-containerd.sock"
    for argv in (["create", "example.test/a:v1"], ["convert", "example.test/a:v1", "example.test/b:v1"]):
        r = run("--address", sock, "--root", tmp_path / "root", *argv)
        assert r.rc == 5, r.err
        assert "cannot reach containerd" in r.err and str(sock) in r.err


@pytest.mark.parametrize(
    ("dest", "reason"),
    [
        ("example.test/app", "reference must be tagged"),
        ("example.test/app@sha256:" + "1" * 64, "reference must not contain a digest"),
        ("example.test/app:v1@sha256:" + "1" * 64, "reference must not contain a digest"),
        ("app:v1", "could not parse reference"),
    ],
)
def test_convert_needs_a_tagged_destination(tmp_path: Path, dest: str, reason: str) -> None:
    # checked before containerd is asked (none runs at this address)
    r = run(
        "--address", tmp_path / "none.sock", "--root", tmp_path / "root", "convert", "example.test/a:v1", dest
    )
    assert r.rc == 2 and r.err.startswith(f"soci: {DEST_REF_ERROR}: {reason}"), r.err


def test_convert_of_paths_without_standalone_points_at_it(tmp_path: Path) -> None:
    (tmp_path / "layout").mkdir()
    r = run("--root", tmp_path / "root", "convert", tmp_path / "layout", tmp_path / "out.tar")
    assert r.rc == 2 and "use soci convert --standalone SRC DST" in r.err, r.err


def test_get_file_says_why_a_layer_is_missing(tmp_path: Path) -> None:
    img = build_image(tmp_path, "example.test/cc/local:v1")
    root = tmp_path / "root"
    out = ok(run("--root", root, "create", "--oci-layout", img.layout, "--min-layer-size", "0"))
    ztoc = out.text.splitlines()[1].split()[4]
    (root / "content" / "blobs" / "sha256" / img.layers[1][7:]).unlink()
    name = next(iter(img.files))
    r = run("--address", tmp_path / "none.sock", "--root", root, "ztoc", "get-file", ztoc, name)
    assert r.rc == 3, r.err
    assert f"layer {img.layers[1]} of ztoc {ztoc}: not in the local content store" in r.err
    assert "containerd could not be asked" in r.err
