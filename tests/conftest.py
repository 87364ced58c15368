"""Suite-wide rules.

* A test that logs WARNING or worse fails unless it is marked ``@pytest.mark.expect_log``.
* ``SOCI_PUREPYTHON=1`` runs the whole suite against the pure-Python twins.
* ``SOCI_REQUIRE_ALL=1`` (set by ``make test``, so in CI) turns every skip into a failure: tests that need
  root, ``/dev/fuse``, overlayfs or a service must run there, not skip.
* gRPC's fork handlers are off (``GRPC_ENABLE_FORK_SUPPORT=false``, before grpc is imported): tests start
  processes with ``preexec_fn`` (a real fork) right after using gRPC channels, and the handlers can deadlock
  in the child.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
from collections.abc import Iterator

import pytest

from soci_fs._select import pure_python_forced


def pytest_report_header(config: pytest.Config) -> str:
    return "soci implementation: " + ("pure-Python twins" if pure_python_forced() else "compiled extensions")


@pytest.fixture(autouse=True)
def _fail_on_unexpected_warnings(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    yield
    if request.node.get_closest_marker("expect_log"):
        return
    bad = [r for r in caplog.get_records("call") if r.levelno >= logging.WARNING]
    if bad:
        lines = "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in bad)
        pytest.fail(f"unexpected log records at WARNING or above:\n{lines}", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("SOCI_REQUIRE_ALL", "") not in ("", "0"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped, but SOCI_REQUIRE_ALL=1 forbids skips: {reason}"
