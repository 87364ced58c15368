"""Suite-wide rules.

* A test that logs WARNING or worse fails unless it is marked ``@pytest.mark.expect_log``.
* ``SOCI_PUREPYTHON=1`` runs the whole suite against the pure-Python twins; ``impl_name`` says which ran.
"""

from __future__ import annotations

import logging

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
