"""Keep secrets out of logs and error messages.

Owns: URL redaction (every query value becomes ``redacted``, user info is dropped), header redaction
(``Authorization``, cookies, security tokens), scrubbing known secret strings out of free text, and a logging
filter for urllib3's connection-pool logger, which otherwise logs request paths with signed query strings at
DEBUG.

Will not: decide what is secret beyond these rules; callers pass the secrets they hold to ``scrub``.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "redacted"
SENSITIVE_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-amz-security-token",
        "x-registry-auth",
        "x-auth-token",
    }
)
_TOKEN_KEYS_RE = re.compile(
    r'("(?:token|access_token|refresh_token|id_token|password|secret)"\s*:\s*")[^"]*(")', re.IGNORECASE
)


def redact_url(url: str) -> str:
    """Replace every query value with ``redacted`` and drop ``user:password@`` from the URL."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED) for k, _ in pairs], safe="")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def redact_path(path: str) -> str:
    """Like :func:`redact_url` for a request target (``/path?query``)."""
    if "?" not in path:
        return path
    head, query = path.split("?", 1)
    pairs = parse_qsl(query, keep_blank_values=True)
    return head + "?" + urlencode([(k, REDACTED) for k, _ in pairs], safe="")


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``headers`` with the values of sensitive headers replaced."""
    return {k: (REDACTED if k.lower() in SENSITIVE_HEADERS else v) for k, v in headers.items()}


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove secrets from free text (for example a response body quoted in an error).

    Known token fields of JSON bodies are blanked, and each non-empty string in ``secrets`` (and its base64
    forms as ``user:secret`` cannot be known here, only the plain value) is replaced with ``redacted``.
    """
    out = _TOKEN_KEYS_RE.sub(r"\1" + REDACTED + r"\2", text)
    for s in secrets:
        if s and len(s) >= 3:
            out = out.replace(s, REDACTED)
            b64 = base64.b64encode(s.encode()).decode().rstrip("=")
            if len(b64) >= 4:
                out = out.replace(b64, REDACTED)
    return out


def short_body(body: bytes, limit: int = 200, secrets: Iterable[str] = ()) -> str:
    """A printable, scrubbed, truncated excerpt of a response body for an error message."""
    text = body[: limit * 4].decode("utf-8", "replace")
    text = scrub(" ".join(text.split()), secrets)
    return text[:limit] + ("…" if len(text) > limit or len(body) > limit * 4 else "")


class _Urllib3Redactor(logging.Filter):
    """Rewrites urllib3 connection-pool records so request targets carry no query values."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and args:
            record.args = tuple(
                redact_path(a) if isinstance(a, str) and "?" in a and a.startswith("/") else a for a in args
            )
        return True


_installed = False


def install_urllib3_filter() -> None:
    """Attach the redacting filter to ``urllib3.connectionpool`` once per process."""
    global _installed
    if _installed:
        return
    logging.getLogger("urllib3.connectionpool").addFilter(_Urllib3Redactor())
    _installed = True
