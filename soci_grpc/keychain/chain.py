"""The credential chain: the order of the sources and the fall-through rule, in one place.

The rule (the user's contract, in our words): the sources are asked in a fixed order — the Docker config
(always on), then credentials recorded from CRI pulls, then Kubernetes secrets (each of the last two only
when enabled). The first source that answers with non-empty credentials decides. If those credentials turn
out to be wrong or expired, the chain does not offer the next source's credentials instead: a source that
answers owns the answer, and the fix is to correct that source. A source that answers nothing (None or
empty credentials) passes the question on. A source that fails (a malformed config file, a broken
credential helper) stops the lookup with its error — no silent fall-through on errors either.

This module owns that order (:data:`SOURCE_ORDER`), the pick (:func:`pick`, also used by ``explain.py``),
and the bookkeeping of which source answered each host (for ``soci auth explain`` and metrics). It will
not build the sources (the daemon's start-up code and the CLI do) or retry anything.

The upstream code asks Kubernetes secrets before CRI; we follow the documented order (CRI first), as the
contract says.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from soci_fs.errors import SociError
from soci_fs.registry.credentials import Credential, Credentials

log = logging.getLogger(__name__)

SOURCE_ORDER = ("docker-config", "cri", "kubernetes-secrets")


@dataclass(frozen=True)
class Answer:
    """What the chain answered for one lookup (kept per host, for explain and metrics)."""

    host: str
    ref: str
    source: str  # the slot that answered; "" when none did
    credentials: Credentials | None
    error: str
    at: float


def pick(answers: Sequence[tuple[str, Credentials | None, str]]) -> tuple[str, str]:
    """Apply the rule to (source name, answer, error text) in chain order: (picked source, reason).

    The picked name is "" when no source gives credentials or an error stops the lookup first.
    """
    passed: list[str] = []
    for name, creds, error in answers:
        if error:
            return "", (
                f"the chain stops at {name}: it failed ({error}); later sources are not asked"
                + (f" ({', '.join(passed)} had nothing)" if passed else "")
            )
        if creds is not None and not creds.is_empty():
            tail = f" after {', '.join(passed)} had nothing" if passed else ""
            return name, (
                f"{name} is the first source in order with non-empty credentials{tail}; "
                "if they are rejected or expired the chain does not fall through to later sources"
            )
        passed.append(name)
    if not answers:
        return "", "no source is enabled; requests go out anonymously"
    return "", "no source has credentials for this host; requests go out anonymously"


class CredentialChain:
    """Docker config, then CRI, then Kubernetes secrets, as one ``Credential`` callable.

    Args:
        docker_config: the Docker config keychain (always on).
        cri: the CRI credential store, or None when ``[cri_keychain]`` is disabled.
        kubernetes: the Kubernetes-secret keychain, or None when ``[kubeconfig_keychain]`` is disabled.
    """

    def __init__(
        self,
        docker_config: Credential,
        cri: Credential | None = None,
        kubernetes: Credential | None = None,
    ) -> None:
        self._slots: tuple[tuple[str, Credential | None], ...] = tuple(
            zip(SOURCE_ORDER, (docker_config, cri, kubernetes), strict=True)
        )
        self._lock = threading.Lock()
        self._last: dict[str, Answer] = {}
        self._counts: dict[str, int] = {name: 0 for name in (*SOURCE_ORDER, "none", "error")}

    def slots(self) -> tuple[tuple[str, Credential | None], ...]:
        """(name, source or None when disabled), in chain order."""
        return self._slots

    def __call__(self, host: str, ref: str) -> Credentials | None:
        passed: list[str] = []
        for name, source in self._slots:
            if source is None:
                continue
            try:
                creds = source(host, ref)
            except SociError as exc:
                self._note(Answer(host, ref, name, None, str(exc), time.time()), "error")
                log.debug("credentials for %s: %s failed; not asking later sources", host, name)
                raise
            if creds is not None and not creds.is_empty():
                self._note(Answer(host, ref, name, creds, "", time.time()), name)
                log.debug("credentials for %s: %s answered (%s)", host, name, creds)
                return creds
            passed.append(name)
        self._note(Answer(host, ref, "", None, "", time.time()), "none")
        log.debug("credentials for %s: no source has any (asked %s)", host, ", ".join(passed) or "none")
        return None

    def _note(self, answer: Answer, counter: str) -> None:
        with self._lock:
            self._last[answer.host] = answer
            self._counts[counter] += 1

    def last_answer(self, host: str) -> Answer | None:
        """The most recent lookup for ``host``."""
        with self._lock:
            return self._last.get(host)

    def statistics(self) -> dict[str, int]:
        """Lookups answered per source, plus ``none`` and ``error``."""
        with self._lock:
            return dict(self._counts)
