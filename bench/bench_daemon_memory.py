"""Memory the daemon holds per lazily mounted layer, by structure, in one process (no containerd or registry).

Builds one gzip layer of about 12,400 files (a synthetic ``/usr``-like tree of word-salad files, or a real
layer blob with ``--blob``) and its zTOC (``soci_fs.builder.build_ztoc``, serialized as a registry would
hold it); both are kept in ``bench/out`` for later runs. Then, for each of N layers, does what the daemon
does when it mounts a lazy layer (``soci_grpc/layers.py``): ``ztoc.parse`` of the zTOC bytes in a worker
thread (``ImageSource.plan``; the plan is kept), ``RemoteLayer.open`` with a ``fetch(start, end)`` over the
local blob (gzip header checked), ``InodeTree.from_ztoc`` in a worker thread and
``LayerOperations.add_layer`` with verification (``Session.add_layer``), and the header offsets that a first
verified read computes. Each layer has its own digest; the block cache is shared and stays empty, so its own
bound (``[directory_cache] max_memory_bytes``) is not part of these figures.

Two phases:

* RSS first (no tracemalloc, nothing else allocated yet): ``/proc/self/statm`` after each of the N layers,
  as the daemon's RSS would grow.
* tracemalloc, per layer and by structure: the bytes still allocated after each step (``ztoc``: the parsed
  ``Ztoc``, its ``FileMetadata`` and checkpoint blob; ``spans``: ``RemoteLayer`` with its span table and
  gzip checkpoint windows; ``tree``: ``InodeTree`` nodes and its packed entries; ``serve``: the mounted
  ``Layer`` and its verifier's header offsets) and what ``release`` gives back when the daemon lets go of
  the parsed zTOC (``OpenedLayer.take_ztoc`` + ``ImagePlan.without_ztoc``). ``walk`` (not in ``held``) is
  what getattr of every inode then adds, as a ``find`` or ``ls -lR`` over the layer would.

The baseline measured in the same run is the same layers with the parsed zTOC kept (what layers.py holds
without ``take_ztoc``/``without_ztoc``); printed ratios: held released / kept, and held / the zTOC's size.
``--keep-ztoc`` makes the RSS phase keep it too. Against a soci_fs without ``EntryTable`` the script still
runs (the release step then drops the references by hand, and frees nothing: the tree held the entries).

Run: ``.venv/bin/python bench/bench_daemon_memory.py [--layers 10] [--files 12400] [--mb 640] [--blob PATH]
[--keep-ztoc]``. Needs no root and no FUSE (the handlers are called directly). Owns nothing else.
"""

from __future__ import annotations

import argparse
import gc
import io
import itertools
import os
import random
import sys
import tarfile
import time
import tracemalloc
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trio

from soci_fs import ztoc as ztoc_mod
from soci_fs.builder import build_ztoc
from soci_fs.cache import BlockCache, CacheConfig
from soci_fs.inodes import InodeTree
from soci_fs.operations import LayerOperations, LocalBlob
from soci_fs.registry.client import Descriptor
from soci_fs.remote import ImagePlan, LayerPlan, OpenedLayer
from soci_fs.spans import RemoteLayer

MIB = 1 << 20
MT_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_ZTOC = "application/octet-stream"
STEPS = ("ztoc", "spans", "tree", "serve", "release")


# ------------------------------------------------------------------------------------------ the layer


def synthetic_layer(path: Path, files: int, total_mb: int, seed: int = 7) -> None:
    """A gzip tar of ``files`` files (plus their directories and a few symlinks) holding about ``total_mb``
    MiB of word salad, in a /usr-like tree of packages; written to ``path``."""
    rnd = random.Random(seed)
    words = [f"{rnd.choice('abcdefghijklmnopqrstuvwxyz')}{i:x}" for i in range(800)]
    salad = " ".join(rnd.choice(words) for _ in range(1 << 19)).encode()  # ~2.5 MB, compresses ~2.5x
    mean = max(1, total_mb * MIB // files)
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)  # gzip framing, fast level
    with open(path, "wb") as out:

        class Sink(io.RawIOBase):
            def writable(self) -> bool:
                return True

            def write(self, b: Any) -> int:
                out.write(comp.compress(b))
                return len(b)

        with tarfile.open(fileobj=Sink(), mode="w|", format=tarfile.PAX_FORMAT) as tf:  # type: ignore[arg-type]
            made = 0
            pkg = 0
            while made < files:
                base = f"usr/share/{rnd.choice(['doc', 'lib', 'locale', 'java', 'go'])}/package-{pkg:04d}"
                pkg += 1
                subdirs = [base, f"{base}/{rnd.choice(['src', 'include', 'bin', 'man'])}"]
                for d in subdirs:
                    info = tarfile.TarInfo(d)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_680_000_000
                    tf.addfile(info)
                for _ in range(min(rnd.randint(8, 24), files - made)):
                    size = min(int(rnd.expovariate(1 / mean)), len(salad) - 1)
                    start = rnd.randrange(0, len(salad) - size)
                    info = tarfile.TarInfo(
                        f"{rnd.choice(subdirs)}/file_{made:05d}_{rnd.getrandbits(24):06x}.txt"
                    )
                    info.size, info.mode, info.mtime = size, 0o644, 1_680_000_000 + rnd.randrange(60)
                    tf.addfile(info, io.BytesIO(salad[start : start + size]))
                    made += 1
                if pkg % 40 == 0:
                    info = tarfile.TarInfo(f"{base}/current")
                    info.type, info.linkname, info.mtime = tarfile.SYMTYPE, "src", 1_680_000_000
                    tf.addfile(info)
        out.write(comp.flush())


# ----------------------------------------------------------------------------------------- the steps


@dataclass
class Mounted:
    """What the daemon keeps for one served layer (its image plan and its OpenedLayer), plus the tree."""

    plan: ImagePlan
    opened: OpenedLayer
    tree: InodeTree


def _plan(desc: Descriptor, zdesc: Descriptor, z: ztoc_mod.Ztoc) -> ImagePlan:
    return ImagePlan(None, None, "", 2, "bench", (LayerPlan(desc, zdesc, z),))  # type: ignore[arg-type]


def _release(m: Mounted) -> None:
    """What layers.py would do once the layer is served: forget the parsed zTOC everywhere."""
    take = getattr(m.opened, "take_ztoc", None)
    if take is not None:
        take()
        m.plan = m.plan.without_ztoc(m.opened.digest)
    else:  # an older soci_fs (before EntryTable): drop the references by hand
        m.opened.ztoc = None  # type: ignore[assignment]
        m.plan = ImagePlan(None, None, "", 2, "bench", ())  # type: ignore[arg-type]


class Layers:
    """N layers mounted one after the other, each step measured by ``measure()``."""

    def __init__(self, blob: Path, zdata: bytes, digest_size: int) -> None:
        self.blob = blob
        self.zdata = zdata
        self.size = digest_size
        self.cache = BlockCache(None, CacheConfig())
        self.ops = LayerOperations()
        self.fetch = LocalBlob(blob)
        self.kept: list[Mounted] = []
        self.n = 0

    async def mount(self, measure: Any, *, release: bool, walk: bool) -> dict[str, int]:
        """Mount one more layer; ``measure()`` after each step; returns the step deltas."""
        i = self.n
        self.n += 1
        digest = f"sha256:{i:064x}"
        desc = Descriptor(MT_GZIP, digest, self.size)
        zdesc = Descriptor(MT_ZTOC, f"sha256:{i + (1 << 128):064x}", len(self.zdata))
        out: dict[str, int] = {}
        m0 = measure()
        z = await trio.to_thread.run_sync(ztoc_mod.parse, self.zdata)  # the daemon resolves in a thread
        plan = _plan(desc, zdesc, z)
        m1 = measure()
        data = await RemoteLayer.open(z, self.fetch, digest, self.cache)
        opened = OpenedLayer(plan.layers[0], z, data, lazy=True)
        m2 = measure()
        tree = await trio.to_thread.run_sync(InodeTree.from_ztoc, z)  # as Session.add_layer builds it
        m3 = measure()
        layer = self.ops.add_layer(
            f"layer{i}".encode(), tree, data, digest=digest, size=self.size, verify=True
        )
        first_file = next(n for n in (tree.node(k) for k in range(1, tree.max_id + 1)) if n.entry >= 0)
        assert layer.verifier is not None
        layer.verifier.header_range(first_file.entry)  # what the first verified read computes
        m4 = measure()
        mounted = Mounted(plan, opened, tree)
        del z, plan, opened
        if release:
            _release(mounted)
        m5 = measure()
        out.update(ztoc=m1 - m0, spans=m2 - m1, tree=m3 - m2, serve=m4 - m3, release=m5 - m4)
        if walk:
            for k in range(1, tree.max_id + 1):
                await self.ops.getattr(layer.inode(tree.node(k)))
            out["walk"] = measure() - m5
        self.kept.append(mounted)
        out["files"] = len(tree.entries)
        out["nodes"] = tree.max_id
        return out

    def close(self) -> None:
        self.kept.clear()
        self.fetch.close()


def traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mb(n: float) -> str:
    return f"{n / MIB:7.2f}"


async def trace_phase(blob: Path, zdata: bytes, size: int, *, release: bool) -> dict[str, int]:
    """Two layers under tracemalloc (the second one's figures are reported: warm interpreter caches)."""
    layers = Layers(blob, zdata, size)
    tracemalloc.start()
    try:
        await layers.mount(traced, release=release, walk=True)
        got = await layers.mount(traced, release=release, walk=True)
    finally:
        tracemalloc.stop()
        layers.close()
    return got


async def rss_phase(blob: Path, zdata: bytes, size: int, count: int, *, release: bool) -> list[int]:
    layers = Layers(blob, zdata, size)
    out = [rss()]
    try:
        for _ in range(count):
            await layers.mount(rss, release=release, walk=False)
            out.append(rss())
    finally:
        layers.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=10, help="layers mounted in the RSS phase")
    ap.add_argument("--files", type=int, default=12400, help="files in the synthetic layer")
    ap.add_argument("--mb", type=int, default=640, help="uncompressed MiB of the synthetic layer")
    ap.add_argument("--blob", type=Path, help="use this gzip layer blob instead of the synthetic one")
    ap.add_argument("--keep-ztoc", action="store_true", help="RSS phase: keep the parsed zTOC, as today")
    args = ap.parse_args()
    blob, zdata, built = prepare(args)
    z = ztoc_mod.parse(zdata)
    size = blob.stat().st_size
    print(
        f"layer: {size / MIB:.0f} MiB gzip, {z.uncompressed_archive_size / MIB:.0f} MiB tar, "
        f"{len(z.files)} entries, {z.compression.max_span_id + 1} spans; zTOC {len(zdata) / MIB:.2f} MiB "
        f"({len(z.compression.checkpoints) / MIB:.2f} MiB of it checkpoints)"
        + (f"; built in {built:.1f} s and cached in bench/out" if built else ""),
        flush=True,
    )
    del z

    release = not args.keep_ztoc
    series = trio.run(lambda: rss_phase(blob, zdata, size, args.layers, release=release))
    how = "zTOC released" if release else "zTOC kept, as layers.py does today"
    print(f"RSS with {args.layers} layers ({how}):")
    after = " ".join(f"{x / MIB:.0f}" for x in series[1:])
    print(f"  start {series[0] / MIB:.0f} MiB; after each layer: {after}")
    print(
        f"  growth per layer (MiB): {' '.join(f'{(b - a) / MIB:.1f}' for a, b in itertools.pairwise(series))}"
    )
    line = f"  mean growth per layer: {(series[-1] - series[0]) / args.layers / MIB:.1f} MiB"
    if args.layers > 2:
        line += f" (from the third layer on: {(series[-1] - series[2]) / (args.layers - 2) / MIB:.1f} MiB)"
    if built:
        line += (
            "\n  (this run built the layer: its freed heap absorbs some growth; run again for clean figures)"
        )
    print(line, flush=True)

    kept = trio.run(lambda: trace_phase(blob, zdata, size, release=False))
    released = trio.run(lambda: trace_phase(blob, zdata, size, release=True))
    files = released["files"]
    print("\ntracemalloc, MiB held per layer after each step (the second of two layers):")
    print(f"  {'step':<8} {'zTOC kept':>10} {'released':>10}   bytes/entry (released)")
    for step in (*STEPS, "walk"):
        print(f"  {step:<8} {mb(kept[step]):>10} {mb(released[step]):>10}   {released[step] / files:8.0f}")
    total_kept = sum(kept[s] for s in STEPS)
    total_rel = sum(released[s] for s in STEPS)
    print(f"  {'held':<8} {mb(total_kept):>10} {mb(total_rel):>10}   {total_rel / files:8.0f}")
    print(f"  ({files} entries, {released['nodes']} inodes; walk = getattr of every inode, not in 'held')")
    print(f"ratio held released / kept: {total_rel / total_kept:.2f}x")
    print(
        f"ratio held / zTOC size: kept {total_kept / len(zdata):.2f}x, released {total_rel / len(zdata):.2f}x"
    )
    return 0


def prepare(args: argparse.Namespace) -> tuple[Path, bytes, float]:
    """The layer blob and its serialized zTOC, built once and kept in bench/out; seconds spent (0: cached)."""
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    blob = args.blob
    if blob is None:
        blob = out / f"daemon-memory-{args.files}-{args.mb}.tar.gz"
        if not blob.exists():
            tmp = blob.with_suffix(".part")
            synthetic_layer(tmp, args.files, args.mb)
            tmp.rename(blob)
    zpath = out / f"daemon-memory-{blob.name.removeprefix('daemon-memory-')}-{blob.stat().st_size}.ztoc"
    if not zpath.exists():
        with open(blob, "rb") as f:
            zpath.write_bytes(ztoc_mod.serialize(build_ztoc(f.read)))
    spent = time.perf_counter() - t0
    return blob, zpath.read_bytes(), spent if spent > 0.5 else 0.0


if __name__ == "__main__":
    sys.exit(main())
