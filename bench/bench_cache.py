"""Benchmark of the span manager and block cache (``soci_fs.spans.RemoteLayer`` over ``soci_fs.cache``).

Input: a gzip layer of real files with a zTOC of 4 MiB spans. It reuses ``bench/out/layer-pax.tar(.gz)``
(made by ``bench_zinfo.py``'s sibling runs) when present, else writes ``bench/out/cache-layer.tar(.gz)`` from
``/usr`` (``pigz -6``). The zTOC is cached as ``<blob>.ztoc``.

Measures (medians of alternating rounds):

* warm reads: ``RemoteLayer.read`` of the first 512 MiB of the uncompressed layer in 1 MiB requests, from the
  memory tier, from the disk tier (first pass verifies every crc32 block, later passes do not), against
  ``os.pread`` of the same bytes from the plain tar file (page cache warm);
* the cold path: the first read of a small file (<= 4 KiB) = one range request for its span + inflate +
  sha256 + cache write, against doing the range read and ``zinfo.extract_span`` by hand;
* peak RSS of a child process reading the whole 512 MiB cold while the cache is bounded (memory tier
  64 MiB, disk tier 256 MiB).

Run: ``.venv/bin/python bench/bench_cache.py [--rounds N] [--files N]``. The package never imports it.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from soci_fs import cache as cache_mod  # noqa: E402
from soci_fs import zinfo, ztoc  # noqa: E402
from soci_fs.builder import build_ztoc_from_file  # noqa: E402
from soci_fs.cache import BlockCache, CacheConfig  # noqa: E402
from soci_fs.spans import RemoteLayer  # noqa: E402

OUT = ROOT / "bench" / "out"
MIB = 1 << 20
RANGE = 512 * MIB
REQ = 1 * MIB
SPAN = 4 * MIB


def prepare() -> tuple[Path, Path, ztoc.Ztoc]:
    OUT.mkdir(parents=True, exist_ok=True)
    tar, gz = OUT / "layer-pax.tar", OUT / "layer-pax.tar.gz"
    if not (tar.exists() and gz.exists() and tar.stat().st_size >= RANGE):
        tar, gz = OUT / "cache-layer.tar", OUT / "cache-layer.tar.gz"
        if not gz.exists():
            print("building", tar, flush=True)
            total = 0
            with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
                for dirpath, dirnames, filenames in os.walk("/usr"):
                    dirnames.sort()
                    for name in sorted(filenames):
                        p = os.path.join(dirpath, name)
                        if os.path.islink(p) or not os.path.isfile(p):
                            continue
                        try:
                            tf.add(p, arcname=os.path.relpath(p, "/"))
                        except OSError:
                            continue
                        total += os.path.getsize(p)
                        if total > RANGE + 40 * MIB:
                            break
                    if total > RANGE + 40 * MIB:
                        break
            with open(gz, "wb") as f:
                subprocess.run(["pigz", "-6", "-c", str(tar)], stdout=f, check=True)
    zpath = gz.with_suffix(".gz.ztoc")
    if zpath.exists():
        z = ztoc.parse(zpath.read_bytes())
    else:
        print("building zTOC of", gz, flush=True)
        with open(gz, "rb") as f:
            z = build_ztoc_from_file(f, span_size=SPAN)
        zpath.write_bytes(ztoc.serialize(z))
    return tar, gz, z


class FileFetch:
    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.calls = 0

    def __call__(self, start: int, end: int) -> bytes:
        self.calls += 1
        return os.pread(self.fd, end - start, start)


def digest_of(gz: Path) -> str:
    return "sha256:" + "0" * 48 + format(gz.stat().st_size, "016x")  # a stable cache key, not verified


async def read_range(remote: RemoteLayer, length: int) -> float:
    t = time.perf_counter()
    for off in range(0, length, REQ):
        await remote.read(off, min(REQ, length - off))
    return time.perf_counter() - t


def plain_range(tar: Path, length: int) -> float:
    fd = os.open(tar, os.O_RDONLY)
    try:
        t = time.perf_counter()
        for off in range(0, length, REQ):
            os.pread(fd, min(REQ, length - off), off)
        return time.perf_counter() - t
    finally:
        os.close(fd)


def mbps(seconds: float, n: int = RANGE) -> str:
    return f"{n / seconds / 1e6:8.0f} MB/s"


async def warm(tar: Path, gz: Path, z: ztoc.Ztoc, rounds: int) -> None:
    length = min(RANGE, z.uncompressed_archive_size)
    root = Path(tempfile.mkdtemp(prefix="soci-bench-cache-"))
    try:
        digest = digest_of(gz)
        fetch = FileFetch(gz)
        mem_cache = BlockCache(root, CacheConfig(max_memory_bytes=length + 64 * MIB))
        remote = await RemoteLayer.open(z, fetch, digest, mem_cache)
        cold = await read_range(remote, length)
        print(f"cold pass (local blob, fetch+sha256+inflate+cache write): {cold:6.2f} s {mbps(cold, length)}")
        disk_cache = BlockCache(root, CacheConfig(max_memory_bytes=0))
        disk = await RemoteLayer.open(z, fetch, digest, disk_cache)
        first_disk = await read_range(disk, length)
        print(
            f"disk tier, first pass (crc32 verify of every block): {first_disk:6.2f} s "
            f"{mbps(first_disk, length)}"
        )
        times: dict[str, list[float]] = {"memory": [], "disk": [], "plain": []}
        for _ in range(rounds):
            times["plain"].append(plain_range(tar, length))
            times["memory"].append(await read_range(remote, length))
            times["disk"].append(await read_range(disk, length))
        plain = statistics.median(times["plain"])
        for name in ("memory", "disk", "plain"):
            med = statistics.median(times[name])
            print(
                f"warm {name:6s}: median {med * 1000:7.1f} ms for {length >> 20} MiB in 1 MiB requests "
                f"{mbps(med, length)}  ({med / plain:4.2f}x plain file)"
            )
        print(f"range requests in the cold pass: {fetch.calls} for {remote.span_count} spans")
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def cold_files(gz: Path, z: ztoc.Ztoc, nfiles: int) -> None:
    probe = await RemoteLayer.open(z, FileFetch(gz), digest_of(gz), BlockCache(None), check_header=False)
    lay = probe.layer
    by_span: dict[int, Any] = {}
    for f in z.files:
        if f.type == "reg" and 0 < f.uncompressed_size <= 4096:
            s = lay.span_of(f.uncompressed_offset)
            if s == lay.span_of(f.uncompressed_offset + f.uncompressed_size) and s not in by_span:
                by_span[s] = f
    rnd = random.Random(5)
    picks = rnd.sample(sorted(by_span), min(nfiles, len(by_span)))
    fetch = FileFetch(gz)
    ours: list[float] = []
    hand: list[float] = []
    ratios: list[float] = []
    for s in picks:
        f = by_span[s]
        root = Path(tempfile.mkdtemp(prefix="soci-bench-cold-"))
        try:
            remote = await RemoteLayer.open(z, fetch, digest_of(gz), BlockCache(root), check_header=False)
            t = time.perf_counter()
            data = await remote.read(f.uncompressed_offset, f.uncompressed_size)
            a = time.perf_counter() - t
            cs, ce = lay.compressed_range(s)
            us, ue = lay.uncompressed_range(s)
            t = time.perf_counter()
            raw = fetch(cs, ce)
            whole = zinfo.extract_span(raw, lay.index.checkpoints[s], 0, ue - us)  # type: ignore[union-attr]
            b = time.perf_counter() - t
            off = f.uncompressed_offset - us
            assert bytes(data) == whole[off : off + f.uncompressed_size]
            ours.append(a)
            hand.append(b)
            ratios.append(a / b)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"cold small-file read over {len(picks)} files (one span each, ~{SPAN >> 20} MiB uncompressed): "
        f"ours median {statistics.median(ours) * 1000:.1f} ms, by hand (range read + extract_span) "
        f"{statistics.median(hand) * 1000:.1f} ms, ratio median {statistics.median(ratios):.2f}x "
        f"(p90 {sorted(ratios)[int(len(ratios) * 0.9)]:.2f}x)"
    )


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


async def rss_child(gz: Path) -> None:
    z = ztoc.parse(gz.with_suffix(".gz.ztoc").read_bytes())
    length = min(RANGE, z.uncompressed_archive_size)
    root = Path(tempfile.mkdtemp(prefix="soci-bench-rss-"))
    try:
        cfg = CacheConfig(max_memory_bytes=64 * MIB, max_disk_bytes=256 * MIB)
        c = BlockCache(root, cfg)
        remote = await RemoteLayer.open(z, FileFetch(gz), digest_of(gz), c)
        base = _status_kib("VmRSS")
        t = await read_range(remote, length)
        peak = _status_kib("VmHWM")  # ru_maxrss would include the parent's peak (kept across exec)
        st = c.statistics()
        print(
            f"bounded cache (memory 64 MiB, disk 256 MiB), cold read of {length >> 20} MiB: {t:.2f} s; "
            f"RSS before {base / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB; cache now memory "
            f"{st['memory_bytes'] >> 20} MiB / disk {st['disk_bytes'] >> 20} MiB, "
            f"{st['disk_evictions']} disk evictions"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--files", type=int, default=30)
    ap.add_argument("--rss-child", type=Path)
    args = ap.parse_args()
    if args.rss_child:
        trio.run(rss_child, args.rss_child)
        return
    tar, gz, z = prepare()
    print(
        f"layer {gz.name}: {z.compressed_archive_size / 1e6:.0f} MB gzip, "
        f"{z.uncompressed_archive_size / 1e6:.0f} MB tar, {z.compression.max_span_id + 1} spans; "
        f"blockcopy {cache_mod.IMPLEMENTATION}, zinfo {zinfo.IMPLEMENTATION}"
    )
    trio.run(warm, tar, gz, z, args.rounds)
    trio.run(cold_files, gz, z, args.files)
    subprocess.run([sys.executable, __file__, "--rss-child", str(gz)], check=True)


if __name__ == "__main__":
    main()
