"""Push a set of blobs and manifests to one repository (the graph copy behind ``soci push``).

Owns: concurrent blob uploads bounded by ``max_concurrent_uploads`` (existing blobs are skipped after a
HEAD), manifests pushed in the given order (children before parents) by digest, the progress callbacks the
CLI turns into its ``pushing artifact with digest: <d>`` / ``successfully pushed artifact with digest: <d>`` /
``skipped artifact with digest: <d>`` lines, and upkeep of the referrers fallback tag (``sha256-<hex>``)
when a manifest with a ``subject`` is pushed to a registry that does not answer with ``OCI-Subject``.

Will not: print anything, pick credentials, or decide which indexes to push (the CLI does).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from soci_fs.errors import FormatError, NotFound
from soci_fs.registry.client import OCI_INDEX, Descriptor, RegistryClient, referrers_tag
from soci_fs.registry.reference import Reference

log = logging.getLogger(__name__)

DEFAULT_MAX_CONCURRENT_UPLOADS = 3

Callback = Callable[[Descriptor], None]


@dataclass(frozen=True)
class Artifact:
    """Content to push: its descriptor and the bytes (or a file holding them)."""

    descriptor: Descriptor
    data: bytes | Path


@dataclass
class PushResult:
    pushed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    mounted: list[str] = field(default_factory=list)
    referrers_tag_updated: bool = False


def _noop(_: Descriptor) -> None:
    pass


def push_artifacts(
    client: RegistryClient,
    ref: Reference,
    blobs: Sequence[Artifact],
    manifests: Sequence[Artifact],
    *,
    max_concurrent_uploads: int = DEFAULT_MAX_CONCURRENT_UPLOADS,
    mount_from: str = "",
    chunk_size: int | None = None,
    on_pushing: Callback = _noop,
    on_pushed: Callback = _noop,
    on_skipped: Callback = _noop,
) -> PushResult:
    """Push ``blobs`` (concurrently) then ``manifests`` (in order, by digest) to ``ref``'s repository.

    Args:
        max_concurrent_uploads: parallel blob uploads; values < 1 mean the default (3).
        mount_from: try a cross-repository mount from this repository first.
        chunk_size: use chunked uploads for blobs larger than this.
        on_pushing / on_pushed / on_skipped: progress callbacks, called from worker threads.

    Raises:
        The first error of any upload (``Unauthenticated``, ``Unavailable``, ...); remaining uploads that have
        not started are cancelled.
    """
    if max_concurrent_uploads < 1:
        max_concurrent_uploads = DEFAULT_MAX_CONCURRENT_UPLOADS
    result = PushResult()

    def one_blob(a: Artifact) -> None:
        d = a.descriptor
        if client.blob_exists(ref, d.digest, push=True):
            result.skipped.append(d.digest)
            on_skipped(d)
            return
        on_pushing(d)
        how = client.push_blob(ref, d.digest, a.data, mount_from=mount_from, chunk_size=chunk_size)
        (result.mounted if how == "mounted" else result.pushed).append(d.digest)
        on_pushed(d)

    if blobs:
        with ThreadPoolExecutor(max_workers=max_concurrent_uploads, thread_name_prefix="soci-push") as pool:
            futures = [pool.submit(one_blob, a) for a in blobs]
            _, not_done = wait(futures, return_when=FIRST_EXCEPTION)
            for f in not_done:
                f.cancel()
            for f in futures:
                if f.done() and not f.cancelled() and f.exception() is not None:
                    raise f.exception()  # type: ignore[misc]

    for a in manifests:
        d = a.descriptor
        existing = client.head_manifest(ref, d.digest)
        if existing is not None:
            result.skipped.append(d.digest)
            on_skipped(d)
            continue
        on_pushing(d)
        data = a.data.read_bytes() if isinstance(a.data, Path) else a.data
        digest, resp = client.push_manifest(ref, d.digest, data, d.media_type)
        if digest != d.digest:
            raise FormatError(f"manifest content hashes to {digest}, descriptor says {d.digest}")
        result.pushed.append(d.digest)
        on_pushed(d)
        if not resp.headers.get("OCI-Subject"):
            result.referrers_tag_updated |= _update_referrers_tag(client, ref, d, data)
    return result


def _update_referrers_tag(client: RegistryClient, ref: Reference, desc: Descriptor, data: bytes) -> bool:
    """Add ``desc`` to the referrers index at the subject's fallback tag; True if the tag was written."""
    try:
        doc = json.loads(data)
    except ValueError:
        return False
    subject = doc.get("subject") if isinstance(doc, dict) else None
    if not isinstance(subject, dict) or not subject.get("digest"):
        return False
    artifact_type = doc.get("artifactType") or (doc.get("config") or {}).get("mediaType", "")
    entry = Descriptor(
        desc.media_type or str(doc.get("mediaType", "")),
        desc.digest,
        len(data),
        artifact_type=str(artifact_type),
        annotations=dict(doc.get("annotations") or {}),
    )
    tag = referrers_tag(str(subject["digest"]))
    try:
        index = client.get_manifest(ref, tag, accept=(OCI_INDEX,)).json()
    except NotFound:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    manifests = [m for m in index.get("manifests") or [] if isinstance(m, dict)]
    if any(m.get("digest") == desc.digest for m in manifests):
        return False
    manifests.append(entry.to_json())
    index["manifests"] = manifests
    index.setdefault("schemaVersion", 2)
    index.setdefault("mediaType", OCI_INDEX)
    body = json.dumps(index, separators=(",", ":")).encode()
    client.push_manifest(ref, tag, body, OCI_INDEX)
    log.debug("updated referrers tag %s in %s with %s", tag, ref.locator, desc.digest)
    return True
