"""Fixtures for the end-to-end tests: the real registries and token server of the harness."""

from __future__ import annotations

from tests.harness.registry import (  # noqa: F401  (pytest finds fixtures by name)
    fault_proxy,
    harness_dir,
    htpasswd_registry,
    token_registry,
    token_server,
)
