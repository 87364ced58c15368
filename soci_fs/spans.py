"""The span manager of one lazily loaded layer: span states, one fetch in flight per span, reads.

Owns, per layer (:class:`RemoteLayer`, the ``LayerData`` the FUSE side reads through):

* the state of every span and the only legal moves between states (:data:`TRANSITIONS`, one comment per
  edge); every change goes through :meth:`RemoteLayer._move`;
* one fetch in flight per span: the fetching task owns an :class:`_Attempt` whose ``trio.Event`` is set once
  when the attempt ends; other readers of the span wait on it and take its data or its error. Every attempt
  gets a new Event (Events are never reset);
* fetching: the injected ``fetch(start, end) -> bytes`` runs in a worker thread (``trio.to_thread.run_sync``
  with a ``CapacityLimiter``); adjacent spans that one read needs are coalesced into one range request of at
  most ``max_coalesce_bytes`` (:func:`coalesce`); transient failures (``Unavailable``, ``OSError``) are
  retried with backoff, all of it bounded by ``fetch_timeout_sec``, after which the read raises
  ``Unavailable`` (the FUSE side answers EIO) and the span goes back to ``unrequested`` so a later read tries
  again;
* verification: length and sha256 of every span's compressed bytes on every fetch; a mismatch is refetched
  ``verification_retries`` times (default once), then ``FormatError`` naming the span and both digests,
  logged at ERROR once;
* decompression in worker threads with their own ``CapacityLimiter`` (the compiled inflate releases the
  GIL), and storing the result in the :class:`~soci_fs.cache.BlockCache`;
* reads: :meth:`RemoteLayer.read` serves from the memory tier on the event loop when it can, from the disk
  tier in a thread, and fetches the missing spans of a read concurrently;
* counters (:meth:`RemoteLayer.statistics`), the fetched size/percentage of the state file, a metrics hook
  ``metrics(name, value)`` and read listeners (the background fetcher's "a read happened" signal).

Config (:class:`SpanConfig`): ``fetch_timeout_sec`` comes from ``[blob] fetching_timeout_sec`` (300),
``verification_retries`` from ``[blob] max_span_verification_retries`` (negative -> 3), the retry waits
from ``[blob] min_wait_msec``/``max_wait_msec``; ``fetch_retries``, ``max_coalesce_bytes`` and the thread
counts are ours.

Will not: parse zTOCs or decide span arithmetic (``soci_fs.spanread.LayerSpans`` does), know about HTTP (the
fetch callable hides the registry client), know errno (the FUSE operations map errors), or keep compressed
bytes beyond one attempt. The background fetcher (``soci_fs.background``) drives :meth:`RemoteLayer.prefetch`.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

import trio

from soci_fs.cache import BlockCache, gather
from soci_fs.errors import FailedPrecondition, FormatError, InvalidArgument, SociError, Unavailable
from soci_fs.spanread import Fetch, LayerSpans

__all__ = [
    "TRANSITIONS",
    "RemoteLayer",
    "SpanConfig",
    "SpanState",
    "check_transition",
    "coalesce",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
Metrics = Callable[[str, float], None]
"""``metrics(name, value)``: called on the trio thread; must not block."""
RunSync = Callable[..., Awaitable[Any]]
"""``await run_sync(fn, *args, limiter=..., abandon_on_cancel=...)`` like ``trio.to_thread.run_sync``."""

MIB = 1 << 20


class SpanState(enum.Enum):
    """Where a span's data is."""

    UNREQUESTED = "unrequested"  # nothing held; nobody is fetching it
    REQUESTED = "requested"  # one attempt is fetching the compressed bytes
    FETCHED = "fetched"  # compressed bytes verified, being inflated by the same attempt
    UNCOMPRESSED = "uncompressed"  # decompressed data in the block cache


U, R, F, C = SpanState.UNREQUESTED, SpanState.REQUESTED, SpanState.FETCHED, SpanState.UNCOMPRESSED

TRANSITIONS: Mapping[tuple[SpanState, SpanState], str] = MappingProxyType(
    {
        # A reader (or the background fetcher) claims the span and creates its attempt; from here on
        # every other reader of the span waits for that attempt instead of fetching.
        (U, R): "claimed: one fetch in flight, later readers wait on its Event",
        # The span's bytes arrived with the right length and sha256 (possibly after a refetch).
        (R, F): "compressed bytes verified; the same attempt inflates them",
        # Fetch failed for good (timeout, registry unreachable, digest mismatch after the refetches) or
        # the fetching task was cancelled: the attempt ends with the error, the next read starts afresh.
        (R, U): "fetch failed or cancelled; the next read tries again",
        # Inflated (gzip) or sliced (tar) and stored in the block cache; the attempt hands the data to its
        # waiters and ends.
        (F, C): "inflated and cached",
        # Inflate failed (the verified bytes do not decode: a broken zTOC) or was cancelled; the compressed
        # bytes are dropped with the attempt.
        (F, U): "inflate failed or cancelled; compressed bytes dropped",
        # The block cache no longer has the span: evicted by its size bound, or dropped as corrupt.
        (C, U): "cache entry gone (evicted or corrupt); fetch again",
        # The block cache already had the span: written by an earlier run (restart) or by another
        # RemoteLayer over the same blob.
        (U, C): "found in the block cache",
    }
)


def check_transition(old: SpanState, new: SpanState) -> str:
    """The comment of edge ``old -> new``.

    Raises:
        FailedPrecondition: the edge is not in :data:`TRANSITIONS`.
    """
    try:
        return TRANSITIONS[(old, new)]
    except KeyError:
        raise FailedPrecondition(f"illegal span transition {old.value} -> {new.value}") from None


def coalesce(
    spans: Sequence[int], ranges: Sequence[tuple[int, int]], max_bytes: int
) -> list[tuple[int, int]]:
    """Group span ids into range requests: runs of consecutive ids whose compressed bytes fit ``max_bytes``.

    Args:
        spans: span ids, sorted ascending, no duplicates.
        ranges: ``[cs, ce)`` of every span of the layer, indexed by span id.
        max_bytes: the largest request; a single span larger than this is still fetched alone.

    Returns:
        ``(first, last)`` span ids (inclusive) of each request, in order.
    """
    runs: list[tuple[int, int]] = []
    for s in spans:
        if runs:
            first, last = runs[-1]
            if s == last + 1 and ranges[s][1] - ranges[first][0] <= max_bytes:
                runs[-1] = (first, s)
                continue
        runs.append((s, s))
    return runs


def backoff_seconds(attempt: int, min_wait_msec: int, max_wait_msec: int) -> float:
    """Exponential backoff for retry ``attempt`` (0-based): ``min * 2**attempt`` capped at ``max``."""
    return min(min_wait_msec * (2**attempt), max_wait_msec) / 1000.0


@dataclass(frozen=True)
class SpanConfig:
    """How spans are fetched. See the module docstring for where each value comes from.

    Attributes:
        fetch_timeout_sec: bound on one fetch of a span or run of spans, retries included (``[blob]
            fetching_timeout_sec``, 300).
        fetch_retries: extra attempts after a transient failure (``Unavailable``/``OSError``), within the
            timeout. The registry client retries on its own, so this is small.
        retry_min_wait_msec, retry_max_wait_msec: backoff between those attempts (``[blob]`` waits).
        verification_retries: refetches after a span digest mismatch before ``FormatError``.
        max_coalesce_bytes: the largest range request made of adjacent spans one read needs.
        fetch_threads: concurrent fetch threads (per limiter; share a limiter across layers to bound the
            daemon).
        inflate_threads: concurrent inflate threads (default: the CPU count).
    """

    fetch_timeout_sec: float = 300.0
    fetch_retries: int = 2
    retry_min_wait_msec: int = 30
    retry_max_wait_msec: int = 2000
    verification_retries: int = 1
    max_coalesce_bytes: int = 8 * MIB
    fetch_threads: int = 16
    inflate_threads: int = 0

    def __post_init__(self) -> None:
        if self.fetch_timeout_sec <= 0:
            raise InvalidArgument(f"fetch_timeout_sec must be positive, got {self.fetch_timeout_sec}")
        if self.fetch_retries < 0 or self.verification_retries < 0:
            raise InvalidArgument("fetch_retries and verification_retries must not be negative")
        if self.max_coalesce_bytes < 0 or self.fetch_threads <= 0 or self.inflate_threads < 0:
            raise InvalidArgument("max_coalesce_bytes, fetch_threads and inflate_threads are out of range")

    @classmethod
    def from_blob_section(cls, blob: Any, **overrides: Any) -> SpanConfig:
        """From a ``[blob]`` table (``soci_grpc.config.BlobSection`` or any object with those attributes)."""
        retries = int(getattr(blob, "max_span_verification_retries", 0))
        values: dict[str, Any] = {
            "fetch_timeout_sec": float(getattr(blob, "fetching_timeout_sec", 300) or 300),
            "verification_retries": 3 if retries < 0 else retries,
            "retry_min_wait_msec": int(getattr(blob, "min_wait_msec", 30) or 30),
            "retry_max_wait_msec": int(getattr(blob, "max_wait_msec", 2000) or 2000),
        }
        values.update(overrides)
        return cls(**values)


class _Attempt:
    """One fetch of one span. ``done`` is set exactly once; then exactly one of ``data``/``error`` is set,
    or ``cancelled`` is true (the fetching task was cancelled: waiters retry on their own)."""

    __slots__ = ("cancelled", "data", "done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: SociError | None = None
        self.cancelled = False


class _Span:
    __slots__ = ("attempt", "seen", "state")

    def __init__(self, state: SpanState) -> None:
        self.state = state
        self.attempt: _Attempt | None = None
        self.seen = state is C  # fetched (or found cached) at least once: counts towards fetchedSize


_TRANSIENT = (Unavailable, OSError)


def _copy_error(exc: SociError) -> SociError:
    """A fresh exception of the same type for another waiter (one object must not be raised twice)."""
    try:
        new = type(exc)(*exc.args)
    except Exception:  # an unusual constructor: fall back to the base type
        new = SociError(str(exc))
    new.__cause__ = exc
    return new


class RemoteLayer:
    """The lazily loaded data of one layer: ``await read(offset, length)`` over its uncompressed tar.

    Args:
        spans: the layer's span arithmetic and decoder (its ``fetch`` is not used; see ``fetch``).
        fetch: ``fetch(start, end) -> bytes`` of the compressed blob; blocking, run in a worker thread.
        digest: the layer blob digest: the block cache key and the name in messages.
        cache: the block cache (shared by all layers).
        config: fetch/retry/coalescing settings.
        fetch_limiter, inflate_limiter: thread limiters, normally shared daemon-wide; default: per layer,
            sized from ``config``.
        metrics: optional ``metrics(name, value)`` hook (``span_fetch_seconds``, ``span_fetch_bytes``,
            ``cache_hit``, ``digest_mismatch``, ``fetch_error``).
        run_sync: runs blocking work off the loop; default ``trio.to_thread.run_sync``. Tests inject an inline
            runner so that trio's autojump clock sees no threads.

    All methods are for the trio thread. Errors from :meth:`read`: ``InvalidArgument`` (range outside the
    layer), ``Unavailable`` (registry unreachable until the timeout; retryable), ``FormatError`` (digest
    mismatch after the refetches, undecodable span), ``FailedPrecondition`` (layer closed), and whatever
    non-retryable ``SociError`` the fetch raised (``Unauthenticated``, ``NotFound``).
    """

    def __init__(
        self,
        spans: LayerSpans,
        fetch: Fetch,
        digest: str,
        cache: BlockCache,
        *,
        config: SpanConfig | None = None,
        fetch_limiter: trio.CapacityLimiter | None = None,
        inflate_limiter: trio.CapacityLimiter | None = None,
        metrics: Metrics | None = None,
        run_sync: RunSync | None = None,
    ) -> None:
        self.config = config or SpanConfig()
        self._run_sync: RunSync = run_sync or trio.to_thread.run_sync
        self.layer = spans
        self.digest = digest
        self.cache = cache
        self._fetch = fetch
        self._fetch_limiter = fetch_limiter or trio.CapacityLimiter(self.config.fetch_threads)
        self._inflate_limiter = inflate_limiter or trio.CapacityLimiter(
            self.config.inflate_threads or os.cpu_count() or 1
        )
        self._metrics = metrics
        self.read_listeners: list[Callable[[], None]] = []
        self.closed = False
        n = spans.max_span_id + 1
        self._c = [spans.compressed_range(i) for i in range(n)]
        self._u = [spans.uncompressed_range(i) for i in range(n)]
        self.size = spans.uncompressed_size
        cached = cache.cached_spans(digest)
        self._spans = [_Span(C if i in cached else U) for i in range(n)]
        self._stats = dict.fromkeys(
            (
                "reads",
                "spans_fetched",
                "bytes_fetched",
                "requests",
                "cache_hits",
                "disk_reads",
                "retries",
                "digest_mismatches",
                "fetch_errors",
                "inflate_errors",
                "cache_refetches",
            ),
            0,
        )
        self._inflight = 0

    # ---- construction

    @classmethod
    async def open(
        cls,
        ztoc: Any,
        fetch: Fetch,
        digest: str,
        cache: BlockCache,
        *,
        check_header: bool = True,
        **kw: Any,
    ) -> RemoteLayer:
        """Open a layer from its zTOC (see ``LayerSpans.from_ztoc``).

        The gzip header ``[0, cs_0)`` is fetched (in a thread, within the fetch timeout) and checked unless
        ``check_header`` is false or every span is already in the block cache (a fully cached layer needs no
        network).

        Raises:
            FormatError: bad zTOC values or gzip header.
            Unavailable: the header fetch did not complete within the timeout.
        """
        spans = LayerSpans.from_ztoc(ztoc, fetch, check_header=False)
        self = cls(spans, fetch, digest, cache, **kw)
        if check_header and spans.is_gzip and any(s.state is not C for s in self._spans):
            with trio.move_on_after(self.config.fetch_timeout_sec) as scope:
                try:
                    await self._run_sync(
                        spans.check_header, limiter=self._fetch_limiter, abandon_on_cancel=True
                    )
                except _TRANSIENT as exc:
                    raise Unavailable(f"layer {digest}: cannot fetch the gzip header: {exc}") from exc
            if scope.cancelled_caught:
                raise Unavailable(
                    f"layer {digest}: gzip header fetch did not complete within "
                    f"{self.config.fetch_timeout_sec:g} s"
                )
        return self

    # ---- introspection

    @property
    def span_count(self) -> int:
        return len(self._spans)

    def state(self, span: int) -> SpanState:
        """Current state of ``span``."""
        return self._spans[span].state

    def states(self) -> list[SpanState]:
        return [s.state for s in self._spans]

    def fetched_size(self) -> int:
        """Bytes of the blob fetched so far (or found cached): the union of those spans' compressed ranges."""
        total = 0
        end = 0
        for sp, (cs, ce) in zip(self._spans, self._c, strict=True):
            if sp.seen:
                lo = max(cs, end)
                if ce > lo:
                    total += ce - lo
                end = max(end, ce)
        return total

    def fetched_percent(self) -> float:
        size = self.layer.compressed_size
        return 100.0 if size == 0 else 100.0 * self.fetched_size() / size

    def statistics(self) -> dict[str, Any]:
        """Counters: reads, spans_fetched, bytes_fetched, requests, cache_hits, in_flight, states, percent."""
        out: dict[str, Any] = dict(self._stats)
        out["in_flight"] = self._inflight
        counts = dict.fromkeys((s.value for s in SpanState), 0)
        for sp in self._spans:
            counts[sp.state.value] += 1
        out["states"] = counts
        out["spans"] = len(self._spans)
        out["fetched_size"] = self.fetched_size()
        out["fetched_percent"] = self.fetched_percent()
        return out

    def next_unfetched(self, start: int = 0) -> int | None:
        """The first span at or after ``start`` that is ``unrequested`` and not in the cache, or ``None``."""
        for i in range(start, len(self._spans)):
            if self._spans[i].state is U and not self.cache.contains(self.digest, i):
                return i
        return None

    def close(self) -> None:
        """Mark the layer closed: later reads raise ``FailedPrecondition``; in-flight fetches finish."""
        self.closed = True

    # ---- state changes

    def _move(self, span: int, new: SpanState) -> None:
        sp = self._spans[span]
        check_transition(sp.state, new)
        if new is R:
            self._inflight += 1
        elif sp.state in (R, F) and new in (U, C):
            self._inflight -= 1
        if new is C:
            sp.seen = True
        sp.state = new

    def _claim(self, span: int) -> _Attempt:
        att = _Attempt()
        self._move(span, R)
        self._spans[span].attempt = att
        return att

    def _finish(
        self, span: int, data: bytes | None, error: SociError | None, cancelled: bool = False
    ) -> None:
        sp = self._spans[span]
        att = sp.attempt
        assert att is not None and sp.state in (R, F)
        self._move(span, C if data is not None else U)
        att.data, att.error, att.cancelled = data, error, cancelled
        sp.attempt = None
        att.done.set()

    def _metric(self, name: str, value: float) -> None:
        if self._metrics is not None:
            try:
                self._metrics(name, value)
            except Exception:
                log.exception("metrics hook failed for %s", name)

    # ---- reads

    async def read(self, offset: int, length: int) -> bytes | memoryview | bytearray:
        """Exactly ``length`` bytes of the uncompressed tar at ``offset``.

        Raises:
            InvalidArgument: the range is outside the layer.
            FailedPrecondition: the layer is closed.
            Unavailable / FormatError / other SociError: see the class docstring.
        """
        if self.closed:
            raise FailedPrecondition(f"layer {self.digest} is closed")
        end = offset + length
        if offset < 0 or length < 0 or end > self.size:
            raise InvalidArgument(
                f"layer {self.digest}: read [{offset}, {end}) is outside its {self.size} bytes"
            )
        self._stats["reads"] += 1
        for listener in self.read_listeners:
            listener()
        if length == 0:
            return b""
        first = self.layer.span_of(offset)
        last = self.layer.span_of(end - 1)
        pieces: list[Any] = []
        missing: list[int] = []
        for s in range(first, last + 1):
            us, _ = self._u[s]
            lo = max(offset, us) - us
            hi = min(end, self._u[s][1]) - us
            data = self.cache.get_memory(self.digest, s)
            if data is not None:
                pieces.append(memoryview(data)[lo:hi])
            else:
                pieces.append(None)
                missing.append(s)
        self._stats["cache_hits"] += len(pieces) - len(missing)
        if missing and all(
            self._spans[s].state in (U, C) and self.cache.contains(self.digest, s) for s in missing
        ):
            # Warm disk tier: all missing pieces in one thread hop; misses fall through to _fill.
            got = await self._run_sync(self._read_disk, missing, offset, end, limiter=self._inflate_limiter)
            self._stats["disk_reads"] += len(missing)
            still = []
            for s, view in zip(missing, got, strict=True):
                if view is None:
                    still.append(s)
                    continue
                pieces[s - first] = view
                self._stats["cache_hits"] += 1
                if self._spans[s].state is U:
                    self._move(s, C)
            missing = still
        if missing:
            await self._fill(missing, pieces, first, offset, end)
        if len(pieces) == 1:
            return pieces[0]
        out = bytearray(length)
        gather(pieces, out)
        return out

    def _read_disk(self, spans: list[int], offset: int, end: int) -> list[bytes | memoryview | None]:
        """Worker thread: the pieces of ``spans`` that ``[offset, end)`` needs, from the block cache."""
        out: list[bytes | memoryview | None] = []
        for s in spans:
            us, ue = self._u[s]
            lo, hi = max(offset, us) - us, min(end, ue) - us
            out.append(self.cache.read(self.digest, s, lo, hi - lo))
        return out

    async def _fill(self, missing: list[int], pieces: list[Any], first: int, offset: int, end: int) -> None:
        claimed = [
            s for s in missing if self._spans[s].state is U and not self.cache.contains(self.digest, s)
        ]
        attempts = {s: self._claim(s) for s in claimed}
        runs = coalesce(claimed, self._c, self.config.max_coalesce_bytes)
        errors: list[SociError] = []

        async def piece(s: int) -> None:
            us, ue = self._u[s]
            lo, hi = max(offset, us) - us, min(end, ue) - us
            try:
                pieces[s - first] = await self._piece(s, lo, hi, attempts.get(s))
            except SociError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for a, b in runs:
                nursery.start_soon(self._fetch_run, a, b, [attempts[s] for s in range(a, b + 1)])
            for s in missing:
                nursery.start_soon(piece, s)
        if errors:
            raise errors[0]

    async def _piece(self, s: int, lo: int, hi: int, att: _Attempt | None = None) -> bytes | memoryview:
        """Bytes ``[lo, hi)`` of span ``s``: wait for an attempt, read the cache, or fetch it alone.

        The data of an attempt this reader waited for is used directly, so a span the cache cannot hold
        (smaller memory bound, no disk tier) is still served once fetched.
        """
        while True:
            sp = self._spans[s]
            if att is None and sp.state in (R, F):
                att = sp.attempt
            if att is not None:
                await att.done.wait()
                if att.data is not None:
                    return memoryview(att.data)[lo:hi]
                if att.error is not None:
                    raise _copy_error(att.error)
                att = None  # cancelled attempt: look again
                continue
            data = self.cache.get_memory(self.digest, s)
            if data is not None:
                self._stats["cache_hits"] += 1
                return memoryview(data)[lo:hi]
            if self.cache.contains(self.digest, s):
                got = await self._run_sync(  # disk + checksums: the CPU-bound limiter
                    self.cache.read, self.digest, s, lo, hi - lo, limiter=self._inflate_limiter
                )
                self._stats["disk_reads"] += 1
                if got is not None:
                    if sp.state is U:
                        self._move(s, C)
                    self._stats["cache_hits"] += 1
                    self._metric("cache_hit", 1)
                    return got
                continue  # evicted or corrupt meanwhile; the state may have moved too: look again
            if sp.state is C:
                self._stats["cache_refetches"] += 1
                self._move(s, U)
            att = self._claim(s)
            await self._fetch_run(s, s, [att])

    # ---- background

    async def prefetch(self, span: int) -> bool:
        """Fetch ``span`` into the cache if nobody has it yet (the background fetcher's step).

        Returns:
            True if this call fetched the span, False if it was already cached or in flight.

        Raises:
            SociError: the fetch failed (see :meth:`read`).
        """
        sp = self._spans[span]
        if self.closed or sp.state is not U:
            return False
        if self.cache.contains(self.digest, span):
            self._move(span, C)
            return False
        att = self._claim(span)
        await self._fetch_run(span, span, [att])
        if att.error is not None:
            raise _copy_error(att.error)
        return att.data is not None

    # ---- fetching

    async def _fetch_run(self, a: int, b: int, attempts: list[_Attempt]) -> None:
        """Fetch spans ``a..b`` (claimed, state requested) and finish each attempt. Raises only Cancelled."""
        ids = range(a, b + 1)
        try:
            results = await self._fetch_verified(a, b)
        except trio.Cancelled:
            for s in ids:
                self._finish(s, None, None, cancelled=True)
            raise
        async with trio.open_nursery() as nursery:
            for s in ids:
                res = results[s]
                if isinstance(res, SociError):
                    self._finish(s, None, res)
                else:
                    self._move(s, F)
                    nursery.start_soon(self._inflate, s, res)

    async def _inflate(self, s: int, compressed: bytes) -> None:
        try:
            data = await self._run_sync(
                self._decode_and_store, s, compressed, limiter=self._inflate_limiter, abandon_on_cancel=True
            )
        except trio.Cancelled:
            self._finish(s, None, None, cancelled=True)
            raise
        except SociError as exc:
            self._stats["inflate_errors"] += 1
            log.error("layer %s span %d: %s", self.digest, s, exc)
            self._finish(s, None, exc)
            return
        self._finish(s, data, None)

    def _decode_and_store(self, s: int, compressed: bytes) -> bytes:
        """Worker thread: inflate (or slice) and put into the block cache."""
        data = self.layer.decode_span(s, compressed)
        self.cache.put(self.digest, s, data)
        return data

    async def _fetch_verified(self, a: int, b: int) -> dict[int, bytes | SociError]:
        """Verified compressed bytes of spans ``a..b``, or the error for each span that failed."""
        cfg = self.config
        results: dict[int, bytes | SociError] = {}
        tries = dict.fromkeys(range(a, b + 1), 0)
        pending = [(a, b)]
        started = trio.current_time()
        with trio.move_on_after(cfg.fetch_timeout_sec) as scope:
            while pending:
                x, y = pending.pop()
                try:
                    good, bad = await self._fetch_range(x, y)
                except SociError as exc:
                    self._stats["fetch_errors"] += 1
                    self._metric("fetch_error", 1)
                    log.warning("layer %s spans %d-%d: fetch failed: %s", self.digest, x, y, exc)
                    for s in range(x, y + 1):
                        results[s] = exc
                    continue
                results.update(good)
                for s, got in bad.items():
                    want = self.layer.span_digests[s]
                    self._stats["digest_mismatches"] += 1
                    self._metric("digest_mismatch", 1)
                    tries[s] += 1
                    if tries[s] <= cfg.verification_retries:
                        log.warning(
                            "layer %s span %d: span digests do not match (expected %s, got %s); refetching",
                            self.digest,
                            s,
                            want,
                            got,
                        )
                        pending.append((s, s))
                    else:
                        err = FormatError(
                            f"layer {self.digest} span {s}: span digests do not match: expected {want}, "
                            f"got {got} (after {tries[s]} fetches)"
                        )
                        log.error("%s", err)
                        results[s] = err
        if scope.cancelled_caught:
            self._stats["fetch_errors"] += 1
            self._metric("fetch_error", 1)
            cs, ce = self._c[a][0], self._c[b][1]
            log.warning(
                "layer %s spans %d-%d: fetch of [%d, %d) did not complete within %g s",
                self.digest,
                a,
                b,
                cs,
                ce,
                cfg.fetch_timeout_sec,
            )
            for s in range(a, b + 1):
                results.setdefault(
                    s,
                    Unavailable(
                        f"layer {self.digest} span {s}: fetch of [{cs}, {ce}) did not complete within "
                        f"{cfg.fetch_timeout_sec:g} s"
                    ),
                )
        self._metric("span_fetch_seconds", trio.current_time() - started)
        return results

    async def _fetch_range(self, x: int, y: int) -> tuple[dict[int, bytes], dict[int, str]]:
        """One range request for spans ``x..y`` with transient retries: (verified bytes, bad digests)."""
        cfg = self.config
        attempt = 0
        while True:
            self._stats["requests"] += 1
            try:
                good, bad = await self._run_fetch(self._fetch_and_check, x, y)
            except FormatError:
                raise
            except _TRANSIENT as exc:
                if attempt >= cfg.fetch_retries:
                    cs, ce = self._c[x][0], self._c[y][1]
                    raise Unavailable(
                        f"layer {self.digest} spans {x}-{y}: fetch of [{cs}, {ce}) failed "
                        f"after {attempt + 1} attempt(s): {exc}"
                    ) from exc
                self._stats["retries"] += 1
                wait = backoff_seconds(attempt, cfg.retry_min_wait_msec, cfg.retry_max_wait_msec)
                log.debug("layer %s spans %d-%d: retry in %.3f s after %s", self.digest, x, y, wait, exc)
                attempt += 1
                await trio.sleep(wait)
                continue
            except SociError:
                raise
            except Exception as exc:  # a fetch callable failing in an unexpected way: not retryable
                raise Unavailable(f"layer {self.digest} spans {x}-{y}: fetch failed: {exc!r}") from exc
            nbytes = self._c[y][1] - self._c[x][0]
            self._stats["bytes_fetched"] += nbytes
            self._stats["spans_fetched"] += len(good)
            self._metric("span_fetch_bytes", nbytes)
            return good, bad

    async def _run_fetch(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._run_sync(
            functools.partial(fn, *args), limiter=self._fetch_limiter, abandon_on_cancel=True
        )

    def _fetch_and_check(self, x: int, y: int) -> tuple[dict[int, bytes], dict[int, str]]:
        """Worker thread: one ``fetch`` of ``[cs_x, ce_y)``, split per span, length and sha256 checked."""
        cs, ce = self._c[x][0], self._c[y][1]
        t0 = time.perf_counter()
        raw = self._fetch(cs, ce)
        if len(raw) != ce - cs:
            raise FormatError(
                f"layer {self.digest} spans {x}-{y}: fetch of [{cs}, {ce}) returned {len(raw)} bytes, "
                f"expected {ce - cs}"
            )
        view = memoryview(raw)
        good: dict[int, bytes] = {}
        bad: dict[int, str] = {}
        for s in range(x, y + 1):
            s0, s1 = self._c[s]
            part = raw if x == y else bytes(view[s0 - cs : s1 - cs])
            got = "sha256:" + hashlib.sha256(part).hexdigest()
            if got == self.layer.span_digests[s]:
                good[s] = part
            else:
                bad[s] = got
        log.debug(
            "layer %s spans %d-%d: fetched [%d, %d) in %.1f ms",
            self.digest,
            x,
            y,
            cs,
            ce,
            (time.perf_counter() - t0) * 1000,
        )
        return good, bad
