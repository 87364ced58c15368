"""The credential value passed from keychains to the registry client, and the ``Credential`` callable type.

A ``Credential`` is a function ``(host, ref) -> Credentials | None`` called on every token fetch, so that a
rotated secret takes effect without a restart. Keychains are constructors that return one; the chain in
``soci_grpc.keychain.chain`` combines them. ``Credentials`` never shows its secrets in ``repr``/``str``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Credentials:
    """Registry credentials and where they came from.

    Exactly one way to authenticate is meaningful per value: ``username``/``password`` (Basic or OAuth2
    password grant), ``identity_token`` (OAuth2 refresh-token grant; ``username`` may be ``<token>``), or
    ``registry_token`` (a bearer token used as is).
    """

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)
    source: str = ""  # e.g. "docker-config:/root/.docker/config.json", "helper:ecr-login", "secret:ns/name"
    expires_at: float | None = None  # unix time, when the source knows it

    def is_empty(self) -> bool:
        """True when this value carries no way to authenticate."""
        return not (self.username or self.password or self.identity_token or self.registry_token)

    def __str__(self) -> str:
        kind = (
            "identity-token"
            if self.identity_token
            else "registry-token"
            if self.registry_token
            else "password"
            if self.password
            else "none"
        )
        return f"Credentials(user={self.username!r}, kind={kind}, source={self.source!r})"


Credential = Callable[[str, str], "Credentials | None"]
"""``(host, ref) -> Credentials | None``: ``host`` as in the registry URL (``registry-1.docker.io``,
``127.0.0.1:5000``), ``ref`` the full image reference being fetched (may be empty)."""
