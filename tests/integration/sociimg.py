"""SOCI-enabled test images that containerd can unpack and run, pushed to a harness registry.

``push_image`` builds an OCI layout of gzip layers (tar bytes from :func:`tests.fs.ocigen.make_tar`) with a
config carrying ``rootfs.diff_ids`` (containerd checks them), converts it with ``soci convert --standalone``
(unless ``soci=False``) and pushes it with ``soci push --oci-layout``. The base layer ``BASE`` has static
busybox with ``sh``/``cat``/``sha256sum`` links so containers can run.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from tests.fs.ocigen import MT_LAYER_GZIP, Entry, LayoutBuilder, gz, make_tar
from tests.grpc.clihelp import ok, run
from tests.harness.registry import PASSWORD, USER, Registry

ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
SPAN = 65536
_n = iter(range(1_000_000))


def base_entries() -> list[Entry]:
    """bin/busybox (static) with a few applet links, and the directories runc needs."""
    entries = [Entry("bin/", type=b"5"), Entry("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755)]
    for applet in ("sh", "cat", "sha256sum", "ls", "echo", "head", "wc"):
        entries.append(Entry(f"bin/{applet}", type=b"2", linkname="busybox", mode=0o777))
    for d in ("etc/", "proc/", "sys/", "dev/", "tmp/"):
        entries.append(Entry(d, type=b"5"))
    entries.append(Entry("etc/hello.txt", b"hello from a lazily loaded layer\n", mode=0o644))
    return entries


def data_entries(prefix: str, n: int, size: int, seed: int = 1) -> list[Entry]:
    """``n`` incompressible files of ``size`` bytes under ``prefix/`` (deterministic)."""
    out = [Entry(prefix.rstrip("/") + "/", type=b"5")]
    for i in range(n):
        h = hashlib.sha256(f"{seed}-{i}".encode()).digest()
        blocks = (size + 31) // 32
        data = b"".join(hashlib.sha256(h + j.to_bytes(4, "big")).digest() for j in range(blocks))[:size]
        out.append(Entry(f"{prefix.rstrip('/')}/f{i:04d}.bin", data, mode=0o644))
    return out


@dataclass
class Pushed:
    registry: Registry
    repo: str
    tag: str
    ref: str
    manifest: str  # image manifest digest
    layers: list[str] = field(default_factory=list)  # digests, base first
    layer_sizes: list[int] = field(default_factory=list)
    tars: list[bytes] = field(default_factory=list)
    index_digest: str = ""

    @property
    def image_bytes(self) -> int:
        return sum(self.layer_sizes)


def push_image(
    registry: Registry,
    work: Path,
    layers: list[list[Entry]],
    *,
    name: str = "img",
    soci: bool = True,
    min_layer_size: int = 0,
    span_size: int = SPAN,
    convert_flags: tuple[str, ...] = (),
    cmd: list[str] | None = None,
) -> Pushed:
    """Build, (convert,) push; the image is ``<registry>/daemon/<name><n>:v1``."""
    tars = [make_tar(e) for e in layers]
    blobs = [gz(t) for t in tars]
    diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]
    layout = work / f"{name}-{next(_n)}-layout"
    b = LayoutBuilder(layout)
    m = b.image(
        [(MT_LAYER_GZIP, x) for x in blobs],
        diff_ids=diff_ids,
        config={"Env": ["PATH=/bin"], "Cmd": cmd or ["/bin/sh"]},
    )
    b.write_index_json(m, ref_names=["test"])
    src = layout
    if soci:
        src = work / f"{layout.name}-soci"
        flags = [
            "--format",
            "oci-dir",
            "--span-size",
            str(span_size),
            "--min-layer-size",
            str(min_layer_size),
        ]
        ok(run("convert", "--standalone", *flags, *convert_flags, layout, src))
    repo = f"daemon/{name}{next(_n)}"
    ref = f"{registry.host}/{repo}:v1"
    ok(run("push", "--plain-http", "--user", f"{USER}:{PASSWORD}", "--oci-layout", src, ref))
    manifest, index_digest = _manifest_of(src)
    digests = ["sha256:" + hashlib.sha256(x).hexdigest() for x in blobs]
    return Pushed(registry, repo, "v1", ref, manifest, digests, [len(x) for x in blobs], tars, index_digest)


def _manifest_of(layout: Path) -> tuple[str, str]:
    """The image manifest digest in ``layout`` (following an image index) and its SOCI index annotation."""
    index = json.loads((layout / "index.json").read_text())
    desc = index["manifests"][0]
    doc = json.loads(_blob(layout, desc["digest"]))
    if "manifests" in doc:  # an image index (convert output): the entry that is not a SOCI index
        desc = next(m for m in doc["manifests"] if "soci" not in str(m.get("artifactType", "")))
        doc = json.loads(_blob(layout, desc["digest"]))
    return desc["digest"], (doc.get("annotations") or {}).get("com.amazon.soci.index-digest", "")


def _blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def docker_config(path: Path, host: str, user: str = USER, password: str = PASSWORD) -> Path:
    """A Docker config.json with plain ``auths`` for registry ``host``; returns its path."""
    import base64

    path.parent.mkdir(parents=True, exist_ok=True)
    blob = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": blob}}}))
    os.chmod(path, 0o600)
    return path
