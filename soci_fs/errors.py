"""The project's exception hierarchy, shared by the data plane and the control plane.

Each boundary (FUSE errno, gRPC status, CLI exit code) maps these with one table of its own; nothing else
maps errors. Messages name the object and the cause; the cause is chained with ``raise ... from exc``.
Secrets never go into a message.
"""

from __future__ import annotations


class SociError(Exception):
    """Base class of every error this project raises on purpose."""


class NotFound(SociError):
    """A named object (blob, index, zTOC, file, snapshot) does not exist."""


class AlreadyExists(SociError):
    """The object exists already (for Prepare: the remote layer is ready)."""


class InvalidArgument(SociError):
    """The caller passed a value that cannot be used (bad flag, bad reference, bad path)."""


class FailedPrecondition(SociError):
    """The operation is not possible in the current state."""


class Unauthenticated(SociError):
    """The registry refused the credentials, or none were available."""


class Unavailable(SociError):
    """A remote (registry, containerd) cannot be reached now; retrying later may succeed."""


class FormatError(SociError):
    """Bytes that should hold a known format do not: bad zTOC, bad checkpoint blob, digest mismatch,
    corrupt gzip, truncated tar. The message names the field or position at fault."""
