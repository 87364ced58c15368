"""``soci debug``: ask the running ``soci-snapshotter-grpc`` what it did with each image and layer.

``soci debug images [--snapshotter-address SOCK] [--json]`` prints, per image the daemon handled (by
manifest digest): the reference, whether a SOCI index was found (and how), and per layer its snapshot id,
mode (``lazy``: served through FUSE; ``local``: unpacked by the snapshotter; ``deferred``: left to
containerd; ``degraded``: a remote snapshot that could not be served again after a restart and is being
retried), the fallback reason with its detail, how much of a lazy layer has been fetched, cache hits and the
mount points. ``--json`` prints the daemon's answer as it is (one JSON object).

The daemon is reached on its socket (``--snapshotter-address``, env ``SOCI_SNAPSHOTTER_ADDRESS``, default
``/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock``). Exit status 3 when there is no socket, 5 when
the daemon does not answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from soci_grpc import debug

DEFAULT_SNAPSHOTTER_ADDRESS = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock"


def snapshotter_address_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--snapshotter-address",
        default=os.environ.get("SOCI_SNAPSHOTTER_ADDRESS", DEFAULT_SNAPSHOTTER_ADDRESS),
        metavar="SOCK",
        help="the soci-snapshotter-grpc socket (env SOCI_SNAPSHOTTER_ADDRESS; "
        f"default {DEFAULT_SNAPSHOTTER_ADDRESS})",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("debug", help="ask the running snapshotter daemon about images and layers")
    p.set_defaults(func=_usage, _debug_parser=p)
    group = p.add_subparsers(dest="debug_command", metavar="COMMAND")
    images = group.add_parser(
        "images",
        help="per image and layer: lazy/local/deferred, fallback reason, fetched %%, cache, mounts",
    )
    snapshotter_address_flag(images)
    images.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    images.set_defaults(func=run_images)


def _usage(args: argparse.Namespace) -> int:
    args._debug_parser.print_help(sys.stderr)
    return 2


def run_images(args: argparse.Namespace) -> int:
    status = debug.call(args.snapshotter_address, "Status")
    if args.json:
        sys.stdout.write(json.dumps(status, indent=2, sort_keys=True) + "\n")
        return 0
    sys.stdout.write(render_status(status))
    return 0


def _layer_line(x: dict[str, Any]) -> str:
    parts = [f"  layer {x.get('digest') or '?'} snapshot {x.get('snapshot_id')}: {x.get('mode')}"]
    if x.get("reason"):
        parts.append(f" ({x['reason']}: {x.get('detail', '')})")
    elif x.get("detail"):
        parts.append(f" ({x['detail']})")
    if "fetched_percent" in x:
        parts.append(
            f"; fetched {x['fetched_percent']:.1f}% ({x.get('fetched_bytes', 0)} bytes, "
            f"{x.get('spans_fetched', 0)}/{x.get('spans', 0)} spans), {x.get('cache_hits', 0)} cache hits"
        )
    if x.get("mountpoint"):
        parts.append(f"\n    mounted at {x['mountpoint']}")
    if x.get("fuse_path"):
        parts.append(f" (served from {x['fuse_path']})")
    return "".join(parts) + "\n"


def render_status(status: dict[str, Any]) -> str:
    lines = [f"soci-snapshotter-grpc pid {status.get('pid')} version {status.get('version', '?')}\n"]
    if status.get("note"):
        lines.append(status["note"] + "\n")
    images = status.get("images") or []
    if not images:
        lines.append("no images handled yet\n")
    for img in images:
        state = img.get("state", "")
        head = f"image {img.get('ref')} manifest {img.get('manifest') or '?'}: {state}"
        if img.get("index_digest"):
            head += f", SOCI index {img['index_digest']} (found by {img.get('index_found_by')})"
        elif img.get("detail"):
            head += f" ({img['detail']})"
        lines.append(head + "\n")
        for x in img.get("layers") or []:
            lines.append(_layer_line(x))
    cache = status.get("cache") or {}
    if cache:
        lines.append("cache: " + ", ".join(f"{k}={v}" for k, v in sorted(cache.items())) + "\n")
    return "".join(lines)
