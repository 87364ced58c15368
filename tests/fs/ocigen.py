"""Test helper: deterministic tarballs, gzip layers and OCI image layouts made in Python.

Not a test module. Everything here is byte-reproducible (fixed mtimes, owners, gzip headers), so digests of
what it builds can be recorded as golden values.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from soci_fs.oci import Descriptor, Platform

MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
AMD64 = Platform("amd64", "linux")


@dataclass
class Entry:
    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    mode: int = 0o644
    pax: dict[str, str] = field(default_factory=dict)


def make_tar(entries: list[Entry], *, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = e.type
            info.mode = e.mode if e.type != tarfile.DIRTYPE else 0o755
            info.mtime = 1_600_000_000
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.linkname = e.linkname
            info.pax_headers = dict(e.pax)
            if e.type == tarfile.REGTYPE:
                info.size = len(e.data)
                tf.addfile(info, io.BytesIO(e.data))
            else:
                tf.addfile(info)
    return buf.getvalue()


def gz(data: bytes, level: int = 6) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=0)


def generated_tree(seed: int, n_files: int = 40, max_size: int = 200_000) -> list[Entry]:
    """Directories and files of mixed sizes: text-like (compressible) and random (incompressible)."""
    rnd = random.Random(seed)
    out = [Entry("gen/", type=tarfile.DIRTYPE), Entry("gen/sub/", type=tarfile.DIRTYPE)]
    for i in range(n_files):
        size = rnd.choice([0, 1, 100, 511, 512, 513, 4096, rnd.randrange(1, max_size)])
        if rnd.random() < 0.5:
            words = [rnd.choice(["alpha", "beta", "gamma", "delta", "\n"]) for _ in range(size // 5 + 1)]
            data = " ".join(words).encode()[:size]
        else:
            data = rnd.randbytes(size)
        d = "gen/sub/" if i % 3 == 0 else "gen/"
        out.append(Entry(f"{d}file{i:03d}.bin", data))
    out.append(Entry("gen/link", type=tarfile.SYMTYPE, linkname="file001.bin"))
    out.append(Entry("gen/hard", type=tarfile.LNKTYPE, linkname="gen/file002.bin"))
    return out


def tree_from_dir(root: Path, prefix: str, limit: int) -> list[Entry]:
    """Regular files and directories under ``root`` (sorted, at most ``limit`` bytes of file data)."""
    out: list[Entry] = []
    total = 0
    for p in sorted(root.rglob("*")):
        rel = prefix + str(p.relative_to(root))
        if p.is_symlink():
            continue
        if p.is_dir():
            out.append(Entry(rel + "/", type=tarfile.DIRTYPE))
        elif p.is_file():
            data = p.read_bytes()
            if total + len(data) > limit:
                break
            total += len(data)
            out.append(Entry(rel, data))
    return out


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compact(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class LayoutBuilder:
    """Writes blobs into ``root/blobs/sha256`` and an ``index.json`` at the end."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def blob(self, data: bytes, media_type: str = "application/octet-stream") -> Descriptor:
        d = digest(data)
        (self.root / "blobs" / "sha256" / d.split(":")[1]).write_bytes(data)
        return Descriptor(media_type, d, len(data))

    def image(
        self,
        layers: list[tuple[str, bytes]],
        *,
        platform: Platform = AMD64,
        manifest_media_type: str = MT_MANIFEST,
        config_media_type: str = MT_CONFIG,
        diff_ids: list[str] | None = None,
        config: dict | None = None,
    ) -> Descriptor:
        cfg: dict = {"architecture": platform.architecture, "os": platform.os, "rootfs": {"type": "layers"}}
        if diff_ids is not None:  # containerd's unpacker needs them; older tests leave them out
            cfg["rootfs"]["diff_ids"] = diff_ids
        if config:
            cfg["config"] = config
        if platform.variant:
            cfg["variant"] = platform.variant
        c = self.blob(compact(cfg), config_media_type)
        ls = [self.blob(data, mt) for mt, data in layers]
        m = {
            "schemaVersion": 2,
            "mediaType": manifest_media_type,
            "config": {"mediaType": c.media_type, "digest": c.digest, "size": c.size},
            "layers": [{"mediaType": x.media_type, "digest": x.digest, "size": x.size} for x in ls],
        }
        return self.blob(compact(m), manifest_media_type)

    def index(
        self, manifests: list[tuple[Descriptor, Platform | None]], media_type: str = MT_INDEX
    ) -> Descriptor:
        ents = []
        for d, p in manifests:
            e: dict = {"mediaType": d.media_type, "digest": d.digest, "size": d.size}
            if p is not None:
                e["platform"] = {"architecture": p.architecture, "os": p.os}
                if p.variant:
                    e["platform"]["variant"] = p.variant
            ents.append(e)
        return self.blob(
            compact({"schemaVersion": 2, "mediaType": media_type, "manifests": ents}), media_type
        )

    def write_index_json(self, *descs: Descriptor, ref_names: list[str] | None = None) -> None:
        ents = []
        for i, d in enumerate(descs):
            e: dict = {"mediaType": d.media_type, "digest": d.digest, "size": d.size}
            if ref_names:
                e["annotations"] = {"org.opencontainers.image.ref.name": ref_names[i]}
            ents.append(e)
        (self.root / "index.json").write_bytes(compact({"schemaVersion": 2, "manifests": ents}))


def extract_all(tar_bytes: bytes) -> dict[str, bytes]:
    """Regular-file name -> bytes, as ``tar -x`` would produce (hardlinks resolved)."""
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        for m in tf:
            if m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                out[m.name] = f.read()
    return out
