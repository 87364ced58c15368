"""``make demo``: lazy pulling end to end on this machine, against containerd's overlayfs snapshotter.

All on loopback, every part real:

1. build (or reuse) the demo image with umoci (``scripts/demo_image.py``: one ~650 MB layer of Debian
   packages, ~200 MB gzip, and an app layer whose ``/entrypoint.sh`` prints ``demo: first output`` at once,
   then reads a handful of files);
2. start docker-registry with token auth (the test harness's registry and token server) and write a Docker
   config with ``auths`` for it in a temp ``DOCKER_CONFIG`` (no ``--user`` anywhere for soci);
3. ``soci convert --standalone`` the layout and ``soci push --oci-layout`` it (credentials from the Docker
   config); the unconverted image is pushed beside it with skopeo (what a pull without SOCI downloads);
4. lazy: start containerd and ``soci-snapshotter-grpc`` as its proxy snapshotter ``soci`` (daemon config
   ``docker_config`` = that Docker config), ``soci image rpull`` (``DOCKER_CONFIG``) and
   ``ctr run --rm --snapshotter soci``; print the container's lines as they come, the time from the start of
   the pull to the first line, and the bytes the registry sent vs the image size;
5. the same with containerd's overlayfs snapshotter (``ctr image pull --user``: ctr reads no Docker config);
6. a last line with ONE JSON object: ``lazy_seconds``, ``overlayfs_seconds`` (start of pull to first output),
   ``fetched_bytes`` (lazy), ``image_bytes``, and more.

Everything it starts is stopped by PID, mounts under its temp dir are undone and the dir is removed, also on
failure and on Ctrl-C or SIGTERM. When the lazy path fails (``soci image rpull`` missing, the daemon failing)
the overlayfs half still runs, the reason is printed, ``lazy_seconds`` is null and the exit status is 1.

Run as root: ``.venv/bin/python scripts/demo.py [--small]``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pullrun import (
    LazyUnavailable,
    Node,
    RunResult,
    cleanup_under,
    fmt_bytes,
    rpull_missing,
    sigterm_as_interrupt,
    skopeo_push,
    soci_convert,
    soci_push,
    write_docker_config,
)
from scripts import demo_image
from soci_fs.errors import SociError
from tests.harness.registry import Registry
from tests.harness.token_server import TokenServer

USER = "demo"
REPO = "demo/app"


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show_line(seconds: float, line: str) -> None:
    print(f"  [{seconds:6.2f} s] {line}", flush=True)


def report(r: RunResult, image_bytes: int) -> None:
    f = r.fetched.get("bytes", 0)
    print(
        f"{r.mode}: pull {r.pull_s:.2f} s, first output after {r.first_output_s:.2f} s, done after "
        f"{r.done_s:.2f} s; the registry sent {fmt_bytes(f)} of a {fmt_bytes(image_bytes)} image "
        f"({100 * f / image_bytes:.1f}%) in {r.fetched.get('requests', 0)} requests",
        flush=True,
    )


def run_demo(work: Path, small: bool) -> tuple[dict[str, object], int]:
    step("build the demo image (umoci; reused when its inputs are unchanged)")
    img, reused = demo_image.build(small=small)
    print(
        f"{img.layout}: {fmt_bytes(img.content_bytes)} in {img.files} files, layers "
        f"{' + '.join(fmt_bytes(s) for s in img.layer_sizes)} gzip{' (reused)' if reused else ''}",
        flush=True,
    )

    step("start docker-registry with token auth and write a Docker config for it")
    password = secrets.token_urlsafe(16)
    ts = TokenServer(work / "token").start()
    reg: Registry | None = None
    try:
        ts.set_password(USER, password)
        reg = Registry(work / "registry", auth="token", token_server=ts).start()
        docker_config = write_docker_config(work / "docker", reg.host, USER, password)
        print(f"registry {reg.url}, token realm {ts.realm}, DOCKER_CONFIG={docker_config}", flush=True)
        soci_ref, plain_ref = f"{reg.host}/{REPO}:soci", f"{reg.host}/{REPO}:plain"

        step("soci convert --standalone (SOCI index v2 and a zTOC per big layer)")
        cli_root = work / "soci-cli"
        converted = soci_convert(
            img.layout, work / "converted", min_layer_size=0 if small else None, root=cli_root, echo=True
        )
        step(f"soci push --oci-layout {soci_ref} (credentials from the Docker config)")
        soci_push(converted, soci_ref, root=cli_root, docker_config=docker_config)
        print(f"pushed; the unconverted image goes to {plain_ref} with skopeo", flush=True)
        skopeo_push(img.layout, img.tag, plain_ref, docker_config=docker_config)

        doc: dict[str, object] = {
            "image_bytes": img.image_bytes,
            "image_files": img.files,
            "image_content_bytes": img.content_bytes,
            "lazy_seconds": None,
            "overlayfs_seconds": None,
            "fetched_bytes": None,
        }
        status = 0
        daemon_config = f'docker_config = "{docker_config / "config.json"}"\n'

        step("lazy: containerd + soci-snapshotter-grpc, soci image rpull, ctr run --snapshotter soci")
        why = rpull_missing()
        if not why:
            node = Node(
                work / "lazy",
                registry_hosts=[reg.host],
                lazy=True,
                daemon_config=daemon_config,
                docker_config=docker_config,
            )
            try:
                node.start()
                lazy = node.pull_and_run(soci_ref, reg, on_line=show_line)
                report(lazy, img.image_bytes)
                doc.update(
                    lazy_seconds=round(lazy.first_output_s, 3),
                    lazy_done_seconds=round(lazy.done_s, 3),
                    lazy_pull_seconds=round(lazy.pull_s, 3),
                    fetched_bytes=lazy.fetched.get("bytes", 0),
                    daemon_peak_rss_kb=lazy.memory.get("tree_hwm_kb", 0),
                )
            except LazyUnavailable as exc:
                why = str(exc)
            finally:
                node.close()
        if why:
            print(f"LAZY PATH NOT AVAILABLE: {why}", flush=True)
            doc["lazy_error"] = why.splitlines()[0]
            status = 1

        step("overlayfs: containerd's default snapshotter, ctr image pull, ctr run")
        with_overlay = Node(
            work / "overlayfs", registry_hosts=[reg.host], lazy=False, user=f"{USER}:{password}"
        )
        try:
            with_overlay.start()
            over = with_overlay.pull_and_run(plain_ref, reg, on_line=show_line)
        finally:
            with_overlay.close()
        report(over, img.image_bytes)
        doc.update(
            overlayfs_seconds=round(over.first_output_s, 3),
            overlayfs_done_seconds=round(over.done_s, 3),
            overlayfs_fetched_bytes=over.fetched.get("bytes", 0),
        )
        if doc["lazy_seconds"] is not None:
            ratio = float(doc["lazy_seconds"]) / over.first_output_s  # type: ignore[arg-type]
            doc["ratio"] = round(ratio, 3)
            lz, ov = doc["lazy_seconds"], doc["overlayfs_seconds"]
            step(f"time to first output: lazy {lz} s vs overlayfs {ov} s")
            print(f"ratio lazy / overlayfs: {ratio:.2f}x", flush=True)
        return doc, status
    finally:
        if reg is not None:
            reg.stop()
        ts.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="soci-py demo: lazy pull vs overlayfs, time to first output")
    ap.add_argument("--small", action="store_true", help="the few-MB test image instead of the big one")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("the demo needs root (containerd, runc, FUSE, overlay mounts)", file=sys.stderr)
        return 1
    sigterm_as_interrupt()
    # Ctrl-C cleans up even when started from a shell that ignores SIGINT for background jobs (Python
    # keeps an inherited SIG_IGN and would then never raise KeyboardInterrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    work = Path(tempfile.mkdtemp(prefix="soci-demo-"))
    t0 = time.monotonic()
    try:
        doc, status = run_demo(work, args.small)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    except SociError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        cleanup_under(work)
        shutil.rmtree(work, ignore_errors=True)
    doc["demo_seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(doc, sort_keys=True), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
