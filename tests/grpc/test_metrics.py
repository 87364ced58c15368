"""soci_grpc.metrics: the metric types, the text format (parsed back with prometheus_client), the daemon's
metric set, and the HTTP endpoint over TCP and a unix socket."""

from __future__ import annotations

import errno
import http.client
import logging
import math
import os
import socket
import stat
import threading
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from soci_fs.errors import InvalidArgument
from soci_grpc import config as configmod
from soci_grpc import metrics as m


@pytest.fixture(autouse=True)
def _no_serving_thread_left() -> Iterator[None]:
    yield
    left = [t for t in threading.enumerate() if t.name == "metrics-http"]
    assert not left, f"metrics-http threads still running: {left}"


def make_server(*args: object, **kw: object) -> m.MetricsServer:
    """A MetricsServer that notices close() quickly (keeps the suite fast)."""
    return m.MetricsServer(*args, poll_interval=0.02, **kw)


def parse(text: str) -> dict[str, object]:
    """Families by name as prometheus_client reads them (it drops a counter's ``_total`` from the name)."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(text: str, sample: str, **labels: str) -> float:
    """The value of the one sample named ``sample`` with exactly ``labels``."""
    found = [
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == sample and s.labels == labels
    ]
    assert len(found) == 1, (sample, labels, found)
    return found[0]


# --- values and escaping


@pytest.mark.parametrize(
    ("given", "want"),
    [
        (0, "0"),
        (3, "3"),
        (2**70, str(2**70)),
        (True, "1"),
        (1.0, "1"),
        (-2.0, "-2"),
        (0.5, "0.5"),
        (1e-05, "1e-05"),
        (1e20, "1e+20"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_format_value(given: float, want: str) -> None:
    assert m.format_value(given) == want


def test_counter_gauge_histogram_render_and_parse_back() -> None:
    r = m.Registry()
    c = r.counter("t_requests_total", "Requests.", ("code",))
    g = r.gauge("t_temperature", "Temperature.")
    h = r.histogram("t_latency_seconds", "Latency.", buckets=(0.1, 1, 10))
    c.labels(code="200").inc()
    c.labels(code=200).inc(2)  # values become strings: the same child
    c.labels("404").inc()
    g.set(21.5)
    g.inc(1)
    g.dec(0.5)
    h.observe(0.05)
    h.observe(5)
    text = r.render()
    fams = parse(text)
    assert fams["t_requests"].type == "counter"
    assert fams["t_requests"].documentation == "Requests."
    assert value(text, "t_requests_total", code="200") == 3
    assert value(text, "t_requests_total", code="404") == 1
    assert fams["t_temperature"].type == "gauge"
    assert value(text, "t_temperature") == 22
    assert fams["t_latency_seconds"].type == "histogram"
    assert value(text, "t_latency_seconds_count") == 2
    assert value(text, "t_latency_seconds_sum") == 5.05
    assert c.labels(code="200").get() == 3 and g.get() == 22
    assert text.endswith("\n")
    assert "# TYPE t_requests_total counter\n" in text
    assert 't_requests_total{code="200"} 3\n' in text  # integers without ".0"


def test_histogram_buckets_are_cumulative_and_end_with_inf() -> None:
    r = m.Registry()
    h = r.histogram("t_h", "h", ("op",), buckets=(1, 2, 4))
    for v in (0.5, 1, 1.5, 3, 3, 100, math.nan):
        h.labels(op="x").observe(v)
    text = r.render()
    got = [(s.labels["le"], s.value) for s in parse(text)["t_h"].samples if s.name == "t_h_bucket"]
    assert got == [("1", 2), ("2", 3), ("4", 5), ("+Inf", 7)]  # le is inclusive; NaN lands in +Inf
    assert value(text, "t_h_count", op="x") == 7
    assert math.isnan(value(text, "t_h_sum", op="x"))


def test_histogram_with_inf_given_and_bad_buckets() -> None:
    assert m.Histogram("t_a", "a", buckets=(1, math.inf)).buckets == (1.0,)
    for bad in ((), (2, 1), (1, 1), (math.nan,), (-math.inf, 1)):
        with pytest.raises(InvalidArgument, match="t_b"):
            m.Histogram("t_b", "b", buckets=bad)
    with pytest.raises(InvalidArgument, match="reserved"):
        m.Histogram("t_c", "c", ("le",), buckets=(1,))


def test_escaping_of_label_values_and_help() -> None:
    r = m.Registry()
    nasty = 'a\\b"c\nd'
    c = r.counter("t_esc", 'help with \\ backslash\nand "quotes"', ("v",))
    c.labels(v=nasty).inc()
    text = r.render()
    assert 't_esc{v="a\\\\b\\"c\\nd"} 1\n' in text
    assert '# HELP t_esc help with \\\\ backslash\\nand "quotes"\n' in text
    fam = parse(text)["t_esc"]
    assert fam.documentation == 'help with \\ backslash\nand "quotes"'
    assert fam.samples[0].labels == {"v": nasty}


def test_label_and_name_errors() -> None:
    r = m.Registry()
    c = r.counter("t_l", "l", ("a", "b"))
    with pytest.raises(InvalidArgument, match=r"t_l.*\['a', 'b'\]"):
        c.labels(a="1")
    with pytest.raises(InvalidArgument, match="t_l"):
        c.labels(a="1", b="2", c="3")
    with pytest.raises(InvalidArgument, match="t_l"):
        c.labels("1")
    with pytest.raises(InvalidArgument, match="not both"):
        c.labels("1", b="2")
    with pytest.raises(InvalidArgument, match="update it through"):
        c.inc()
    with pytest.raises(InvalidArgument, match="only go up"):
        c.labels("1", "2").inc(-1)
    for name in ("1abc", "a-b", ""):
        with pytest.raises(InvalidArgument, match="metric name"):
            m.Counter(name, "x")
    for label in ("__x", "a-b", "1"):
        with pytest.raises(InvalidArgument, match="label name"):
            m.Counter("t_ok", "x", (label,))
    with pytest.raises(InvalidArgument, match="duplicate"):
        m.Counter("t_ok", "x", ("a", "a"))
    with pytest.raises(InvalidArgument, match="sequence"):
        m.Counter("t_ok", "x", "ab")


def test_remove_forgets_a_child() -> None:
    r = m.Registry()
    g = r.gauge("t_r", "r", ("host",))
    g.labels(host="a").set(1)
    g.labels(host="b").set(2)
    g.remove(host="a")
    g.remove(host="never")
    text = r.render()
    assert [s.labels for s in parse(text)["t_r"].samples] == [{"host": "b"}]


def test_duplicate_names_are_refused() -> None:
    r = m.Registry()
    r.counter("t_dup", "x")
    with pytest.raises(InvalidArgument, match=r"t_dup.*already used"):
        r.gauge("t_dup", "y")
    r.histogram("t_hist", "h", buckets=(1,))
    with pytest.raises(InvalidArgument, match=r"t_hist_count.*already used by metric 't_hist'"):
        r.counter("t_hist_count", "c")
    with pytest.raises(InvalidArgument, match="t_dup_total"):
        r.gauge("t_dup_total", "g")  # the counter t_dup may be read as t_dup_total
    fam = r.counter("t_gone", "x")
    r.unregister(fam)
    r.counter("t_gone", "again")  # the name is free again


def test_concurrent_updates_sum_exactly() -> None:
    r = m.Registry()
    c = r.counter("t_conc_total", "c", ("t",))
    solo = r.counter("t_solo_total", "s")
    h = r.histogram("t_conc_h", "h", buckets=(0.5,))
    g = r.gauge("t_conc_g", "g")
    threads_n, per = 8, 5000
    start = threading.Barrier(threads_n)

    def work(i: int) -> None:
        start.wait()
        for k in range(per):
            c.labels(t=str(k % 3)).inc()
            solo.inc()
            h.observe(k % 2)
            g.inc()
            g.dec()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    text = r.render()
    total = sum(value(text, "t_conc_total", t=str(k)) for k in range(3))
    assert total == threads_n * per
    assert value(text, "t_solo_total") == threads_n * per
    assert value(text, "t_conc_h_count") == threads_n * per
    assert value(text, "t_conc_h_bucket", le="0.5") == threads_n * per // 2
    assert value(text, "t_conc_h_sum") == threads_n * per // 2
    assert value(text, "t_conc_g") == 0


# --- collectors


def test_collector_samples_render() -> None:
    r = m.Registry()
    live = {"sha256:a": 10}

    @r.collector
    def layers() -> list[m.CollectedFamily]:
        samples = [m.Sample("t_live_bytes", {"digest": d}, n) for d, n in live.items()]
        return [m.CollectedFamily("t_live_bytes", "gauge", "Live.", samples)]

    assert value(r.render(), "t_live_bytes", digest="sha256:a") == 10
    live["sha256:a"] = 25
    live["sha256:b"] = 1
    text = r.render()
    assert value(text, "t_live_bytes", digest="sha256:a") == 25
    assert value(text, "t_live_bytes", digest="sha256:b") == 1
    r.remove_collector(layers)
    assert "t_live_bytes" not in r.render()


@pytest.mark.expect_log
def test_a_failing_collector_is_skipped_with_one_warning_per_scrape(caplog: pytest.LogCaptureFixture) -> None:
    r = m.Registry()
    r.counter("t_still_here_total", "c").inc(4)

    def broken() -> list[m.CollectedFamily]:
        raise RuntimeError("layer table went away")

    def clashing() -> list[m.CollectedFamily]:
        return [m.CollectedFamily("t_still_here_total", "counter", "dup", [])]

    def malformed() -> list[m.CollectedFamily]:
        return [m.CollectedFamily("t_bad", "gauge", "b", [m.Sample("t_other", {}, 1)])]

    def good() -> list[m.CollectedFamily]:
        return [m.CollectedFamily("t_good", "gauge", "g", [m.Sample("t_good", {}, 7)])]

    for fn in (broken, clashing, malformed, good):
        r.collector(fn)
    caplog.clear()
    text = r.render()
    assert value(text, "t_still_here_total") == 4
    assert value(text, "t_good") == 7
    assert "t_bad" not in text and "dup" not in text
    warnings = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert len(warnings) == 3
    assert all(rec.name == "soci_grpc.metrics" and rec.levelno == logging.WARNING for rec in warnings)
    messages = [rec.getMessage() for rec in warnings]
    assert "layer table went away" in messages[0] and "broken" in messages[0]
    assert "already used" in messages[1]
    assert "does not belong" in messages[2]
    r.render()
    assert len([rec for rec in caplog.records if rec.levelno >= logging.WARNING]) == 6


# --- the daemon's metric set


def test_daemon_metrics_names_and_values() -> None:
    now = [1000.0]
    dm = m.DaemonMetrics(clock=lambda: now[0])
    dm.fuse_op("lookup", 0.0005)
    dm.fuse_op("lookup", 2)
    dm.fuse_error("lookup", errno.ENOENT)
    dm.fuse_error("read", errno.EIO, "sha256:l1")
    dm.fuse_error("read", "EIO", "sha256:l1")  # same window: fuse_failure_state once
    now[0] += m.FUSE_FAILURE_WINDOW_SEC
    dm.fuse_error("statfs", errno.EIO, "sha256:l1")  # a new window
    dm.fetched(4096, 2, "on_demand", "sha256:l1")
    dm.fetched(1000, 3, "background", "sha256:l1")
    dm.fetch_failed()
    dm.background_fetch_failed("sha256:l1")
    dm.background_progress(17)
    dm.background_queue_size(2)
    dm.background_queue_size(3)
    dm.background_evicted()
    dm.cache_hit("memory")
    dm.cache_hit("disk")
    dm.cache_hit("disk")
    dm.cache_miss()
    dm.registry_status("registry.example:5000", 401)
    dm.registry_status("registry.example:5000", 401)
    dm.registry_status("registry.example:5000", 200)
    dm.token_refresh("registry.example:5000")
    dm.credential_hit("docker-config")
    dm.credential_hit("none")
    dm.fallback("no_ztoc")
    dm.fallback("below_min_size")
    dm.fallback("no_ztoc")
    dm.mount_failure("lazy", "sha256:l2")
    dm.mount_failure("local", "sha256:l3")
    dm.set_mounted_layers("lazy", 5)
    dm.set_mounted_layers("local", 2)
    dm.set_images(1)
    dm.sync_read(100, 0.000003, "sha256:l1")
    dm.fs_operation("mount", 0.0035, "sha256:l1")
    dm.fs_operation("node_readdir", 0.00001, "sha256:l1")
    dm.fs_event("resolve_cache_hit")
    dm.image_fuse_op_counts("sha256:img", {"node.Lookup": 3, "file.Read": 2})
    text = dm.registry.render()
    fams = parse(text)

    assert value(text, "soci_fuse_operations_total", operation="lookup") == 2
    assert value(text, "soci_fuse_operation_duration_seconds_count", operation="lookup") == 2
    assert value(text, "soci_fuse_operation_duration_seconds_bucket", operation="lookup", le="0.0001") == 0
    assert value(text, "soci_fuse_operation_duration_seconds_bucket", operation="lookup", le="0.001") == 1
    assert value(text, "soci_fuse_operation_duration_seconds_bucket", operation="lookup", le="10") == 2
    buckets = [s for s in fams["soci_fuse_operation_duration_seconds"].samples if s.name.endswith("_bucket")]
    assert buckets[0].labels["le"] == "0.0001" and buckets[-2].labels["le"] == "10"
    assert 10 <= len(buckets) <= 14
    assert value(text, "soci_fuse_operation_errors_total", operation="lookup", errno="ENOENT") == 1
    assert value(text, "soci_fuse_operation_errors_total", operation="read", errno="EIO") == 2
    assert value(text, "soci_fetched_bytes_total") == 5096
    assert value(text, "soci_fetched_spans_total") == 5
    assert value(text, "soci_fetch_requests_total", kind="on_demand") == 1
    assert value(text, "soci_fetch_requests_total", kind="background") == 1
    assert value(text, "soci_fetch_errors_total") == 1
    assert value(text, "soci_background_fetch_spans_total") == 3
    assert value(text, "soci_background_fetch_failures_total") == 1
    assert value(text, "soci_background_fetch_remaining_spans") == 17
    assert value(text, "soci_background_fetch_queue_layers") == 3
    assert value(text, "soci_cache_hits_total", tier="memory") == 1
    assert value(text, "soci_cache_hits_total", tier="disk") == 2
    assert value(text, "soci_cache_misses_total") == 1
    assert value(text, "soci_registry_responses_total", host="registry.example:5000", status="401") == 2
    assert value(text, "soci_registry_responses_total", host="registry.example:5000", status="200") == 1
    assert value(text, "soci_registry_token_refreshes_total", host="registry.example:5000") == 1
    assert value(text, "soci_credential_source_hits_total", source="docker-config") == 1
    assert value(text, "soci_credential_source_hits_total", source="none") == 1
    assert value(text, "soci_fallbacks_total", reason="no_ztoc") == 2
    assert value(text, "soci_fallbacks_total", reason="below_min_size") == 1
    assert value(text, "soci_mounted_layers", mode="lazy") == 5
    assert value(text, "soci_mounted_layers", mode="local") == 2
    assert value(text, "soci_images") == 1
    # plain counters with exactly these names (prometheus_client reads them as <name>_total)
    assert "soci_fuse_mount_failure_count 1\n" in text
    assert "soci_local_mount_failure_count 1\n" in text
    assert fams["soci_fuse_mount_failure_count"].type == "counter"

    # upstream's families and operation_type values (cli-and-config.md §5)
    def op(name: str, layer: str = "") -> float:
        return value(text, "soci_fs_operation_count_total", operation_type=name, layer=layer)

    assert op("fuse_mount_failure_count", "sha256:l2") == 1
    assert op("local_mount_failure_count", "sha256:l3") == 1
    assert op("fuse_file_read_failure_count", "sha256:l1") == 2
    assert op("fuse_unknown_operation_failure_count", "sha256:l1") == 1
    assert op("fuse_failure_state", "sha256:l1") == 2
    assert op("synchronous_read_remote_registry_fetch_count", "sha256:l1") == 1
    assert op("background_span_fetch_count", "sha256:l1") == 3
    assert op("background_span_fetch_failure_count", "sha256:l1") == 1
    assert op("background_fetch_work_queue_evicted") == 1
    assert op("synchronous_read_count", "sha256:l1") == 1
    assert op("resolve_cache_hit") == 1
    assert (
        value(text, "soci_fs_bytes_served", operation_type="synchronous_bytes_served", layer="sha256:l1")
        == 100
    )
    assert (
        value(
            text,
            "soci_fs_operation_duration_microseconds_bucket",
            operation_type="synchronous_read",
            layer="sha256:l1",
            le="4",
        )
        == 1
    )
    assert (
        value(
            text,
            "soci_fs_operation_duration_microseconds_count",
            operation_type="node_readdir",
            layer="sha256:l1",
        )
        == 1
    )
    assert (
        value(
            text,
            "soci_fs_operation_duration_milliseconds_bucket",
            operation_type="mount",
            layer="sha256:l1",
            le="4",
        )
        == 1
    )
    ms = [s.labels["le"] for s in fams["soci_fs_operation_duration_milliseconds"].samples if "le" in s.labels]
    assert ms[0] == "1" and ms[-2] == "16384"
    # added to, as upstream does
    image_ops = "soci_fs_image_operation_count_key"
    assert value(text, image_ops, operation_type="background_fetch_work_queue_size", image="") == 5
    assert value(text, image_ops, operation_type="node.Lookup", image="sha256:img") == 3

    with pytest.raises(InvalidArgument, match="mount mode"):
        dm.mount_failure("other")


def test_pre_created_series_are_zero() -> None:
    text = m.DaemonMetrics().registry.render()
    assert value(text, "soci_fetch_requests_total", kind="background") == 0
    assert value(text, "soci_cache_hits_total", tier="memory") == 0
    assert value(text, "soci_mounted_layers", mode="local") == 0
    evicted = {"operation_type": "background_fetch_work_queue_evicted", "layer": ""}
    assert value(text, "soci_fs_operation_count_total", **evicted) == 0


def test_layer_source_is_read_at_each_scrape() -> None:
    dm = m.DaemonMetrics()
    layers = [m.LayerStat("sha256:a", "/mnt/a", 10, 100)]
    dm.layers(lambda: layers)
    text = dm.registry.render()
    labels = {"digest": "sha256:a", "mountpoint": "/mnt/a"}
    assert value(text, "soci_fs_layer_fetched_size_bytes_total", **labels) == 10
    assert value(text, "soci_fs_layer_size_bytes_total", **labels) == 100
    layers[0] = layers[0]._replace(fetched_bytes=60)
    assert value(dm.registry.render(), "soci_fs_layer_fetched_size_bytes_total", **labels) == 60
    dm.layers(None)
    assert "soci_fs_layer_size_bytes{" not in dm.registry.render()


def test_hook_maps_the_soci_fs_metric_names() -> None:
    dm = m.DaemonMetrics()
    hook = dm.hook("sha256:l")
    hook("span_fetch_bytes", 300)
    hook("span_fetch_seconds", 0.003)
    hook("cache_hit", 1)
    hook("digest_mismatch", 1)
    hook("fetch_error", 1)
    hook("background_fetch_queue_size", 4)
    hook("background_fetch_layer_seconds", 2.0)
    hook("something_new", 1)  # ignored
    text = dm.registry.render()
    assert value(text, "soci_fetched_bytes_total") == 300
    assert value(text, "soci_cache_hits_total", tier="disk") == 1
    assert value(text, "soci_span_digest_mismatches_total") == 1
    assert value(text, "soci_fetch_errors_total") == 1
    assert value(text, "soci_background_fetch_queue_layers") == 4
    hist = "soci_fs_operation_duration_milliseconds_count"
    assert value(text, hist, operation_type="remote_registry_get", layer="sha256:l") == 1
    assert value(text, hist, operation_type="background_fetch", layer="sha256:l") == 1


# --- the HTTP endpoint


@pytest.fixture
def registry() -> m.Registry:
    r = m.Registry()
    r.counter("t_scraped_total", "Scrapes.", ("path",)).labels(path='/a"b').inc(3)
    return r


@pytest.fixture
def tcp_server(registry: m.Registry) -> Iterator[m.MetricsServer]:
    srv = make_server("127.0.0.1:0", registry)
    try:
        yield srv.start()
    finally:
        srv.close()


def _get(port: int, method: str = "GET", path: str = "/metrics") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_http_scrape_over_tcp(tcp_server: m.MetricsServer, caplog: pytest.LogCaptureFixture) -> None:
    assert tcp_server.port and tcp_server.port > 0
    assert tcp_server.where == f"127.0.0.1:{tcp_server.port}"
    status, headers, body = _get(tcp_server.port)
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert int(headers["content-length"]) == len(body)
    assert value(body.decode(), "t_scraped_total", path='/a"b') == 3
    status, _, body = _get(tcp_server.port, path="/metrics?name[]=x")
    assert status == 200 and b"t_scraped_total" in body
    # requests are logged at DEBUG, never above
    request_logs = [
        r for r in caplog.records if r.name == "soci_grpc.metrics" and "GET /metrics" in r.getMessage()
    ]
    assert request_logs and all(r.levelno == logging.DEBUG for r in request_logs)


def test_http_keep_alive_serves_several_requests(tcp_server: m.MetricsServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", tcp_server.port, timeout=30)
    try:
        for _ in range(3):
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            assert resp.status == 200 and b"t_scraped_total" in resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("path", ["/", "/metric", "/metrics/", "/debug/pprof/"])
def test_http_other_paths_are_404(tcp_server: m.MetricsServer, path: str) -> None:
    status, _, _ = _get(tcp_server.port, path=path)
    assert status == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "HEAD", "BREW"])
def test_http_other_methods_are_405(tcp_server: m.MetricsServer, method: str) -> None:
    status, headers, _ = _get(tcp_server.port, method=method)
    assert status == 405
    assert headers["allow"] == "GET"


def test_close_frees_the_port_and_ends_open_connections(registry: m.Registry) -> None:
    srv = make_server("127.0.0.1:0", registry).start()
    port = srv.port
    assert port is not None
    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        idle.request("GET", "/metrics")
        idle.getresponse().read()  # a keep-alive connection stays open
        srv.close()
        srv.close()  # twice is fine
        with pytest.raises(OSError):
            idle.request("GET", "/metrics")
            idle.getresponse()
    finally:
        idle.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=30).close()
    again = make_server(f"127.0.0.1:{port}", registry)  # the port is free again
    again.close()
    with pytest.raises(InvalidArgument, match="already closed"):
        srv.start()


def test_a_server_never_started_closes(registry: m.Registry) -> None:
    srv = make_server("127.0.0.1:0", registry)
    with srv:
        pass
    assert srv._thread is None


def _unix_request(path: str, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("form", ["unix:{}", "unix://{}", "network"])
def test_http_scrape_over_a_unix_socket(tmp_path, registry: m.Registry, form: str) -> None:
    path = str(tmp_path / "sub" / "dir" / "metrics.sock")
    if form == "network":
        srv = make_server(path, registry, network="unix")
    else:
        srv = make_server(form.format(path), registry)
    try:
        srv.start()
        assert srv.path == path and srv.port is None and srv.where == f"unix:{path}"
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_IMODE(os.stat(tmp_path / "sub" / "dir").st_mode) == 0o700
        raw = _unix_request(path, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0] == "HTTP/1.1 200 OK"
        assert "Content-Type: text/plain; version=0.0.4; charset=utf-8" in lines
        assert value(body.decode(), "t_scraped_total", path='/a"b') == 3
        raw = _unix_request(
            path, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        assert raw.startswith(b"HTTP/1.1 405 ")
        raw = _unix_request(path, b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 404 ")
    finally:
        srv.close()
    assert not os.path.exists(path)


def test_unix_socket_stale_file_is_replaced_and_other_files_are_refused(
    tmp_path, registry: m.Registry
) -> None:
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # leaves the socket file behind, as a crashed daemon would
    with make_server(f"unix:{path}", registry).start():
        raw = _unix_request(str(path), b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200 ")
    assert not path.exists()
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(InvalidArgument, match="is not a socket"):
        make_server(f"unix:{regular}", registry)
    assert regular.read_text() == "keep me"


def test_close_leaves_a_successors_socket_file(tmp_path, registry: m.Registry) -> None:
    path = str(tmp_path / "m.sock")
    first = make_server(f"unix:{path}", registry)
    second = make_server(f"unix:{path}", registry)  # replaces the first one's file
    try:
        first.close()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        second.close()
    assert not os.path.exists(path)


@pytest.mark.parametrize(
    ("address", "network", "cause"),
    [
        ("localhost", "tcp", "missing port"),
        ("127.0.0.1:http", "tcp", "invalid port"),
        ("127.0.0.1:70000", "tcp", "invalid port"),
        ("127.0.0.1:-1", "tcp", "invalid port"),
        ("::1:9090", "tcp", "too many colons"),
        ("no-such-host.invalid:9090", "tcp", "cannot resolve"),
        ("[::1]:9090", "tcp4", "cannot resolve"),
        ("unix:", "tcp", "no socket path"),
        ("/tmp/x.sock", "unixpacket", "not supported"),
        ("192.0.2.1:0", "tcp", "cannot listen"),  # TEST-NET address: not ours
    ],
)
def test_bad_addresses(registry: m.Registry, address: str, network: str, cause: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        make_server(address, registry, network=network)
    assert repr(address) in str(info.value) and cause in str(info.value)


def test_port_in_use_names_the_address(tcp_server: m.MetricsServer, registry: m.Registry) -> None:
    address = f"127.0.0.1:{tcp_server.port}"
    with pytest.raises(InvalidArgument, match=f"'{address}': cannot listen: Address already in use"):
        make_server(address, registry)


def test_empty_host_listens_on_all_addresses(registry: m.Registry) -> None:
    with make_server(":0", registry).start() as srv:
        status, _, body = _get(srv.port)
        assert status == 200 and b"t_scraped_total" in body


def test_from_config(tmp_path, registry: m.Registry) -> None:
    assert m.from_config(configmod.parse(""), registry) is None
    off = configmod.parse('metrics_address = "127.0.0.1:0"\nno_prometheus = true\n')
    assert m.from_config(off, registry) is None
    srv = m.from_config(configmod.parse('metrics_address = "127.0.0.1:0"\n'), registry)
    assert srv is not None
    try:
        assert _get(srv.port)[0] == 200
    finally:
        srv.close()
    path = tmp_path / "metrics.sock"
    cfg = configmod.parse(f'metrics_address = "{path}"\nmetrics_network = "unix"\n')
    srv = m.from_config(cfg, registry)
    assert srv is not None
    try:
        raw = _unix_request(str(path), b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200 ")
    finally:
        srv.close()
    assert not path.exists()


def test_empty_host_falls_back_to_ipv4_without_ipv6(
    registry: m.Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_init = m._TCPServer.__init__

    def no_ipv6(self: m._TCPServer, family: int, sockaddr: tuple, reg: m.Registry) -> None:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        real_init(self, family, sockaddr, reg)

    monkeypatch.setattr(m._TCPServer, "__init__", no_ipv6)
    with make_server(":0", registry).start() as srv:
        assert srv.where == f"0.0.0.0:{srv.port}"
        assert _get(srv.port)[0] == 200
