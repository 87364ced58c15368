"""The Docker credential-helper protocol: run ``docker-credential-<name> get`` and read its answer.

This module owns running one helper for one server URL: the name check, the PATH lookup, the child
process (its own process group, a timeout after which the whole group is killed), and the reply:

* stdin: the server URL (the registry key, e.g. ``https://index.docker.io/v1/``), no newline;
* stdout: JSON ``{"ServerURL": ..., "Username": ..., "Secret": ...}``; user name ``<token>`` means the
  secret is an identity token;
* exit status non-zero with ``credentials not found in native keychain`` → no credentials (None).

Every failure (missing executable, timeout, non-zero exit, output that is not the JSON object) is an error
naming the helper and the server URL. Error messages and logs never contain the helper's output: stdout
may hold the secret, and stderr is shown only as a byte count.

It will not cache answers (rotation must show on the next lookup) and does not know which helper a host
uses (``docker_config.py`` decides that).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping

from soci_fs.errors import FailedPrecondition, InvalidArgument, Unavailable
from soci_fs.registry.credentials import Credentials

log = logging.getLogger(__name__)

HELPER_PREFIX = "docker-credential-"
NOT_FOUND_MESSAGE = "credentials not found in native keychain"
TOKEN_USERNAME = "<token>"
DEFAULT_TIMEOUT = 5.0

# A plain program-name suffix: no path separators, spaces, shell metacharacters or leading dash.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


class CredentialHelperError(FailedPrecondition):
    """A credential helper is missing, failed, or answered something that is not credentials."""


class CredentialHelperTimeout(Unavailable):
    """A credential helper did not answer in time (its process group was killed)."""


def validate_helper_name(name: str) -> str:
    """Return ``name`` when it is a plain helper name; ``InvalidArgument`` otherwise."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidArgument(
            f"credential helper name {name!r} is not a plain name "
            "(letters, digits, '.', '_', '+', '-'; no leading '-')"
        )
    return name


class HelperRunner:
    """Runs credential helpers.

    Args:
        timeout: seconds a helper may take before its process group is killed.
        search_path: the PATH used to find ``docker-credential-<name>`` (default: this process's PATH); it is
            also put in front of the helper's own PATH.
        env: the helper's environment (default: this process's, with ``HOME`` filled in when unset, since
            helpers such as ecr-login need it and systemd does not set it).
    """

    def __init__(
        self,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        search_path: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if timeout <= 0:
            raise InvalidArgument(f"credential helper timeout must be > 0, got {timeout}")
        self.timeout = timeout
        self.search_path = search_path
        self._env = dict(env) if env is not None else None
        self._lock = threading.Lock()
        self._stats: dict[str, dict[str, float]] = {}

    def statistics(self) -> dict[str, dict[str, float]]:
        """Per helper: calls, errors, timeouts, total seconds."""
        with self._lock:
            return {k: dict(v) for k, v in self._stats.items()}

    def _count(self, name: str, what: str, seconds: float) -> None:
        with self._lock:
            s = self._stats.setdefault(name, {"calls": 0, "errors": 0, "timeouts": 0, "seconds": 0.0})
            s["calls"] += 1
            s["seconds"] += seconds
            if what:
                s[what] += 1

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ) if self._env is None else dict(self._env)
        if not env.get("HOME"):
            env["HOME"] = os.path.expanduser("~")
        if self.search_path is not None:
            # The helper's own PATH: the search path first, then what it would have had anyway.
            env["PATH"] = os.pathsep.join(p for p in (self.search_path, env.get("PATH", os.defpath)) if p)
        return env

    def find(self, name: str) -> str:
        """The helper's executable path; ``CredentialHelperError`` when it is not on the search path."""
        validate_helper_name(name)
        prog = HELPER_PREFIX + name
        path = self.search_path if self.search_path is not None else os.environ.get("PATH", os.defpath)
        exe = shutil.which(prog, path=path)
        if exe is None:
            raise CredentialHelperError(f"credential helper {prog!r} not found on PATH ({path})")
        return exe

    def get(self, name: str, server_url: str) -> Credentials | None:
        """Ask helper ``name`` for ``server_url``; None when it has no credentials for it."""
        prog = HELPER_PREFIX + name
        exe = self.find(name)
        started = time.monotonic()
        outcome = "errors"
        try:
            creds = self._run(exe, prog, name, server_url)
            outcome = ""
            return creds
        except CredentialHelperTimeout:
            outcome = "timeouts"
            raise
        finally:
            self._count(name, outcome, time.monotonic() - started)

    def _run(self, exe: str, prog: str, name: str, server_url: str) -> Credentials | None:
        what = f"credential helper {prog!r} for {server_url!r}"
        try:
            proc = subprocess.Popen(
                [exe, "get"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._environment(),
                start_new_session=True,  # its own process group, so a timeout kills its children too
                close_fds=True,
            )
        except OSError as exc:
            raise CredentialHelperError(f"{what}: cannot run: {exc.strerror}") from None
        try:
            out, err = proc.communicate(server_url.encode(), timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise CredentialHelperTimeout(
                f"{what}: no answer within {self.timeout:g} s; its process group was killed"
            ) from None
        finally:
            if proc.poll() is None:  # communicate() raised something else
                _kill_group(proc)
        if proc.returncode != 0:
            if NOT_FOUND_MESSAGE in out.decode("utf-8", "replace") or NOT_FOUND_MESSAGE in err.decode(
                "utf-8", "replace"
            ):
                log.debug("%s: no credentials", what)
                return None
            raise CredentialHelperError(
                f"{what}: exited with status {proc.returncode}"
                f" (stdout {len(out)} bytes, stderr {len(err)} bytes, not shown: they may hold secrets;"
                f" run '{prog} get' by hand to see them)"
            )
        return _parse_reply(out, what, source=f"helper:{name}")


def _parse_reply(out: bytes, what: str, *, source: str) -> Credentials | None:
    try:
        doc = json.loads(out)
    except (UnicodeDecodeError, json.JSONDecodeError):
        doc = None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("Username", ""), str)
        or not isinstance(doc.get("Secret", ""), str)
    ):
        raise CredentialHelperError(
            f"{what}: answered {len(out)} bytes that are not a JSON object with string Username and Secret"
        )
    from soci_grpc.keychain.docker_config import jwt_expiry  # shared utility; no import cycle at load

    user, secret = doc.get("Username", ""), doc.get("Secret", "")
    if not user and not secret:
        return None
    if user == TOKEN_USERNAME:
        return Credentials(identity_token=secret, source=source, expires_at=jwt_expiry(secret))
    return Credentials(username=user, password=secret, source=source, expires_at=jwt_expiry(secret))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the helper's whole process group and reap it, without waiting on pipes held by others."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:
        proc.kill()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        log.error("credential helper process %d did not exit after SIGKILL", proc.pid)
