"""``soci mount`` end to end: real layers in the real registry (with auth), real FUSE, real overlayfs.

Images are made here from GNU tar layers (parts of /usr, a tree with every entry kind, three layers with
whiteouts and opaque directories, one tiny layer that gets no zTOC), converted with ``soci convert
--standalone`` and pushed with ``soci push --oci-layout`` (v2), or indexed with ``soci create`` and pushed
with ``soci push`` (v1). ``.venv/bin/soci mount`` runs as a child process in front of a ``FaultProxy`` that
counts every request and injects faults; the "no handler kills the session" test runs the same data plane
in process. Every test unmounts everything it made (checked in /proc/self/mountinfo) and stops its
processes by PID, even when it fails.
"""

from __future__ import annotations

import base64
import errno
import functools
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from soci_fs.cache import CRC_BLOCK, BlockCache, CacheConfig, layer_dir_name
from soci_fs.mount import MountOptions, ThreadedSession
from soci_fs.registry import reference
from soci_fs.registry.client import RegistryClient
from soci_fs.registry.credentials import Credentials
from soci_fs.registry.reference import HttpConfig, RegistryConfig
from soci_fs.remote import ImagePlan, ImageSource, LayerPlan, open_layer
from soci_fs.spanread import LayerSpans
from soci_fs.spans import SpanConfig
from soci_fs.store import ContentStore
from soci_fs.ztoc import Ztoc
from soci_grpc import config as config_mod
from soci_grpc.cli import cmd_mount
from tests.fs import fusehelp as fh
from tests.fs.ocigen import MT_LAYER_GZIP, MT_LAYER_TAR, LayoutBuilder
from tests.grpc.clihelp import SOCI_EXE, ok, run
from tests.harness.registry import PASSWORD, USER, Fault, FaultProxy, RawPusher, Registry
from tests.harness.token_server import TokenServer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs /dev/fuse and root"
    ),
]

SPAN = 65536
USR_PARTS = ["usr/share/zoneinfo", "usr/lib/python3.11/email"]
FAST = RegistryConfig(http=HttpConfig(max_retries=2, min_wait_msec=1, max_wait_msec=20))
_n = iter(range(100_000))

CONFIG = """
[http]
MaxRetries = 2
MinWaitMsec = 10
MaxWaitMsec = 100
DialTimeoutMsec = 1000
ResponseHeaderTimeoutMsec = 2000
[blob]
fetching_timeout_sec = {timeout}
max_retries = 2
min_wait_msec = 10
max_wait_msec = 100
[background_fetch]
disable = {bg_disable}
silence_period_msec = 10
fetch_period_msec = 1
[directory_cache]
max_memory_bytes = {memory}
verify_every_read = {verify}
"""


def write_config(
    path: Path,
    *,
    timeout: int = 5,
    background: bool = False,
    memory: int = 128 << 20,
    verify: bool = False,
    top: str = "",
) -> Path:
    """A config.toml with short timeouts; ``top`` holds top-level keys (they come before the tables)."""
    text = CONFIG.format(
        timeout=timeout,
        bg_disable=str(not background).lower(),
        memory=memory,
        verify=str(verify).lower(),
    )
    path.write_text(top + text)
    return path


# ---------------------------------------------------------------------------------------------------------
# images


@dataclass
class Image:
    registry: Registry
    repo: str
    tag: str
    root_digest: str
    tars: list[Path]  # base first
    layers: list[str] = field(default_factory=list)  # digests, base first
    plan: ImagePlan | None = None

    def ref(self, host: str, *, by_digest: bool = False) -> str:
        return f"{host}/{self.repo}@{self.root_digest}" if by_digest else f"{host}/{self.repo}:{self.tag}"

    def ztoc(self, i: int) -> Ztoc:
        assert self.plan is not None
        z = self.plan.layers[i].ztoc
        assert z is not None
        return z


def _gzip(tar: Path) -> bytes:
    return subprocess.run(["gzip", "-6", "-n", "-c", str(tar)], capture_output=True, check=True).stdout


def _creds_client(ref: str) -> RegistryClient:
    creds = Credentials(USER, PASSWORD)
    return RegistryClient(lambda h, r: creds, config=FAST, ref=ref, plain_http=True)


def _plan(img: Image, work: Path) -> ImagePlan:
    ref = reference.parse(img.ref(img.registry.host))
    with _creds_client(str(ref)) as client:
        return ImageSource(client, ref, ContentStore(work / f"plan-{img.repo.replace('/', '-')}")).plan()


def make_v2_image(
    registry: Registry,
    work: Path,
    name: str,
    tars: list[Path],
    *,
    min_layer_size: int = 0,
    convert_flags: tuple[str, ...] = (),
    uncompressed: bool = False,
) -> Image:
    """A SOCI-enabled image (index v2) of gzip layers made from ``tars`` (base first), pushed as repo:soci.
    With ``uncompressed`` the layers are plain tar blobs (``application/vnd.oci.image.layer.v1.tar``)."""
    b = LayoutBuilder(work / f"{name}-layout")
    if uncompressed:
        m = b.image([(MT_LAYER_TAR, t.read_bytes()) for t in tars])
    else:
        m = b.image([(MT_LAYER_GZIP, _gzip(t)) for t in tars])
    b.write_index_json(m, ref_names=["test"])
    out = work / f"{name}-soci"
    ok(
        run(
            "convert",
            "--standalone",
            "--format",
            "oci-dir",
            "--span-size",
            str(SPAN),
            "--min-layer-size",
            str(min_layer_size),
            *convert_flags,
            b.root,
            out,
        )
    )
    repo = f"lazy/{name}{next(_n)}"
    r = ok(
        run(
            "push",
            "--plain-http",
            "--user",
            f"{USER}:{PASSWORD}",
            "--oci-layout",
            out,
            f"{registry.host}/{repo}:soci",
        )
    )
    root_digest = r.text.splitlines()[0].split(": ", 1)[1]
    img = Image(registry, repo, "soci", root_digest, tars)
    img.plan = _plan(img, work)
    img.layers = [x.descriptor.digest for x in img.plan.layers]
    return img


def make_v1_image(registry: Registry, work: Path, name: str, tars: list[Path]) -> Image:
    """A plain image pushed as is, plus a v1 SOCI index from ``soci create`` pushed by ``soci push``."""
    b = LayoutBuilder(work / f"{name}-layout")
    blobs = [_gzip(t) for t in tars]
    m = b.image([(MT_LAYER_GZIP, x) for x in blobs])
    b.write_index_json(m, ref_names=["test"])
    repo = f"lazy/{name}{next(_n)}"
    pusher = RawPusher(registry)
    manifest = (b.root / "blobs" / "sha256" / m.digest.split(":")[1]).read_bytes()
    doc = json.loads(manifest)
    for d in [doc["config"], *doc["layers"]]:
        pusher.push_blob(repo, (b.root / "blobs" / "sha256" / d["digest"].split(":")[1]).read_bytes())
    pusher.push_manifest(repo, "v1", manifest, m.media_type)
    root = work / f"{name}-root"
    ok(
        run(
            "--root",
            root,
            "create",
            "--oci-layout",
            b.root,
            "test",
            "--min-layer-size",
            "0",
            "--span-size",
            str(SPAN),
        )
    )
    ok(
        run(
            "--root",
            root,
            "push",
            "--plain-http",
            "--user",
            f"{USER}:{PASSWORD}",
            f"{registry.host}/{repo}:v1",
        )
    )
    img = Image(registry, repo, "v1", m.digest, tars)
    img.plan = _plan(img, work)
    img.layers = [x.descriptor.digest for x in img.plan.layers]
    return img


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lazy")


@pytest.fixture(scope="module")
def tars(work: Path) -> dict[str, Path]:
    """kinds (every entry kind), usr (parts of /usr), ov1..ov3 (whiteouts, opaque dirs), tiny (no zTOC)."""
    out: dict[str, Path] = {}
    fh.make_kinds_tree(work / "kinds-src")
    out["kinds"] = fh.tar_dir(work / "kinds-src", work / "kinds.tar")
    out["usr"] = fh.tar_dir(Path("/"), work / "usr.tar", fh.usr_members(USR_PARTS))
    pad = {f"pad{i}.bin": os.urandom(20_000) for i in range(1, 4)}
    # the overlay layers, each padded with incompressible data so it spans several 64 KiB spans
    trees: dict[str, dict[str, bytes | str]] = {
        name: {**files, f"pad{i}.bin": pad[f"pad{i}.bin"]}
        for i, (name, files) in enumerate(fh.OVERLAY_TREES.items(), start=1)
    }
    trees["tiny"] = {"tiny/note.txt": b"a layer too small for a zTOC\n", "b/.wh.fresh": b""}
    for name, files in trees.items():
        fh.make_files(work / name, files)
        out[name] = fh.tar_dir(work / name, work / f"{name}.tar")
    return out


@pytest.fixture(scope="module")
def stack(htpasswd_registry: Registry, work: Path, tars: dict[str, Path]) -> Image:
    """kinds, ov1, ov2, ov3 (lazy) and tiny (local: below the 8 KiB min layer size) as one v2 image."""
    names = ["kinds", "ov1", "ov2", "ov3", "tiny"]
    img = make_v2_image(htpasswd_registry, work, "stack", [tars[n] for n in names], min_layer_size=8192)
    assert img.plan is not None
    assert [x.lazy for x in img.plan.layers] == [True, True, True, True, False]
    return img


@pytest.fixture(scope="module")
def usr(htpasswd_registry: Registry, work: Path, tars: dict[str, Path]) -> Image:
    return make_v2_image(htpasswd_registry, work, "usr", [tars["usr"]])


@pytest.fixture(scope="module")
def usr_token(token_registry: Registry, work: Path, tars: dict[str, Path]) -> Image:
    return make_v2_image(token_registry, work, "usrtok", [tars["usr"]])


@pytest.fixture(scope="module")
def extracted(work: Path, tars: dict[str, Path]) -> Callable[[str, bool], Path]:
    """``tar -x`` of a layer (``conv``: with whiteouts converted the way containerd's snapshotter does)."""

    def get(name: str, conv: bool = False) -> Path:
        dest = work / f"x-{name}{'-conv' if conv else ''}"
        if not dest.exists():
            fh.extract(tars[name], dest)
            if conv:
                fh.convert_whiteouts(dest)
        return dest

    return get


# ---------------------------------------------------------------------------------------------------------
# the soci mount child process


@dataclass
class Mounted:
    proc: subprocess.Popen[str]
    mountpoint: Path
    root: Path
    lines: list[str]
    err: list[str]
    ready: threading.Event
    done: threading.Event

    def stop(self, timeout: float = 20.0) -> list[str]:
        """SIGTERM by PID, wait for the exit and the final report; returns every stdout line."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            raise AssertionError(f"soci mount did not end on SIGTERM: {self.err[-5:]}") from None
        self.done.wait(5)
        assert self.proc.returncode == 0, (self.proc.returncode, self.err[-10:])
        return self.lines

    def report(self) -> tuple[int, int, int]:
        """(bytes, spans, requests) of the ``fetched ...`` line."""
        for line in self.lines:
            m = re.match(r"fetched (\d+) bytes in (\d+) spans \((\d+) requests\) from ", line)
            if m:
                return int(m.group(1)), int(m.group(2)), int(m.group(3))
        raise AssertionError(f"no report in {self.lines}")


@pytest.fixture
def soci_mount(tmp_path: Path) -> Iterator[Callable[..., Mounted]]:
    """Factory: ``soci_mount(ref, *flags, root=..., mountpoint=...)`` starts ``soci mount`` and waits until it
    says it mounted. At teardown every process is stopped by PID and nothing may stay mounted."""
    started: list[Mounted] = []
    env = {**os.environ, "DOCKER_CONFIG": str(tmp_path / "no-docker-config")}

    def start(
        ref: str,
        *flags: str,
        root: Path | None = None,
        mountpoint: Path | None = None,
        expect_fail: bool = False,
    ) -> Mounted:
        root = root or tmp_path / "root"
        mp = mountpoint or tmp_path / f"mnt{len(started)}"
        mp.mkdir(parents=True, exist_ok=True)
        cmd = [str(SOCI_EXE), "--root", str(root), "mount", "--plain-http", *flags, ref, str(mp)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        m = Mounted(proc, mp, root, [], [], threading.Event(), threading.Event())
        started.append(m)

        def pump_out() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                m.lines.append(line.rstrip("\n"))
                if line.startswith("mounted "):
                    m.ready.set()
            m.done.set()
            m.ready.set()

        def pump_err() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                m.err.append(line.rstrip("\n"))

        threading.Thread(target=pump_out, daemon=True).start()
        threading.Thread(target=pump_err, daemon=True).start()
        assert m.ready.wait(60), "soci mount did not get ready in time"
        if expect_fail:
            proc.wait(20)
            m.done.wait(5)
            return m
        assert proc.poll() is None, f"soci mount exited: rc={proc.returncode} {m.err[-10:]}"
        assert fh.mounts_under(mp) == [str(mp)]
        return m

    try:
        yield start
    finally:
        for m in started:
            if m.proc.poll() is None:
                os.kill(m.proc.pid, signal.SIGTERM)
                try:
                    m.proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.kill(m.proc.pid, signal.SIGKILL)
                    m.proc.wait(5)
        leftover = fh.mounts_under(tmp_path)
        for mp in reversed(leftover):
            fh.run("umount", "-l", mp, check=False)
        assert not leftover, f"mounts left behind: {leftover}"


@pytest.fixture
def proxy(fault_proxy: Callable[..., FaultProxy], htpasswd_registry: Registry) -> FaultProxy:
    return fault_proxy(htpasswd_registry)


def blob_gets(p: FaultProxy, digest: str) -> list[tuple[int, int]]:
    """``[start, end)`` of every ranged blob GET of ``digest`` that reached the proxy."""
    out = []
    for e in list(p.log):
        if e["method"] == "GET" and e["path"].endswith("/blobs/" + digest) and e["range"]:
            a, b = e["range"].removeprefix("bytes=").split("-")
            out.append((int(a), int(b) + 1))
    return out


def spans_of_file(z: Ztoc, name: str) -> list[int]:
    f = next(x for x in z.files if x.name.removeprefix("./") == name)
    spans = LayerSpans.from_ztoc(z, lambda a, b: b"", check_header=False)
    first = spans.span_of(f.uncompressed_offset)
    last = spans.span_of(f.uncompressed_offset + max(f.uncompressed_size, 1) - 1)
    return list(range(first, last + 1))


def compressed_bytes(z: Ztoc, span_ids: list[int]) -> int:
    spans = LayerSpans.from_ztoc(z, lambda a, b: b"", check_header=False)
    return sum(spans.compressed_range(s)[1] - spans.compressed_range(s)[0] for s in span_ids)


def read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------------------------------------
# correctness: single layers against tar -x, the stack against overlay of extracted layers


def test_each_layer_matches_tar_x(
    stack: Image, usr: Image, proxy: FaultProxy, soci_mount: Callable[..., Mounted], extracted
) -> None:
    for img, i, name in ((usr, 0, "usr"), (stack, 0, "kinds")):
        m = soci_mount(img.ref(proxy.host), "--user", f"{USER}:{PASSWORD}", "--layer", img.layers[i])
        want = extracted(name)
        assert fh.diff_r(m.mountpoint, want) == ""
        got = fh.snapshot(m.mountpoint, with_data=True)
        assert len(got) > 10
        assert fh.differences(got, fh.snapshot(want, with_data=True)) == []
        assert any("lazy:" in line for line in m.lines)
        m.stop()
        assert not fh.mounts_under(m.mountpoint)


def test_uncompressed_tar_layer_is_served_lazily_the_same_way(
    htpasswd_registry: Registry,
    work: Path,
    tars: dict[str, Path],
    proxy: FaultProxy,
    soci_mount: Callable[..., Mounted],
    extracted,
) -> None:
    img = make_v2_image(htpasswd_registry, work, "plain", [tars["kinds"]], uncompressed=True)
    assert img.ztoc(0).compression.algorithm == 2  # uncompressed: TarZinfo spans over the raw tar
    proxy.clear()
    m = soci_mount(img.ref(proxy.host), "--user", f"{USER}:{PASSWORD}", "--layer", img.layers[0])
    want = extracted("kinds")
    assert fh.diff_r(m.mountpoint, want) == ""
    assert fh.differences(fh.snapshot(m.mountpoint, with_data=True), fh.snapshot(want, with_data=True)) == []
    assert any("lazy:" in line for line in m.lines)
    assert blob_gets(proxy, img.layers[0]), "the layer was not read through ranged blob requests"
    m.stop()
    assert not fh.mounts_under(m.mountpoint)


def test_overlay_of_the_image_matches_overlay_of_extracted_layers(
    stack: Image, proxy: FaultProxy, soci_mount: Callable[..., Mounted], extracted, tmp_path: Path
) -> None:
    m = soci_mount(stack.ref(proxy.host), "--user", f"{USER}:{PASSWORD}")
    assert [line.split()[3] for line in m.lines if line.startswith("layer ")] == [
        "lazy:",
        "lazy:",
        "lazy:",
        "lazy:",
        "local:",
    ]
    assert "(overlay of 5 layers: 4 lazy, 1 local)" in m.lines[-1]
    theirs = [extracted(n, True) for n in ("kinds", "ov1", "ov2", "ov3", "tiny")][::-1]
    with fh.overlay(theirs, tmp_path / "theirs") as want:
        assert fh.diff_r(m.mountpoint, want) == ""
        assert (
            fh.differences(fh.snapshot(m.mountpoint, with_data=True), fh.snapshot(want, with_data=True)) == []
        )
    names = set(os.listdir(m.mountpoint))
    assert {"a", "b", "same.txt", "dir-then-f", "tiny"} <= names and "c" in names
    assert read_bytes(m.mountpoint / "same.txt") == b"second version\n"
    assert not os.path.lexists(m.mountpoint / "a" / "gone.txt")
    assert sorted(os.listdir(m.mountpoint / "b")) == []  # opaque in ov2, then fresh whited out by tiny
    m.stop()


def test_v1_index_through_referrers(
    htpasswd_registry: Registry, work: Path, tars: dict[str, Path], proxy: FaultProxy, soci_mount, extracted
) -> None:
    img = make_v1_image(htpasswd_registry, work, "v1", [tars["ov1"], tars["ov2"]])
    m = soci_mount(img.ref(proxy.host), "--user", f"{USER}:{PASSWORD}")
    assert any("found by v1 referrers" in line for line in m.lines)
    assert read_bytes(m.mountpoint / "a" / "new.txt") == b"new in 2\n"
    assert os.listdir(m.mountpoint / "b") == ["fresh"]
    m.stop()


# ---------------------------------------------------------------------------------------------------------
# laziness


def test_reading_one_small_file_fetches_only_its_spans(
    usr: Image, proxy: FaultProxy, soci_mount: Callable[..., Mounted], extracted
) -> None:
    digest = usr.layers[0]
    z = usr.ztoc(0)
    m = soci_mount(usr.ref(proxy.host), "--user", f"{USER}:{PASSWORD}")
    at_mount = blob_gets(proxy, digest)
    # mount time: the URL probe (2 bytes) and the gzip header [0, start of span 0), nothing else
    cs0 = LayerSpans.from_ztoc(z, lambda a, b: b"", check_header=False).compressed_range(0)[0]
    assert sorted(at_mount) == sorted([(0, 2), (0, cs0)])
    name = "usr/share/zoneinfo/Europe/Paris"
    assert read_bytes(m.mountpoint / name) == read_bytes(extracted("usr") / name)
    os.stat(m.mountpoint / "usr/lib/python3.11/email/__init__.py")  # metadata needs no fetch
    want_spans = spans_of_file(z, name)
    ranges = blob_gets(proxy, digest)[len(at_mount) :]
    assert len(ranges) <= len(want_spans)
    fetched = sum(b - a for a, b in ranges)
    assert fetched == compressed_bytes(z, want_spans)
    m.stop()
    nbytes, nspans, nreq = m.report()
    assert (nbytes, nspans, nreq) == (fetched, len(want_spans), len(ranges))


def test_32_concurrent_readers_get_correct_bytes_and_each_span_is_fetched_once(
    stack: Image, proxy: FaultProxy, soci_mount: Callable[..., Mounted], extracted
) -> None:
    m = soci_mount(stack.ref(proxy.host), "--user", f"{USER}:{PASSWORD}", "--layer", stack.layers[0])
    want = extracted("kinds")
    files = [
        "dir/sub/big.bin",
        "dir/sub/text.txt",
        "dir/hl-a",
        *[f"many/f{i:04d}" for i in range(0, 300, 23)],
    ]
    jobs = [files[i % len(files)] for i in range(96)]

    def check(name: str) -> bool:
        return read_bytes(m.mountpoint / name) == read_bytes(want / name)

    with ThreadPoolExecutor(32) as pool:
        assert all(pool.map(check, jobs))
    digest = stack.layers[0]
    ranges = blob_gets(proxy, digest)[2:]  # after the probe and the gzip header
    spans_fetched: list[int] = []
    ls = LayerSpans.from_ztoc(stack.ztoc(0), lambda a, b: b"", check_header=False)
    starts = {ls.compressed_range(s)[0]: s for s in range(ls.max_span_id + 1)}
    ends = {ls.compressed_range(s)[1]: s for s in range(ls.max_span_id + 1)}
    for a, b in ranges:
        spans_fetched.extend(range(starts[a], ends[b] + 1))
    assert len(spans_fetched) == len(set(spans_fetched)), "a span was fetched twice"
    m.stop()
    assert m.report()[1] == len(spans_fetched)


# ---------------------------------------------------------------------------------------------------------
# faults


FAULTS = {
    "reset": Fault("reset", path="/blobs/"),
    "short": Fault("short", path="/blobs/"),
    "wrong_content_range": Fault("wrong_content_range", path="/blobs/"),
    "ignore_range": Fault("ignore_range", path="/blobs/"),
    "5xx": Fault("status", path="/blobs/", status=503, times=2),
}


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_fault_during_a_span_fetch_is_survived(
    kind: str, usr: Image, proxy: FaultProxy, soci_mount: Callable[..., Mounted], extracted, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "config.toml")
    m = soci_mount(usr.ref(proxy.host), "--user", f"{USER}:{PASSWORD}", "--config", str(cfg))
    f = FAULTS[kind]
    fault = proxy.add(Fault(f.kind, path=f.path, status=f.status, times=f.times))
    name = "usr/share/zoneinfo/America/New_York"
    assert read_bytes(m.mountpoint / name) == read_bytes(extracted("usr") / name)
    assert fault.hits >= 1
    m.stop()


def test_registry_down_longer_than_the_timeout_is_eio_then_recovers(
    usr: Image, proxy: FaultProxy, soci_mount: Callable[..., Mounted], extracted, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "config.toml", timeout=2)
    m = soci_mount(usr.ref(proxy.host), "--user", f"{USER}:{PASSWORD}", "--config", str(cfg))
    down = proxy.add(Fault("status", method=None, status=503, times=-1))
    name = "usr/share/zoneinfo/Asia/Tokyo"
    t0 = time.monotonic()
    with pytest.raises(OSError) as exc:
        read_bytes(m.mountpoint / name)
    assert exc.value.errno == errno.EIO
    assert time.monotonic() - t0 < 15
    assert down.hits >= 1
    assert m.proc.poll() is None and fh.mounts_under(m.mountpoint)  # the mount is alive
    assert os.path.isdir(m.mountpoint / "usr/lib")
    proxy.clear()
    assert read_bytes(m.mountpoint / name) == read_bytes(extracted("usr") / name)
    m.stop()


def test_token_expiry_and_password_rotation_mid_read(
    usr_token: Image,
    token_server: TokenServer,
    fault_proxy: Callable[..., FaultProxy],
    soci_mount: Callable[..., Mounted],
    extracted,
    tmp_path: Path,
) -> None:
    p = fault_proxy(usr_token.registry)
    docker = tmp_path / "docker.json"

    def login(password: str) -> None:
        auth = base64.b64encode(f"{USER}:{password}".encode()).decode()
        docker.write_text(json.dumps({"auths": {p.host: {"auth": auth}}}))

    login(PASSWORD)
    cfg = write_config(tmp_path / "config.toml", top=f'docker_config = "{docker}"\n')
    token_server.configure(ttl=2, omit_expires_in=True)
    try:
        m = soci_mount(usr_token.ref(p.host), "--config", str(cfg))
        want = extracted("usr")
        name1, name2 = "usr/share/zoneinfo/Europe/Berlin", "usr/share/zoneinfo/Australia/Sydney"
        assert read_bytes(m.mountpoint / name1) == read_bytes(want / name1)
        issued = token_server.total_token_requests()
        token_server.set_password(USER, "r0tated-Passw0rd")
        login("r0tated-Passw0rd")
        time.sleep(3.2)  # the token the client holds has expired at the registry now
        assert read_bytes(m.mountpoint / name2) == read_bytes(want / name2)
        assert token_server.total_token_requests() > issued
        m.stop()
    finally:
        token_server.set_password(USER, PASSWORD)
        token_server.reset()


@pytest.mark.expect_log
def test_corrupted_cached_block_is_detected_and_refetched(
    usr: Image, proxy: FaultProxy, soci_mount: Callable[..., Mounted], extracted, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "config.toml", memory=0, verify=True)
    m = soci_mount(usr.ref(proxy.host), "--user", f"{USER}:{PASSWORD}", "--config", str(cfg))
    name = "usr/share/zoneinfo/Africa/Cairo"
    want = read_bytes(extracted("usr") / name)
    assert read_bytes(m.mountpoint / name) == want
    span_dir = m.root / "cache" / layer_dir_name(usr.layers[0])
    spans = spans_of_file(usr.ztoc(0), name)
    victim = span_dir / str(spans[0])
    raw = bytearray(victim.read_bytes())
    n = int.from_bytes(raw[8:16], "little")  # the span file: magic, data length, block size, crc table
    data_off = 20 + 4 * ((n + CRC_BLOCK - 1) // CRC_BLOCK)
    f = next(x for x in usr.ztoc(0).files if x.name.removeprefix("./") == name)
    us = LayerSpans.from_ztoc(usr.ztoc(0), lambda a, b: b"", check_header=False).uncompressed_range(spans[0])[
        0
    ]
    raw[data_off + f.uncompressed_offset - us + 1] ^= 0xFF  # a byte of the file itself
    victim.write_bytes(bytes(raw))
    before = len(blob_gets(proxy, usr.layers[0]))
    fd = os.open(m.mountpoint / name, os.O_RDONLY)  # drop the file's pages: the kernel must ask again
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert read_bytes(m.mountpoint / name) == want
    assert len(blob_gets(proxy, usr.layers[0])) > before  # refetched
    m.stop()


def test_fully_fetched_layer_needs_no_network_after_a_restart(
    usr: Image, proxy: FaultProxy, soci_mount: Callable[..., Mounted], extracted, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "config.toml", background=True)
    root = tmp_path / "root"
    ref = usr.ref(proxy.host, by_digest=True)
    m = soci_mount(ref, "--user", f"{USER}:{PASSWORD}", "--config", str(cfg), root=root)
    z = usr.ztoc(0)
    n = LayerSpans.from_ztoc(z, lambda a, b: b"", check_header=False).max_span_id + 1
    span_dir = root / "cache" / layer_dir_name(usr.layers[0])
    deadline = time.monotonic() + 30
    while not (span_dir.is_dir() and len([f for f in os.listdir(span_dir) if f.isdigit()]) == n):
        assert time.monotonic() < deadline, "the background fetcher did not fetch the layer"
        time.sleep(0.05)
    m.stop()
    proxy.stop()  # the registry is gone for this process: connections are refused
    m2 = soci_mount(ref, "--user", f"{USER}:{PASSWORD}", "--config", str(cfg), root=root)
    assert f"{n} cached" in next(line for line in m2.lines if line.startswith("layer "))
    want = extracted("usr")
    assert fh.diff_r(m2.mountpoint, want) == ""
    m2.stop()
    assert m2.report()[:2] == (0, 0)


def test_errors_are_exit_codes(proxy: FaultProxy, soci_mount, usr: Image, tmp_path: Path) -> None:
    env = {**os.environ, "DOCKER_CONFIG": str(tmp_path)}
    mp = tmp_path / "mp"
    mp.mkdir()
    cfg = write_config(tmp_path / "config.toml", timeout=2)

    def soci(*a: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SOCI_EXE), "--root", str(tmp_path / "r"), "mount", "--plain-http", "--config", str(cfg), *a],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )

    r = soci("--user", f"{USER}:wrong", usr.ref(proxy.host), str(mp))
    assert r.returncode == 4 and "wrong" not in r.stderr and proxy.host in r.stderr, r.stderr
    r = soci("--user", f"{USER}:{PASSWORD}", f"{proxy.host}/lazy/missing:v1", str(mp))
    assert r.returncode == 3, r.stderr
    r = soci("--user", f"{USER}:{PASSWORD}", usr.ref(proxy.host), str(tmp_path / "nope"))
    assert r.returncode == 3, r.stderr
    r = soci("--user", f"{USER}:{PASSWORD}", "127.0.0.1:1/x/y:z", str(mp))
    assert r.returncode == 5, r.stderr
    assert not fh.mounts_under(tmp_path)


def test_unmounted_from_outside_ends_the_command(
    usr: Image, proxy: FaultProxy, soci_mount: Callable[..., Mounted]
) -> None:
    m = soci_mount(usr.ref(proxy.host), "--user", f"{USER}:{PASSWORD}")
    fh.run("umount", m.mountpoint)
    m.proc.wait(20)
    m.done.wait(5)
    assert m.proc.returncode == 0
    assert any("was unmounted" in line for line in m.lines)
    assert not fh.mounts_under(m.root)


# ---------------------------------------------------------------------------------------------------------
# in process: an unexpected error in the fetch layer does not end the session


@pytest.mark.expect_log
def test_unexpected_fetch_error_does_not_kill_the_session(
    stack: Image, tmp_path: Path, extracted, htpasswd_registry: Registry
) -> None:
    assert stack.plan is not None
    plan: LayerPlan = stack.plan.layers[0]
    z = stack.ztoc(0)
    victim = "dir/sub/big.bin"
    bad_spans = set(spans_of_file(z, victim))
    others = [
        f.name.removeprefix("./")
        for f in z.files
        if f.type == "reg"
        and f.uncompressed_size
        and not bad_spans & set(spans_of_file(z, f.name.removeprefix("./")))
    ][:5]
    assert len(others) >= 3
    ls = LayerSpans.from_ztoc(z, lambda a, b: b"", check_header=False)
    first_span = {ls.compressed_range(s)[0]: s for s in range(ls.max_span_id + 1)}
    last_span = {ls.compressed_range(s)[1]: s for s in range(ls.max_span_id + 1)}

    def wrap(fetch: Callable[[int, int], bytes]) -> Callable[[int, int], bytes]:
        def f(start: int, end: int) -> bytes:
            x, y = first_span.get(start), last_span.get(end)
            if x is not None and y is not None and any(x <= s <= y for s in bad_spans):
                raise RuntimeError("boom: an unexpected bug in the fetch layer")
            return fetch(start, end)

        return f

    ref = reference.parse(stack.ref(htpasswd_registry.host))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with _creds_client(str(ref)) as client:
        source = ImageSource(client, ref, ContentStore(tmp_path / "content"))
        cache = BlockCache(tmp_path, CacheConfig())
        s = ThreadedSession(mnt, MountOptions())
        try:
            s.start()
            layer = s.call(
                functools.partial(
                    open_layer,
                    source,
                    plan,
                    cache,
                    span_config=SpanConfig(fetch_timeout_sec=5),
                    wrap_fetch=wrap,
                )
            )
            d = s.add_layer("kinds", layer.ztoc, layer.data)
            with pytest.raises(OSError) as exc:
                read_bytes(d / victim)
            assert exc.value.errno == errno.EIO
            want = extracted("kinds")
            for name in others:
                assert read_bytes(d / name) == read_bytes(want / name)
            assert os.listdir(d / "dir")
        finally:
            s.close()
            left = fh.mounts_under(tmp_path)
            for mp in left:
                fh.run("umount", "-l", mp, check=False)
            assert not left


# ---------------------------------------------------------------------------------------------------------
# the state directory, disable-xattrs and the [fuse] config through soci mount


def test_state_file_shows_a_partly_fetched_layer(
    usr: Image, proxy: FaultProxy, soci_mount: Callable[..., Mounted], extracted
) -> None:
    digest = usr.layers[0]
    m = soci_mount(usr.ref(proxy.host), "--user", f"{USER}:{PASSWORD}")  # one layer: a bind mount of it
    state = m.mountpoint / ".soci-snapshotter" / f"{digest}.json"
    assert ".soci-snapshotter" not in os.listdir(m.mountpoint)
    first = json.loads(read_bytes(state))
    assert first == {"digest": digest, "size": first["size"], "fetchedSize": 0, "fetchedPercent": 0}
    name = "usr/share/zoneinfo/Europe/Paris"
    assert read_bytes(m.mountpoint / name) == read_bytes(extracted("usr") / name)
    raw = read_bytes(state)
    assert raw.endswith(b"}\n") and b", " not in raw
    doc = json.loads(raw)
    fetched = sum(b - a for a, b in blob_gets(proxy, digest)[2:])  # after the probe and the gzip header
    assert 0 < doc["fetchedSize"] <= fetched < doc["size"]
    assert doc["fetchedPercent"] == pytest.approx(100 * doc["fetchedSize"] / doc["size"])
    assert "error" not in doc
    m.stop()


def test_disable_xattrs_annotation_reaches_the_layer(
    htpasswd_registry: Registry, work: Path, tars: dict[str, Path], tmp_path: Path
) -> None:
    img = make_v2_image(
        htpasswd_registry,
        work,
        "noxattr",
        [tars["kinds"], tars["ov1"]],
        convert_flags=("--optimizations", "xattr"),
    )
    assert img.plan is not None
    assert [x.disable_xattrs for x in img.plan.layers] == [False, True]  # kinds has user.* xattrs
    ref = reference.parse(img.ref(htpasswd_registry.host))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with _creds_client(str(ref)) as client:
        source = ImageSource(client, ref, ContentStore(tmp_path / "content"))
        cache = BlockCache(tmp_path, CacheConfig())
        s = ThreadedSession(mnt, MountOptions())
        opened = []
        try:
            s.start()
            dirs = []
            for i, plan in enumerate(img.plan.layers):
                layer = s.call(functools.partial(open_layer, source, plan, cache))
                opened.append(layer)
                assert layer.serve_options() == {
                    "digest": img.layers[i],
                    "size": plan.descriptor.size,
                    "disable_xattrs": i == 1,
                }
                dirs.append(s.add_layer(f"l{i}", layer.ztoc, layer.data, **layer.serve_options()))
            layers = s.session.ops.layers.by_name
            assert (layers[b"l0"].xattrs, layers[b"l1"].xattrs) == (True, False)
            assert os.listxattr(dirs[1] / "a") == []
            with pytest.raises(OSError) as exc:
                os.getxattr(dirs[1] / "a", "user.plain")
            assert exc.value.errno == errno.ENODATA
            assert os.getxattr(dirs[0] / "dir" / "xattrs", "user.plain") == b"value"
            assert os.listdir(dirs[1] / ".soci-snapshotter") == [f"{img.layers[1]}.json"]
        finally:
            s.close()
            for layer in opened:
                layer.close()
            left = fh.mounts_under(tmp_path)
            for mp in left:
                fh.run("umount", "-l", mp, check=False)
            assert not left


def test_mount_options_from_the_config() -> None:
    default = cmd_mount.mount_options(config_mod.Config())
    assert (default.attr_timeout, default.entry_timeout, default.negative_timeout) == (3600, 3600, 3600)
    assert default.verify
    cfg = config_mod.parse(
        "disable_verification = true\n[fuse]\nlong_timeouts = false\nattr_timeout = 5\nnegative_timeout = 0\n"
    )
    opts = cmd_mount.mount_options(cfg)
    assert (opts.attr_timeout, opts.entry_timeout, opts.negative_timeout) == (5, 1, 1)
    assert not opts.verify


@pytest.mark.expect_log
def test_fuse_timeouts_ignored_under_long_timeouts_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    opts = cmd_mount.mount_options(config_mod.parse("[fuse]\nentry_timeout = 7\n"))
    assert opts.entry_timeout == 3600
    assert any("entry_timeout = 7 not used" in r.getMessage() for r in caplog.records)
