"""Benchmark of the whole zTOC build: inflate + checkpoints + tar scan + flatbuffer, per layer.

Builds (once, cached under ``bench/out/``; files another bench made there are reused) a ~500 MB tar of real
files from ``/usr`` in GNU format and the same tree in PAX format (``tar --format=pax``: atime/ctime/mtime
records for every entry), each compressed with ``gzip -6``, plus a half-size cut of the GNU layer for the
memory comparison. Then, in one run and alternating the contenders each round, it reports medians of:

* ``builder.build_ztoc`` + ``ztoc.serialize`` with the compiled modules, and the same with the pure-Python
  twins (``SOCI_PUREPYTHON=1``, in a subprocess, fewer rounds);
* the parts of the compiled build: ``zinfo.index_gzip`` alone (inflate, checkpoints, span digests), the scan
  on top of it, and ``serialize``;
* indexed_gzip ``_IndexedGzipFile(path, spacing=4 MiB).build_full_index()``;
* a plain Python ``zlib.decompressobj(31)`` inflate in 1 MiB input chunks.

It prints MB/s (uncompressed tar bytes per second, MB = 10^6 bytes), the ratios against indexed_gzip
(target >= 1.0) and the plain inflate (target >= 0.9), and the peak memory of one compiled build for two layer
sizes, each in a fresh subprocess: the RSS high-water growth and the ``tracemalloc`` peak. The high-water
mark is ``VmHWM`` reset through ``/proc/self/clear_refs`` just before the build: the same kernel counter as
``ru_maxrss``, whose own delta is useless in a child because it starts at the forking parent's RSS.

Run: ``.venv/bin/python bench/bench_ztoc_build.py [--rounds N] [--pure-rounds N]``.
The package never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.layers import MB, OUT, ensure, gzip_file  # noqa: E402  (after the sys.path line)

SPAN = 4 << 20
LAYERS = {  # name -> (tar, gzip)
    "gnu": (OUT / "layer.tar", OUT / "layer.tar.gz"),  # same files as bench/bench_zinfo.py
    "pax": (OUT / "layer-pax.tar", OUT / "layer-pax.tar.gz"),
    "gnu-half": (OUT / "layer-half.tar", OUT / "layer-half.tar.gz"),
}


# ------------------------------------------------------------------------------------------ layers


def _make_half(src: Path, dst: Path) -> None:
    """The entries of ``src`` whose headers start in its first half, then an end marker."""
    from soci_fs.tarscan import TarScanner

    scanner = TarScanner()
    with open(src, "rb") as f:
        while chunk := f.read(1 << 20):
            scanner.feed(chunk)
    half = src.stat().st_size // 2
    cut = 0
    end = 0
    for e in scanner.finish().entries:
        if e.uncompressed_offset > half:
            cut = end  # header offset of this entry = end of the previous one (its padding included)
            break
        end = -(-(e.uncompressed_offset + e.uncompressed_size) // 512) * 512
    print(f"building {dst.name}: first {cut / MB:.0f} MB of {src.name} ...", flush=True)
    tmp = dst.with_suffix(".tmp")
    with open(src, "rb") as f, open(tmp, "wb") as out:
        left = cut
        while left:
            piece = f.read(min(left, 1 << 20))
            out.write(piece)
            left -= len(piece)
        out.write(bytes(1024))
    tmp.rename(dst)


def prepare() -> None:
    """Create the cached layers that are missing."""
    ensure(*LAYERS["gnu"])
    ensure(*LAYERS["pax"], "--format=pax")
    tar, gz = LAYERS["gnu-half"]
    if not tar.exists():
        _make_half(LAYERS["gnu"][0], tar)
    if not gz.exists():
        gzip_file(tar, gz)


# ------------------------------------------------------------------------------------ contenders


def build_and_serialize(gz: Path) -> tuple[float, float, int]:
    """(build seconds, serialize seconds, entries) of one full zTOC build."""
    from soci_fs import ztoc
    from soci_fs.builder import build_ztoc

    with open(gz, "rb", buffering=0) as f:
        t = time.perf_counter()
        z = build_ztoc(f.read, span_size=SPAN)
        t1 = time.perf_counter()
    data = ztoc.serialize(z)
    t2 = time.perf_counter()
    assert data
    return t1 - t, t2 - t1, len(z.files)


def index_only(gz: Path) -> float:
    from soci_fs import zinfo

    with open(gz, "rb", buffering=0) as f:
        t = time.perf_counter()
        zinfo.index_gzip(f.read, SPAN)
        return time.perf_counter() - t


def run_indexed_gzip(gz: Path) -> float:
    from indexed_gzip.indexed_gzip import _IndexedGzipFile

    t = time.perf_counter()
    f = _IndexedGzipFile(str(gz), spacing=SPAN)
    f.build_full_index()
    dt = time.perf_counter() - t
    f.close()
    return dt


def run_zlib(gz: Path) -> float:
    with open(gz, "rb", buffering=0) as f:
        t = time.perf_counter()
        d = zlib.decompressobj(31)
        while chunk := f.read(1 << 20):
            d.decompress(chunk)
        d.flush()
        return time.perf_counter() - t


# -------------------------------------------------------------------------------------- children


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(kind: str, gz: Path, rounds: int) -> None:
    """Subprocess body; prints one JSON line."""
    from soci_fs import tarscan, zinfo, ztoc

    impl = {
        "zinfo": zinfo.IMPLEMENTATION,
        "tarscan": tarscan.IMPLEMENTATION,
        "ztoc": ztoc.WRITER_IMPLEMENTATION,
    }
    if kind == "time":
        runs = [build_and_serialize(gz) for _ in range(rounds)]
        print(json.dumps({"impl": impl, "runs": runs}))
    elif kind == "rss":
        import gc

        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark (VmHWM) to the current RSS
        base = _status_kib("VmRSS")
        _, _, n = build_and_serialize(gz)
        print(
            json.dumps(
                {
                    "impl": impl,
                    "hwm_growth_kib": _status_kib("VmHWM") - base,
                    "entries": n,
                }
            )
        )
    else:  # tracemalloc
        import tracemalloc

        tracemalloc.start()
        build_and_serialize(gz)
        _, peak = tracemalloc.get_traced_memory()
        print(json.dumps({"impl": impl, "tracemalloc_peak": peak}))


def spawn(kind: str, layer: str, rounds: int = 1, pure: bool = False) -> dict:
    env = {**os.environ, "SOCI_PUREPYTHON": "1" if pure else ""}
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--layer", layer, "--rounds", str(rounds)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ main


def med(values: list[float]) -> float:
    return statistics.median(values)


def bench_layer(name: str, rounds: int, pure_rounds: int) -> dict[str, float]:
    tar, gz = LAYERS[name]
    tar_mb = tar.stat().st_size / MB
    print(f"\n== layer {name}: {tar_mb:.1f} MB tar, {gz.stat().st_size / MB:.1f} MB gzip -6, span 4 MiB ==")
    wall: dict[str, list[float]] = {k: [] for k in ("ztoc", "build", "serialize", "index", "igzip", "zlib")}
    entries = 0
    for r in range(rounds):
        b, s, entries = build_and_serialize(gz)
        wall["ztoc"].append(b + s)
        wall["build"].append(b)
        wall["serialize"].append(s)
        wall["igzip"].append(run_indexed_gzip(gz))
        wall["zlib"].append(run_zlib(gz))
        wall["index"].append(index_only(gz))
        print(
            f"  round {r + 1}: build+serialize {b + s:.2f}s (serialize {s:.3f}s), "
            f"indexed_gzip {wall['igzip'][-1]:.2f}s, zlib {wall['zlib'][-1]:.2f}s, "
            f"index_gzip alone {wall['index'][-1]:.2f}s",
            flush=True,
        )
    pure = spawn("time", name, pure_rounds, pure=True) if pure_rounds else None
    m = {k: med(v) for k, v in wall.items()}
    print(f"  {entries} entries; medians ({rounds} rounds):")

    def line(label: str, seconds: float) -> None:
        print(
            f"    {label:34s} {seconds:6.3f} s {tar_mb / seconds:7.1f} MB/s   vs indexed_gzip "
            f"{m['igzip'] / seconds:5.2f}x   vs zlib inflate {m['zlib'] / seconds:5.2f}x"
        )

    line("zTOC build + serialize (compiled)", m["ztoc"])
    if pure is not None:
        runs = pure["runs"]
        p_total = med([b + s for b, s, _ in runs])
        line(f"zTOC build + serialize (pure, {len(runs)} runs)", p_total)
        p_build = med([b for b, _, _ in runs])
        p_ser = med([s for _, s, _ in runs])
        print(f"      pure parts: build {p_build:.3f} s, serialize {p_ser:.3f} s")
    line("  index_gzip alone (compiled)", m["index"])
    print(
        f"      scan on top of index_gzip {m['build'] - m['index']:+.3f} s, serialize {m['serialize']:.3f} s"
    )
    line("indexed_gzip build_full_index", m["igzip"])
    line("zlib.decompressobj(31)", m["zlib"])
    return {"igzip_ratio": m["igzip"] / m["ztoc"], "zlib_ratio": m["zlib"] / m["ztoc"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pure-rounds", type=int, default=2)
    ap.add_argument("--layers", default="gnu,pax")
    ap.add_argument("--child", choices=["time", "rss", "tracemalloc"])
    ap.add_argument("--layer", default="gnu")
    args = ap.parse_args()
    if args.child:
        child(args.child, LAYERS[args.layer][1], args.rounds)
        return
    prepare()
    from soci_fs import tarscan, zinfo, ztoc

    print(
        f"implementations: zinfo {zinfo.IMPLEMENTATION}, tarscan {tarscan.IMPLEMENTATION}, "
        f"ztoc writer {ztoc.WRITER_IMPLEMENTATION}; load {os.getloadavg()[0]:.2f}"
    )
    ratios = {name: bench_layer(name, args.rounds, args.pure_rounds) for name in args.layers.split(",")}

    print("\n== peak memory of one compiled build + serialize (fresh subprocess each) ==")
    for name in ("gnu-half", "gnu", "pax"):
        tar = LAYERS[name][0]
        rss = spawn("rss", name)
        tm = spawn("tracemalloc", name)
        n = rss["entries"]
        print(
            f"  {name:9s} {tar.stat().st_size / MB:6.1f} MB tar, {n:6d} entries: RSS high-water growth "
            f"{rss['hwm_growth_kib'] / 1024:6.1f} MiB, "
            f"tracemalloc peak {tm['tracemalloc_peak'] / MB:6.1f} MB "
            f"= {tm['tracemalloc_peak'] / n:5.0f} B/entry"
        )
    print("\nsummary (targets: >= 1.00x indexed_gzip, >= 0.90x plain zlib inflate):")
    for name, r in ratios.items():
        print(f"  {name}: {r['igzip_ratio']:.2f}x indexed_gzip, {r['zlib_ratio']:.2f}x zlib inflate")


if __name__ == "__main__":
    main()
