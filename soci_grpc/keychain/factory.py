"""Build the daemon's credential chain from its configuration.

This module owns turning :class:`soci_grpc.config.Config` (or its :class:`~soci_grpc.config.KeychainSettings`)
into the sources and the chain, and the start-up policy for the one source that runs in the background:

* the Docker config keychain is always built (``docker_config``: the file, "" for Docker's own lookup;
  ``credential_helper_timeout_sec``: how long a ``docker-credential-*`` helper may take);
* the CRI store is built when ``[cri_keychain] enable_keychain`` is set (``credential_ttl_sec`` becomes its
  TTL); with ``persist`` its entries are kept in ``persist_path`` (a
  :class:`~soci_grpc.keychain.cri.CredentialFile`) and loaded from there now, so credentials recorded before
  a daemon restart still work;
* the Kubernetes-secret keychain is built when ``[kubeconfig_keychain] enable_keychain`` is set, started in
  its background thread, and waited for at most ``first_sync_wait_sec`` seconds. If the first list is not
  complete by then, start-up goes on (WARNING): lookups answer from what has been synced so far and the
  sync keeps going in the background.

:func:`build_chain` returns a :class:`BuiltChain`: the chain (the ``Credential`` callable to hand to the
registry client), the sources themselves (the CRI proxy records pulls into ``cri``), and :meth:`stop` for the
background work. It will not decide the lookup order (``chain.py`` does) or serve the CRI proxy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from soci_grpc.config import Config, KeychainSettings
from soci_grpc.keychain.chain import CredentialChain
from soci_grpc.keychain.cri import CredentialFile, CriCredentialStore
from soci_grpc.keychain.docker_config import DockerConfigKeychain
from soci_grpc.keychain.helpers import HelperRunner
from soci_grpc.keychain.kubeconfig import KubeSecretKeychain

log = logging.getLogger(__name__)


@dataclass
class BuiltChain:
    """The chain and its parts. ``cri`` / ``kubernetes`` are None when that source is disabled."""

    chain: CredentialChain
    docker_config: DockerConfigKeychain
    cri: CriCredentialStore | None = None
    kubernetes: KubeSecretKeychain | None = None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop background work (the Kubernetes sync thread). Safe to call more than once."""
        if self.kubernetes is not None:
            self.kubernetes.stop(timeout)

    def __enter__(self) -> BuiltChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def build_chain(config: Config | KeychainSettings, **kube_options: float) -> BuiltChain:
    """Build the sources named by ``config`` and the chain over them.

    Args:
        config: the daemon configuration, or just its keychain settings.
        kube_options: extra keyword arguments for :class:`KubeSecretKeychain` (poll interval and backoff
            bounds; tests shorten them).

    Raises:
        InvalidArgument: a setting the keychains refuse (a bad namespace, a non-positive helper timeout,
            a malformed ``DOCKER_AUTH_CONFIG``); nothing has been started then.
    """
    s = config.keychain_settings() if isinstance(config, Config) else config
    docker = DockerConfigKeychain(s.docker_config or None, helpers=HelperRunner(timeout=s.helper_timeout))
    log.info("credential source docker-config: %s", docker.path)

    cri: CriCredentialStore | None = None
    if s.cri_enabled:
        persister = CredentialFile(s.cri_persist_path) if s.cri_persist else None
        cri = CriCredentialStore(ttl=s.cri_ttl, persist=persister)
        log.info(
            "credential source cri: enabled (backend image service %s; %s)",
            s.cri_image_service_path,
            f"persisted in {s.cri_persist_path}" if persister is not None else "in memory only",
        )

    kube: KubeSecretKeychain | None = None
    if s.kube_enabled:
        kube = KubeSecretKeychain(
            s.kubeconfig_path or None,
            namespaces=s.kube_namespaces,
            label_selector=s.kube_label_selector,
            **kube_options,  # type: ignore[arg-type]
        )
        kube.start()
        if s.kube_first_sync_wait > 0 and not kube.wait_ready(s.kube_first_sync_wait):
            log.warning(
                "credential source kubernetes-secrets: first sync not complete after %g s; starting "
                "without it (lookups use what has been synced so far, the sync goes on in the background)",
                s.kube_first_sync_wait,
            )
        else:
            log.info("credential source kubernetes-secrets: enabled (synced: %s)", kube.ready)

    return BuiltChain(
        chain=CredentialChain(docker, cri=cri, kubernetes=kube),
        docker_config=docker,
        cri=cri,
        kubernetes=kube,
    )
