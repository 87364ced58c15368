"""Fixtures for the keychain tests: fake credential helpers, a Kubernetes API server, config files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.credhelpers import HelperDir
from tests.harness.kube_api import KubeAPIServer
from tests.harness.registry import harness_dir, htpasswd_registry  # noqa: F401  (pytest finds fixtures by name)


@pytest.fixture
def helper_dir(tmp_path: Path) -> HelperDir:
    return HelperDir(tmp_path / "bin")


@pytest.fixture
def kube_api() -> Iterator[KubeAPIServer]:
    server = KubeAPIServer().start()
    try:
        yield server
    finally:
        server.stop()


def write_config(path: Path, doc: dict | str) -> Path:
    """Write a Docker config (dict → JSON, str as is) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path
