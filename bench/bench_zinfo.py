"""Benchmark of the checkpoint engine: index build throughput and random span reads.

Builds (once, cached under ``bench/out/``) a ~500 MB tar of real files from ``/usr`` and its ``gzip -6``
blob, then measures in one run, alternating the contenders each round and reporting medians:

* index build: ``zinfo.index_gzip`` (compiled and pure twin, 4 MiB spans) against indexed_gzip's
  ``_IndexedGzipFile(path, spacing=4 MiB).build_full_index()`` and a plain ``zlib.decompressobj(31)`` inflate;
* peak RSS growth of one build (each implementation in a fresh subprocess);
* random 4 KiB reads: span bytes from the local file + ``extract_span`` (and through ``spanread.LayerSpans``,
  which also verifies the span digest) against plain zlib inflating the same span from its checkpoint
  (``zlib.decompressobj(-15, zdict=window)``; only spans whose checkpoint has ``bits == 0``, since Python's
  zlib cannot prime bits);
* a get-file-style read of a small file near the end of the layer.

Run: ``.venv/bin/python bench/bench_zinfo.py [--rounds N] [--reads N]``. The package never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.layers import MB, OUT, ensure  # noqa: E402  (after the sys.path line)

TAR = OUT / "layer.tar"
GZ = OUT / "layer.tar.gz"
SPAN = 4 << 20


def prepare() -> None:
    """Create bench/out/layer.tar and layer.tar.gz unless they exist."""
    ensure(TAR, GZ)


def run_index(engine) -> tuple[float, object]:
    with open(GZ, "rb", buffering=0) as f:
        t = time.perf_counter()
        res = engine.index_gzip(f.read, SPAN)
        return time.perf_counter() - t, res


def cpu_seconds() -> float:
    """CPU time of this process (all threads), user + system."""
    t = os.times()
    return t.user + t.system


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds, result) of ``fn()``."""
    c, t = cpu_seconds(), time.perf_counter()
    res = fn()
    return time.perf_counter() - t, cpu_seconds() - c, res


def run_indexed_gzip() -> float:
    from indexed_gzip.indexed_gzip import _IndexedGzipFile

    t = time.perf_counter()
    f = _IndexedGzipFile(str(GZ), spacing=SPAN)
    f.build_full_index()
    dt = time.perf_counter() - t
    f.close()
    return dt


def run_zlib() -> float:
    with open(GZ, "rb", buffering=0) as f:
        t = time.perf_counter()
        d = zlib.decompressobj(31)
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            d.decompress(chunk)
        d.flush()
        return time.perf_counter() - t


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_child(impl: str) -> None:
    """Subprocess body: print the peak RSS growth (KiB) of one index build over the RSS before it."""
    if impl == "pure":
        from soci_fs import zinfo_py as engine
    else:
        from soci_fs._ext import _zinfo as engine
    from soci_fs import zinfo  # noqa: F401  (IndexResult)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    base = _status_kib("VmRSS")
    _, res = run_index(engine)
    peak = _status_kib("VmHWM")
    print(json.dumps({"growth_kib": peak - base, "blob": len(res.checkpoints_blob)}))


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reads", type=int, default=400)
    ap.add_argument("--rss-child", choices=["compiled", "pure"])
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return
    prepare()

    from soci_fs import spanread, zinfo, zinfo_py
    from soci_fs._ext import _zinfo as compiled

    gz_size = GZ.stat().st_size
    tar_size = TAR.stat().st_size
    print(f"layer: {tar_size / MB:.1f} MB tar, {gz_size / MB:.1f} MB gzip -6; span {SPAN >> 20} MiB")

    # ---- index build -------------------------------------------------------------------------------------
    def noop_sink(view: memoryview) -> None:
        pass

    def index_with(engine, sink=None):
        def run():
            with open(GZ, "rb", buffering=0) as f:
                return engine.index_gzip(f.read, SPAN, sink)

        return run

    contenders = {
        "compiled": index_with(compiled),
        "indexed_gzip": run_indexed_gzip,
        "zlib": run_zlib,
        "compiled+sink": index_with(compiled, noop_sink),
        "pure": index_with(zinfo_py),
    }
    wall: dict[str, list[float]] = {k: [] for k in contenders}
    cpu: dict[str, list[float]] = {k: [] for k in contenders}
    result = None
    for r in range(args.rounds):
        for name, fn in contenders.items():
            if name == "pure" and r >= max(2, args.rounds // 2):
                continue
            dt, dc, res = timed(fn)
            wall[name].append(dt)
            cpu[name].append(dc)
            if name == "compiled" and result is None:
                result = res
            if name == "pure":
                assert res == result, "pure twin result differs from the compiled one"
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in wall.items() if v), flush=True)
    assert result is not None
    med = {k: statistics.median(v) for k, v in wall.items()}
    medc = {k: statistics.median(v) for k, v in cpu.items()}
    print("\nindex build (medians; MB/s of uncompressed output; CPU = all threads of the process):")
    for k in contenders:
        print(f"  {k:14s} wall {med[k]:6.2f} s {tar_size / MB / med[k]:6.1f} MB/s   CPU {medc[k]:6.2f} s")
    for ref, target in (("indexed_gzip", 1.0), ("zlib", 0.9)):
        print(
            f"  compiled vs {ref:12s}: wall {med[ref] / med['compiled']:.2f}x, "
            f"CPU {medc[ref] / medc['compiled']:.2f}x  (target >= {target})"
        )
    print(f"  pure vs compiled: wall {med['compiled'] / med['pure']:.2f}x")
    z = zinfo.GzipZinfo.parse(result.checkpoints_blob)
    print(f"  {len(z.checkpoints)} checkpoints, blob {len(result.checkpoints_blob) / MB:.2f} MB")

    for impl in ("compiled", "pure"):
        out = subprocess.run(
            [sys.executable, __file__, "--rss-child", impl], capture_output=True, text=True, check=True
        ).stdout
        info = json.loads(out)
        print(f"  peak RSS growth of one build ({impl}): {info['growth_kib'] / 1024:.1f} MiB")

    # ---- random 4 KiB reads -----------------------------------------------------------------------------
    usize = result.uncompressed_size
    rng = random.Random(1)
    offsets = []
    while len(offsets) < args.reads:  # reads that stay inside one span (LayerSpans.read also crosses spans)
        off = rng.randrange(0, usize - 4096)
        if z.uncompressed_range(z.span_of(off), usize)[1] >= off + 4096:
            offsets.append(off)
    fd = os.open(GZ, os.O_RDONLY)

    def fetch(start: int, end: int) -> bytes:
        return os.pread(fd, end - start, start)

    class _Compression:
        algorithm = 1
        checkpoints = result.checkpoints_blob
        span_digests = result.span_digests

    class _Ztoc:
        compression = _Compression
        compressed_archive_size = gz_size
        uncompressed_archive_size = usize

    layer = spanread.LayerSpans.from_ztoc(_Ztoc, fetch)

    def ours(off: int) -> bytes:
        i = z.span_of(off)
        cs, ce = z.compressed_range(i, gz_size)
        return zinfo.extract_span(fetch(cs, ce), z.checkpoints[i], off - z.checkpoints[i].out_offset, 4096)

    def plain(off: int, whole: bool) -> bytes:
        i = z.span_of(off)
        cs, ce = z.compressed_range(i, gz_size)
        cp = z.checkpoints[i]
        us, ue = z.uncompressed_range(i, usize)
        d = zlib.decompressobj(-15, zdict=cp.window)
        comp = fetch(cs, ce)
        want = (ue - us) if whole else (off - us + 4096)
        data = d.decompress(comp, want)
        return data[off - us : off - us + 4096]

    def ours_pure(off: int) -> bytes:
        i = z.span_of(off)
        cs, ce = z.compressed_range(i, gz_size)
        return zinfo_py.extract_span(fetch(cs, ce), z.checkpoints[i], off - z.checkpoints[i].out_offset, 4096)

    zero_bit = [o for o in offsets if z.checkpoints[z.span_of(o)].bits == 0]
    lat: dict[str, list[tuple[float, float]]] = {}

    def measure(name: str, fn, off: int) -> bytes:
        c, t = time.thread_time(), time.perf_counter()
        out = fn(off)
        lat.setdefault(name, []).append((time.perf_counter() - t, time.thread_time() - c))
        return out

    for off in offsets:
        a = measure("extract_span (all offsets)", ours, off)
        b = measure("  pure twin", ours_pure, off)
        c = measure("LayerSpans.read (all, verified)", lambda o: layer.read(o, 4096), off)
        assert a == b == c
    for off in zero_bit:
        a = measure("extract_span (bits=0 spans)", ours, off)
        b = measure("zlib to offset (bits=0 spans)", lambda o: plain(o, whole=False), off)
        measure("zlib whole span (bits=0 spans)", lambda o: plain(o, whole=True), off)
        assert a == b

    def med(name: str, k: int) -> float:
        return statistics.median(x[k] for x in lat[name])

    print(f"\nrandom 4 KiB reads ({len(offsets)} offsets, {len(zero_bit)} in bits=0 spans), medians:")
    for name in lat:
        print(f"  {name:34s} wall {med(name, 0) * 1e3:6.2f} ms   CPU {med(name, 1) * 1e3:6.2f} ms")
    for ref in ("zlib to offset (bits=0 spans)", "zlib whole span (bits=0 spans)"):
        print(
            f"  extract vs {ref}: wall {med('extract_span (bits=0 spans)', 0) / med(ref, 0):.2f}x, "
            f"CPU {med('extract_span (bits=0 spans)', 1) / med(ref, 1):.2f}x  (target <= 1.3)"
        )

    # ---- get-file-style read near the end ---------------------------------------------------------------
    member = None
    with tarfile.open(TAR) as tf:
        for m in tf:
            if m.isreg() and 1000 <= m.size <= 16384:
                member = m
    assert member is not None
    with open(TAR, "rb") as f:
        f.seek(member.offset_data)
        expect = f.read(member.size)
    got_times = []
    for _ in range(7):
        t = time.perf_counter()
        got = layer.read(member.offset_data, member.size)
        got_times.append(time.perf_counter() - t)
        assert got == expect
    first, last = layer.span_range(member.offset_data, member.size)
    print(
        f"\nget-file {member.name} ({member.size} B at {member.offset_data}, spans {first}..{last}): "
        f"{ms(got_times)} (fetch + verify + extract)"
    )
    os.close(fd)


if __name__ == "__main__":
    main()
