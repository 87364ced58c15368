"""Pull start to the container's first output line: lazy (SOCI) vs containerd's overlayfs snapshotter.

The image is the demo image (``scripts/demo_image.py``: one ~650 MB layer of Debian packages, ~200 MB gzip,
and a small app layer whose entrypoint prints a line at once and then reads a handful of files), converted
with ``soci convert --standalone`` and pushed with ``soci push --oci-layout`` to docker-registry (no auth);
the image as built (no SOCI index) is pushed beside it with skopeo for the overlayfs runs, because that is
what a pull without SOCI downloads (``ctr image pull`` of the SOCI-enabled image also fetches the SOCI index
and its zTOCs, about 4 % more bytes).
Each measurement uses a fresh containerd (and, for lazy, a fresh daemon with an empty cache), so every pull
is cold; the registry's files are in the page cache for both. Modes alternate within each repeat.

* overlayfs: ``ctr image pull --plain-http REF`` then ``ctr run --rm REF ID /entrypoint.sh`` (REF: the
  unconverted image);
* lazy: ``soci-snapshotter-grpc`` as proxy snapshotter ``soci``; ``soci image rpull --plain-http
  --snapshotter soci REF`` then ``ctr run --rm --snapshotter soci REF ID /entrypoint.sh``.

Both run over loopback, then with the registry inside a network namespace behind a 100 Mbit/s ``tbf`` veth
(reached through a loopback relay, see ``bench/netlimit.py``). Printed: medians of the time to the first
output line (and to the ``demo: done`` line), the ratio lazy / overlayfs (target <= 0.3x on loopback),
bytes the registry sent vs the image size, and the daemon's memory with N distinct images pulled and run
(each a variant of the demo image with its own big layer, zTOCs and SOCI index; see
``demo_image.build_variants``): RSS idle, after each image, the peak (VmHWM), and the RSS growth per image.

When the lazy path cannot run (``soci image rpull`` missing, the daemon failing), the overlayfs figures are
still printed, then the reason, and the exit status is 1.

Run as root: ``.venv/bin/python bench/bench_pull_first_output.py [--small] [--repeat 3] [--no-netns]
[--images 10] [--json FILE]``. Owns nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.netlimit import NetNS, TcpRelay
from bench.pullrun import (
    LazyUnavailable,
    NetnsRegistry,
    Node,
    RunResult,
    cleanup_under,
    fmt_bytes,
    one_run,
    rpull_missing,
    sigterm_as_interrupt,
    skopeo_push,
    soci_convert,
    soci_push,
)
from scripts import demo_image
from tests.harness.registry import Registry

REPO = "bench/pull"
PLAIN_TAG = "plain"  # the image as built (what a pull without SOCI downloads)
SOCI_TAG = "soci"  # the SOCI-enabled image made by soci convert


def _median(rs: list[RunResult], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in rs)


def _summary(rs: list[RunResult], image_bytes: int) -> dict[str, float]:
    if not rs:
        return {}
    fetched = statistics.median(r.fetched.get("bytes", 0) for r in rs)
    out = {
        "runs": len(rs),
        "pull_s": _median(rs, "pull_s"),
        "first_output_s": _median(rs, "first_output_s"),
        "done_s": _median(rs, "done_s"),
        "fetched_bytes": fetched,
        "fetched_fraction": fetched / image_bytes,
        "requests": statistics.median(r.fetched.get("requests", 0) for r in rs),
        "range_bytes": statistics.median(r.fetched.get("range_bytes", 0) for r in rs),
    }
    hwm = [r.memory.get("tree_hwm_kb", 0) for r in rs if r.memory]
    if hwm:
        out["daemon_hwm_kb"] = max(hwm)
    return out


def _print_mode(name: str, s: dict[str, float]) -> None:
    if not s:
        return
    extra = f", daemon peak {s['daemon_hwm_kb'] / 1024:.0f} MiB" if "daemon_hwm_kb" in s else ""
    print(
        f"  {name:<9} pull {s['pull_s']:6.2f} s | first output {s['first_output_s']:6.2f} s | done "
        f"{s['done_s']:6.2f} s | fetched {fmt_bytes(s['fetched_bytes'])} "
        f"({100 * s['fetched_fraction']:.1f}% of the image; {fmt_bytes(s['range_bytes'])} in ranges) in "
        f"{s['requests']:.0f} GETs{extra}",
        flush=True,
    )


def measure(
    label: str, work: Path, host: str, registry: Registry, repeat: int, image_bytes: int, state: dict
) -> dict[str, object]:
    """``repeat`` alternating overlayfs / lazy runs; prints and returns the medians."""
    over: list[RunResult] = []
    lazy: list[RunResult] = []
    plain, converted = f"{host}/{REPO}:{PLAIN_TAG}", f"{host}/{REPO}:{SOCI_TAG}"
    for i in range(repeat):
        over.append(one_run(work / f"{label}-o{i}", plain, registry, registry_host=host, lazy=False))
        if not state["lazy_error"]:
            try:
                lazy.append(
                    one_run(work / f"{label}-l{i}", converted, registry, registry_host=host, lazy=True)
                )
            except LazyUnavailable as exc:
                state["lazy_error"] = str(exc)
    so, sl = _summary(over, image_bytes), _summary(lazy, image_bytes)
    print(f"{label}: median of {repeat} cold pull+run each", flush=True)
    _print_mode("overlayfs", so)
    _print_mode("lazy", sl)
    out: dict[str, object] = {"overlayfs": so, "lazy": sl}
    if sl:
        ratio = sl["first_output_s"] / so["first_output_s"]
        out["ratio_first_output"] = ratio
        out["ratio_done"] = sl["done_s"] / so["done_s"]
        target = " (target <= 0.3x)" if label == "loopback" else ""
        print(f"  ratio lazy / overlayfs, time to first output: {ratio:.2f}x{target}", flush=True)
        print(f"  ratio lazy / overlayfs, time to done:         {out['ratio_done']:.2f}x", flush=True)
    return out


def memory_phase(
    base: demo_image.DemoImage, count: int, work: Path, registry: Registry, cli_root: Path
) -> dict[str, object]:
    """Pull and run ``count`` distinct variants through one daemon; RSS after each, peak, growth per image."""
    variants = demo_image.build_variants(base, count)
    refs = []
    for i, v in enumerate(variants):
        conv = soci_convert(
            v.layout, work / f"mem-conv-{i}", min_layer_size=0 if base.small else None, root=cli_root
        )
        ref = f"{registry.host}/{REPO}-mem{i:02d}:v1"
        soci_push(conv, ref, root=cli_root)
        shutil.rmtree(conv, ignore_errors=True)
        refs.append(ref)
    n = Node(work / "mem-node", registry_hosts=[registry.host], lazy=True).start()
    try:
        assert n.daemon is not None
        idle = n.daemon.memory()
        after = []
        for ref in refs:
            n.pull_and_run(ref, registry)
            after.append(n.daemon.memory())
        peak = n.daemon.memory()
    finally:
        n.close()
    rss = [a["tree_rss_kb"] for a in after]
    per_image = (rss[-1] - idle["tree_rss_kb"]) / count
    print(f"memory: {count} distinct images pulled lazily and run through one daemon", flush=True)
    print(f"  daemon RSS idle {idle['tree_rss_kb'] / 1024:.0f} MiB", flush=True)
    print(f"  RSS after each image (MiB): {' '.join(f'{r / 1024:.0f}' for r in rss)}", flush=True)
    print(f"  peak (VmHWM) {peak['tree_hwm_kb'] / 1024:.0f} MiB", flush=True)
    print(f"  RSS growth per image: {per_image / 1024:.1f} MiB", flush=True)
    return {
        "images": count,
        "idle_rss_kb": idle["tree_rss_kb"],
        "rss_after_kb": rss,
        "peak_hwm_kb": peak["tree_hwm_kb"],
        "per_image_kb": per_image,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="the few-MB test image (for a quick check)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-netns", action="store_true", help="loopback only")
    ap.add_argument("--rate", default="100mbit", help="tc rate of the namespace link (default 100mbit)")
    ap.add_argument("--images", type=int, default=10, help="distinct images for the memory figure (0: skip)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_pull_first_output needs root (containerd, runc, network namespaces)", file=sys.stderr)
        return 1
    sigterm_as_interrupt()
    img, reused = demo_image.build(small=args.small)
    print(
        f"image: {fmt_bytes(img.content_bytes)} in {img.files} files; layers "
        f"{', '.join(fmt_bytes(s) for s in img.layer_sizes)} gzip; image {fmt_bytes(img.image_bytes)}"
        f"{' (reused)' if reused else ''}; the entrypoint reads {len(img.read_files)} files",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="soci-bench-pull-"))
    cli_root = work / "cli"
    state: dict[str, str] = {"lazy_error": rpull_missing()}
    results: dict[str, object] = {"image": img.to_json()}
    reg: Registry | None = None
    try:
        reg = Registry(work / "reg").start()
        conv = soci_convert(
            img.layout, work / "converted", min_layer_size=0 if img.small else None, root=cli_root
        )
        soci_push(conv, f"{reg.host}/{REPO}:{SOCI_TAG}", root=cli_root)
        skopeo_push(img.layout, img.tag, f"{reg.host}/{REPO}:{PLAIN_TAG}")
        results["loopback"] = measure("loopback", work, reg.host, reg, args.repeat, img.image_bytes, state)
        if not args.no_netns:
            reg.stop()
            with NetNS(args.rate) as ns:
                nreg = NetnsRegistry(work / "reg-ns", ns)
                nreg.data_dir = reg.data_dir  # the same pushed data, served from inside the namespace
                relay: TcpRelay | None = None
                try:
                    nreg.start()
                    relay = TcpRelay((ns.ns_ip, nreg.port)).start()
                    label = f"netns-{args.rate}"
                    results[label] = measure(
                        label, work, relay.host, nreg, args.repeat, img.image_bytes, state
                    )
                finally:
                    if relay is not None:
                        relay.close()
                    nreg.stop()
            reg.start()
        if args.images and not state["lazy_error"]:
            try:
                results["memory"] = memory_phase(img, args.images, work, reg, cli_root)
            except LazyUnavailable as exc:
                state["lazy_error"] = str(exc)
    finally:
        if reg is not None:
            reg.stop()
        cleanup_under(work)
        shutil.rmtree(work, ignore_errors=True)
    if state["lazy_error"]:
        results["lazy_error"] = state["lazy_error"]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if state["lazy_error"]:
        print(f"lazy path not measured: {state['lazy_error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
