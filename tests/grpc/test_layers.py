"""RemoteLayers (the daemon's layer provider) against bad input, with no containerd: ``provide_layer`` is
driven with :class:`LayerRequest` values as the snapshotter core builds them, against the harness's real
registry (htpasswd, optionally behind the fault proxy) and, where a layer is served lazily, the real FUSE
session of :class:`RemoteLayers`.

Covered: labels that are not digests or references (``bad_labels``), a registry that is down or refuses the
credentials (``resolve_failed``, tried again at the next Prepare: not remembered), an index whose zTOC is
missing from the registry or belongs to another layer or has a wrong blob size (``bad_index``, remembered,
one WARNING naming the index, the zTOC and the layer), a zTOC whose span digests do not match the blob (the
lazy mount succeeds, every read fails with EIO, never wrong bytes), ``min_layer_size`` with the
``soci.size`` label (``below_min_size``: unpacked here), and unexpected exceptions anywhere in the provider
(``internal_error`` / ``local_unpack_failed``: deferred with an empty directory, never raised).

The image helpers (:func:`reindex`, :func:`delete_blob`, :func:`fetch_json`) are used by
``tests/integration/test_daemon_bad_input.py`` too.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from soci_fs import index as soci_index
from soci_fs import ztoc as ztoc_mod
from soci_fs.registry.credentials import Credentials
from soci_grpc import config as c
from soci_grpc import layers as layers_mod
from soci_grpc.layers import (
    LABEL_IMAGE_REF,
    LABEL_INDEX_DIGEST,
    LABEL_LAYER,
    LABEL_MANIFEST,
    LABEL_SOCI_SIZE,
    RemoteLayers,
    mounts_under,
)
from soci_grpc.snapshotter import LABEL_SNAPSHOT_REF, LayerRequest
from tests.fs.ocigen import Entry, make_tar
from tests.harness.registry import (  # noqa: F401  (pytest finds fixtures by name)
    PASSWORD,
    USER,
    Fault,
    FaultProxy,
    RawPusher,
    Registry,
    fault_proxy,
    harness_dir,
    htpasswd_registry,
)
from tests.integration.sociimg import Pushed, data_entries, push_image

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"
    ),
]

FAST = """
[http]
MaxRetries = 1
MinWaitMsec = 10
MaxWaitMsec = 50
DialTimeoutMsec = 1000
[blob]
fetching_timeout_sec = 10
max_retries = 1
max_span_verification_retries = 1
[background_fetch]
disable = true
"""
_seed = itertools.count(1000)
_sid = itertools.count(1)


# --------------------------------------------------------------------------------------------------------
# images and their SOCI artifacts, bent on purpose


def fetch_json(registry: Registry, repo: str, kind: str, obj: str) -> tuple[dict[str, Any], bytes]:
    """A manifest or blob of ``repo`` (basic auth) as ``(document, raw bytes)``."""
    accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"
    r = requests.get(
        f"{registry.url}/v2/{repo}/{kind}/{obj}",
        auth=(USER, PASSWORD),
        headers={"Accept": accept},
        timeout=30,
    )
    assert r.status_code == 200, (r.status_code, r.text)
    return json.loads(r.content) if kind == "manifests" else {}, r.content


def fetch_blob(registry: Registry, repo: str, digest: str) -> bytes:
    r = requests.get(f"{registry.url}/v2/{repo}/blobs/{digest}", auth=(USER, PASSWORD), timeout=30)
    assert r.status_code == 200, (r.status_code, r.text)
    return r.content


def delete_blob(registry: Registry, repo: str, digest: str) -> None:
    """Unlink ``digest`` from ``repo`` (the registry has deletes enabled); other repositories keep theirs."""
    r = requests.delete(f"{registry.url}/v2/{repo}/blobs/{digest}", auth=(USER, PASSWORD), timeout=30)
    assert r.status_code == 202, (r.status_code, r.text)
    r = requests.head(f"{registry.url}/v2/{repo}/blobs/{digest}", auth=(USER, PASSWORD), timeout=30)
    assert r.status_code == 404


def index_of(img: Pushed) -> dict[str, Any]:
    man, _ = fetch_json(img.registry, img.repo, "manifests", img.manifest)
    index, _ = fetch_json(
        img.registry, img.repo, "manifests", man["annotations"][soci_index.ANN_INDEX_DIGEST]
    )
    return index


def ztoc_desc(index: dict[str, Any], layer: str) -> dict[str, Any]:
    return next(
        d for d in index["layers"] if (d.get("annotations") or {}).get(soci_index.ANN_LAYER_DIGEST) == layer
    )


def reindex(img: Pushed, edit: Callable[[dict[str, Any], RawPusher], None], tag: str) -> Pushed:
    """The image again under ``repo:tag`` with a SOCI index changed by ``edit(index, pusher)`` (a new image
    manifest whose v2 annotation names the new index)."""
    reg = img.registry
    pusher = RawPusher(reg)
    man, _ = fetch_json(reg, img.repo, "manifests", img.manifest)
    index, _ = fetch_json(reg, img.repo, "manifests", man["annotations"][soci_index.ANN_INDEX_DIGEST])
    edit(index, pusher)
    data = json.dumps(index).encode()
    new_index = pusher.push_manifest(
        img.repo, "sha256:" + hashlib.sha256(data).hexdigest(), data, index["mediaType"]
    )
    man["annotations"][soci_index.ANN_INDEX_DIGEST] = new_index
    mdata = json.dumps(man).encode()
    new_manifest = pusher.push_manifest(img.repo, tag, mdata, man["mediaType"])
    ref = img.ref.rsplit(":", 1)[0] + ":" + tag
    return dataclasses.replace(img, tag=tag, ref=ref, manifest=new_manifest, index_digest=new_index)


def swap_ztocs(a: str, b: str) -> Callable[[dict[str, Any], RawPusher], None]:
    """Index edit: layer ``a`` gets ``b``'s zTOC and the other way round."""

    def edit(index: dict[str, Any], pusher: RawPusher) -> None:
        da, db = ztoc_desc(index, a), ztoc_desc(index, b)
        da["annotations"][soci_index.ANN_LAYER_DIGEST] = b
        db["annotations"][soci_index.ANN_LAYER_DIGEST] = a

    return edit


def rewrite_ztoc(
    img: Pushed, layer: str, change: Callable[[ztoc_mod.Ztoc], ztoc_mod.Ztoc]
) -> Callable[..., None]:
    """Index edit: ``layer``'s zTOC replaced by ``change(zTOC)`` (pushed as a new blob)."""

    def edit(index: dict[str, Any], pusher: RawPusher) -> None:
        d = ztoc_desc(index, layer)
        z = ztoc_mod.parse(fetch_blob(img.registry, img.repo, d["digest"]))
        data = ztoc_mod.serialize(change(z))
        d["digest"], d["size"] = pusher.push_blob(img.repo, data), len(data)

    return edit


def wrong_span_digests(z: ztoc_mod.Ztoc) -> ztoc_mod.Ztoc:
    bad = tuple(
        "sha256:" + hashlib.sha256(f"wrong {i}".encode()).hexdigest()
        for i in range(len(z.compression.span_digests))
    )
    return dataclasses.replace(z, compression=dataclasses.replace(z.compression, span_digests=bad))


# File counts for which the tar stream (16 KiB files, one directory, the end marker) is a whole number of
# 10240-byte tar records, so Python's tarfile adds no padding after the end marker. With padding, a
# checkpoint can fall into it, beyond uncompressed_archive_size, and soci_fs.spanread.LayerSpans refuses such
# a zTOC (lazy mount -> local fallback) although the layer is fine; see test_checkpoint_in_the_tar_padding.
A_FILES, B_FILES = 29, 49
_ENTRIES: dict[str, list[list[Entry]]] = {}


def data_image(
    registry: Registry, work: Path, *, name: str, small_last: bool = False, min_layer_size: int = 0
) -> Pushed:
    """Two incompressible data layers ``a/`` and ``b/`` of different sizes (unique content, so unique
    zTOCs), and with ``small_last`` a tiny third layer ``c/`` that gets no zTOC when ``min_layer_size`` is
    set. :func:`entries_of` gives the entries back."""
    s = next(_seed)
    layers = [data_entries("a", A_FILES, 16384, seed=s), data_entries("b", B_FILES, 16384, seed=s + 1)]
    if small_last:
        layers.append(data_entries("c", 1, 100, seed=s + 2))
    img = push_image(registry, work, layers, name=name, min_layer_size=min_layer_size)
    _ENTRIES[img.repo] = layers
    return img


def entries_of(img: Pushed) -> list[list[Entry]]:
    return _ENTRIES[img.repo]


def file_bytes(img: Pushed, layer: int, name: str) -> bytes:
    return next(e.data for e in entries_of(img)[layer] if e.name == name)


# --------------------------------------------------------------------------------------------------------
# the provider


class Creds:
    """A credential whose password the test can change (rotation, refusal)."""

    def __init__(self) -> None:
        self.password = PASSWORD

    def __call__(self, host: str, ref: str) -> Credentials:
        return Credentials(username=USER, password=self.password, source="test")


@pytest.fixture
def registry(htpasswd_registry: Registry) -> Registry:  # noqa: F811
    """The harness's htpasswd registry (session-scoped; every image here gets its own repository)."""
    return htpasswd_registry


@pytest.fixture
def proxies(fault_proxy: Callable[..., FaultProxy]) -> Callable[..., FaultProxy]:  # noqa: F811
    return fault_proxy


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[Callable[..., RemoteLayers]]:
    made: list[RemoteLayers] = []

    def make(extra: str = "", *, start: bool = True, credential: Any = None) -> RemoteLayers:
        rl = RemoteLayers(tmp_path / f"soci{len(made)}", c.parse(FAST + extra), credential or Creds())
        made.append(rl)
        if start:
            rl.start()
        return rl

    try:
        yield make
    finally:
        for rl in made:
            rl.close()
        assert mounts_under(tmp_path) == []


def request(rl: RemoteLayers, labels: dict[str, str], parents: tuple[Path, ...] = ()) -> LayerRequest:
    sid = str(next(_sid))
    mp = rl.root / "snapshotter" / "snapshots" / sid / "fs"
    mp.mkdir(parents=True)
    return LayerRequest(f"extract-{sid} sha256:{sid}", f"sha256:chain{sid}", sid, mp, parents, dict(labels))


def labels(img: Pushed, i: int, **extra: str) -> dict[str, str]:
    return {
        LABEL_SNAPSHOT_REF: f"sha256:chain-{img.layers[i][7:19]}",
        LABEL_IMAGE_REF: img.ref,
        LABEL_MANIFEST: img.manifest,
        LABEL_LAYER: img.layers[i],
        **extra,
    }


def layer_status(rl: RemoteLayers, sid: str) -> dict[str, Any]:
    for image in rl.status()["images"]:
        for x in image["layers"]:
            if x["snapshot_id"] == sid:
                return {**x, "image_state": image["state"], "image_detail": image["detail"]}
    raise AssertionError(f"snapshot {sid} not in the status: {rl.status()}")


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# --------------------------------------------------------------------------------------------------------
# labels


DIG = "sha256:" + "d" * 64


@pytest.mark.expect_log
@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({LABEL_LAYER: "sha256:xyz"}, "cri.layer-digest='sha256:xyz'"),
        ({LABEL_MANIFEST: "not-a-digest"}, "cri.manifest-digest='not-a-digest'"),
        ({LABEL_MANIFEST: "SHA256:" + "D" * 64}, "cri.manifest-digest="),
        ({LABEL_INDEX_DIGEST: "sha256:123"}, "soci.index.digest='sha256:123'"),
        ({LABEL_IMAGE_REF: "Bad Ref::"}, "invalid reference 'Bad Ref::'"),
        ({LABEL_IMAGE_REF: "reg.example/" + "x" * 300}, "longer than 255"),
    ],
)
def test_labels_that_are_not_digests_or_references(
    provider: Callable[..., RemoteLayers],
    caplog: pytest.LogCaptureFixture,
    change: dict[str, str],
    named: str,
) -> None:
    rl = provider(start=False)  # refused before anything is fetched or mounted
    base = {
        LABEL_SNAPSHOT_REF: "x",
        LABEL_IMAGE_REF: "reg.example/app:1",
        LABEL_MANIFEST: DIG,
        LABEL_LAYER: DIG,
    }
    req = request(rl, {**base, **change})
    assert rl.provide_layer(req) is None
    st = layer_status(rl, req.snapshot_id)
    assert (st["mode"], st["reason"]) == ("deferred", "bad_labels") and named in st["detail"], st
    assert any(named in w for w in warnings(caplog))
    assert os.listdir(req.mountpoint) == []


def test_missing_image_labels_defer_quietly(provider: Callable[..., RemoteLayers]) -> None:
    rl = provider(start=False)
    for missing in (LABEL_IMAGE_REF, LABEL_MANIFEST, LABEL_LAYER):
        base = {
            LABEL_SNAPSHOT_REF: "x",
            LABEL_IMAGE_REF: "reg.example/app:1",
            LABEL_MANIFEST: DIG,
            LABEL_LAYER: DIG,
        }
        del base[missing]
        assert rl.provide_layer(request(rl, base)) is None
    assert rl.status()["images"] == []


@pytest.mark.expect_log
def test_layer_not_in_the_manifest_and_unknown_manifest(
    provider: Callable[..., RemoteLayers],
    registry: Registry,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    img = data_image(registry, tmp_path, name="notin")
    rl = provider(start=False)
    req = request(rl, labels(img, 0, **{LABEL_LAYER: DIG}))
    assert rl.provide_layer(req) is None
    st = layer_status(rl, req.snapshot_id)
    assert (st["mode"], st["reason"]) == ("deferred", "bad_labels")
    assert st["detail"] == f"layer {DIG} is not in manifest {img.manifest}"
    # a manifest digest the registry does not have: nothing to serve, the image is left to containerd
    req = request(rl, labels(img, 0, **{LABEL_MANIFEST: DIG}))
    assert rl.provide_layer(req) is None
    st = layer_status(rl, req.snapshot_id)
    assert (st["mode"], st["reason"]) == ("deferred", "no_index") and "not found (404)" in st["detail"], st


# --------------------------------------------------------------------------------------------------------
# registry down, credentials refused: not remembered


@pytest.mark.expect_log
def test_registry_down_then_back_is_retried(
    provider: Callable[..., RemoteLayers],
    registry: Registry,
    proxies: Callable[..., FaultProxy],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = proxies(registry)
    img = data_image(registry, tmp_path, name="down")
    img = dataclasses.replace(img, ref=img.ref.replace(registry.host, proxy.host))
    creds = Creds()
    rl = provider(credential=creds)

    proxy.add(Fault("status", path="", method=None, times=-1, status=503))  # everything 503
    req = request(rl, labels(img, 0))
    assert rl.provide_layer(req) is None
    st = layer_status(rl, req.snapshot_id)
    assert (st["mode"], st["reason"], st["image_state"]) == ("deferred", "resolve_failed", "error"), st
    assert "status 503" in st["detail"] and "tried again at the next pull" in st["detail"]
    assert any("resolve_failed" not in w and "status 503" in w for w in warnings(caplog))

    proxy.clear()
    creds.password = "wrong"  # the registry is back but refuses the credentials: not remembered either
    req = request(rl, labels(img, 0))
    assert rl.provide_layer(req) is None
    st = layer_status(rl, req.snapshot_id)
    assert (st["reason"], st["image_state"]) == ("resolve_failed", "error") and "401" in st["detail"], st

    creds.password = PASSWORD
    req = request(rl, labels(img, 0))
    result = rl.provide_layer(req)
    assert result is not None and result.labels[layers_mod.LABEL_REMOTE] == "remote snapshot"
    st = layer_status(rl, req.snapshot_id)
    assert (st["mode"], st["reason"], st["image_state"]) == ("lazy", "", "indexed")
    assert (req.mountpoint / "a" / "f0003.bin").read_bytes() == file_bytes(img, 0, "a/f0003.bin")


# --------------------------------------------------------------------------------------------------------
# broken indexes: remembered, one WARNING naming the index, zTOC and layer; every layer deferred


@pytest.mark.expect_log
def test_index_whose_ztoc_is_missing(
    provider: Callable[..., RemoteLayers],
    registry: Registry,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    img = data_image(registry, tmp_path, name="noztoc")
    zdig = ztoc_desc(index_of(img), img.layers[1])["digest"]
    delete_blob(registry, img.repo, zdig)
    rl = provider(start=False)
    reqs = [request(rl, labels(img, i)) for i in (0, 1)]
    assert [rl.provide_layer(r) for r in reqs] == [None, None]
    for r in reqs:
        st = layer_status(rl, r.snapshot_id)
        assert (st["mode"], st["reason"], st["image_state"]) == ("deferred", "bad_index", "bad_index"), st
        assert f"zTOC {zdig} of layer {img.layers[1]}, listed in the SOCI index" in st["detail"]
        assert "not found (404)" in st["detail"]
    (w,) = warnings(caplog)  # once per image, not per layer
    assert f"SOCI index {img.index_digest} cannot be used: zTOC {zdig} of layer {img.layers[1]}" in w
    assert rl.status()["images"][0]["index_digest"] == img.index_digest


@pytest.mark.expect_log
@pytest.mark.parametrize("how", ["swapped", "size"])
def test_ztoc_that_does_not_fit_its_layer(
    provider: Callable[..., RemoteLayers],
    registry: Registry,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    img = data_image(registry, tmp_path, name="misfit")
    a, b = img.layers
    if how == "swapped":
        bad = reindex(img, swap_ztocs(a, b), "swapped")
    else:
        bad = reindex(
            img,
            rewrite_ztoc(
                img,
                a,
                lambda z: dataclasses.replace(z, compressed_archive_size=z.compressed_archive_size + 1),
            ),
            "size",
        )
    rl = provider(start=False)
    req = request(rl, labels(bad, 0))
    assert rl.provide_layer(req) is None
    st = layer_status(rl, req.snapshot_id)
    assert (st["mode"], st["reason"]) == ("deferred", "bad_index"), st
    assert (
        st["detail"].startswith("zTOC sha256:")
        and f"but layer {a} is {img.layer_sizes[0]} bytes" in st["detail"]
    )
    (w,) = warnings(caplog)
    assert f"SOCI index {bad.index_digest} cannot be used: zTOC" in w and a in w


@pytest.mark.expect_log
def test_span_digests_that_do_not_match_fail_reads_with_eio(
    provider: Callable[..., RemoteLayers],
    registry: Registry,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    img = data_image(registry, tmp_path, name="spans")
    bad = reindex(img, rewrite_ztoc(img, img.layers[0], wrong_span_digests), "spans")
    rl = provider()
    req = request(rl, labels(bad, 0))
    assert rl.provide_layer(req) is not None  # the zTOC fits the blob's size and header: mounted lazily
    assert layer_status(rl, req.snapshot_id)["mode"] == "lazy"
    assert sorted(os.listdir(req.mountpoint / "a"))[:2] == ["f0000.bin", "f0001.bin"]  # metadata: no spans
    for name in ("a/f0000.bin", "a/f0028.bin"):
        with pytest.raises(OSError) as exc:
            (req.mountpoint / name).read_bytes()
        assert exc.value.errno == errno.EIO
    st = layer_status(rl, req.snapshot_id)
    assert st["fetched_percent"] == 0 and st["spans_fetched"] == 0  # nothing accepted from those fetches
    assert any("span digests do not match" in w and img.layers[0] in w for w in warnings(caplog))
    # the good layer of the same image is served (and right)
    req2 = request(rl, labels(bad, 1), parents=(req.mountpoint,))
    assert rl.provide_layer(req2) is not None
    assert (req2.mountpoint / "b" / "f0007.bin").read_bytes() == file_bytes(img, 1, "b/f0007.bin")


# --------------------------------------------------------------------------------------------------------
# min_layer_size with the soci.size label


def test_min_layer_size_unpacks_small_layers_here(
    provider: Callable[..., RemoteLayers], registry: Registry, tmp_path: Path
) -> None:
    img = data_image(registry, tmp_path, name="minsize")
    rl = provider(f"[snapshotter]\nmin_layer_size = {img.layer_sizes[1]}\n")
    small = request(rl, labels(img, 0, **{LABEL_SOCI_SIZE: str(img.layer_sizes[0])}))
    result = rl.provide_layer(small)
    assert result is not None and result.compute_usage and layers_mod.LABEL_REMOTE not in result.labels
    st = layer_status(rl, small.snapshot_id)
    assert (st["mode"], st["reason"]) == ("local", "below_min_size"), st
    assert st["detail"] == f"layer is {img.layer_sizes[0]} bytes, below min_layer_size {img.layer_sizes[1]}"
    assert not any(m == small.mountpoint for m in mounts_under(rl.root))  # real files, no mount
    assert len(os.listdir(small.mountpoint / "a")) == A_FILES
    # at the limit, and with a size label that is not a number: lazy
    for size in (str(img.layer_sizes[1]), "big", "-1"):
        req = request(rl, labels(img, 1, **{LABEL_SOCI_SIZE: size}), parents=(small.mountpoint,))
        assert rl.provide_layer(req) is not None
        assert layer_status(rl, req.snapshot_id)["mode"] == "lazy"
    # without the label (containerd's CRI never sends it) the rule cannot apply
    req = request(rl, labels(img, 0))
    assert rl.provide_layer(req) is not None and layer_status(rl, req.snapshot_id)["mode"] == "lazy"


# --------------------------------------------------------------------------------------------------------
# unexpected exceptions: logged with their traceback, recorded, deferred; never raised


@pytest.mark.expect_log
def test_unexpected_errors_never_escape(
    provider: Callable[..., RemoteLayers],
    registry: Registry,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    img = data_image(registry, tmp_path, name="bugs", small_last=True, min_layer_size=4096)
    rl = provider()

    # while resolving the image: not remembered, the next Prepare resolves it
    def broken_plan(self: Any, **kw: Any) -> Any:
        raise KeyError("surprise")

    with monkeypatch.context() as m:
        m.setattr(layers_mod._Source, "plan", broken_plan)
        req = request(rl, labels(img, 0))
        assert rl.provide_layer(req) is None
    st = layer_status(rl, req.snapshot_id)
    assert (st["mode"], st["reason"]) == ("deferred", "resolve_failed") and "KeyError('surprise')" in st[
        "detail"
    ]
    assert any(r.exc_info for r in caplog.records if "resolving failed unexpectedly" in r.getMessage())

    # anywhere else in the provider: internal_error
    def boom(*args: Any, **kw: Any) -> Any:
        raise ValueError("at the very end")

    with monkeypatch.context() as m:
        m.setattr(layers_mod, "LayerResult", boom)
        req = request(rl, labels(img, 0))
        assert rl.provide_layer(req) is None  # the lazy mount it had made is released again
    st = layer_status(rl, req.snapshot_id)
    assert (st["mode"], st["reason"]) == ("deferred", "internal_error") and "at the very end" in st["detail"]
    assert not any(m == req.mountpoint for m in mounts_under(rl.root)) and os.listdir(req.mountpoint) == []

    # in a local unpack that had written part of the layer: the directory is emptied for containerd
    def half_unpack(blob: Any, dest: Path, **kw: Any) -> None:
        (Path(dest) / "partial").write_text("half a layer")
        raise ZeroDivisionError("mid-layer")

    with monkeypatch.context() as m:
        m.setattr("soci_fs.unpack.apply_layer", half_unpack)
        req = request(rl, labels(img, 2))
        assert rl.provide_layer(req) is None
    st = layer_status(rl, req.snapshot_id)
    assert (st["mode"], st["reason"]) == ("deferred", "local_unpack_failed") and "ZeroDivisionError" in st[
        "detail"
    ]
    assert os.listdir(req.mountpoint) == []

    # and afterwards the same provider serves the image as it should
    reqs = [request(rl, labels(img, 0))]
    reqs.append(request(rl, labels(img, 1), parents=(reqs[0].mountpoint,)))
    reqs.append(request(rl, labels(img, 2), parents=(reqs[1].mountpoint, reqs[0].mountpoint)))
    assert all(rl.provide_layer(r) is not None for r in reqs)
    assert [layer_status(rl, r.snapshot_id)["mode"] for r in reqs] == ["lazy", "lazy", "local"]
    assert (reqs[2].mountpoint / "c" / "f0000.bin").stat().st_size == 100


# --------------------------------------------------------------------------------------------------------
# a zTOC whose last checkpoint lies in the tar's trailing padding (found here; fixed in soci_fs.spanread)


def test_checkpoint_in_the_tar_padding(
    provider: Callable[..., RemoteLayers], registry: Registry, tmp_path: Path
) -> None:
    entries = data_entries("b", 40, 16384, seed=1005)  # a tar that tarfile pads to 10240-byte records
    tar = make_tar(entries)
    assert len(tar) % 10240 == 0 and len(tar) > 677376  # 677376: where the end marker ends
    img = push_image(registry, tmp_path, [entries], name="padding")
    z = ztoc_mod.parse(fetch_blob(registry, img.repo, ztoc_desc(index_of(img), img.layers[0])["digest"]))
    assert z.uncompressed_archive_size == 677376
    rl = provider()
    req = request(rl, labels(img, 0))
    assert rl.provide_layer(req) is not None
    want = next(e.data for e in entries if e.name == "b/f0039.bin")
    assert (req.mountpoint / "b" / "f0039.bin").read_bytes() == want  # right either way (local fallback)
    st = layer_status(rl, req.snapshot_id)
    assert (st["mode"], st["reason"]) == ("lazy", ""), st["detail"]


# --------------------------------------------------------------------------------------------------------
# release


def test_releasing_every_lazy_layer_forgets_the_image_and_a_new_prepare_serves_it_again(
    provider: Callable[..., RemoteLayers], registry: Registry, tmp_path: Path
) -> None:
    img = data_image(registry, tmp_path, name="release")
    rl = provider()
    reqs = [request(rl, labels(img, i)) for i in range(2)]
    for req in reqs:
        assert rl.provide_layer(req) is not None
    assert [x["mode"] for x in rl.status()["images"][0]["layers"]] == ["lazy", "lazy"]
    rl.release_layer(reqs[0].snapshot_id)
    assert img.manifest in rl._images  # one layer of it is still served
    rl.release_layer(reqs[1].snapshot_id)
    assert img.manifest not in rl._images and rl.status()["images"] == []
    assert mounts_under(rl.root / "snapshotter") == []
    again = request(rl, labels(img, 1))
    assert rl.provide_layer(again) is not None  # rebuilt from the locally stored manifest, index, zTOCs
    want = file_bytes(img, 1, "b/f0003.bin")
    assert (again.mountpoint / "b" / "f0003.bin").read_bytes() == want


# --------------------------------------------------------------------------------------------------------
# restore after a restart


@pytest.mark.expect_log
def test_restore_that_cannot_work_stops_the_start_unless_invalid_mounts_are_allowed(
    provider: Callable[..., RemoteLayers], registry: Registry, tmp_path: Path
) -> None:
    from soci_fs.errors import FailedPrecondition

    img = data_image(registry, tmp_path, name="restore")
    gone = "sha256:" + "e" * 64  # an index digest the registry does not have: not a transient failure
    rl = provider()
    fs = rl.root / "snapshotter" / "snapshots" / "41" / "fs"
    fs.mkdir(parents=True)
    snap = ("41", fs, labels(img, 0, **{LABEL_INDEX_DIGEST: gone}))
    with pytest.raises(FailedPrecondition, match="allow_invalid_mounts_on_restart"):
        rl.restore([snap])
    rl.close()  # one FUSE session per process

    tolerant = provider("[snapshotter]\nallow_invalid_mounts_on_restart = true\n")
    fs2 = tolerant.root / "snapshotter" / "snapshots" / "41" / "fs"
    fs2.mkdir(parents=True)
    assert tolerant.restore([("41", fs2, snap[2])]) == 0  # the daemon starts; the snapshot stays broken
    st = layer_status(tolerant, "41")
    assert st["mode"] == "degraded" and st["digest"] == img.layers[0]
    tolerant.close()

    # and one that can: served again from the local copies, with no network at all
    ok_rl = provider()
    first = request(ok_rl, labels(img, 1))
    assert ok_rl.provide_layer(first) is not None
    committed = dict(first.labels)
    committed[LABEL_INDEX_DIGEST] = img.index_digest
    ok_rl.release_layer(first.snapshot_id)
    registry.stop()
    try:
        assert ok_rl.restore([(first.snapshot_id, first.mountpoint, committed)]) == 1
        assert layer_status(ok_rl, first.snapshot_id)["detail"] == "restored"
    finally:
        registry.start()
