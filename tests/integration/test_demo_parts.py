"""The parts of ``make demo`` and of the pull-to-first-output bench, on the small demo image.

* ``scripts/demo_image.py``: the small image is a valid OCI layout whose config ``diff_ids`` are the
  digests of its uncompressed layers, holds the entrypoint and its read list, is reused when nothing
  changed and rebuilt on ``force``; variants differ in their first layer by one leading gzip member only.
* ``bench/netlimit.py``: a rate-limited namespace carries an HTTP transfer from a server inside it (direct and
  through the loopback relay), and leaves no namespace, veth or process behind, also when set-up fails. No
  timing is asserted.
* ``scripts/demo.py --small`` end to end (token registry, soci convert/push with a Docker config, lazy pull
  through our daemon, overlayfs pull, one JSON line), and its clean-up when interrupted.
* ``bench/bench_pull_first_output.py --small`` once (loopback, the namespace, the memory phase with two
  variants), checking its figures file.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.netlimit import NetNS, TcpRelay
from scripts import demo_image
from soci_fs.errors import FailedPrecondition
from tests.harness.procs import die_with_parent

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="containerd, runc and network namespaces need root"),
]

ROOT = Path(__file__).resolve().parents[2]


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def _layers(img: demo_image.DemoImage) -> tuple[dict, dict, list[bytes]]:
    """(manifest, config, uncompressed layer tars) of ``img``."""
    _d, manifest = demo_image.read_manifest(img.layout, img.tag)
    config = json.loads(_blob(img.layout, manifest["config"]["digest"]).read_bytes())
    tars = [gzip.decompress(_blob(img.layout, lay["digest"]).read_bytes()) for lay in manifest["layers"]]
    return manifest, config, tars


def _names(tar_bytes: bytes) -> list[str]:
    import io

    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        return tf.getnames()


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> demo_image.DemoImage:
    out = tmp_path_factory.mktemp("demo-image")
    img, reused = demo_image.build(small=True, out=out, cache=out / "cache", say=lambda s: None)
    assert not reused
    return img


def test_small_image_is_a_valid_layout(small_image: demo_image.DemoImage) -> None:
    img = small_image
    manifest, config, tars = _layers(img)
    assert len(manifest["layers"]) == 2
    assert [lay["size"] for lay in manifest["layers"]] == list(img.layer_sizes)
    for lay in manifest["layers"]:
        data = _blob(img.layout, lay["digest"]).read_bytes()
        assert lay["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]
    assert config["config"]["Cmd"] == ["/entrypoint.sh"]
    big, app = _names(tars[0]), _names(tars[1])
    assert "bin/busybox" in app and "entrypoint.sh" in app and "etc/demo/read-list" in app
    for f in img.read_files:
        assert f.lstrip("/") in big
    assert len(img.read_files) < 0.05 * img.files
    assert img.image_bytes > sum(img.layer_sizes)


def test_small_image_reused_then_rebuilt(small_image: demo_image.DemoImage) -> None:
    out = small_image.layout.parent
    again, reused = demo_image.build(small=True, out=out, cache=out / "cache", say=lambda s: None)
    assert reused and again == small_image
    rebuilt, reused = demo_image.build(
        small=True, out=out, cache=out / "cache", force=True, say=lambda s: None
    )
    assert not reused and rebuilt.layout == small_image.layout
    assert demo_image.read_manifest(rebuilt.layout)[0] == rebuilt.manifest_digest


def test_variants_differ_by_a_leading_member(small_image: demo_image.DemoImage, tmp_path: Path) -> None:
    base_manifest, _c, base_tars = _layers(small_image)
    variants = demo_image.build_variants(small_image, 2, tmp_path / "variants", say=lambda s: None)
    assert len({v.manifest_digest for v in variants}) == 2
    for i, v in enumerate(variants):
        manifest, config, tars = _layers(v)
        assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]
        assert tars[0] == demo_image.variant_prefix(i) + base_tars[0]
        assert tars[1] == base_tars[1]
        assert manifest["layers"][1] == base_manifest["layers"][1]
        assert _names(tars[0])[0] == "demo-variant"
    again = demo_image.build_variants(small_image, 2, tmp_path / "variants", say=lambda s: None)
    assert again == variants


# --------------------------------------------------------------------------------------------------------
# the network namespace


@pytest.fixture
def netns() -> Iterator[NetNS]:
    ns = NetNS("100mbit").start()
    try:
        yield ns
    finally:
        ns.close()
    assert not ns.exists()


def _wait_http(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server in the namespace exited"
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{url} did not answer")


def test_netns_carries_a_transfer(netns: NetNS, tmp_path: Path) -> None:
    payload = os.urandom(2_000_000)
    (tmp_path / "blob").write_bytes(payload)
    argv = [sys.executable, "-m", "http.server", "--bind", netns.ns_ip, "8080", "--directory", str(tmp_path)]
    server = netns.popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent
    )
    relay = None
    try:
        _wait_http(f"http://{netns.ns_ip}:8080/", server)
        assert netns.pids() == [server.pid]  # `ip netns exec` execs the server: same PID
        before = netns.counters()["rx_bytes"]
        got = urllib.request.urlopen(f"http://{netns.ns_ip}:8080/blob", timeout=60).read()
        assert got == payload
        assert netns.counters()["rx_bytes"] - before >= len(payload)  # it went over the veth
        relay = TcpRelay((netns.ns_ip, 8080)).start()
        got = urllib.request.urlopen(f"http://{relay.host}/blob", timeout=60).read()
        assert got == payload
    finally:
        if relay is not None:
            relay.close()
        netns.close()  # kills the server (it is in the namespace) and removes the namespace
        server.wait(timeout=10)
    assert not netns.exists()


def test_netns_failed_setup_leaves_nothing() -> None:
    ns = NetNS("not-a-rate")
    with pytest.raises(FailedPrecondition, match="tc"):
        ns.start()
    assert ns.name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not ns.exists()


# --------------------------------------------------------------------------------------------------------
# the demo and the bench, small


def _leftovers(prefix: str) -> tuple[list[Path], list[str]]:
    dirs = sorted(Path("/tmp").glob(prefix + "*"))
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f if f"/tmp/{prefix}" in line.split()[4]]
    return dirs, mounts


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "SOCI_DEMO_CACHE": str(tmp_path / "demo-cache")}


def test_demo_small_end_to_end(tmp_path: Path) -> None:
    before = _leftovers("soci-demo-")
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--small"],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=280,
        preexec_fn=die_with_parent,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    for k in ("lazy_seconds", "overlayfs_seconds", "fetched_bytes", "image_bytes"):
        assert isinstance(doc[k], int | float) and doc[k] > 0, (k, doc)
    assert doc["overlayfs_fetched_bytes"] >= doc["image_bytes"] - 4096
    assert res.stdout.count(demo_image.FIRST_LINE) == 2
    assert _leftovers("soci-demo-") == before


def test_demo_interrupted_cleans_up(tmp_path: Path) -> None:
    before = _leftovers("soci-demo-")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--small"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_env(tmp_path),
        preexec_fn=die_with_parent,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    timer = threading.Timer(200, proc.kill)
    timer.start()
    try:
        for raw in proc.stdout:
            lines.append(raw.decode(errors="replace"))
            if lines[-1].startswith("== lazy"):
                time.sleep(0.5)  # containerd and the daemon are starting or running

                proc.send_signal(signal.SIGINT)
                break
        rest = proc.stdout.read().decode(errors="replace")
        rc = proc.wait(timeout=60)
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 130, "".join(lines) + rest
    assert "interrupted" in rest
    assert _leftovers("soci-demo-") == before


def test_bench_small(tmp_path: Path) -> None:
    before = _leftovers("soci-bench-pull-")
    out = tmp_path / "figures.json"
    argv = [sys.executable, str(ROOT / "bench" / "bench_pull_first_output.py"), "--small", "--repeat", "1"]
    res = subprocess.run(
        [*argv, "--images", "2", "--json", str(out)],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=280,
        preexec_fn=die_with_parent,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads(out.read_text())
    for label in ("loopback", "netns-100mbit"):
        assert doc[label]["overlayfs"]["first_output_s"] > 0
        assert doc[label]["lazy"]["first_output_s"] > 0
        assert doc[label]["ratio_first_output"] > 0
    assert len(doc["memory"]["rss_after_kb"]) == 2
    assert "ratio lazy / overlayfs" in res.stdout
    assert _leftovers("soci-bench-pull-") == before


def test_demo_without_rpull_reports_and_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """When ``soci image rpull`` is missing, the overlayfs half still runs; the reason is printed, the JSON
    line has ``lazy_seconds: null`` and the exit status is 1."""
    from scripts import demo

    monkeypatch.setenv("SOCI_DEMO_CACHE", str(tmp_path / "demo-cache"))
    monkeypatch.setattr(demo, "rpull_missing", lambda: "`soci image rpull` is not available yet (simulated)")
    monkeypatch.setattr(demo, "sigterm_as_interrupt", lambda: None)
    before = _leftovers("soci-demo-")
    rc = demo.main(["--small"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "LAZY PATH NOT AVAILABLE: `soci image rpull` is not available yet (simulated)" in out
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc["lazy_seconds"] is None and doc["fetched_bytes"] is None
    assert doc["overlayfs_seconds"] > 0 and "simulated" in doc["lazy_error"]
    assert _leftovers("soci-demo-") == before
