"""Tests of soci_fs.spans: span states, one fetch in flight per span, coalescing, retries, timeouts, reads.

Layers are real: a tar of files under /usr, gzipped at test time, indexed by ``soci_fs.builder.build_ztoc``
with 64 KiB spans, served by a fetch over the blob file that records every call. The helpers here
(``make_layer``, ``BlobFetch``, ``inline_run_sync``) are also used by test_background.py.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import random
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from soci_fs.builder import build_ztoc
from soci_fs.cache import BlockCache, CacheConfig
from soci_fs.errors import FailedPrecondition, FormatError, InvalidArgument, NotFound, Unavailable
from soci_fs.spans import (
    TRANSITIONS,
    RemoteLayer,
    SpanConfig,
    SpanState,
    backoff_seconds,
    check_transition,
    coalesce,
)
from soci_fs.ztoc import Ztoc
from tests.harness.registry import (  # noqa: F401  (pytest finds fixtures by name)
    PASSWORD,
    USER,
    RawPusher,
    fault_proxy,
    harness_dir,
    htpasswd_registry,
)

KIB = 1024
SPAN = 64 * KIB
U, R, F, C = SpanState.UNREQUESTED, SpanState.REQUESTED, SpanState.FETCHED, SpanState.UNCOMPRESSED
SOURCE = Path("/usr/lib/python3/dist-packages")


# ---------------------------------------------------------------------------------------------------------
# helpers shared with test_background.py


@dataclass
class Layer:
    gz: bytes
    tar: bytes
    ztoc: Ztoc
    digest: str
    path: Path


def _tar_of_usr(limit: int) -> bytes:
    buf = io.BytesIO()
    total = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(SOURCE):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if not os.path.isfile(path) or os.path.islink(path) or name.endswith(".pyc"):
                    continue
                info = tf.gettarinfo(path, arcname=os.path.relpath(path, "/"))
                try:
                    with open(path, "rb") as f:
                        tf.addfile(info, f)
                except OSError:
                    continue
                total += info.size
                if total >= limit:
                    return _close(tf, buf)
    return _close(tf, buf)


def _close(tf: tarfile.TarFile, buf: io.BytesIO) -> bytes:
    tf.close()
    return buf.getvalue()


def make_layer(tmp: Path, limit: int = 3_000_000, span: int = SPAN, compression: str = "gzip") -> Layer:
    """A real layer: a tar of /usr files (about ``limit`` bytes), gzipped, indexed, written to a file."""
    tar = _tar_of_usr(limit)
    blob = gzip.compress(tar, 6, mtime=0) if compression == "gzip" else tar
    z = build_ztoc(io.BytesIO(blob).read, span_size=span, compression=compression)  # type: ignore[arg-type]
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    path = tmp / f"blob-{compression}-{span}"
    path.write_bytes(blob)
    return Layer(blob, tar, z, digest, path)


@dataclass
class BlobFetch:
    """``fetch(start, end)`` over a blob file; records calls; optional per-call behaviour."""

    path: Path
    calls: list[tuple[int, int]] = field(default_factory=list)
    hook: Any = None  # hook(start, end, call_index) -> bytes | None (None: serve the file)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, start: int, end: int) -> bytes:
        with self.lock:
            index = len(self.calls)
            self.calls.append((start, end))
        if self.hook is not None:
            out = self.hook(start, end, index)
            if out is not None:
                return out
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return os.pread(fd, end - start, start)
        finally:
            os.close(fd)


async def inline_run_sync(fn: Any, *args: Any, limiter: Any = None, abandon_on_cancel: bool = False) -> Any:
    """Runs blocking work on the loop (tests with an autojump clock must not have threads)."""
    await trio.lowlevel.checkpoint()
    return fn(*args)


def spans_of_calls(remote: RemoteLayer, calls: list[tuple[int, int]]) -> list[int]:
    """Every span id each call covered (a span appears once per call that fetched it)."""
    starts = {remote.layer.compressed_range(i)[0]: i for i in range(remote.span_count)}
    ends = {remote.layer.compressed_range(i)[1]: i for i in range(remote.span_count)}
    out: list[int] = []
    for start, end in calls:
        if start in starts and end in ends:
            out.extend(range(starts[start], ends[end] + 1))
    return out


async def open_remote(layer: Layer, fetch: Any, cache: BlockCache, **kw: Any) -> RemoteLayer:
    return await RemoteLayer.open(layer.ztoc, fetch, layer.digest, cache, **kw)


# ---------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> Layer:
    return make_layer(tmp_path_factory.mktemp("layer"))


@pytest.fixture
def cache(tmp_path: Path) -> BlockCache:
    return BlockCache(tmp_path / "root", CacheConfig(max_memory_bytes=8 << 20))


# ---------------------------------------------------------------------------------------------------------
# pure cores


ALL_EDGES = [(a, b) for a in SpanState for b in SpanState]
LEGAL = {(U, R), (R, F), (R, U), (F, C), (F, U), (C, U), (U, C)}


@pytest.mark.parametrize(("old", "new"), ALL_EDGES, ids=lambda s: s.value)
def test_transition_table(old: SpanState, new: SpanState) -> None:
    if (old, new) in LEGAL:
        assert check_transition(old, new) == TRANSITIONS[(old, new)]
    else:
        with pytest.raises(FailedPrecondition, match="illegal span transition"):
            check_transition(old, new)


def test_transition_table_is_exactly_the_legal_edges() -> None:
    assert set(TRANSITIONS) == LEGAL
    assert all(TRANSITIONS.values())


RANGES = [(10, 100), (99, 200), (200, 300), (300, 1000), (1000, 1010)]


@pytest.mark.parametrize(
    ("spans", "max_bytes", "expect"),
    [
        ([], 1000, []),
        ([0], 0, [(0, 0)]),
        ([0, 1, 2], 1000, [(0, 2)]),
        ([0, 1, 2], 190, [(0, 1), (2, 2)]),  # [10, 200) is 190 bytes: fits exactly
        ([0, 1, 2], 189, [(0, 0), (1, 1), (2, 2)]),  # [99, 300) is 201 bytes: too big
        ([0, 2], 10_000, [(0, 0), (2, 2)]),  # not adjacent: never merged
        ([1, 2, 3, 4], 10_000, [(1, 4)]),
        ([1, 2, 3, 4], 201, [(1, 2), (3, 3), (4, 4)]),  # a span bigger than the bound stays alone
        ([0, 1, 3, 4], 10_000, [(0, 1), (3, 4)]),
    ],
)
def test_coalesce(spans: list[int], max_bytes: int, expect: list[tuple[int, int]]) -> None:
    assert coalesce(spans, RANGES, max_bytes) == expect


@pytest.mark.parametrize(
    ("attempt", "lo", "hi", "expect"),
    [(0, 30, 1000, 0.03), (1, 30, 1000, 0.06), (5, 30, 1000, 0.96), (6, 30, 1000, 1.0), (3, 0, 10, 0.0)],
)
def test_backoff(attempt: int, lo: int, hi: int, expect: float) -> None:
    assert backoff_seconds(attempt, lo, hi) == pytest.approx(expect)


@pytest.mark.parametrize(
    "kw",
    [
        {"fetch_timeout_sec": 0},
        {"fetch_retries": -1},
        {"verification_retries": -1},
        {"fetch_threads": 0},
        {"max_coalesce_bytes": -1},
    ],
)
def test_span_config_rejects(kw: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        SpanConfig(**kw)


@dataclass
class _Blob:
    fetching_timeout_sec: int = 300
    max_span_verification_retries: int = 0
    min_wait_msec: int | None = None
    max_wait_msec: int | None = None


@pytest.mark.parametrize(
    ("blob", "timeout", "vretries", "lo"),
    [(_Blob(), 300.0, 0, 30), (_Blob(7, -1, 5, 9), 7.0, 3, 5), (_Blob(0, 2), 300.0, 2, 30)],
)
def test_span_config_from_blob_section(blob: _Blob, timeout: float, vretries: int, lo: int) -> None:
    cfg = SpanConfig.from_blob_section(blob, fetch_retries=0)
    assert (cfg.fetch_timeout_sec, cfg.verification_retries, cfg.retry_min_wait_msec) == (
        timeout,
        vretries,
        lo,
    )
    assert cfg.fetch_retries == 0


# ---------------------------------------------------------------------------------------------------------
# reads


@pytest.mark.trio
async def test_read_whole_layer_and_random_ranges(layer: Layer, cache: BlockCache) -> None:
    fetch = BlobFetch(layer.path)
    remote = await open_remote(layer, fetch, cache)
    assert remote.span_count > 20
    assert fetch.calls == [(0, remote.layer.compressed_range(0)[0])]  # the gzip header check
    fetch.calls.clear()
    rnd = random.Random(7)
    size = len(layer.tar[: remote.size])
    for _ in range(60):
        off = rnd.randrange(size)
        n = rnd.choice([1, 100, 4096, 70_000, 300_000])
        n = min(n, size - off)
        assert bytes(await remote.read(off, n)) == layer.tar[off : off + n]
    assert bytes(await remote.read(0, size)) == layer.tar[:size]
    assert bytes(await remote.read(size, 0)) == b""
    covered = spans_of_calls(remote, fetch.calls)
    assert len(covered) == len(set(covered)) == remote.span_count  # every span fetched exactly once
    assert remote.fetched_percent() == pytest.approx(100.0 * (len(layer.gz) - 8) / len(layer.gz), abs=1)
    st = remote.statistics()
    assert st["states"]["uncompressed"] == remote.span_count
    assert st["in_flight"] == 0 and st["spans_fetched"] == remote.span_count
    assert st["requests"] == len(fetch.calls) and st["cache_hits"] > 0
    assert st["bytes_fetched"] == sum(e - s for s, e in fetch.calls)


@pytest.mark.trio
async def test_read_of_a_file_fetches_only_its_spans(layer: Layer, cache: BlockCache) -> None:
    fetch = BlobFetch(layer.path)
    remote = await open_remote(layer, fetch, cache, check_header=False)
    entry = next(f for f in layer.ztoc.files if f.type == "reg" and 1000 < f.uncompressed_size < 4096)
    first, last = remote.layer.span_range(entry.uncompressed_offset, entry.uncompressed_size)
    data = await remote.read(entry.uncompressed_offset, entry.uncompressed_size)
    assert (
        bytes(data)
        == layer.tar[entry.uncompressed_offset : entry.uncompressed_offset + entry.uncompressed_size]
    )
    needed = set(range(remote.layer.span_of(entry.uncompressed_offset), last + 1))
    assert set(spans_of_calls(remote, fetch.calls)) <= needed | {first}
    assert {i for i, s in enumerate(remote.states()) if s is C} == set(spans_of_calls(remote, fetch.calls))


@pytest.mark.trio
@pytest.mark.parametrize("coalesce_bytes", [0, 8 << 20])
async def test_32_concurrent_readers_fetch_each_span_once(
    layer: Layer, cache: BlockCache, coalesce_bytes: int
) -> None:
    gate = threading.Event()

    def slow(start: int, end: int, index: int) -> None:
        gate.wait(5)  # hold the first fetches so that readers pile up on the same spans
        return None

    fetch = BlobFetch(layer.path, hook=slow)
    remote = await open_remote(
        layer, fetch, cache, check_header=False, config=SpanConfig(max_coalesce_bytes=coalesce_bytes)
    )
    size = remote.size
    rnd = random.Random(32)
    window = (0, min(size, 12 * SPAN))
    reads = []
    for _ in range(32):
        off = rnd.randrange(*window)
        reads.append((off, min(rnd.randrange(1, 5 * SPAN), size - off)))
    results: dict[int, bytes] = {}

    async def reader(i: int) -> None:
        off, n = reads[i]
        results[i] = bytes(await remote.read(off, n))

    async with trio.open_nursery() as nursery:
        for i in range(32):
            nursery.start_soon(reader, i)
        await trio.sleep(0.05)
        assert remote.statistics()["in_flight"] > 0
        gate.set()
    for i, (off, n) in enumerate(reads):
        assert results[i] == layer.tar[off : off + n], i
    covered = spans_of_calls(remote, fetch.calls)
    assert len(covered) == len(fetch.calls) if coalesce_bytes == 0 else len(covered) >= len(fetch.calls)
    assert len(covered) == len(set(covered)), "a span was fetched twice"
    needed = set()
    for off, n in reads:
        needed |= set(range(remote.layer.span_of(off), remote.layer.span_of(off + n - 1) + 1))
    assert set(covered) == needed
    if coalesce_bytes:
        assert len(fetch.calls) < len(covered)  # some requests carried several spans


@pytest.mark.trio
async def test_coalescing_counts(layer: Layer, cache: BlockCache) -> None:
    fetch = BlobFetch(layer.path)
    cfg = SpanConfig(max_coalesce_bytes=3 * SPAN)
    remote = await open_remote(layer, fetch, cache, check_header=False, config=cfg)
    us, _ = remote.layer.uncompressed_range(2)
    _, ue = remote.layer.uncompressed_range(11)
    await remote.read(us, ue - us)  # spans 2..11: ten adjacent spans
    expect = coalesce(
        list(range(2, 12)),
        [remote.layer.compressed_range(i) for i in range(remote.span_count)],
        cfg.max_coalesce_bytes,
    )
    assert 1 < len(expect) < 10
    assert sorted(fetch.calls) == [
        (remote.layer.compressed_range(a)[0], remote.layer.compressed_range(b)[1]) for a, b in expect
    ]
    assert remote.statistics()["requests"] == len(expect)
    assert remote.statistics()["spans_fetched"] == 10


@pytest.mark.trio
async def test_uncompressed_tar_layer(tmp_path: Path) -> None:
    lay = make_layer(tmp_path, limit=600_000, compression="tar")
    fetch = BlobFetch(lay.path)
    remote = await open_remote(lay, fetch, BlockCache(None), check_header=True)
    assert fetch.calls == []  # no header to check
    assert bytes(await remote.read(1000, 200_000)) == lay.tar[1000:201_000]


@pytest.mark.trio
async def test_read_outside_the_layer_and_after_close(layer: Layer, cache: BlockCache) -> None:
    remote = await open_remote(layer, BlobFetch(layer.path), cache, check_header=False)
    with pytest.raises(InvalidArgument):
        await remote.read(remote.size - 1, 2)
    with pytest.raises(InvalidArgument):
        await remote.read(-1, 1)
    remote.close()
    with pytest.raises(FailedPrecondition):
        await remote.read(0, 1)


# ---------------------------------------------------------------------------------------------------------
# verification, errors, retries, timeouts


@pytest.mark.trio
@pytest.mark.expect_log
async def test_digest_mismatch_refetched_once_then_format_error(
    layer: Layer, cache: BlockCache, caplog: pytest.LogCaptureFixture
) -> None:
    fetch = BlobFetch(layer.path)
    remote = await open_remote(layer, fetch, cache, check_header=False)
    bad_span = 3
    cs, ce = remote.layer.compressed_range(bad_span)

    def corrupt(start: int, end: int, index: int) -> bytes | None:
        if (start, end) == (cs, ce):
            return b"\0" * (end - start)
        return None

    fetch.hook = corrupt
    us, _ = remote.layer.uncompressed_range(bad_span)
    with pytest.raises(FormatError) as info:
        await remote.read(us, 10)
    msg = str(info.value)
    zero_digest = "sha256:" + hashlib.sha256(b"\0" * (ce - cs)).hexdigest()
    assert f"span {bad_span}" in msg and remote.layer.span_digests[bad_span] in msg and zero_digest in msg
    assert fetch.calls.count((cs, ce)) == 2  # refetched once
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "span digests do not match" in errors[0].getMessage()
    assert remote.state(bad_span) is U
    fetch.hook = None
    assert bytes(await remote.read(us, 10)) == layer.tar[us : us + 10]  # a later read tries again


@pytest.mark.trio
@pytest.mark.expect_log
async def test_digest_mismatch_once_then_good(layer: Layer, cache: BlockCache) -> None:
    def corrupt_first(start: int, end: int, index: int) -> bytes | None:
        return b"x" * (end - start) if index == 0 else None

    fetch = BlobFetch(layer.path, hook=corrupt_first)
    remote = await open_remote(layer, fetch, cache, check_header=False)
    assert bytes(await remote.read(5000, 100)) == layer.tar[5000:5100]
    assert len(fetch.calls) == 2 and remote.statistics()["digest_mismatches"] == 1


@pytest.mark.trio
async def test_transient_errors_then_recovery(layer: Layer, cache: BlockCache) -> None:
    def flaky(start: int, end: int, index: int) -> None:
        if index < 2:
            raise (Unavailable if index == 0 else ConnectionResetError)("registry hiccup")
        return None

    fetch = BlobFetch(layer.path, hook=flaky)
    cfg = SpanConfig(fetch_retries=2, retry_min_wait_msec=1, retry_max_wait_msec=2)
    remote = await open_remote(layer, fetch, cache, check_header=False, config=cfg)
    assert bytes(await remote.read(70_000, 1000)) == layer.tar[70_000:71_000]
    assert len(fetch.calls) == 3
    assert remote.statistics()["retries"] == 2


@pytest.mark.trio
@pytest.mark.expect_log
async def test_transient_errors_exhaust_retries(layer: Layer, cache: BlockCache) -> None:
    def down(start: int, end: int, index: int) -> None:
        raise ConnectionRefusedError("connection refused")

    fetch = BlobFetch(layer.path, hook=down)
    cfg = SpanConfig(fetch_retries=1, retry_min_wait_msec=1, retry_max_wait_msec=1)
    remote = await open_remote(layer, fetch, cache, check_header=False, config=cfg)
    with pytest.raises(Unavailable, match="after 2 attempt"):
        await remote.read(0, 10)
    assert remote.state(0) is U and remote.statistics()["in_flight"] == 0


@pytest.mark.trio
@pytest.mark.expect_log
async def test_permanent_error_is_not_retried(layer: Layer, cache: BlockCache) -> None:
    def gone(start: int, end: int, index: int) -> None:
        raise NotFound("blob is gone")

    fetch = BlobFetch(layer.path, hook=gone)
    remote = await open_remote(layer, fetch, cache, check_header=False)
    with pytest.raises(NotFound):
        await remote.read(0, 10)
    assert len(fetch.calls) == 1


@pytest.fixture
def slow_mock_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 0.3 s of real idleness: worker threads finish before that."""
    return trio.testing.MockClock(autojump_threshold=0.3)


@pytest.mark.trio
@pytest.mark.expect_log
async def test_hanging_fetch_times_out_then_later_read_succeeds(
    layer: Layer, cache: BlockCache, slow_mock_clock: trio.testing.MockClock
) -> None:
    release = threading.Event()

    def hang_first(start: int, end: int, index: int) -> None:
        if index == 0:
            release.wait(30)
        return None

    fetch = BlobFetch(layer.path, hook=hang_first)
    remote = await open_remote(
        layer, fetch, cache, check_header=False, config=SpanConfig(fetch_timeout_sec=300)
    )
    waiters: list[BaseException] = []

    async def other_reader() -> None:
        try:
            await remote.read(100, 10)
        except Unavailable as exc:
            waiters.append(exc)

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_reader)
        with pytest.raises(Unavailable, match="did not complete within 300 s"):
            await remote.read(0, 10)
    assert trio.current_time() - t0 == pytest.approx(300, abs=1)
    assert len(waiters) == 1  # the waiter got the same outcome, without a second fetch
    assert len(fetch.calls) == 1 and remote.state(0) is U
    assert bytes(await remote.read(0, 10)) == layer.tar[:10]
    release.set()


@pytest.mark.trio
async def test_cancelled_reader_leaves_the_span_fetchable(layer: Layer, cache: BlockCache) -> None:
    gate = threading.Event()

    def hold(start: int, end: int, index: int) -> None:
        if index == 0:
            gate.wait(10)
        return None

    fetch = BlobFetch(layer.path, hook=hold)
    remote = await open_remote(layer, fetch, cache, check_header=False)
    with trio.move_on_after(0.05):
        await remote.read(0, 10)
    assert remote.state(0) is U and remote.statistics()["in_flight"] == 0
    gate.set()
    assert bytes(await remote.read(0, 10)) == layer.tar[:10]


# ---------------------------------------------------------------------------------------------------------
# cache interplay


@pytest.mark.trio
async def test_restart_serves_from_disk_without_network(layer: Layer, tmp_path: Path) -> None:
    root = tmp_path / "root"
    remote = await open_remote(layer, BlobFetch(layer.path), BlockCache(root))
    assert bytes(await remote.read(0, remote.size)) == layer.tar[: remote.size]

    def no_network(start: int, end: int, index: int) -> None:
        raise AssertionError("network used after restart")

    fetch = BlobFetch(layer.path, hook=no_network)
    again = await open_remote(layer, fetch, BlockCache(root, CacheConfig(max_memory_bytes=0)))
    assert all(s is C for s in again.states())
    assert again.fetched_percent() > 99
    rnd = random.Random(3)
    for _ in range(30):
        off = rnd.randrange(again.size)
        n = min(rnd.randrange(1, 200_000), again.size - off)
        assert bytes(await again.read(off, n)) == layer.tar[off : off + n]
    assert fetch.calls == []


@pytest.mark.trio
@pytest.mark.expect_log
async def test_corrupted_block_on_disk_is_refetched(layer: Layer, tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = await open_remote(layer, BlobFetch(layer.path), BlockCache(root), check_header=False)
    await first.read(0, 3 * SPAN)
    f = next(root.glob("cache/*/1"))
    raw = bytearray(f.read_bytes())
    raw[-100] ^= 0xFF
    f.write_bytes(raw)
    fetch = BlobFetch(layer.path)
    cache2 = BlockCache(root, CacheConfig(max_memory_bytes=0))
    again = await open_remote(layer, fetch, cache2, check_header=False)
    assert again.state(1) is C
    us, ue = again.layer.uncompressed_range(1)
    assert bytes(await again.read(us, ue - us)) == layer.tar[us:ue]
    assert fetch.calls == [again.layer.compressed_range(1)]
    assert cache2.statistics()["corrupt"] == 1 and again.statistics()["cache_refetches"] == 1


@pytest.mark.trio
async def test_memory_only_cache_smaller_than_a_span(layer: Layer) -> None:
    fetch = BlobFetch(layer.path)
    remote = await open_remote(layer, fetch, BlockCache(None, CacheConfig(max_memory_bytes=1000)))
    assert bytes(await remote.read(10, 100_000)) == layer.tar[10:100_010]
    n = len(fetch.calls)
    assert bytes(await remote.read(10, 100)) == layer.tar[10:110]
    assert len(fetch.calls) == n + 1  # nothing could be cached: fetched again (state went back)


@pytest.mark.trio
async def test_metrics_hook(layer: Layer, cache: BlockCache) -> None:
    seen: list[tuple[str, float]] = []
    remote = await open_remote(
        layer, BlobFetch(layer.path), cache, check_header=False, metrics=lambda n, v: seen.append((n, v))
    )
    await remote.read(0, 10)
    names = {n for n, _ in seen}
    assert {"span_fetch_seconds", "span_fetch_bytes"} <= names


# ---------------------------------------------------------------------------------------------------------
# the real registry


@pytest.mark.integration
@pytest.mark.trio
async def test_registry_reading_one_small_file_fetches_only_its_spans(
    layer: Layer,
    htpasswd_registry: Any,  # noqa: F811
    fault_proxy: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    from soci_fs.registry import reference
    from soci_fs.registry.client import RegistryClient
    from soci_fs.registry.credentials import Credentials
    from soci_fs.registry.reference import HttpConfig, RegistryConfig

    repo = f"spans/t{os.getpid()}-{random.randrange(1 << 30)}"
    img = RawPusher(htpasswd_registry).push_image(repo, "v1", [layer.gz])
    digest = img["layers"][0]
    assert digest == layer.digest
    proxy = fault_proxy(htpasswd_registry)
    ref = reference.parse(f"{proxy.host}/{repo}:v1")
    config = RegistryConfig(http=HttpConfig(max_retries=2, min_wait_msec=1, max_wait_msec=20))
    with RegistryClient(lambda host, r: Credentials(USER, PASSWORD), config=config) as client:
        blob = client.blob(ref, digest, size=len(layer.gz))

        def fetch(start: int, end: int) -> bytes:
            return blob.read(start, end - start)

        remote = await RemoteLayer.open(layer.ztoc, fetch, digest, BlockCache(tmp_path / "root"))
        entry = next(
            f
            for f in layer.ztoc.files
            if f.type == "reg"
            and 100 < f.uncompressed_size <= 4096
            and remote.layer.span_of(f.uncompressed_offset)
            == remote.layer.span_of(f.uncompressed_offset + f.uncompressed_size)
            and remote.layer.span_of(f.uncompressed_offset) > 2
        )
        before = [e for e in proxy.log if e["range"]]
        data = await remote.read(entry.uncompressed_offset, entry.uncompressed_size)
        assert (
            bytes(data)
            == layer.tar[entry.uncompressed_offset : entry.uncompressed_offset + entry.uncompressed_size]
        )
        ranges = [e for e in proxy.log if e["range"]][len(before) :]
        span = remote.layer.span_of(entry.uncompressed_offset)
        cs, ce = remote.layer.compressed_range(span)
        assert [e["range"] for e in ranges] == [f"bytes={cs}-{ce - 1}"]
        assert remote.statistics()["requests"] == 1
        assert [i for i, s in enumerate(remote.states()) if s is C] == [span]
