"""What each credential source answers for one host, in chain order, and which answer the chain picks.

This module owns the :class:`Trace` value every keychain can produce (``keychain.trace(host, ref)``), the
:class:`Report` built by :func:`explain` over a :class:`~soci_grpc.keychain.chain.CredentialChain`, and its
text rendering for ``soci auth explain``. It asks every enabled source (not only up to the first answer) so
the user sees shadowed credentials too; the pick itself is computed with the chain's own rule
(:func:`soci_grpc.keychain.chain.pick`), so explain and the chain cannot disagree.

It will not talk to a registry (``--check`` lives in the CLI command) and never prints a secret: answers are
shown through :func:`describe_credentials` (user name, kind, origin, expiry), and trace steps are written by
the keychains without secret values.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from soci_fs.errors import SociError
from soci_fs.registry.credentials import Credentials


@dataclass(frozen=True)
class Trace:
    """One source's answer for (host, ref), with the steps that led to it.

    ``steps`` are human-readable lines (file read, store selected, entries matched, candidates ranked)
    that never contain a password, token or auth blob.
    """

    answer: Credentials | None = None
    error: str = ""
    steps: tuple[str, ...] = ()


@dataclass(frozen=True)
class SourceReport:
    """One slot of the chain in the report."""

    name: str
    enabled: bool
    trace: Trace = field(default_factory=Trace)
    note: str = ""  # why a slot is not evaluated (disabled, lives in the daemon, ...)


@dataclass(frozen=True)
class Report:
    """Everything ``soci auth explain`` prints."""

    host: str
    ref: str
    sources: tuple[SourceReport, ...]
    picked: str  # name of the source the chain uses, "" when none
    reason: str


def describe_credentials(creds: Credentials | None, now: float | None = None) -> str:
    """A one-line, secret-free description: user, kind, origin and expiry."""
    if creds is None or creds.is_empty():
        return "no credentials"
    if creds.identity_token:
        kind = "identity token"
    elif creds.registry_token:
        kind = "registry token"
    elif creds.password:
        kind = "password"
    else:
        kind = "user name only"
    parts = [f"user {creds.username!r}" if creds.username else "no user name", kind]
    if creds.source:
        parts.append(f"from {creds.source}")
    if creds.expires_at is not None:
        now = time.time() if now is None else now
        left = creds.expires_at - now
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(creds.expires_at))
        parts.append(f"expires {stamp} ({'expired' if left <= 0 else f'in {int(left)} s'})")
    return ", ".join(parts)


def trace_source(source: Callable[[str, str], Credentials | None], host: str, ref: str) -> Trace:
    """Ask one source; use its ``trace`` method when it has one, else call it and wrap the answer."""
    tracer: Any = getattr(source, "trace", None)
    try:
        if tracer is not None:
            return tracer(host, ref)
        return Trace(answer=source(host, ref))
    except SociError as exc:
        return Trace(error=str(exc))


def explain(chain: Any, host: str, ref: str, *, notes: dict[str, str] | None = None) -> Report:
    """Evaluate every enabled source of ``chain`` for (host, ref) and say which one the chain picks.

    Args:
        chain: a :class:`~soci_grpc.keychain.chain.CredentialChain`.
        host: registry host as the client would pass it (``registry-1.docker.io``).
        ref: the image reference.
        notes: per slot name, why a disabled slot is not evaluated here (shown instead of "disabled").
    """
    from soci_grpc.keychain.chain import pick  # the chain's own rule, so both agree

    notes = notes or {}
    reports: list[SourceReport] = []
    answers: list[tuple[str, Trace]] = []
    for name, source in chain.slots():
        if source is None:
            reports.append(SourceReport(name=name, enabled=False, note=notes.get(name, "disabled")))
            continue
        tr = trace_source(source, host, ref)
        answers.append((name, tr))
        reports.append(SourceReport(name=name, enabled=True, trace=tr))
    picked, reason = pick([(name, tr.answer, tr.error) for name, tr in answers])
    return Report(host=host, ref=ref, sources=tuple(reports), picked=picked, reason=reason)


def render(report: Report, *, header: str = "", now: float | None = None) -> str:
    """The text ``soci auth explain`` prints (no secrets)."""
    lines: list[str] = []
    if header:
        lines.append(header)
    lines.append(f"reference: {report.ref}")
    lines.append(f"registry host: {report.host}")
    lines.append("sources, in chain order:")
    for i, src in enumerate(report.sources, 1):
        mark = "  <- picked" if src.name == report.picked else ""
        if not src.enabled:
            lines.append(f"  {i}. {src.name}: not evaluated ({src.note})")
            continue
        tr = src.trace
        if tr.error:
            answer = f"ERROR: {tr.error}"
        else:
            answer = describe_credentials(tr.answer, now)
        lines.append(f"  {i}. {src.name}: {answer}{mark}")
        for step in tr.steps:
            lines.append(f"       - {step}")
    lines.append(f"result: {report.reason}")
    return "\n".join(lines) + "\n"
