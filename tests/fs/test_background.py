"""Tests of soci_fs.background: quiet period, rate, completion, priority of reads, unmount, queue bounds.

Virtual time only (pytest-trio's ``autojump_clock``); the layers run their blocking work inline
(``inline_run_sync``) so that no thread hides from the clock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from soci_fs.background import BackgroundConfig, BackgroundFetcher
from soci_fs.cache import BlockCache
from soci_fs.errors import InvalidArgument, NotFound
from soci_fs.spans import RemoteLayer, SpanState
from tests.fs.test_spans import BlobFetch, Layer, inline_run_sync, make_layer, spans_of_calls

CFG = BackgroundConfig(silence_period_msec=30_000, fetch_period_msec=500)


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> Layer:
    return make_layer(tmp_path_factory.mktemp("bglayer"), limit=1_200_000)


async def remote_for(
    layer: Layer, tmp: Path, fetch: Any = None, name: str = "root"
) -> tuple[RemoteLayer, BlobFetch]:
    fetch = fetch or BlobFetch(layer.path)
    remote = await RemoteLayer.open(
        layer.ztoc, fetch, layer.digest, BlockCache(tmp / name), check_header=False, run_sync=inline_run_sync
    )
    return remote, fetch


def test_config() -> None:
    assert BackgroundConfig().queue_limit == 300
    assert BackgroundConfig(max_queue_size=0).queue_limit == 300
    assert BackgroundConfig(max_queue_size=-1).queue_limit is None
    with pytest.raises(InvalidArgument, match='drop_policy must be "oldest" or "newest", got "middle"'):
        BackgroundConfig(drop_policy="middle")

    class Section:
        disable = True
        silence_period_msec = 5
        fetch_period_msec = 6
        max_queue_size = 7
        drop_policy = "oldest"
        emit_metric_period_sec = 8

    assert BackgroundConfig.from_section(Section()) == BackgroundConfig(True, 5, 6, 7, "oldest", 8)


@pytest.mark.trio
async def test_completes_a_layer_after_the_quiet_period_at_the_fetch_rate(
    layer: Layer, tmp_path: Path, autojump_clock: Any
) -> None:
    remote, fetch = await remote_for(layer, tmp_path)
    n = remote.span_count
    bg = BackgroundFetcher(CFG)
    async with trio.open_nursery() as nursery:
        await nursery.start(bg.serve)
        assert bg.register(remote)
        await trio.sleep(29.9)
        assert fetch.calls == []  # still in the quiet period
        await trio.sleep(0.2)
        assert len(fetch.calls) == 1  # first one at 30 s
        await trio.sleep(0.5 * 4)
        assert len(fetch.calls) == 5  # then one per 500 ms
        await trio.sleep(0.5 * n)
        assert len(fetch.calls) == n
        assert all(s is SpanState.UNCOMPRESSED for s in remote.states())
        st = bg.statistics()
        info = st["layers"][layer.digest]
        assert info["state"] == "done" and info["background_spans"] == n
        assert info["fetched_percent"] > 99
        assert info["seconds"] == pytest.approx(30 + 0.5 * (n - 1), abs=0.6)
        assert st["queue_size"] == 0 and st["spans_fetched"] == n
        nursery.cancel_scope.cancel()
    assert sorted(spans_of_calls(remote, fetch.calls)) == list(range(n))
    assert bytes(await remote.read(0, remote.size)) == layer.tar[: remote.size]
    assert len(fetch.calls) == n  # everything came from the cache


@pytest.mark.trio
async def test_on_demand_reads_go_first_and_restart_the_quiet_period(
    layer: Layer, tmp_path: Path, autojump_clock: Any
) -> None:
    remote, fetch = await remote_for(layer, tmp_path)
    bg = BackgroundFetcher(CFG)
    async with trio.open_nursery() as nursery:
        await nursery.start(bg.serve)
        bg.register(remote)
        await trio.sleep(31.1)  # background at work: spans 0, 1, 2
        assert len(fetch.calls) == 3
        last = remote.span_count - 1
        us, ue = remote.layer.uncompressed_range(last)
        t = trio.current_time()
        assert bytes(await remote.read(us, ue - us)) == layer.tar[us:ue]
        assert trio.current_time() == t  # the read did not wait for the background
        assert len(fetch.calls) == 4 and remote.state(last) is SpanState.UNCOMPRESSED
        await trio.sleep(29.9)
        assert len(fetch.calls) == 4  # paused by the read
        await trio.sleep(0.2)
        assert len(fetch.calls) == 5
        await trio.sleep(0.5 * remote.span_count)
        nursery.cancel_scope.cancel()
    covered = spans_of_calls(remote, fetch.calls)
    assert sorted(covered) == list(range(remote.span_count))  # the read span was skipped, not refetched


@pytest.mark.trio
async def test_unmount_stops_the_layer(layer: Layer, tmp_path: Path, autojump_clock: Any) -> None:
    remote, fetch = await remote_for(layer, tmp_path)
    other, other_fetch = await remote_for(layer, tmp_path, name="other")
    bg = BackgroundFetcher(CFG)
    async with trio.open_nursery() as nursery:
        await nursery.start(bg.serve)
        bg.register(remote)
        bg.register(other)
        await trio.sleep(32.1)  # turns alternate: 5 fetches, 3 of the first layer
        assert (len(fetch.calls), len(other_fetch.calls)) == (3, 2)
        bg.unregister(remote)
        assert layer.digest in bg.statistics()["layers"]  # "other" has the same digest
        await trio.sleep(10)
        assert len(fetch.calls) == 3
        assert len(other_fetch.calls) == min(2 + 20, other.span_count)
        nursery.cancel_scope.cancel()
    assert bg.statistics()["queue_size"] == 0
    assert bg.pause not in remote.read_listeners


@pytest.mark.trio
async def test_unmount_cancels_a_fetch_in_flight(layer: Layer, tmp_path: Path, autojump_clock: Any) -> None:
    gate = trio.Event()

    async def gated_run_sync(fn: Any, *args: Any, **kw: Any) -> Any:
        await gate.wait()
        return fn(*args)

    fetch = BlobFetch(layer.path)
    remote = await RemoteLayer.open(
        layer.ztoc,
        fetch,
        layer.digest,
        BlockCache(tmp_path / "r"),
        check_header=False,
        run_sync=gated_run_sync,
    )
    bg = BackgroundFetcher(CFG)
    async with trio.open_nursery() as nursery:
        await nursery.start(bg.serve)
        bg.register(remote)
        await trio.sleep(31)
        assert remote.state(0) is SpanState.REQUESTED
        bg.unregister(remote)
        await trio.testing.wait_all_tasks_blocked()
        assert remote.state(0) is SpanState.UNREQUESTED and remote.statistics()["in_flight"] == 0
        nursery.cancel_scope.cancel()
    assert fetch.calls == []


@pytest.mark.trio
@pytest.mark.expect_log
@pytest.mark.parametrize("policy", ["newest", "oldest"])
async def test_queue_bound_and_drop_policy(
    layer: Layer, tmp_path: Path, policy: str, autojump_clock: Any
) -> None:
    remotes = [(await remote_for(layer, tmp_path, name=f"r{i}"))[0] for i in range(3)]
    bg = BackgroundFetcher(BackgroundConfig(max_queue_size=2, drop_policy=policy))
    results = [bg.register(r) for r in remotes]
    st = bg.statistics()
    assert st["drops"] == 1 and st["queue_size"] == 2
    if policy == "newest":
        assert results == [True, True, False]
    else:
        assert results == [True, True, True]
        assert [e.layer for e in bg._queue] == remotes[1:]


@pytest.mark.trio
@pytest.mark.expect_log
async def test_fetch_error_drops_the_layer(layer: Layer, tmp_path: Path, autojump_clock: Any) -> None:
    def gone(start: int, end: int, index: int) -> None:
        raise NotFound("blob deleted")

    remote, fetch = await remote_for(layer, tmp_path, fetch=BlobFetch(layer.path, hook=gone))
    bg = BackgroundFetcher(CFG)
    async with trio.open_nursery() as nursery:
        await nursery.start(bg.serve)
        bg.register(remote)
        await trio.sleep(60)
        nursery.cancel_scope.cancel()
    assert len(fetch.calls) == 1
    st = bg.statistics()
    assert st["errors"] == 1 and st["layers"][layer.digest]["state"] == "failed" and st["queue_size"] == 0


@pytest.mark.trio
async def test_disabled_does_nothing(layer: Layer, tmp_path: Path, autojump_clock: Any) -> None:
    remote, fetch = await remote_for(layer, tmp_path)
    bg = BackgroundFetcher(BackgroundConfig(disable=True))
    async with trio.open_nursery() as nursery:
        await nursery.start(bg.serve)
        bg.register(remote)
        await trio.sleep(3600)
        nursery.cancel_scope.cancel()
    assert fetch.calls == []


@pytest.mark.trio
async def test_queue_size_metric(layer: Layer, tmp_path: Path, autojump_clock: Any) -> None:
    seen: list[tuple[str, float]] = []
    remote, _ = await remote_for(layer, tmp_path)
    bg = BackgroundFetcher(CFG, metrics=lambda n, v: seen.append((n, v)))
    async with trio.open_nursery() as nursery:
        await nursery.start(bg.serve)
        bg.register(remote)
        await trio.sleep(25)
        nursery.cancel_scope.cancel()
    assert seen == [("background_fetch_queue_size", 1.0), ("background_fetch_queue_size", 1.0)]
