"""The background fetcher: pulls the rest of every mounted layer into the block cache when the node is quiet.

Owns one daemon-wide queue of layers (:class:`~soci_fs.spans.RemoteLayer`) and one service,
:meth:`BackgroundFetcher.serve`, that walks them round-robin, one span per turn:

* it starts only after a quiet period: no on-demand read (and no new mount) for ``silence_period_msec``;
  every read of a registered layer and every :meth:`~BackgroundFetcher.register` restarts that period, so
  on-demand reads always go first (they never queue behind background work; the only thing a reader can
  wait for is a background fetch of the very span it needs, which is then already in flight);
* it starts at most one span fetch per ``fetch_period_msec`` (a rate of one, burst one);
* a turn takes the head layer, fetches its next span that is still ``unrequested`` and not cached (spans
  requested or cached by readers are skipped), and puts the layer back at the tail if spans remain; a
  finished layer records its duration;
* ``max_queue_size`` bounds the queue (0 -> 300, negative = unlimited); when full, ``drop_policy``
  ``"newest"`` refuses the layer being added and ``"oldest"`` drops the head. Adding never blocks; drops are
  counted and logged at WARNING;
* :meth:`~BackgroundFetcher.unregister` (unmount) takes a layer out at once; a fetch of it in flight is
  cancelled (the span goes back to ``unrequested``);
* a fetch error drops the layer from the queue (logged at WARNING): reads still fetch on demand;
* :meth:`~BackgroundFetcher.statistics`: queue size, drops, spans fetched and progress per layer; with a
  metrics hook the queue size is published every ``emit_metric_period_sec``.

Config keys are ``[background_fetch]``'s (cli-and-config.md §4): ``disable`` false,
``silence_period_msec`` 30000, ``fetch_period_msec`` 500, ``max_queue_size`` 300, ``drop_policy``
``newest``, ``emit_metric_period_sec`` 10.

Will not: fetch, verify or inflate by itself (``RemoteLayer.prefetch`` does), keep compressed-only spans (a
background fetch leaves the span fully decompressed in the cache), or open/close layers.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from soci_fs.errors import InvalidArgument, SociError
from soci_fs.spans import RemoteLayer

__all__ = ["BackgroundConfig", "BackgroundFetcher"]

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 300


@dataclass(frozen=True)
class BackgroundConfig:
    """The ``[background_fetch]`` table (periods: 0 means the default where used)."""

    disable: bool = False
    silence_period_msec: int = 30_000
    fetch_period_msec: int = 500
    max_queue_size: int = DEFAULT_QUEUE_SIZE
    drop_policy: str = "newest"
    emit_metric_period_sec: int = 10

    def __post_init__(self) -> None:
        if self.drop_policy not in ("oldest", "newest"):
            raise InvalidArgument(
                f'background_fetch.drop_policy must be "oldest" or "newest", got "{self.drop_policy}"'
            )
        if self.silence_period_msec < 0 or self.fetch_period_msec < 0 or self.emit_metric_period_sec < 0:
            raise InvalidArgument("background_fetch periods must not be negative")

    @classmethod
    def from_section(cls, section: Any) -> BackgroundConfig:
        """From a ``[background_fetch]`` table (``soci_grpc.config.BackgroundFetchSection`` or alike)."""
        names = (
            "disable",
            "silence_period_msec",
            "fetch_period_msec",
            "max_queue_size",
            "drop_policy",
            "emit_metric_period_sec",
        )
        return cls(**{n: getattr(section, n) for n in names if hasattr(section, n)})

    @property
    def queue_limit(self) -> int | None:
        """The queue bound in effect (``None`` = unlimited)."""
        if self.max_queue_size < 0:
            return None
        return self.max_queue_size or DEFAULT_QUEUE_SIZE


class _Entry:
    """One registered layer: where its walk is and how it ended."""

    __slots__ = ("cursor", "ended", "fetched", "layer", "registered", "scope", "state")

    def __init__(self, layer: RemoteLayer, now: float) -> None:
        self.layer = layer
        self.cursor = 0
        self.fetched = 0
        self.registered = now
        self.ended: float | None = None
        self.state = "queued"  # queued | done | dropped | failed
        self.scope: trio.CancelScope | None = None


class BackgroundFetcher:
    """Daemon-wide background fetching of registered layers. Methods are for the trio thread.

    Args:
        config: the ``[background_fetch]`` settings.
        metrics: optional ``metrics(name, value)`` hook (``background_fetch_queue_size``,
            ``background_fetch_layer_seconds``).
    """

    def __init__(
        self, config: BackgroundConfig | None = None, metrics: Callable[[str, float], None] | None = None
    ):
        self.config = config or BackgroundConfig()
        self._metrics = metrics
        self._queue: deque[_Entry] = deque()
        self._entries: dict[RemoteLayer, _Entry] = {}
        self._last_activity = -math.inf
        self._wakeup = trio.Event()
        self._drops = 0
        self._spans_fetched = 0
        self._errors = 0

    # ---- control (called by mounts and reads)

    def pause(self) -> None:
        """An on-demand read (or a mount) happened: background work waits for another quiet period."""
        self._last_activity = trio.current_time()

    def register(self, layer: RemoteLayer) -> bool:
        """Queue ``layer`` for background fetching (a mount). Never blocks.

        Returns:
            False if the queue was full and the policy is ``newest`` (the layer is not queued).
        """
        if layer in self._entries:
            return True
        self.pause()
        entry = _Entry(layer, trio.current_time())
        limit = self.config.queue_limit
        if limit is not None and len(self._queue) >= limit:
            self._drops += 1
            if self.config.drop_policy == "newest":
                log.warning(
                    "background fetch queue full (%d layers): not queueing layer %s (drop_policy newest)",
                    len(self._queue),
                    layer.digest,
                )
                return False
            old = self._queue.popleft()
            old.state = "dropped"
            old.ended = trio.current_time()
            log.warning(
                "background fetch queue full (%d layers): dropping layer %s (drop_policy oldest)",
                len(self._queue) + 1,
                old.layer.digest,
            )
        self._entries[layer] = entry
        layer.read_listeners.append(self.pause)
        self._queue.append(entry)
        self._wakeup.set()
        return True

    def unregister(self, layer: RemoteLayer) -> None:
        """Stop fetching ``layer`` (unmount): out of the queue now; a fetch of it in flight is cancelled."""
        entry = self._entries.pop(layer, None)
        if entry is None:
            return
        if self.pause in layer.read_listeners:
            layer.read_listeners.remove(self.pause)
        try:
            self._queue.remove(entry)
        except ValueError:
            pass
        if entry.scope is not None:
            entry.scope.cancel()

    def statistics(self) -> dict[str, Any]:
        """Queue size, drops, spans fetched, errors and per-layer progress (keyed by layer digest)."""
        layers = {}
        for entry in self._entries.values():
            lay = entry.layer
            layers[lay.digest] = {
                "state": entry.state,
                "background_spans": entry.fetched,
                "spans": lay.span_count,
                "fetched_percent": lay.fetched_percent(),
                "seconds": None if entry.ended is None else entry.ended - entry.registered,
            }
        return {
            "queue_size": len(self._queue),
            "drops": self._drops,
            "spans_fetched": self._spans_fetched,
            "errors": self._errors,
            "layers": layers,
        }

    # ---- the service

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled. Starts (``task_status.started()``) at once; with ``disable`` it only waits.

        Errors of single layers are logged and drop that layer; nothing but cancellation ends the service.
        """
        if self.config.disable:
            log.info("background fetch disabled")
            task_status.started()
            await trio.sleep_forever()
        async with trio.open_nursery() as nursery:
            if self._metrics is not None and self.config.emit_metric_period_sec:
                nursery.start_soon(self._emit_metrics)
            task_status.started()
            await self._run()

    async def _emit_metrics(self) -> None:
        assert self._metrics is not None
        while True:
            await trio.sleep(self.config.emit_metric_period_sec)
            self._metrics("background_fetch_queue_size", len(self._queue))

    async def _run(self) -> None:
        silence = self.config.silence_period_msec / 1000.0
        period = self.config.fetch_period_msec / 1000.0
        next_start = -math.inf
        while True:
            if not self._queue:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            now = trio.current_time()
            wait_until = max(self._last_activity + silence, next_start)
            if now < wait_until:
                await trio.sleep_until(wait_until)
                continue  # a read may have come in meanwhile: look again
            entry = self._queue.popleft()
            next_start = now + period
            await self._turn(entry)

    async def _turn(self, entry: _Entry) -> None:
        layer = entry.layer
        if layer.closed or self._entries.get(layer) is not entry:
            return
        span = layer.next_unfetched(entry.cursor)
        if span is None:
            span = layer.next_unfetched(0)  # a span a reader gave up on, or one evicted meanwhile
        if span is None:
            self._finish(entry)
            return
        fetched = False
        with trio.CancelScope() as scope:
            entry.scope = scope
            try:
                fetched = await layer.prefetch(span)
            except SociError as exc:
                self._errors += 1
                entry.state = "failed"
                entry.ended = trio.current_time()
                log.warning(
                    "background fetch of layer %s span %d failed, dropping the layer: %s",
                    layer.digest,
                    span,
                    exc,
                )
                return
            finally:
                entry.scope = None
        if scope.cancelled_caught or self._entries.get(layer) is not entry:
            return  # unregistered while fetching
        entry.cursor = span + 1
        if fetched:
            entry.fetched += 1
            self._spans_fetched += 1
        if layer.next_unfetched(entry.cursor) is None and layer.next_unfetched(0) is None:
            self._finish(entry)
        else:
            self._queue.append(entry)

    def _finish(self, entry: _Entry) -> None:
        entry.state = "done"
        entry.ended = trio.current_time()
        seconds = entry.ended - entry.registered
        log.info(
            "background fetch of layer %s complete: %d spans fetched in the background, %.1f s",
            entry.layer.digest,
            entry.fetched,
            seconds,
        )
        if self._metrics is not None:
            self._metrics("background_fetch_layer_seconds", seconds)
