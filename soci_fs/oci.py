"""OCI image-spec values and OCI image layouts (a directory or a tar of one).

Owns:
* the image-spec v1.1.1 types SOCI touches (:class:`Platform`, :class:`Descriptor`, :class:`Manifest`,
  :class:`ImageIndex`), decoded the way Go ``json.Unmarshal`` fills those structs (unknown members dropped,
  case-insensitive member names) and encoded in canonical Go form (:mod:`soci_fs.gojson`);
* platform parsing, normalization and matching with containerd's rules (``Parse``, ``Normalize``,
  ``Only``, ``OnlyStrict``);
* reading a layout (:class:`Layout`): safe extraction of a tar, root resolution from ``index.json``,
  platform selection, blob reads that verify digest and size;
* writing a layout directory or an OCI archive tar atomically (temp next to the destination, then rename).

Will not: talk to a registry or containerd, build zTOCs or SOCI indexes (see :mod:`soci_fs.index`), or
accept Docker ``docker save`` tarballs.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import json
import os
import platform as _host
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from soci_fs import gojson
from soci_fs.errors import FormatError, InvalidArgument, NotFound
from soci_fs.gojson import Struct

# Media types.
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MANIFEST_TYPES = frozenset({MT_OCI_MANIFEST, MT_DOCKER_MANIFEST})
INDEX_TYPES = frozenset({MT_OCI_INDEX, MT_DOCKER_LIST})

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
OCI_LAYOUT_FILE = b'{"imageLayoutVersion":"1.0.0"}'

_DIGEST_RE = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")

# ---------------------------------------------------------------------------------------------------------
# Go-style decoding helpers


def _members(obj: Any, what: str, names: Iterable[str]) -> dict[str, Any]:
    """Map a decoded JSON object onto struct member names like Go does (exact name first, else case-folded;
    a later duplicate wins; unknown members are dropped)."""
    if not isinstance(obj, dict):
        raise FormatError(f"{what}: expected a JSON object, got {type(obj).__name__}")
    names = tuple(names)
    folded = {n.lower(): n for n in reversed(names)}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = key if key in names else folded.get(key.lower())
        if name is not None:
            out[name] = value
    return out


def _str(v: Any, what: str) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise FormatError(f"{what}: expected a string, got {json.dumps(v)[:40]}")
    return v


def _int(v: Any, what: str) -> int:
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int):
        raise FormatError(f"{what}: expected an integer, got {json.dumps(v)[:40]}")
    if not -(1 << 63) <= v < (1 << 63):
        raise FormatError(f"{what}: {v} overflows int64")
    return v


def _str_map(v: Any, what: str) -> dict[str, str] | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise FormatError(f"{what}: expected an object of strings")
    return {k: _str(val, f"{what}[{k!r}]") for k, val in v.items()}


def _str_list(v: Any, what: str) -> tuple[str, ...] | None:
    if v is None:
        return None
    if not isinstance(v, list):
        raise FormatError(f"{what}: expected an array of strings")
    return tuple(_str(x, what) for x in v)


# ---------------------------------------------------------------------------------------------------------
# Platforms


@dataclass(frozen=True)
class Platform:
    """image-spec ``Platform`` (members serialize in this order, empty optional ones omitted)."""

    architecture: str
    os: str
    os_version: str = ""
    os_features: tuple[str, ...] | None = None
    variant: str = ""

    def to_go(self) -> Struct:
        m: list[tuple[str, Any]] = [("architecture", self.architecture), ("os", self.os)]
        if self.os_version:
            m.append(("os.version", self.os_version))
        if self.os_features:
            m.append(("os.features", list(self.os_features)))
        if self.variant:
            m.append(("variant", self.variant))
        return Struct(*m)

    @classmethod
    def from_json(cls, obj: Any, what: str = "platform") -> Platform:
        f = _members(obj, what, ("architecture", "os", "os.version", "os.features", "variant"))
        return cls(
            architecture=_str(f.get("architecture"), f"{what}.architecture"),
            os=_str(f.get("os"), f"{what}.os"),
            os_version=_str(f.get("os.version"), f"{what}.os.version"),
            os_features=_str_list(f.get("os.features"), f"{what}.os.features"),
            variant=_str(f.get("variant"), f"{what}.variant"),
        )

    def __str__(self) -> str:
        """containerd ``platforms.Format``: ``os/arch[/variant]``."""
        s = f"{self.os or 'unknown'}/{self.architecture or 'unknown'}"
        return f"{s}/{self.variant}" if self.variant else s


def _normalize_arch(arch: str, variant: str) -> tuple[str, str]:
    arch, variant = arch.lower(), variant.lower()
    if arch == "i386":
        return "386", ""
    if arch in ("x86_64", "x86-64", "amd64"):
        return "amd64", "" if variant == "v1" else variant
    if arch in ("aarch64", "arm64"):
        return "arm64", "" if variant in ("8", "v8") else variant
    if arch == "armhf":
        return "arm", "v7"
    if arch == "armel":
        return "arm", "v6"
    if arch == "arm":
        if variant in ("", "7"):
            return "arm", "v7"
        if variant in ("5", "6", "8"):
            return "arm", "v" + variant
    return arch, variant


def _normalize_os(os_name: str) -> str:
    if not os_name:
        return "linux"
    os_name = os_name.lower()
    return "darwin" if os_name == "macos" else os_name


def normalize(p: Platform) -> Platform:
    """containerd ``platforms.Normalize``."""
    arch, variant = _normalize_arch(p.architecture, p.variant)
    return replace(p, os=_normalize_os(p.os), architecture=arch, variant=variant)


_KNOWN_OS = frozenset(
    {
        "aix",
        "android",
        "darwin",
        "dragonfly",
        "freebsd",
        "hurd",
        "illumos",
        "ios",
        "js",
        "linux",
        "nacl",
        "netbsd",
        "openbsd",
        "plan9",
        "solaris",
        "windows",
        "zos",
    }
)
_KNOWN_ARCH = frozenset(
    {
        "386",
        "amd64",
        "amd64p32",
        "arm",
        "armbe",
        "arm64",
        "arm64be",
        "ppc64",
        "ppc64le",
        "loong64",
        "mips",
        "mipsle",
        "mips64",
        "mips64le",
        "mips64p32",
        "mips64p32le",
        "ppc",
        "riscv",
        "riscv64",
        "s390",
        "s390x",
        "sparc",
        "sparc64",
        "wasm",
    }
)
_SPECIFIER_PART = re.compile(r"^[A-Za-z0-9_.-]+$")


def host_platform() -> Platform:
    """The platform of this machine (containerd ``DefaultSpec``); ``linux/amd64`` on x86-64 Linux."""
    arch, variant = _normalize_arch(_host.machine() or "amd64", "")
    if arch == "arm64":
        variant = "v8"
    return Platform(architecture=arch, os=_normalize_os(_host.system()), variant=variant)


def parse_platform(spec: str) -> Platform:
    """containerd ``platforms.Parse``: ``os``, ``arch``, ``os/arch`` or ``os/arch/variant`` (normalized;
    ``arm64`` without a variant becomes ``arm64/v8`` as containerd does).

    Raises:
        InvalidArgument: empty part, bad characters, unknown single word.
    """
    parts = spec.strip().split("/")
    for part in parts:
        if not _SPECIFIER_PART.match(part):
            raise InvalidArgument(f"{spec!r}: invalid platform specifier (expected os[/arch[/variant]])")
    host = host_platform()
    if len(parts) == 1:
        word = parts[0].lower()
        if _normalize_os(word) in _KNOWN_OS:
            return Platform(architecture=host.architecture, os=_normalize_os(word), variant=host.variant)
        arch, variant = _normalize_arch(word, "")
        if arch in _KNOWN_ARCH:
            if arch == "arm64" and not variant:
                variant = "v8"
            return Platform(architecture=arch, os=host.os, variant=variant)
        raise InvalidArgument(f"{spec!r}: unknown operating system or architecture")
    if len(parts) == 2:
        arch, variant = _normalize_arch(parts[1], "")
    elif len(parts) == 3:
        arch, variant = _normalize_arch(parts[1], parts[2])
    else:
        raise InvalidArgument(f"{spec!r}: invalid platform specifier (expected os[/arch[/variant]])")
    if arch == "arm64" and not variant:
        variant = "v8"
    return Platform(architecture=arch, os=_normalize_os(parts[0]), variant=variant)


def _key(p: Platform) -> tuple[str, str, str, str]:
    n = normalize(p)
    return (n.os, n.architecture, n.variant, n.os_version)


def _vector(p: Platform) -> list[Platform]:
    """containerd ``platformVector``: the platforms ``Only(p)`` accepts, best first (simplified for
    arm64 minor variants: ``v8.x`` / ``v9.x`` fall back through the major variants)."""
    out = [p]
    m = re.fullmatch(r"v(\d+)(?:\.(\d+))?", p.variant or "")
    if p.architecture == "amd64":
        if m and int(m.group(1)) > 1:
            out += [replace(p, variant=f"v{v}") for v in range(int(m.group(1)) - 1, 0, -1)]
        out.append(replace(p, architecture="386", variant=""))
    elif p.architecture == "arm":
        if m and int(m.group(1)) > 5:
            out += [replace(p, variant=f"v{v}") for v in range(int(m.group(1)) - 1, 4, -1)]
    elif p.architecture == "arm64":
        major = int(m.group(1)) if m else 8
        minor = int(m.group(2)) if m and m.group(2) else 0
        if major >= 9:
            out += [replace(p, variant=f"v9.{x}" if x else "v9") for x in range(minor - 1, -1, -1)]
            major, minor = 8, min(minor + 5, 9)
            out.append(replace(p, variant=f"v8.{minor}"))
        if major == 8:
            out += [replace(p, variant=f"v8.{x}" if x else "v8") for x in range(minor - 1, -1, -1)]
        out += _vector(Platform(architecture="arm", os=p.os, variant="v8"))
    return out


class PlatformMatcher:
    """containerd ``Only(p)`` (default) or ``OnlyStrict(p)``: ``rank`` is 0 for the best match, ``None`` for
    no match."""

    def __init__(self, p: Platform, *, strict: bool = False) -> None:
        n = normalize(p)
        self.platform = p
        self._keys = [_key(n)] if strict else [_key(x) for x in _vector(n)]

    def rank(self, candidate: Platform) -> int | None:
        k = _key(candidate)
        for i, want in enumerate(self._keys):
            if want[:3] == k[:3] and (not want[3] or want[3] == k[3]):
                return i
        return None

    def match(self, candidate: Platform) -> bool:
        return self.rank(candidate) is not None


# ---------------------------------------------------------------------------------------------------------
# Descriptors, manifests, indexes


def check_digest(digest: str, what: str = "digest") -> str:
    """Return ``digest`` if it is a well-formed sha256/sha512 digest, else raise ``FormatError``."""
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise FormatError(f"{what}: invalid digest {digest!r}")
    return digest


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Descriptor:
    """image-spec ``Descriptor``."""

    media_type: str
    digest: str
    size: int
    urls: tuple[str, ...] | None = None
    annotations: dict[str, str] | None = field(default=None, hash=False, compare=True)
    data: bytes | None = None
    platform: Platform | None = None
    artifact_type: str = ""

    def to_go(self) -> Struct:
        m: list[tuple[str, Any]] = [
            ("mediaType", self.media_type),
            ("digest", self.digest),
            ("size", self.size),
        ]
        if self.urls:
            m.append(("urls", list(self.urls)))
        if self.annotations:
            m.append(("annotations", dict(self.annotations)))
        if self.data:
            m.append(("data", self.data))
        if self.platform is not None:
            m.append(("platform", self.platform.to_go()))
        if self.artifact_type:
            m.append(("artifactType", self.artifact_type))
        return Struct(*m)

    @classmethod
    def from_json(cls, obj: Any, what: str = "descriptor") -> Descriptor:
        names = ("mediaType", "digest", "size", "urls", "annotations", "data", "platform", "artifactType")
        f = _members(obj, what, names)
        data = None
        raw = f.get("data")
        if raw is not None:
            try:
                data = base64.b64decode(_str(raw, f"{what}.data"), validate=True)
            except binascii.Error as exc:
                raise FormatError(f"{what}.data: invalid base64") from exc
        plat = f.get("platform")
        return cls(
            media_type=_str(f.get("mediaType"), f"{what}.mediaType"),
            digest=_str(f.get("digest"), f"{what}.digest"),
            size=_int(f.get("size"), f"{what}.size"),
            urls=_str_list(f.get("urls"), f"{what}.urls"),
            annotations=_str_map(f.get("annotations"), f"{what}.annotations"),
            data=data,
            platform=None if plat is None else Platform.from_json(plat, f"{what}.platform"),
            artifact_type=_str(f.get("artifactType"), f"{what}.artifactType"),
        )

    def short(self) -> Descriptor:
        """Only ``mediaType``, ``digest``, ``size``."""
        return Descriptor(self.media_type, self.digest, self.size)


def _descriptors(v: Any, what: str) -> list[Descriptor] | None:
    if v is None:
        return None
    if not isinstance(v, list):
        raise FormatError(f"{what}: expected an array of descriptors")
    return [Descriptor.from_json(x, f"{what}[{i}]") for i, x in enumerate(v)]


@dataclass
class Manifest:
    """image-spec ``Manifest`` (``layers`` ``None`` = a nil slice, encoded as ``null``)."""

    config: Descriptor
    layers: list[Descriptor] | None
    schema_version: int = 2
    media_type: str = ""
    artifact_type: str = ""
    subject: Descriptor | None = None
    annotations: dict[str, str] | None = None

    def to_go(self) -> Struct:
        m: list[tuple[str, Any]] = [("schemaVersion", self.schema_version)]
        if self.media_type:
            m.append(("mediaType", self.media_type))
        if self.artifact_type:
            m.append(("artifactType", self.artifact_type))
        m.append(("config", self.config.to_go()))
        m.append(("layers", None if self.layers is None else [d.to_go() for d in self.layers]))
        if self.subject is not None:
            m.append(("subject", self.subject.to_go()))
        if self.annotations:
            m.append(("annotations", dict(self.annotations)))
        return Struct(*m)

    def marshal(self) -> bytes:
        return gojson.dumps(self.to_go())

    @classmethod
    def from_json(cls, obj: Any, what: str = "manifest") -> Manifest:
        names = ("schemaVersion", "mediaType", "artifactType", "config", "layers", "subject", "annotations")
        f = _members(obj, what, names)
        subject = f.get("subject")
        config = f.get("config")
        return cls(
            schema_version=_int(f.get("schemaVersion"), f"{what}.schemaVersion"),
            media_type=_str(f.get("mediaType"), f"{what}.mediaType"),
            artifact_type=_str(f.get("artifactType"), f"{what}.artifactType"),
            config=Descriptor("", "", 0)
            if config is None
            else Descriptor.from_json(config, f"{what}.config"),
            layers=_descriptors(f.get("layers"), f"{what}.layers"),
            subject=None if subject is None else Descriptor.from_json(subject, f"{what}.subject"),
            annotations=_str_map(f.get("annotations"), f"{what}.annotations"),
        )

    @classmethod
    def parse(cls, data: bytes, what: str = "manifest") -> Manifest:
        return cls.from_json(gojson.loads(data), what)


@dataclass
class ImageIndex:
    """image-spec ``Index``."""

    manifests: list[Descriptor] | None
    schema_version: int = 2
    media_type: str = ""
    artifact_type: str = ""
    subject: Descriptor | None = None
    annotations: dict[str, str] | None = None

    def to_go(self) -> Struct:
        m: list[tuple[str, Any]] = [("schemaVersion", self.schema_version)]
        if self.media_type:
            m.append(("mediaType", self.media_type))
        if self.artifact_type:
            m.append(("artifactType", self.artifact_type))
        m.append(("manifests", None if self.manifests is None else [d.to_go() for d in self.manifests]))
        if self.subject is not None:
            m.append(("subject", self.subject.to_go()))
        if self.annotations:
            m.append(("annotations", dict(self.annotations)))
        return Struct(*m)

    def marshal(self) -> bytes:
        return gojson.dumps(self.to_go())

    @classmethod
    def from_json(cls, obj: Any, what: str = "index") -> ImageIndex:
        names = ("schemaVersion", "mediaType", "artifactType", "manifests", "subject", "annotations")
        f = _members(obj, what, names)
        subject = f.get("subject")
        return cls(
            schema_version=_int(f.get("schemaVersion"), f"{what}.schemaVersion"),
            media_type=_str(f.get("mediaType"), f"{what}.mediaType"),
            artifact_type=_str(f.get("artifactType"), f"{what}.artifactType"),
            manifests=_descriptors(f.get("manifests"), f"{what}.manifests"),
            subject=None if subject is None else Descriptor.from_json(subject, f"{what}.subject"),
            annotations=_str_map(f.get("annotations"), f"{what}.annotations"),
        )

    @classmethod
    def parse(cls, data: bytes, what: str = "index") -> ImageIndex:
        return cls.from_json(gojson.loads(data), what)


def sniff_media_type(data: bytes) -> str:
    """The media type a manifest-like blob declares (``mediaType``, else guessed from its members)."""
    try:
        obj = gojson.loads(data)
    except FormatError:
        return ""
    if not isinstance(obj, dict):
        return ""
    mt = obj.get("mediaType")
    if isinstance(mt, str) and mt:
        return mt
    if "manifests" in obj:
        return MT_OCI_INDEX
    if "config" in obj or "layers" in obj:
        return MT_OCI_MANIFEST
    return ""


# ---------------------------------------------------------------------------------------------------------
# Verified blob reads


class VerifyingReader:
    """Reads a blob file while hashing it; a size or digest mismatch raises ``FormatError`` naming the blob.

    ``read(n)`` returns ``b""`` at the end after checking the digest; :meth:`finish` reads whatever the
    consumer left and checks too. An optional ``tee`` receives every chunk (used to copy while reading).
    """

    def __init__(
        self,
        f: BinaryIO,
        digest: str,
        size: int,
        what: str,
        tee: Callable[[bytes], None] | None = None,
    ) -> None:
        self._f = f
        self._digest = digest
        self._size = size
        self._what = what
        self._tee = tee
        alg = digest.split(":", 1)[0]
        self._h = hashlib.new(alg)
        self._n = 0
        self._done = False

    def read(self, n: int = -1) -> bytes:
        if self._done:
            return b""
        want = n if n is not None and n >= 0 else 1 << 20
        chunk = self._f.read(want)
        if chunk:
            self._n += len(chunk)
            if self._n > self._size:
                raise FormatError(f"{self._what}: larger than its descriptor size {self._size}")
            self._h.update(chunk)
            if self._tee is not None:
                self._tee(chunk)
            return chunk
        self._check()
        return b""

    def _check(self) -> None:
        self._done = True
        if self._n != self._size:
            raise FormatError(f"{self._what}: size {self._n} does not match its descriptor size {self._size}")
        got = f"{self._digest.split(':', 1)[0]}:{self._h.hexdigest()}"
        if got != self._digest:
            raise FormatError(f"{self._what}: digest mismatch, content hashes to {got}")

    def finish(self) -> None:
        while not self._done:
            self.read(1 << 20)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> VerifyingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def verify_bytes(data: bytes, digest: str, size: int | None, what: str) -> bytes:
    if size is not None and len(data) != size:
        raise FormatError(f"{what}: size {len(data)} does not match its descriptor size {size}")
    alg = digest.split(":", 1)[0]
    got = f"{alg}:{hashlib.new(alg, data).hexdigest()}"
    if got != digest:
        raise FormatError(f"{what}: digest mismatch, content hashes to {got}")
    return data


# ---------------------------------------------------------------------------------------------------------
# Reading a layout


@dataclass(frozen=True)
class RootImage:
    """What ``index.json`` resolves to: one manifest, or an index (a blob, or index.json itself)."""

    descriptor: Descriptor  # for the index.json-as-list case: the descriptor of the re-encoded list
    index: ImageIndex | None  # set when the root is an index / list
    ref_name: str = ""  # org.opencontainers.image.ref.name of the chosen entry, if any

    @property
    def is_index(self) -> bool:
        return self.index is not None


@dataclass(frozen=True)
class SelectedManifest:
    platform: Platform  # as requested (not normalized)
    descriptor: Descriptor
    manifest: Manifest


class Layout:
    """An OCI image layout directory (possibly the extraction of a tar); blobs are verified when read."""

    def __init__(self, root: Path, source: str | None = None) -> None:
        self.root = Path(root)
        self.source = source or str(root)

    # -- opening

    @classmethod
    @contextlib.contextmanager
    def open(cls, path: str | os.PathLike[str]) -> Iterator[Layout]:
        """Open a layout directory, or extract an OCI archive tar to a temp dir for the duration."""
        p = Path(path)
        if p.is_dir():
            layout = cls(p, str(p))
            layout._check_marker()
            yield layout
            return
        if not p.exists():
            raise NotFound(f"OCI layout {str(p)!r}: no such file or directory")
        tmp = Path(tempfile.mkdtemp(prefix="soci-layout-"))
        try:
            extract_tar(p, tmp)
            layout = cls(tmp, str(p))
            layout._check_marker()
            yield layout
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _check_marker(self) -> None:
        if not (self.root / "index.json").is_file():
            raise FormatError(f"OCI layout {self.source!r}: no index.json (only OCI layouts are accepted)")

    # -- blobs

    def blob_path(self, digest: str) -> Path:
        check_digest(digest, f"OCI layout {self.source!r}")
        alg, hexd = digest.split(":", 1)
        return self.root / "blobs" / alg / hexd

    def has_blob(self, digest: str) -> bool:
        try:
            return self.blob_path(digest).is_file()
        except FormatError:
            return False

    def _what(self, digest: str, media_type: str = "") -> str:
        kind = f" ({media_type})" if media_type else ""
        return f"blob {digest}{kind} in OCI layout {self.source!r}"

    def read_blob(self, desc: Descriptor) -> bytes:
        """The verified bytes of a (small) blob.

        Raises:
            NotFound: the blob file is absent.
            FormatError: size or digest mismatch.
        """
        path = self.blob_path(desc.digest)
        what = self._what(desc.digest, desc.media_type)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"{what}: not present") from exc
        return verify_bytes(data, desc.digest, desc.size, what)

    def open_blob(self, desc: Descriptor, tee: Callable[[bytes], None] | None = None) -> VerifyingReader:
        path = self.blob_path(desc.digest)
        what = self._what(desc.digest, desc.media_type)
        try:
            f = open(path, "rb")  # noqa: SIM115 - owned by the returned reader
        except FileNotFoundError as exc:
            raise NotFound(f"{what}: not present") from exc
        return VerifyingReader(f, desc.digest, desc.size, what, tee)

    def read_range(self, desc: Descriptor, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of a blob, unverified (callers verify spans by their digests)."""
        path = self.blob_path(desc.digest)
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(length)
        except FileNotFoundError as exc:
            raise NotFound(f"{self._what(desc.digest, desc.media_type)}: not present") from exc
        if len(data) != length:
            raise FormatError(
                f"{self._what(desc.digest)}: short read at {offset} ({len(data)} of {length} bytes)"
            )
        return data

    def all_blobs(self) -> Iterator[tuple[str, Path]]:
        """``(digest, path)`` of every file under ``blobs/<alg>/``."""
        base = self.root / "blobs"
        if not base.is_dir():
            return
        for algdir in sorted(base.iterdir()):
            if not algdir.is_dir():
                continue
            for f in sorted(algdir.iterdir()):
                d = f"{algdir.name}:{f.name}"
                if f.is_file() and _DIGEST_RE.match(d):
                    yield d, f

    # -- index.json and the root

    def index_json(self) -> ImageIndex:
        path = self.root / "index.json"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise FormatError(f"OCI layout {self.source!r}: cannot read index.json: {exc}") from exc
        return ImageIndex.parse(data, f"OCI layout {self.source!r}: index.json")

    def read_manifest(self, desc: Descriptor) -> Manifest:
        return Manifest.parse(self.read_blob(desc), self._what(desc.digest, desc.media_type))

    def read_index(self, desc: Descriptor) -> ImageIndex:
        return ImageIndex.parse(self.read_blob(desc), self._what(desc.digest, desc.media_type))

    def resolve_root(self, ref_name: str | None = None) -> RootImage:
        """The image ``index.json`` names (formats.md §4, standalone convert).

        One entry (after dropping entries whose blob is absent): that manifest or that nested index. Several:
        ``index.json`` acts as the list. ``ref_name`` picks entries by ``org.opencontainers.image.ref.name``.

        Raises:
            NotFound: no usable entry (or none with that ref name).
        """
        idx = self.index_json()
        entries = [d for d in idx.manifests or [] if self.has_blob(d.digest)]
        if ref_name:
            entries = [d for d in entries if (d.annotations or {}).get(ANNOTATION_REF_NAME) == ref_name]
            if not entries:
                raise NotFound(f"OCI layout {self.source!r}: no image with ref name {ref_name!r}")
        if not entries:
            raise NotFound(f"OCI layout {self.source!r}: index.json names no image whose blobs are present")
        if len(entries) == 1:
            d = entries[0]
            name = (d.annotations or {}).get(ANNOTATION_REF_NAME, "")
            mt = d.media_type or sniff_media_type(self.read_blob(d))
            if mt in INDEX_TYPES:
                return RootImage(replace(d, media_type=mt), self.read_index(d), name)
            return RootImage(replace(d, media_type=mt), None, name)
        lst = replace(idx, manifests=entries, media_type=idx.media_type or MT_OCI_INDEX)
        data = lst.marshal()
        return RootImage(Descriptor(MT_OCI_INDEX, sha256_digest(data), len(data)), lst, "")

    def config_platform(self, manifest: Manifest) -> Platform:
        """The platform recorded in an image config (``os``, ``architecture``, ``variant``, ...)."""
        data = self.read_blob(manifest.config)
        obj = gojson.loads(data)
        return Platform.from_json(obj, f"config {manifest.config.digest}")

    def _platform_of(self, d: Descriptor) -> Platform | None:
        if d.platform is not None:
            return d.platform
        if not self.has_blob(d.digest):
            return None
        return self.config_platform(self.read_manifest(d))

    def _manifest_candidates(self, index: ImageIndex, depth: int = 0) -> Iterator[Descriptor]:
        if depth > 8:
            raise FormatError(f"OCI layout {self.source!r}: image indexes nested too deeply")
        for d in index.manifests or []:
            if d.artifact_type.startswith("application/vnd.amazon.soci.index."):
                continue
            if d.media_type in INDEX_TYPES:
                if self.has_blob(d.digest):
                    yield from self._manifest_candidates(self.read_index(d), depth + 1)
            elif d.media_type in MANIFEST_TYPES or not d.media_type:
                yield d

    def platforms(self, root: RootImage) -> list[Platform]:
        """Every platform the image has, in index order, without repeats (containerd ``images.Platforms``)."""
        if root.index is None:
            return [self.config_platform(self.read_manifest(root.descriptor))]
        seen: set[tuple[str, str, str, str]] = set()
        out: list[Platform] = []
        for d in self._manifest_candidates(root.index):
            p = self._platform_of(d)
            if p is None:
                continue
            if _key(p) not in seen:
                seen.add(_key(p))
                out.append(p)
        return out

    def select(
        self, root: RootImage, platforms: list[Platform] | None, all_platforms: bool
    ) -> list[SelectedManifest]:
        """The platform manifests to index (formats.md §4 platform rules).

        ``all_platforms``: every platform; ``platforms``: those (best ``Only`` match each); neither: the
        image's own platform for a single manifest, else the host platform.

        Raises:
            NotFound: no manifest for a requested platform.
        """
        if root.index is None:
            manifest = self.read_manifest(root.descriptor)
            own = self.config_platform(manifest)
            if platforms and not all_platforms:
                for p in platforms:
                    if not PlatformMatcher(p).match(own):
                        raise NotFound(f"image {root.descriptor.digest}: no manifest for platform {p}")
                return [SelectedManifest(p, root.descriptor, manifest) for p in platforms]
            return [SelectedManifest(own, root.descriptor, manifest)]
        if all_platforms:
            wanted = self.platforms(root)
        elif platforms:
            wanted = list(platforms)
        else:
            wanted = [host_platform()]
        out = []
        candidates = [(d, self._platform_of(d)) for d in self._manifest_candidates(root.index)]
        for p in wanted:
            m = PlatformMatcher(p)
            best: tuple[int, int, Descriptor] | None = None
            for pos, (d, cp) in enumerate(candidates):
                if cp is None:
                    continue
                r = m.rank(cp)
                if r is not None and (best is None or (r, pos) < best[:2]):
                    best = (r, pos, d)
            if best is None:
                raise NotFound(f"image {root.descriptor.digest}: no manifest for platform {p}")
            d = best[2]
            out.append(SelectedManifest(p, d, self.read_manifest(d)))
        return out


# ---------------------------------------------------------------------------------------------------------
# Safe tar extraction


def extract_tar(archive: Path, dest: Path) -> None:
    """Extract an OCI archive into ``dest`` without ownership, refusing absolute paths, ``..``, links that
    escape ``dest`` and device files.

    Raises:
        FormatError: not a tar, truncated, or an unsafe member (named).
    """
    try:
        with tarfile.open(archive, "r:*") as tf:
            for member in tf:
                name = member.name
                parts = Path(name).parts
                if name.startswith("/") or ".." in parts:
                    raise FormatError(f"OCI archive {str(archive)!r}: unsafe member path {name!r}")
                if member.issym() or member.islnk():
                    target = member.linkname
                    base = (dest / name).parent if member.issym() else dest
                    resolved = os.path.normpath(os.path.join(base, target))
                    if target.startswith("/") or not (
                        resolved == str(dest) or resolved.startswith(str(dest) + os.sep)
                    ):
                        raise FormatError(
                            f"OCI archive {str(archive)!r}: link {name!r} -> {target!r} leaves the archive"
                        )
                if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
                    raise FormatError(f"OCI archive {str(archive)!r}: unsupported member type for {name!r}")
                try:
                    tf.extract(member, dest, set_attrs=False, filter="data")
                except tarfile.FilterError as exc:
                    raise FormatError(f"OCI archive {str(archive)!r}: unsafe member {name!r}: {exc}") from exc
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise FormatError(f"OCI archive {str(archive)!r}: not a readable tar: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------
# Writing layouts


def index_json_for(desc: Descriptor) -> bytes:
    """``index.json`` naming one image: ``{"schemaVersion":2,"mediaType":<index>,"manifests":[desc]}``."""
    return ImageIndex(manifests=[desc], media_type=MT_OCI_INDEX).marshal()


def _sibling_temp(dest: Path, suffix: str) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent)
    os.close(fd)
    return Path(name)


class _HashingFile:
    """File wrapper that hashes what is read, so a copy can be checked against the blob's digest."""

    def __init__(self, f: BinaryIO, digest: str) -> None:
        self._f = f
        self._digest = digest
        self._h = hashlib.new(digest.split(":", 1)[0])

    def read(self, n: int = -1) -> bytes:
        chunk = self._f.read(n)
        self._h.update(chunk)
        return chunk

    def check(self, where: str) -> None:
        got = f"{self._digest.split(':', 1)[0]}:{self._h.hexdigest()}"
        if got != self._digest:
            raise FormatError(f"blob {self._digest} ({where}): digest mismatch, content hashes to {got}")


def _open_blob_file(path: Path, digest: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError as exc:
        raise NotFound(f"blob {digest}: not present at {str(path)!r}") from exc


def _copy_blob(src: Path, dst: Path, digest: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _open_blob_file(src, digest) as fi, open(dst, "wb") as fo:
        hf = _HashingFile(fi, digest)
        while chunk := hf.read(1 << 20):
            fo.write(chunk)
        hf.check(str(src))


def write_layout_dir(dest: Path, blobs: Iterable[tuple[str, Path]], index_json: bytes) -> None:
    """Write a layout directory at ``dest`` (an existing one is replaced) atomically; every blob is copied
    from its path and checked against its digest on the way.

    The layout is assembled in a temp directory next to ``dest`` and renamed into place; on failure nothing
    is left at ``dest`` beyond what was there.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        (stage / "oci-layout").write_bytes(OCI_LAYOUT_FILE)
        for digest, path in blobs:
            alg, hexd = check_digest(digest).split(":", 1)
            _copy_blob(path, stage / "blobs" / alg / hexd, digest)
        (stage / "index.json").write_bytes(index_json)
        os.chmod(stage, 0o755)
        old = None
        if dest.exists() or dest.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.rmdir(old)
            os.rename(dest, old)
        os.rename(stage, dest)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _tar_add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tf.addfile(info, io.BytesIO(data))


def write_layout_tar(dest: Path, blobs: Iterable[tuple[str, Path]], index_json: bytes) -> None:
    """Write an OCI archive tar (``oci-layout``, ``index.json``, ``blobs/<alg>/<hex>``) atomically.

    Entries are in name order with zero owner and time, so the same content gives the same tar. Every blob
    is checked against its digest while it is written.
    """
    dest = Path(dest)
    tmp = _sibling_temp(dest, ".tmp")
    try:
        entries = sorted({check_digest(d): p for d, p in blobs}.items())
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
            dirs = sorted({"blobs/"} | {f"blobs/{d.split(':', 1)[0]}/" for d, _ in entries})
            for dname in dirs:
                info = tarfile.TarInfo(dname)
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tf.addfile(info)
            for digest, path in entries:
                alg, hexd = digest.split(":", 1)
                info = tarfile.TarInfo(f"blobs/{alg}/{hexd}")
                with _open_blob_file(path, digest) as f:
                    info.size = os.fstat(f.fileno()).st_size
                    info.mode = 0o644
                    hf = _HashingFile(f, digest)
                    tf.addfile(info, hf)  # type: ignore[arg-type]
                    hf.check(str(path))
            _tar_add_bytes(tf, "index.json", index_json)
            _tar_add_bytes(tf, "oci-layout", OCI_LAYOUT_FILE)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def graph_blobs(
    layout_has: Callable[[str], bool], read: Callable[[Descriptor], bytes], root: Descriptor
) -> list[str]:
    """Digests of every present blob reachable from ``root`` (manifests, configs, layers, nested indexes,
    subjects excluded), root first. Absent blobs are skipped (partial multi-platform images)."""
    out: list[str] = []
    seen: set[str] = set()
    stack = [root]
    while stack:
        d = stack.pop()
        if d.digest in seen or not layout_has(d.digest):
            continue
        seen.add(d.digest)
        out.append(d.digest)
        mt = d.media_type
        if mt in INDEX_TYPES or mt in MANIFEST_TYPES:
            data = read(d)
            if mt in INDEX_TYPES:
                stack.extend(reversed(ImageIndex.parse(data, f"index {d.digest}").manifests or []))
            else:
                m = Manifest.parse(data, f"manifest {d.digest}")
                stack.extend(reversed([m.config, *(m.layers or [])]))
    return out
