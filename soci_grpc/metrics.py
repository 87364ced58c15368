"""The daemon's Prometheus metrics: metric types, a registry, the daemon's metric set and the HTTP endpoint.

Owns:

* :class:`Counter`, :class:`Gauge` and :class:`Histogram`: families with fixed label names whose children
  (``family.labels(op="read")``) count, set and observe from any thread. Each family has one lock; an
  update is a dict lookup and a locked add. A family without labels is updated directly (``c.inc()``).
* :class:`Registry`: registered families (a name, or a sample name a histogram generates, is taken once),
  collectors (callbacks run at scrape time for values read from live objects) and :meth:`Registry.render`,
  the Prometheus text exposition format 0.0.4. A collector that raises is logged at WARNING, once per
  scrape, and left out of that scrape; the rest still renders.
* :class:`DaemonMetrics`: the daemon's metric set, with one typed method per event so that each call site
  is one line (``m.fallback("no_ztoc")``). It keeps upstream's families (cli-and-config.md §5:
  ``soci_fs_operation_count``, ``soci_fs_operation_duration_milliseconds`` / ``_microseconds``,
  ``soci_fs_bytes_served``, ``soci_fs_image_operation_count_key``, ``soci_fs_layer_fetched_size_bytes``,
  ``soci_fs_layer_size_bytes``) with upstream's ``operation_type`` values, so dashboards written for
  upstream keep working, and adds ours beside them (``soci_fuse_*``, ``soci_fetch*``, ``soci_cache_*``,
  ``soci_registry_*``, ``soci_credential_source_hits_total``, ``soci_fallbacks_total``, ...). Where an
  event has both, the method updates both.
* :class:`MetricsServer`: ``GET /metrics`` over HTTP/1.1 on TCP (``host:port``; port 0 picks one) or a unix
  socket (``unix:/path``, or a path with ``network="unix"`` as upstream's ``metrics_network``), in a daemon
  thread; :func:`from_config` starts it from ``metrics_address`` / ``metrics_network`` / ``no_prometheus``.

Deliberate differences from upstream: no ``go_*``/``process_*``/``promhttp_*`` families; the per-image FUSE
operation counts and the background work-queue size are *added to* their gauge, as upstream does, but our
own ``soci_background_fetch_queue_layers`` gauge is *set*; the FUSE failure counters of upstream
(``fuse_node_getattr_failure_count``, ...) are derived from pyfuse3 operation names, which do not tell a
node from a file or a whiteout (``getattr`` counts as ``fuse_node_getattr_failure_count``).

Will not: depend on ``prometheus_client`` (tests parse with it; the runtime does not), push metrics,
render the OpenMetrics format, compress responses, log requests above DEBUG, or log label values that could
hold secrets (callers pass hosts, digests and reasons, never credentials).
"""

from __future__ import annotations

import bisect
import errno as errno_mod
import http.server
import itertools
import logging
import math
import os
import re
import socket
import socketserver
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple
from urllib.parse import urlsplit

from soci_fs.errors import InvalidArgument

if TYPE_CHECKING:
    from soci_grpc.config import Config

__all__ = [
    "CONTENT_TYPE",
    "CollectedFamily",
    "Counter",
    "DaemonMetrics",
    "Gauge",
    "Histogram",
    "LayerStat",
    "MetricsServer",
    "Registry",
    "Sample",
    "format_value",
    "from_config",
]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Content-Type of the text exposition format 0.0.4."""

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_LABEL_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})
_HELP_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n"})
_TYPES = ("counter", "gauge", "histogram", "untyped")
_EXACT_INT = 2**53  # floats at or above this are not written as integers


# ---------------------------------------------------------------------------------------------------------
# values and text


class Sample(NamedTuple):
    """One exposition line: ``name{labels} value``."""

    name: str
    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True)
class CollectedFamily:
    """A family as a collector (or a registered metric at scrape time) reports it.

    ``type`` is ``counter``, ``gauge``, ``histogram`` or ``untyped``. Each sample's name is the family
    name or, for a histogram, the name with ``_bucket``, ``_sum`` or ``_count`` (a counter may also use
    ``_total``).
    """

    name: str
    type: str
    help: str
    samples: Sequence[Sample]


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it: integers without ``.0``; ``+Inf``, ``-Inf``, ``NaN``."""
    if isinstance(value, int):
        return str(int(value))  # int(): a bool is written 1/0
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < _EXACT_INT:
        return str(int(value))
    return repr(float(value))  # the shortest text that reads back to the same float; Go parses it


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _METRIC_NAME.match(name):
        raise InvalidArgument(f"metric name {name!r}: not a valid Prometheus metric name")


def _check_labelnames(name: str, labelnames: Sequence[str], reserved: Sequence[str] = ()) -> tuple[str, ...]:
    if isinstance(labelnames, str):
        raise InvalidArgument(f"metric {name!r}: label names must be a sequence of names, not one string")
    names = tuple(labelnames)
    for label in names:
        if not isinstance(label, str) or not _LABEL_NAME.match(label) or label.startswith("__"):
            raise InvalidArgument(
                f"metric {name!r}: label name {label!r} is not a valid Prometheus label name"
            )
        if label in reserved:
            raise InvalidArgument(f"metric {name!r}: label name {label!r} is reserved for this metric type")
    if len(set(names)) != len(names):
        raise InvalidArgument(f"metric {name!r}: duplicate label names in {names!r}")
    return names


def _render_labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).translate(_LABEL_ESCAPES)}"' for k, v in labels.items())
    return "{" + inner + "}"


def _sample_names(name: str, type_: str) -> tuple[str, ...]:
    """The sample names a family of ``type_`` may write (all are taken in a registry)."""
    if type_ == "histogram":
        return (name, f"{name}_bucket", f"{name}_sum", f"{name}_count")
    if type_ == "counter":
        return (name, f"{name}_total") if not name.endswith("_total") else (name,)
    return (name,)


def _render_family(fam: CollectedFamily, out: list[str]) -> None:
    """Append the text of ``fam`` to ``out``; raises ``InvalidArgument`` for a malformed family."""
    _check_name(fam.name)
    if fam.type not in _TYPES:
        raise InvalidArgument(f"metric {fam.name!r}: unknown type {fam.type!r}")
    allowed = _sample_names(fam.name, fam.type)
    lines = [f"# HELP {fam.name} {fam.help.translate(_HELP_ESCAPES)}", f"# TYPE {fam.name} {fam.type}"]
    for s in fam.samples:
        if s.name not in allowed:
            raise InvalidArgument(f"metric {fam.name!r}: sample name {s.name!r} does not belong to it")
        for label in s.labels:
            if not _LABEL_NAME.match(label):
                raise InvalidArgument(f"metric {fam.name!r}: label name {label!r} is not valid")
        value = s.value
        if not isinstance(value, int | float):
            raise InvalidArgument(f"metric {fam.name!r}: sample value {value!r} is not a number")
        lines.append(f"{s.name}{_render_labels(s.labels)} {format_value(value)}")
    out.extend(lines)


# ---------------------------------------------------------------------------------------------------------
# metric families


class _Family:
    """The shared part of the three metric types: label handling, children, one lock."""

    type: ClassVar[str] = ""
    _reserved_labels: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        _check_name(name)
        self.name = name
        self.help = help
        self.labelnames = _check_labelnames(name, labelnames, self._reserved_labels)
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], Any] = {}
        if not self.labelnames:
            self._children[()] = self._new_child()

    def _new_child(self) -> Any:
        raise NotImplementedError

    def _key(self, values: tuple[Any, ...], kw: Mapping[str, Any]) -> tuple[str, ...]:
        if values and kw:
            raise InvalidArgument(f"metric {self.name!r}: give label values by position or by name, not both")
        if kw:
            if len(kw) != len(self.labelnames) or any(n not in kw for n in self.labelnames):
                raise InvalidArgument(
                    f"metric {self.name!r}: labels {sorted(kw)!r} do not match its label names "
                    f"{list(self.labelnames)!r}"
                )
            return tuple(str(kw[n]) for n in self.labelnames)
        if len(values) != len(self.labelnames):
            raise InvalidArgument(
                f"metric {self.name!r}: {len(values)} label value(s) given, its label names are "
                f"{list(self.labelnames)!r}"
            )
        return tuple(str(v) for v in values)

    def labels(self, *values: Any, **kw: Any) -> Any:
        """The child for these label values (by position in label-name order, or by name); made at first use.

        Values are turned into strings (``status=401`` is ``"401"``). Raises ``InvalidArgument`` when the
        names or the number of values do not match the family's label names.
        """
        key = self._key(values, kw)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.get(key)
                if child is None:
                    child = self._children[key] = self._new_child()
        return child

    def remove(self, *values: Any, **kw: Any) -> None:
        """Forget the child with these label values (a layer or host that went away); no error if absent."""
        key = self._key(values, kw)
        if not self.labelnames:
            raise InvalidArgument(f"metric {self.name!r} has no labels; there is no child to remove")
        with self._lock:
            self._children.pop(key, None)

    def _solo(self) -> Any:
        if self.labelnames:
            raise InvalidArgument(
                f"metric {self.name!r} has labels {list(self.labelnames)!r}; update it through .labels(...)"
            )
        return self._children[()]

    def _snapshot(self) -> list[tuple[tuple[str, ...], Any]]:
        """(label values, copied state) per child, sorted by label values; taken under the lock."""
        with self._lock:
            items = [(k, c._state()) for k, c in self._children.items()]
        items.sort(key=lambda kv: kv[0])
        return items

    def collect(self) -> CollectedFamily:
        """The family's current samples."""
        samples: list[Sample] = []
        for key, state in self._snapshot():
            self._samples(dict(zip(self.labelnames, key, strict=True)), state, samples)
        return CollectedFamily(self.name, self.type, self.help, samples)

    def _samples(self, labels: dict[str, str], state: Any, out: list[Sample]) -> None:
        out.append(Sample(self.name, labels, state))


class _CounterChild:
    __slots__ = ("_lock", "_value")

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._value: float = 0

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (>= 0)."""
        if amount < 0:
            raise InvalidArgument(f"counter increment {amount!r}: counters only go up")
        with self._lock:
            self._value += amount

    def get(self) -> float:
        """The current value."""
        with self._lock:
            return self._value

    def _state(self) -> float:
        return self._value


class Counter(_Family):
    """A value that only goes up (``inc``). Its name is written as given (``_total`` is not appended)."""

    type = "counter"

    def _new_child(self) -> _CounterChild:
        return _CounterChild(self._lock)

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (>= 0) to a family without labels."""
        self._solo().inc(amount)

    def get(self) -> float:
        """The value of a family without labels."""
        return self._solo().get()


class _GaugeChild:
    __slots__ = ("_lock", "_value")

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._value: float = 0

    def set(self, value: float) -> None:
        """Set the value."""
        with self._lock:
            self._value = value

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (may be negative)."""
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1) -> None:
        """Subtract ``amount``."""
        with self._lock:
            self._value -= amount

    def get(self) -> float:
        """The current value."""
        with self._lock:
            return self._value

    def _state(self) -> float:
        return self._value


class Gauge(_Family):
    """A value that goes up and down (``set``, ``inc``, ``dec``)."""

    type = "gauge"

    def _new_child(self) -> _GaugeChild:
        return _GaugeChild(self._lock)

    def set(self, value: float) -> None:
        """Set a family without labels."""
        self._solo().set(value)

    def inc(self, amount: float = 1) -> None:
        """Add to a family without labels."""
        self._solo().inc(amount)

    def dec(self, amount: float = 1) -> None:
        """Subtract from a family without labels."""
        self._solo().dec(amount)

    def get(self) -> float:
        """The value of a family without labels."""
        return self._solo().get()


class _HistogramChild:
    __slots__ = ("_bounds", "_counts", "_lock", "_sum")

    def __init__(self, lock: threading.Lock, bounds: tuple[float, ...]) -> None:
        self._lock = lock
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self._sum: float = 0

    def observe(self, value: float) -> None:
        """Record one observation (it falls in the first bucket whose upper bound is >= ``value``)."""
        i = len(self._bounds) if value != value else bisect.bisect_left(self._bounds, value)  # NaN: +Inf
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def _state(self) -> tuple[list[int], float]:
        return list(self._counts), self._sum


class Histogram(_Family):
    """Observations counted in buckets (``observe``); written as cumulative ``_bucket{le=...}`` lines
    ending with ``le="+Inf"``, then ``_sum`` and ``_count``.

    Args:
        buckets: the finite upper bounds, strictly increasing (``+Inf`` is added; giving it is allowed).
    """

    type = "histogram"
    _reserved_labels = ("le",)

    def __init__(
        self, name: str, help: str, labelnames: Sequence[str] = (), *, buckets: Sequence[float]
    ) -> None:
        bounds = [float(b) for b in buckets]
        if bounds and bounds[-1] == math.inf:
            bounds.pop()
        if not bounds or any(math.isnan(b) or math.isinf(b) for b in bounds):
            raise InvalidArgument(f"histogram {name!r}: buckets {list(buckets)!r} need finite upper bounds")
        if any(a >= b for a, b in itertools.pairwise(bounds)):
            raise InvalidArgument(
                f"histogram {name!r}: buckets {list(buckets)!r} are not strictly increasing"
            )
        self.buckets = tuple(bounds)
        self._le = (*(format_value(b) for b in bounds), "+Inf")
        super().__init__(name, help, labelnames)

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self._lock, self.buckets)

    def observe(self, value: float) -> None:
        """Record one observation in a family without labels."""
        self._solo().observe(value)

    def _samples(self, labels: dict[str, str], state: Any, out: list[Sample]) -> None:
        counts, total = state
        running = 0
        for le, n in zip(self._le, counts, strict=True):
            running += n
            out.append(Sample(f"{self.name}_bucket", {**labels, "le": le}, running))
        out.append(Sample(f"{self.name}_sum", labels, total))
        out.append(Sample(f"{self.name}_count", labels, running))


# ---------------------------------------------------------------------------------------------------------
# registry

Collector = Callable[[], Iterable[CollectedFamily]]
"""A scrape-time callback: returns whole families (name, type, help, samples) read from live objects."""


class Registry:
    """The families and collectors one endpoint serves. Safe to use from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, _Family] = {}
        self._taken: dict[str, str] = {}  # sample name -> family name
        self._collectors: list[Collector] = []

    def register(self, family: _Family) -> _Family:
        """Add ``family``; ``InvalidArgument`` if its name (or a sample name it writes) is taken."""
        names = _sample_names(family.name, family.type)
        with self._lock:
            for n in names:
                if n in self._taken:
                    raise InvalidArgument(
                        f"metric {family.name!r}: the name {n!r} is already used by metric {self._taken[n]!r}"
                    )
            self._families[family.name] = family
            for n in names:
                self._taken[n] = family.name
        return family

    def unregister(self, family: _Family) -> None:
        """Remove ``family`` (no error if it is not registered)."""
        with self._lock:
            if self._families.get(family.name) is family:
                del self._families[family.name]
                for n in _sample_names(family.name, family.type):
                    self._taken.pop(n, None)

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        """Make and register a :class:`Counter`."""
        c = Counter(name, help, labelnames)
        self.register(c)
        return c

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        """Make and register a :class:`Gauge`."""
        g = Gauge(name, help, labelnames)
        self.register(g)
        return g

    def histogram(
        self, name: str, help: str, labelnames: Sequence[str] = (), *, buckets: Sequence[float]
    ) -> Histogram:
        """Make and register a :class:`Histogram`."""
        h = Histogram(name, help, labelnames, buckets=buckets)
        self.register(h)
        return h

    def collector(self, fn: Collector) -> Collector:
        """Register ``fn``, called at each scrape; usable as a decorator. Returns ``fn``.

        Its families must not use a registered family's names or each other's; a collector that raises or
        returns a malformed family is logged at WARNING and left out of that scrape.
        """
        with self._lock:
            self._collectors.append(fn)
        return fn

    def remove_collector(self, fn: Collector) -> None:
        """Unregister ``fn`` (no error if it is not registered)."""
        with self._lock:
            if fn in self._collectors:
                self._collectors.remove(fn)

    def render(self) -> str:
        """The text exposition format 0.0.4: registered families in registration order, then collectors'."""
        with self._lock:
            families = list(self._families.values())
            collectors = list(self._collectors)
            taken = set(self._taken)
        out: list[str] = []
        for fam in families:
            _render_family(fam.collect(), out)
        for fn in collectors:
            part: list[str] = []
            try:
                got = list(fn())
                mine: set[str] = set()
                for fam in got:
                    names = _sample_names(fam.name, fam.type)
                    clash = next((n for n in names if n in taken or n in mine), None)
                    if clash is not None:
                        raise InvalidArgument(f"metric {fam.name!r}: the name {clash!r} is already used")
                    mine.update(names)
                    _render_family(fam, part)
            except Exception as exc:
                log.warning(
                    "metrics collector %s failed; its metrics are left out of this scrape: %s",
                    getattr(fn, "__qualname__", repr(fn)),
                    exc,
                )
                continue
            taken |= mine
            out.extend(part)
        return "\n".join(out) + "\n" if out else ""


# ---------------------------------------------------------------------------------------------------------
# the daemon's metric set

FUSE_DURATION_BUCKETS = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
"""Seconds, for ``soci_fuse_operation_duration_seconds``."""
UPSTREAM_MS_BUCKETS = tuple(float(1 << i) for i in range(15))
"""1, 2, 4, ..., 16384: upstream's ``soci_fs_operation_duration_milliseconds`` buckets."""
UPSTREAM_US_BUCKETS = tuple(float(1 << i) for i in range(11))
"""1, 2, 4, ..., 1024: upstream's ``soci_fs_operation_duration_microseconds`` buckets."""
MICROSECOND_OPERATIONS = frozenset({"node_readdir", "synchronous_read"})
"""Upstream operation types timed in microseconds; all others are timed in milliseconds."""
FETCH_KINDS = ("on_demand", "background")
CACHE_TIERS = ("memory", "disk")
MOUNT_MODES = ("lazy", "local")
FUSE_FAILURE_WINDOW_SEC = 300.0
"""``fuse_failure_state`` is bumped at most once per layer in this many seconds."""

_UPSTREAM_FUSE_FAILURE = {
    "getattr": "fuse_node_getattr_failure_count",
    "listxattr": "fuse_node_listxattr_failure_count",
    "lookup": "fuse_node_lookup_failure_count",
    "open": "fuse_node_open_failure_count",
    "opendir": "fuse_node_readdir_failure_count",
    "readdir": "fuse_node_readdir_failure_count",
    "read": "fuse_file_read_failure_count",
}
_UNKNOWN_FUSE_FAILURE = "fuse_unknown_operation_failure_count"


class LayerStat(NamedTuple):
    """One mounted lazy layer, for ``soci_fs_layer_fetched_size_bytes`` / ``soci_fs_layer_size_bytes``."""

    digest: str
    mountpoint: str
    fetched_bytes: int
    size_bytes: int


class DaemonMetrics:
    """The daemon's metrics on ``registry`` (a new :class:`Registry` when not given).

    Methods may be called from any thread and never block on I/O. Label values are hosts, digests,
    operation names and reasons; never pass anything that could hold a secret.

    Args:
        registry: where the families are registered.
        clock: monotonic seconds, for the ``fuse_failure_state`` window (tests pass a fake).
    """

    def __init__(self, registry: Registry | None = None, *, clock: Callable[[], float] = time.monotonic):
        self.registry = r = registry if registry is not None else Registry()
        self._clock = clock
        self._failure_lock = threading.Lock()
        self._last_failure_state: dict[str, float] = {}
        self._layer_source: Callable[[], Iterable[LayerStat]] | None = None

        # upstream's families (cli-and-config.md §5); `layer` is the layer digest, "" for daemon-wide
        ol = ("operation_type", "layer")
        self.fs_duration_ms = r.histogram(
            "soci_fs_operation_duration_milliseconds",
            "Duration of file system operations, in milliseconds (upstream family).",
            ol,
            buckets=UPSTREAM_MS_BUCKETS,
        )
        self.fs_duration_us = r.histogram(
            "soci_fs_operation_duration_microseconds",
            "Duration of fast file system operations, in microseconds (upstream family).",
            ol,
            buckets=UPSTREAM_US_BUCKETS,
        )
        self.fs_count = r.counter(
            "soci_fs_operation_count", "Counts of file system events by operation type (upstream family).", ol
        )
        self.fs_bytes_served = r.gauge(
            "soci_fs_bytes_served", "Bytes served by synchronous reads (upstream family).", ol
        )
        self.fs_image_ops = r.gauge(
            "soci_fs_image_operation_count_key",
            "FUSE operation counts per image, and the background fetch work queue size (upstream family).",
            ("operation_type", "image"),
        )
        self.fs_count.labels("background_fetch_work_queue_evicted", "").inc(0)
        r.collector(self._collect_layers)

        # ours
        self.fuse_ops = r.counter(
            "soci_fuse_operations_total", "FUSE operations answered, by operation.", ("operation",)
        )
        self.fuse_duration = r.histogram(
            "soci_fuse_operation_duration_seconds",
            "Time to answer a FUSE operation, in seconds.",
            ("operation",),
            buckets=FUSE_DURATION_BUCKETS,
        )
        self.fuse_errors = r.counter(
            "soci_fuse_operation_errors_total",
            "FUSE operations answered with an error, by operation and errno name.",
            ("operation", "errno"),
        )
        self.fetched_bytes = r.counter(
            "soci_fetched_bytes_total", "Compressed layer bytes fetched from registries."
        )
        self.fetched_spans = r.counter("soci_fetched_spans_total", "Spans fetched from registries.")
        self.fetch_requests = r.counter(
            "soci_fetch_requests_total",
            "Range requests for layer data, by kind (on_demand: a read waits; background).",
            ("kind",),
        )
        self.fetch_errors = r.counter(
            "soci_fetch_errors_total", "Span fetches that failed (after retries, or not retryable)."
        )
        self.digest_mismatches = r.counter(
            "soci_span_digest_mismatches_total", "Fetched spans whose digest did not match the zTOC."
        )
        self.cache_hits = r.counter(
            "soci_cache_hits_total", "Span reads answered by the block cache, by tier.", ("tier",)
        )
        self.cache_misses = r.counter(
            "soci_cache_misses_total", "Span reads the block cache could not answer."
        )
        self.background_remaining = r.gauge(
            "soci_background_fetch_remaining_spans", "Spans the background fetcher has still to fetch."
        )
        self.background_spans = r.counter(
            "soci_background_fetch_spans_total", "Spans fetched by the background fetcher."
        )
        self.background_failures = r.counter(
            "soci_background_fetch_failures_total", "Background span fetches that failed."
        )
        self.background_queue = r.gauge(
            "soci_background_fetch_queue_layers", "Layers waiting in the background fetch queue."
        )
        self.registry_responses = r.counter(
            "soci_registry_responses_total",
            "Registry HTTP responses, by host and status.",
            ("host", "status"),
        )
        self.token_refreshes = r.counter(
            "soci_registry_token_refreshes_total", "Registry bearer tokens fetched or refreshed.", ("host",)
        )
        self.credential_hits = r.counter(
            "soci_credential_source_hits_total",
            "Credential lookups, by the source that answered (none: no source did).",
            ("source",),
        )
        self.fallbacks = r.counter(
            "soci_fallbacks_total", "Layers not mounted lazily, by reason.", ("reason",)
        )
        self.mounted_layers = r.gauge(
            "soci_mounted_layers",
            "Layers currently mounted, by mode (lazy: FUSE; local: unpacked).",
            ("mode",),
        )
        self.images = r.gauge("soci_images", "Images with at least one mounted layer.")
        self.fuse_mount_failures = r.counter(
            "soci_fuse_mount_failure_count", "Lazy (FUSE) layer mounts that failed and fell back to local."
        )
        self.local_mount_failures = r.counter(
            "soci_local_mount_failure_count", "Local layer mounts (download and unpack) that failed."
        )
        for kind in FETCH_KINDS:
            self.fetch_requests.labels(kind)
        for tier in CACHE_TIERS:
            self.cache_hits.labels(tier)
        for mode in MOUNT_MODES:
            self.mounted_layers.labels(mode)

    # --- FUSE

    def fuse_op(self, operation: str, seconds: float) -> None:
        """One FUSE operation (a pyfuse3 name: ``lookup``, ``read``, ...) answered after ``seconds``."""
        self.fuse_ops.labels(operation).inc()
        self.fuse_duration.labels(operation).observe(seconds)

    def fuse_error(self, operation: str, err: int | str, layer: str = "") -> None:
        """A FUSE operation answered with errno ``err`` (a number or a name such as ``"EIO"``).

        An ``EIO`` (an internal failure) also counts in upstream's ``fuse_<op>_failure_count`` and, at most
        once per layer in :data:`FUSE_FAILURE_WINDOW_SEC`, in ``fuse_failure_state``.
        """
        name = errno_mod.errorcode.get(err, str(err)) if isinstance(err, int) else err
        self.fuse_errors.labels(operation, name).inc()
        if name != "EIO":
            return
        self.fs_count.labels(_UPSTREAM_FUSE_FAILURE.get(operation, _UNKNOWN_FUSE_FAILURE), layer).inc()
        now = self._clock()
        with self._failure_lock:
            last = self._last_failure_state.get(layer)
            if last is not None and now - last < FUSE_FAILURE_WINDOW_SEC:
                return
            self._last_failure_state[layer] = now
        self.fs_count.labels("fuse_failure_state", layer).inc()

    def image_fuse_op_counts(self, image: str, counts: Mapping[str, int]) -> None:
        """Per-image FUSE operation counts (upstream op names, ``node.Lookup``...); added, as upstream."""
        for op, n in counts.items():
            self.fs_image_ops.labels(op, image).inc(n)

    def sync_read(self, nbytes: int, seconds: float, layer: str = "") -> None:
        """A synchronous (on-demand) read served ``nbytes`` in ``seconds`` (upstream's synchronous_read)."""
        self.fs_count.labels("synchronous_read_count", layer).inc()
        self.fs_bytes_served.labels("synchronous_bytes_served", layer).inc(nbytes)
        self.fs_duration_us.labels("synchronous_read", layer).observe(seconds * 1e6)

    def fs_operation(self, operation_type: str, seconds: float, layer: str = "") -> None:
        """Time an upstream operation type (``mount``, ``ztoc_fetch``, ``node_readdir``, ...).

        ``node_readdir`` and ``synchronous_read`` go to the microseconds histogram, the rest to the
        milliseconds one.
        """
        if operation_type in MICROSECOND_OPERATIONS:
            self.fs_duration_us.labels(operation_type, layer).observe(seconds * 1e6)
        else:
            self.fs_duration_ms.labels(operation_type, layer).observe(seconds * 1e3)

    def fs_event(self, operation_type: str, layer: str = "", n: int = 1) -> None:
        """Count an upstream ``soci_fs_operation_count`` event (``resolve_cache_hit``, ...)."""
        self.fs_count.labels(operation_type, layer).inc(n)

    # --- fetching and the cache

    def fetch_request(self, kind: str, spans: int, layer: str = "") -> None:
        """One range request of ``spans`` spans, ``kind`` ``on_demand`` or ``background`` (bytes not counted:
        use :meth:`fetched` where the byte count is known and the :meth:`hook` does not count it)."""
        self.fetch_requests.labels(kind).inc()
        self.fetched_spans.inc(spans)
        if kind == "background":
            self.background_spans.inc(spans)
            self.fs_count.labels("background_span_fetch_count", layer).inc(spans)
        else:
            self.fs_count.labels("synchronous_read_remote_registry_fetch_count", layer).inc()

    def fetched(self, nbytes: int, spans: int, kind: str, layer: str = "") -> None:
        """One range request that fetched ``nbytes`` compressed bytes holding ``spans`` spans."""
        self.fetched_bytes.inc(nbytes)
        self.fetch_request(kind, spans, layer)

    def fetch_failed(self) -> None:
        """A span fetch failed for good (after retries, or with an error that is not retried)."""
        self.fetch_errors.inc()

    def background_fetch_failed(self, layer: str = "") -> None:
        """A background span fetch failed (the layer is dropped from the queue)."""
        self.background_failures.inc()
        self.fs_count.labels("background_span_fetch_failure_count", layer).inc()

    def background_progress(self, remaining_spans: int) -> None:
        """Spans the background fetcher has still to fetch, over all queued layers."""
        self.background_remaining.set(remaining_spans)

    def background_queue_size(self, layers: int) -> None:
        """The background queue length (published periodically): set ours, add to upstream's gauge."""
        self.background_queue.set(layers)
        self.fs_image_ops.labels("background_fetch_work_queue_size", "").inc(layers)

    def background_evicted(self, n: int = 1) -> None:
        """Layers dropped from a full background queue."""
        self.fs_count.labels("background_fetch_work_queue_evicted", "").inc(n)

    def cache_hit(self, tier: str) -> None:
        """A span read answered by the block cache's ``memory`` or ``disk`` tier."""
        self.cache_hits.labels(tier).inc()

    def cache_miss(self) -> None:
        """A span read the block cache could not answer."""
        self.cache_misses.inc()

    # --- registries and credentials

    def registry_status(self, host: str, status: int) -> None:
        """A registry answered ``status`` (401 and 403 included)."""
        self.registry_responses.labels(host, status).inc()

    def token_refresh(self, host: str) -> None:
        """A bearer token was fetched or refreshed for ``host``."""
        self.token_refreshes.labels(host).inc()

    def credential_hit(self, source: str) -> None:
        """A credential lookup was answered by ``source`` (the chain's source name; ``none`` when none)."""
        self.credential_hits.labels(source).inc()

    # --- mounts

    def fallback(self, reason: str) -> None:
        """A layer was not mounted lazily (``no_index``, ``no_ztoc``, ``below_min_size``, ...)."""
        self.fallbacks.labels(reason).inc()

    def mount_failure(self, mode: str, layer: str = "") -> None:
        """A ``lazy`` (FUSE) or ``local`` layer mount failed: ours and upstream's counters."""
        if mode == "lazy":
            self.fuse_mount_failures.inc()
            self.fs_count.labels("fuse_mount_failure_count", layer).inc()
        elif mode == "local":
            self.local_mount_failures.inc()
            self.fs_count.labels("local_mount_failure_count", layer).inc()
        else:
            raise InvalidArgument(f"mount mode {mode!r}: expected 'lazy' or 'local'")

    def set_mounted_layers(self, mode: str, n: int) -> None:
        """How many layers are mounted in ``mode`` (``lazy`` or ``local``)."""
        self.mounted_layers.labels(mode).set(n)

    def set_images(self, n: int) -> None:
        """How many images have a mounted layer."""
        self.images.set(n)

    # --- live per-layer values

    def layers(self, source: Callable[[], Iterable[LayerStat]] | None) -> None:
        """Read per-layer fetched/total sizes from ``source`` at each scrape (None: stop); replaces any
        earlier source. Written as upstream's counter-typed ``soci_fs_layer_fetched_size_bytes`` and
        ``soci_fs_layer_size_bytes`` with labels ``digest`` and ``mountpoint``."""
        self._layer_source = source

    def _collect_layers(self) -> list[CollectedFamily]:
        source = self._layer_source
        if source is None:
            return []
        fetched: list[Sample] = []
        size: list[Sample] = []
        for st in source():
            labels = {"digest": st.digest, "mountpoint": st.mountpoint}
            fetched.append(Sample("soci_fs_layer_fetched_size_bytes", labels, st.fetched_bytes))
            size.append(Sample("soci_fs_layer_size_bytes", labels, st.size_bytes))
        return [
            CollectedFamily(
                "soci_fs_layer_fetched_size_bytes",
                "counter",
                "Bytes of each mounted layer fetched so far.",
                fetched,
            ),
            CollectedFamily(
                "soci_fs_layer_size_bytes", "counter", "Size of each mounted layer in bytes.", size
            ),
        ]

    # --- soci_fs hooks

    def hook(self, layer: str = "") -> Callable[[str, float], None]:
        """A ``metrics(name, value)`` hook for :class:`soci_fs.spans.RemoteLayer` (``layer``: its digest) and
        :class:`soci_fs.background.BackgroundFetcher`.

        It maps ``span_fetch_seconds`` (upstream ``remote_registry_get``), ``span_fetch_bytes``
        (``soci_fetched_bytes_total``: call :meth:`fetch_request`, not :meth:`fetched`, for those fetches),
        ``cache_hit`` (the disk tier), ``digest_mismatch``, ``fetch_error``, ``background_fetch_queue_size``
        and ``background_fetch_layer_seconds`` (upstream ``background_fetch``); other names are ignored.
        """

        def metrics(name: str, value: float) -> None:
            if name == "span_fetch_bytes":
                self.fetched_bytes.inc(value)
            elif name == "span_fetch_seconds":
                self.fs_operation("remote_registry_get", value, layer)
            elif name == "cache_hit":
                self.cache_hits.labels("disk").inc(value)
            elif name == "digest_mismatch":
                self.digest_mismatches.inc(value)
            elif name == "fetch_error":
                self.fetch_errors.inc(value)
            elif name == "background_fetch_queue_size":
                self.background_queue_size(int(value))
            elif name == "background_fetch_layer_seconds":
                self.fs_operation("background_fetch", value, layer)
            else:
                log.debug("metrics hook: ignoring unknown metric %r", name)

        return metrics


# ---------------------------------------------------------------------------------------------------------
# the HTTP endpoint


class _Handler(http.server.BaseHTTPRequestHandler):
    """``GET /metrics``; 404 for other paths, 405 for other methods. Requests are logged at DEBUG."""

    protocol_version = "HTTP/1.1"
    server_version = "soci-snapshotter-grpc"
    sys_version = ""
    timeout = 60  # an idle keep-alive connection is closed after this many seconds
    server: _TCPServer | _UnixServer

    def setup(self) -> None:
        super().setup()
        self.server._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server._track(self.connection, False)

    def do_GET(self) -> None:
        if urlsplit(self.path).path != "/metrics":
            self._reply(404, b"404 page not found\n")
            return
        try:
            body = self.server.registry.render().encode("utf-8")
        except Exception:
            log.exception("metrics endpoint: rendering the metrics failed")
            self._reply(500, b"500 internal server error\n")
            return
        self._reply(200, body, CONTENT_TYPE)

    def _not_allowed(self) -> None:
        self._reply(405, b"405 method not allowed\n", extra=(("Allow", "GET"),))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):  # every method but GET
            return self._not_allowed
        raise AttributeError(name)

    def _reply(
        self,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        extra: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:
        ca = self.client_address
        return str(ca[0]) if isinstance(ca, tuple) and ca else "unix"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics endpoint: %s " + format, self.address_string(), *args)


class _ServerMixin:
    """Connection tracking (so close() can end keep-alive connections) and quiet error handling."""

    registry: Registry
    daemon_threads = True
    block_on_close = False

    def _init_tracking(self, registry: Registry) -> None:
        self.registry = registry
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._conns_lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def _drop_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics endpoint: error serving a request", exc_info=True)


class _TCPServer(_ServerMixin, http.server.ThreadingHTTPServer):
    def __init__(self, family: int, sockaddr: tuple[Any, ...], registry: Registry) -> None:
        self.address_family = family
        self._init_tracking(registry)
        super().__init__(sockaddr, _Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            try:  # "[::]:port" listens on IPv4 too, as Go's "tcp" does
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:
                pass
        socketserver.TCPServer.server_bind(self)  # not HTTPServer's: no reverse DNS lookup
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = port


class _UnixServer(_ServerMixin, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    def __init__(self, path: str, registry: Registry) -> None:
        self._init_tracking(registry)
        super().__init__(path, _Handler)


def _parse_tcp(address: str, network: str) -> list[tuple[int, tuple[Any, ...]]]:
    """(address family, socket address) candidates for ``host:port``, to try in order; ``InvalidArgument``
    naming the cause. An empty host means every address: ``[::]`` (dual stack), else ``0.0.0.0``."""
    host, sep, port_text = address.rpartition(":")
    if not sep:
        raise InvalidArgument(f"metrics address {address!r}: missing port (want host:port or unix:/path)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise InvalidArgument(
            f"metrics address {address!r}: too many colons (write IPv6 hosts as [host]:port)"
        )
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise InvalidArgument(f"metrics address {address!r}: invalid port {port_text!r}")
    port = int(port_text)
    families = {"tcp": socket.AF_UNSPEC, "tcp4": socket.AF_INET, "tcp6": socket.AF_INET6}
    family = families[network]
    if not host:
        if family == socket.AF_INET6:
            return [(socket.AF_INET6, ("::", port))]
        any4 = (socket.AF_INET, ("0.0.0.0", port))
        if family == socket.AF_INET or not socket.has_ipv6:
            return [any4]
        return [(socket.AF_INET6, ("::", port)), any4]  # a host with IPv6 disabled falls back to IPv4
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InvalidArgument(
            f"metrics address {address!r}: cannot resolve {host!r}: {exc.strerror}"
        ) from exc
    fam, _, _, _, sockaddr = infos[0]
    return [(fam, sockaddr)]


def _prepare_unix_path(address: str, path: str) -> str:
    """Absolute ``path``, its parent directory made (0700), a stale socket removed."""
    if not path:
        raise InvalidArgument(f"metrics address {address!r}: no socket path")
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise InvalidArgument(f"metrics address {address!r}: {exc.strerror or exc}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise InvalidArgument(f"metrics address {address!r}: {path!r} exists and is not a socket")
    os.unlink(path)
    return path


class MetricsServer:
    """The Prometheus endpoint: ``GET /metrics`` served from ``registry`` in a daemon thread.

    The socket is bound when the server is made (so :attr:`port` is known at once); :meth:`start` starts
    serving; :meth:`close` stops the thread, ends open connections, closes the socket and removes the unix
    socket file. Usable as a context manager (``with MetricsServer(...).start():``).

    Args:
        address: ``host:port`` (``[v6]:port``; an empty host listens on all addresses; port 0 picks a free
            port), or ``unix:/path`` (also ``unix:///path``), or, with ``network="unix"``, a socket path.
        registry: what to serve.
        network: upstream's ``metrics_network``: ``tcp`` (default), ``tcp4``, ``tcp6`` or ``unix``
            (``unixpacket`` is refused: HTTP needs a stream). For a unix socket the parent directory is
            made (0700) and a stale socket is removed.
        poll_interval: how often (seconds) the serving thread looks for a shutdown request; bounds how long
            :meth:`close` waits.

    Raises:
        InvalidArgument: the address cannot be parsed, resolved or listened on (the message names the
            address and the cause).
    """

    def __init__(
        self, address: str, registry: Registry, *, network: str = "tcp", poll_interval: float = 0.5
    ) -> None:
        self.address = address
        self._poll_interval = poll_interval
        self.path: str | None = None
        self.port: int | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._inode: tuple[int, int] | None = None
        if network not in ("tcp", "tcp4", "tcp6", "unix"):
            raise InvalidArgument(
                f"metrics address {address!r}: network {network!r} is not supported (tcp, tcp4, tcp6 or unix)"
            )
        if address.startswith("unix:") and network in ("tcp", "unix"):
            rest = address.removeprefix("unix:")
            network, address_path = "unix", rest[2:] if rest.startswith("//") else rest
        else:
            address_path = address
        self._server: _TCPServer | _UnixServer
        try:
            if network == "unix":
                self.path = _prepare_unix_path(address, address_path)
                self._server = _UnixServer(self.path, registry)
                st = os.stat(self.path)
                self._inode = (st.st_dev, st.st_ino)
            else:
                *others, last = _parse_tcp(address, network)
                for family, sockaddr in others:
                    try:
                        self._server = _TCPServer(family, sockaddr, registry)
                        break
                    except OSError as exc:
                        log.debug(
                            "metrics address %r: %s unusable (%s); trying the next", address, sockaddr, exc
                        )
                else:
                    self._server = _TCPServer(*last, registry)
                self.port = self._server.server_address[1]
        except OSError as exc:
            raise InvalidArgument(
                f"metrics address {address!r}: cannot listen: {exc.strerror or exc}"
            ) from exc

    @property
    def where(self) -> str:
        """Where it listens, for messages: ``host:port`` as bound, or ``unix:<path>``."""
        if self.path is not None:
            return f"unix:{self.path}"
        host, port = self._server.server_address[:2]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"

    def start(self) -> MetricsServer:
        """Serve in a daemon thread; returns self. A second call does nothing; after :meth:`close` it raises
        ``InvalidArgument``."""
        with self._lock:
            if self._closed:
                raise InvalidArgument(f"metrics endpoint {self.where}: already closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._server.serve_forever,
                    args=(self._poll_interval,),
                    name="metrics-http",
                    daemon=True,
                )
                self._thread.start()
                log.info("metrics endpoint listening on %s", self.where)
        return self

    def close(self) -> None:
        """Stop serving and release the socket (and the unix socket file). Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._server.shutdown()
            thread.join()
        self._server.server_close()
        self._server._drop_connections()
        if self.path is not None:
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:  # only our socket, not a successor's
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
        log.info("metrics endpoint on %s closed", self.where)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def from_config(config: Config, registry: Registry) -> MetricsServer | None:
    """The started endpoint for ``metrics_address`` / ``metrics_network``, or None when ``metrics_address``
    is empty or ``no_prometheus`` is set."""
    if not config.metrics_address or config.no_prometheus:
        return None
    return MetricsServer(config.metrics_address, registry, network=config.metrics_network).start()
