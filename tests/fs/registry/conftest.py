"""Fixtures for the registry client tests: the shared registries, token server and fault proxy."""

from __future__ import annotations

from tests.harness.registry import (  # noqa: F401  (pytest finds fixtures by name)
    fault_proxy,
    harness_dir,
    htpasswd_registry,
    token_registry,
    token_server,
)
