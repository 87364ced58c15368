"""Fixtures for the end-to-end tests: the real registries, token server and containerd of the harness."""

from __future__ import annotations

from tests.harness.containerd import containerd_factory  # noqa: F401  (pytest finds fixtures by name)
from tests.harness.registry import (  # noqa: F401  (pytest finds fixtures by name)
    fault_proxy,
    harness_dir,
    htpasswd_registry,
    token_registry,
    token_server,
)
from tests.integration.test_daemon_lazy import rig_factory  # noqa: F401  (daemon + containerd + proxy)
