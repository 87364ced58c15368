"""Letting go of parsed zTOCs (soci_fs.remote): a served layer keeps its tree and spans, not the zTOC.

No registry: the client is a stand-in that serves the layer blob's ranges and refuses anything else, and the
zTOC is in the content store (as ``ImageSource.plan`` leaves it).
"""

from __future__ import annotations

import dataclasses
import gc
import io
import types
from pathlib import Path

import pytest

from soci_fs import ztoc as ztoc_mod
from soci_fs.builder import build_ztoc
from soci_fs.cache import BlockCache, CacheConfig
from soci_fs.errors import FailedPrecondition, FormatError
from soci_fs.inodes import InodeTree
from soci_fs.registry import reference
from soci_fs.registry.client import Descriptor
from soci_fs.remote import ImagePlan, ImageSource, LayerPlan, open_layer
from soci_fs.store import ContentStore
from soci_fs.ztoc import FileMetadata, Ztoc
from tests.fs.ocigen import MT_LAYER_GZIP, Entry, digest, generated_tree, gz, make_tar

MT_ZTOC = "application/octet-stream"


class _Blob:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, start: int, length: int) -> bytes:
        return self.data[start : start + length]


class _Client:
    """Serves ranges of the one layer blob; any other request would be a network access."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.blobs = 0

    def blob(self, ref: object, dgst: str, size: int | None = None) -> _Blob:
        self.blobs += 1
        return _Blob(self.data)

    def get_blob(self, *args: object, **kw: object) -> bytes:
        raise AssertionError("the zTOC should come from the content store")


@pytest.fixture
def layer(tmp_path: Path) -> tuple[ImageSource, LayerPlan, Ztoc]:
    blob = gz(make_tar([*generated_tree(3, n_files=30), Entry("gen/z.txt", b"z" * 700)]))
    z = build_ztoc(io.BytesIO(blob).read, span_size=1 << 14)
    zdata = ztoc_mod.serialize(z)
    content = ContentStore(tmp_path / "content")
    source = ImageSource(_Client(blob), reference.parse("reg.example/img:1"), content)  # type: ignore[arg-type]
    content.put(zdata, digest(zdata))
    desc = Descriptor(MT_LAYER_GZIP, digest(blob), len(blob))
    zdesc = Descriptor(MT_ZTOC, digest(zdata), len(zdata))
    return source, LayerPlan(desc, zdesc, source.load_ztoc(desc, zdesc)), z


def _plan(*layers: LayerPlan) -> ImagePlan:
    ref = reference.parse("reg.example/img:1")
    return ImagePlan(ref, None, "sha256:" + "0" * 64, 2, "test", layers)  # type: ignore[arg-type]


def test_plans_without_their_ztoc_stay_lazy(layer: tuple[ImageSource, LayerPlan, Ztoc]) -> None:
    _, lp, _ = layer
    local = LayerPlan(Descriptor(MT_LAYER_GZIP, "sha256:" + "1" * 64, 10))
    assert lp.lazy and not local.lazy
    bare = lp.without_ztoc()
    assert bare.ztoc is None and bare.lazy and bare.ztoc_descriptor == lp.ztoc_descriptor
    assert bare.without_ztoc() is bare and local.without_ztoc() is local
    plan = _plan(lp, local)
    kept = plan.without_ztoc(lp.descriptor.digest)
    assert kept.layers[0].ztoc is None and kept.layers[0].lazy and kept.layers[1] is local
    assert kept.without_ztoc(lp.descriptor.digest) is kept  # nothing left to drop: the same plan
    assert plan.without_ztoc("sha256:" + "9" * 64) is plan
    assert dataclasses.replace(kept, layers=plan.layers) == plan  # nothing else changed


def test_load_ztoc_checks_the_blob_size(layer: tuple[ImageSource, LayerPlan, Ztoc]) -> None:
    source, lp, z = layer
    assert source.load_ztoc(lp.descriptor, lp.ztoc_descriptor) == z  # type: ignore[arg-type]
    wrong = dataclasses.replace(lp.descriptor, size=lp.descriptor.size + 1)
    with pytest.raises(FormatError, match=r"describes a \d+-byte blob"):
        source.load_ztoc(wrong, lp.ztoc_descriptor)  # type: ignore[arg-type]


def _holds_entries(obj: object, *shared: object) -> bool:
    """Whether a zTOC or one of its entries is reachable from ``obj`` (not through ``shared`` objects,
    code, frames or modules, which lead to the test's own references)."""
    seen: set[int] = {id(x) for x in shared}
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, type | types.FrameType | types.CoroutineType | types.ModuleType):
            continue
        if isinstance(o, types.FunctionType):  # a closure: its cells, not its globals
            stack.extend(c.cell_contents for c in o.__closure__ or ())
            seen.add(id(o))
            continue
        seen.add(id(o))
        if isinstance(o, FileMetadata | Ztoc):
            return True
        stack.extend(gc.get_referents(o))
    return False


@pytest.mark.trio
async def test_a_served_layer_lets_go_of_its_ztoc(layer: tuple[ImageSource, LayerPlan, Ztoc]) -> None:
    source, lp, _ = layer
    cache = BlockCache(None, CacheConfig())
    opened = await open_layer(source, lp, cache)
    assert opened.ztoc is lp.ztoc and opened.plan.ztoc is lp.ztoc
    assert _holds_entries(opened, source, cache)
    taken = opened.take_ztoc()
    assert taken is lp.ztoc
    assert opened.ztoc is None and opened.plan.ztoc is None and opened.lazy and opened.plan.lazy
    assert opened.digest == lp.descriptor.digest and opened.serve_options()["digest"] == opened.digest
    with pytest.raises(FailedPrecondition, match="handed over already"):
        opened.take_ztoc()
    tree = InodeTree.from_ztoc(taken)
    del taken
    assert not _holds_entries(opened, source, cache) and not _holds_entries(tree)
    assert _holds_entries(lp)  # the walk does find one where there is one
    name = next(i for i, e in enumerate(tree.entries) if e.name == "gen/z.txt")
    node = next(tree.node(i) for i in range(1, tree.max_id + 1) if tree.node(i).entry == name)
    assert bytes(await opened.data.read(node.offset, node.size)) == b"z" * 700
    opened.close()


@pytest.mark.trio
async def test_a_plan_without_its_ztoc_reloads_it_on_open(layer: tuple[ImageSource, LayerPlan, Ztoc]) -> None:
    source, lp, z = layer
    cache = BlockCache(None, CacheConfig())
    opened = await open_layer(source, lp.without_ztoc(), cache)
    assert opened.lazy and opened.ztoc == z and opened.ztoc is not lp.ztoc
    tree = InodeTree.from_ztoc(opened.take_ztoc())
    assert list(tree.entries) == list(z.files)
    opened.close()
