"""Cold first read of a 4 KiB file in a lazily mounted layer vs the same work done by hand.

Starts docker-registry with htpasswd auth (the test harness) on loopback, pushes a gzip layer of many 4 KiB
files, builds its zTOC, and serves it through the same data plane as ``soci mount`` (``soci_fs.remote`` ->
``RemoteLayer`` -> block cache -> one FUSE session). For each of N files in N distinct spans (so every read
is cold: nothing of that span is cached) it times ``open`` + ``read`` through the mount, and, for the same
span, one range request with the registry client plus inflating the span with ``LayerSpans.decode_span``
(the floor: what any lazy reader must do). Prints both medians and the ratio (target <= 1.5x).

Run as root: ``.venv/bin/python bench/bench_lazy.py [--span-size 1048576] [--files 40]``. Owns nothing else.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import io
import os
import random
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soci_fs.builder import build_ztoc
from soci_fs.cache import BlockCache, CacheConfig
from soci_fs.mount import MountOptions, ThreadedSession
from soci_fs.registry import reference
from soci_fs.registry.client import Descriptor, RegistryClient
from soci_fs.registry.credentials import Credentials
from soci_fs.remote import ImageSource, LayerPlan, open_layer
from soci_fs.spanread import LayerSpans
from soci_fs.store import ContentStore
from tests.harness.registry import PASSWORD, USER, RawPusher, Registry

WORDS = [f"w{i:x}" for i in range(4000)]


def make_layer(span_size: int, spans_wanted: int) -> tuple[bytes, list[str]]:
    """A gzip tar of 4 KiB files of word salad (compresses about 3x, like text), enough for the spans."""
    rnd = random.Random(5)
    buf = io.BytesIO()
    names = []
    total = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        i = 0
        while total < span_size * (spans_wanted + 1):
            data = " ".join(rnd.choice(WORDS) for _ in range(1200)).encode()[:4096]
            info = tarfile.TarInfo(f"files/{i // 1000:03d}/f{i:06d}.txt")
            info.size = len(data)
            info.mtime = 1_600_000_000
            tf.addfile(info, io.BytesIO(data))
            names.append(info.name)
            total += 512 + 4096 + 512
            i += 1
    return gzip.compress(buf.getvalue(), compresslevel=6, mtime=0), names


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--span-size", type=int, default=1 << 20)
    ap.add_argument("--files", type=int, default=40)
    args = ap.parse_args()
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("bench_lazy needs root and /dev/fuse", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="soci-bench-lazy-"))
    reg = Registry(work / "reg", auth="htpasswd", users={USER: PASSWORD}).start()
    session: ThreadedSession | None = None
    try:
        blob, names = make_layer(args.span_size, args.files)
        repo = "bench/lazy"
        img = RawPusher(reg).push_image(repo, "v1", [blob])
        digest = img["layers"][0]
        z = build_ztoc(io.BytesIO(blob).read, span_size=args.span_size)
        spans = LayerSpans.from_ztoc(z, lambda a, b: b"", check_header=False)
        by_span: dict[int, str] = {}
        offsets = {f.name: f for f in z.files}
        for n in names:
            f = offsets[n]
            s0, s1 = spans.span_of(f.uncompressed_offset), spans.span_of(f.uncompressed_offset + 4095)
            if s0 == s1 and s0 not in by_span and s0 > 0:
                by_span[s0] = n
        picked = sorted(by_span.items())[: args.files]
        ref = reference.parse(f"{reg.host}/{repo}:v1")
        creds = Credentials(USER, PASSWORD)
        desc = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", digest, len(blob))

        # --- through the mount
        client = RegistryClient(lambda h, r: creds, ref=str(ref), plain_http=True)
        source = ImageSource(client, ref, ContentStore(work / "content"))
        cache = BlockCache(work / "root", CacheConfig())
        mnt = work / "mnt"
        mnt.mkdir()
        session = ThreadedSession(mnt, MountOptions()).start()
        layer = session.call(functools.partial(open_layer, source, LayerPlan(desc, desc, z), cache))
        d = session.add_layer("layer", layer.ztoc, layer.data)
        os.stat(d / names[0])  # warm the dentries of the first directory; reads below are cold
        mount_times = []
        for _, name in picked:
            p = d / name
            os.stat(p)  # metadata is local; only the data read is timed
            t0 = time.perf_counter()
            with open(p, "rb") as f:
                got = f.read()
            mount_times.append(time.perf_counter() - t0)
            assert len(got) == 4096
        stats = layer.data.statistics()

        # --- by hand: one range request + inflating the span
        hand_client = RegistryClient(lambda h, r: creds, ref=str(ref), plain_http=True)
        rb = hand_client.blob(ref, digest, size=len(blob))
        rb.read(0, 2)  # resolve + token, as the mount did at open
        hand_times = []
        for s, _ in picked:
            cs, ce = spans.compressed_range(s)
            t0 = time.perf_counter()
            data = rb.read(cs, ce - cs)
            spans.decode_span(s, data)
            hand_times.append(time.perf_counter() - t0)
        m, h = statistics.median(mount_times), statistics.median(hand_times)
        print(f"layer: {len(blob)} bytes gzip, {spans.max_span_id + 1} spans of {args.span_size} bytes")
        print(f"cold 4 KiB read through the mount: median {m * 1000:.2f} ms over {len(picked)} files")
        print(f"one range request + inflate by hand: median {h * 1000:.2f} ms")
        print(f"ratio mount / by hand: {m / h:.2f}x (target <= 1.5x)")
        print(f"mount fetched {stats['spans_fetched']} spans in {stats['requests']} requests")
        client.close()
        hand_client.close()
        return 0
    finally:
        if session is not None:
            session.close()
        reg.stop()


if __name__ == "__main__":
    sys.exit(main())
