"""The demo image: a real OCI image with one big layer of Debian packages, for ``make demo`` and the bench.

Owns:

* the package list and its download cache: ``apt-get download`` puts the ``.deb`` files of a few large
  Debian packages under ``/var/cache/soci-py-demo/debs`` (``SOCI_DEMO_CACHE`` moves it), once; later runs need
  no network (``apt-get update`` is run only when a download fails);
* the image, built with umoci in an OCI layout directory (tag ``demo``): layer 1 holds the packages unpacked
  with ``dpkg-deb -x`` (a Debian-ish ``/usr`` of about 650 MB, about 200 MB gzip), layer 2 the app (static
  ``/bin/busybox`` from busybox-static with a few applet links, ``/entrypoint.sh`` and its read list). The
  entrypoint prints ``demo: first output`` at once, then ``sha256sum``-s a handful of known files (well under
  5 % of the image's files), runs ``gofmt`` from the big layer, and ends with ``demo: done: ...``. The config
  carries ``rootfs.diff_ids`` (umoci writes them) and ``Cmd ["/entrypoint.sh"]``;
* reuse: ``image.json`` beside the layout records the inputs (this file's source, the ``.deb`` names and
  sizes, the busybox binary); a call with the same inputs returns the recorded image without building;
* ``--small``: the same shape in a few MB (generated text files instead of packages, no network), for tests;
* variants (:func:`build_variants`): N images whose big layers differ from the base one only by a small
  leading gzip member holding ``/demo-variant`` (so each has its own layer digest, diff_id, zTOC and SOCI
  index) at the cost of a copy, not a rebuild; for measuring memory with N distinct images mounted.

Will not: push, convert or run anything; touch anything outside its cache and output directories; install
packages (``make venv`` runs ``scripts/ensure-apt.sh``, which brings umoci, busybox-static and pigz).

Run: ``.venv/bin/python scripts/demo_image.py [--small] [--out DIR] [--variants N] [--force]``; prints the
image as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soci_fs.errors import FailedPrecondition, FormatError, NotFound

log = logging.getLogger(__name__)

DEFAULT_CACHE = "/var/cache/soci-py-demo"


def cache_dir() -> Path:
    """The cache directory: ``$SOCI_DEMO_CACHE``, else /var/cache/soci-py-demo (read at each call)."""
    return Path(os.environ.get("SOCI_DEMO_CACHE", DEFAULT_CACHE))


TAG = "demo"
FIRST_LINE = "demo: first output"
DONE_PREFIX = "demo: done"
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "echo", "sha256sum", "find", "wc", "head", "ls", "sleep", "true")
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"

# Large Debian 12 packages (installed size / gzip of the unpacked tree, measured): golang-1.19-go 343 / 96 MB,
# openjdk-17-jre-headless 194 / 68 MB, golang-1.19-src 119 / 27 MB (11,751 files), base-files for /etc.
FULL_PACKAGES = ("golang-1.19-go", "golang-1.19-src", "openjdk-17-jre-headless", "base-files")
GOFMT = "/usr/lib/go-1.19/bin/gofmt"
FULL_READS = (
    "/etc/os-release",
    "/usr/lib/go-1.19/VERSION",
    "/usr/share/go-1.19/src/fmt/print.go",
    "/usr/share/go-1.19/src/net/http/server.go",
    "/usr/lib/jvm/java-17-openjdk-amd64/release",
    "/usr/lib/jvm/java-17-openjdk-amd64/lib/libjava.so",
)
GOFMT_FILES = ("/usr/share/go-1.19/src/fmt/print.go", "/usr/share/go-1.19/src/strings/strings.go")
SMALL_FILES = 240  # generated text files of the small image, about 12 KiB each
SMALL_READS = (
    "/etc/os-release",
    "/usr/share/demo/data/d00/f0003.txt",
    "/usr/share/demo/data/d05/f0117.txt",
    "/usr/share/demo/data/d11/f0231.txt",
)


@dataclass(frozen=True)
class DemoImage:
    """A built image in an OCI layout directory.

    Attributes:
        layout: the OCI layout directory; the image is its only entry, tagged ``tag``.
        tag: the ``org.opencontainers.image.ref.name`` of the image.
        manifest_digest: digest of the image manifest.
        image_bytes: manifest + config + every layer blob, as a full pull downloads them.
        layer_sizes: compressed size of each layer, in order (the first is the big one).
        content_bytes: bytes of regular files in the root file system.
        files: regular files in the root file system.
        read_files: the files the entrypoint reads (absolute paths in the container).
        small: built with ``--small``.
        key: digest of the build inputs (for reuse).
    """

    layout: Path
    tag: str
    manifest_digest: str
    image_bytes: int
    layer_sizes: tuple[int, ...]
    content_bytes: int
    files: int
    read_files: tuple[str, ...]
    small: bool
    key: str

    def to_json(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["layout"] = str(self.layout)
        d["layer_sizes"] = list(self.layer_sizes)
        d["read_files"] = list(self.read_files)
        return d

    @classmethod
    def from_json(cls, d: dict[str, object]) -> DemoImage:
        d = dict(d)
        d["layout"] = Path(str(d["layout"]))
        d["layer_sizes"] = tuple(d["layer_sizes"])  # type: ignore[arg-type]
        d["read_files"] = tuple(d["read_files"])  # type: ignore[arg-type]
        return cls(**d)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------
# helpers


def _run(argv: list[str], *, cwd: Path | None = None) -> str:
    """Run a tool; its output on failure goes into the error."""
    res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        out = (res.stderr or res.stdout).strip()[-2000:]
        raise FailedPrecondition(f"{' '.join(argv[:3])}: exit status {res.returncode}: {out}")
    return res.stdout


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created), so the bench and the demo never build the same dir at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _count_files(root: Path) -> tuple[int, int]:
    """(regular files, their bytes) under ``root``, not following symlinks."""
    n = size = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_mode & 0o170000) == 0o100000:
                n += 1
                size += st.st_size
    return n, size


# --------------------------------------------------------------------------------------------------------
# packages


def download_packages(names: tuple[str, ...], cache: Path | None = None) -> list[Path]:
    """The ``.deb`` of each package in ``names``: from ``cache/debs``, else fetched by ``apt-get download``.

    A package already in the cache is never fetched again. When a download fails, ``apt-get update`` runs
    once and the download is retried (a fresh machine may have no package lists).

    Raises:
        FailedPrecondition: apt could not fetch a package.
    """
    debs_dir = (cache or cache_dir()) / "debs"
    debs_dir.mkdir(parents=True, exist_ok=True)

    def cached(name: str) -> Path | None:
        found = sorted(debs_dir.glob(f"{name}_*.deb"))
        return found[-1] if found else None

    missing = [n for n in names if cached(n) is None]
    if missing:
        log.info("downloading %s into %s", " ".join(missing), debs_dir)
        stage = Path(tempfile.mkdtemp(prefix=".download-", dir=debs_dir))
        try:
            argv = ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", *missing]
            try:
                _run(argv, cwd=stage)
            except FailedPrecondition:
                log.info("apt-get download failed; running apt-get update once and retrying")
                _run(["apt-get", "-q", "update"])
                _run(argv, cwd=stage)
            for deb in stage.glob("*.deb"):
                os.replace(deb, debs_dir / deb.name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    out = []
    for n in names:
        p = cached(n)
        if p is None:
            raise FailedPrecondition(f"package {n!r}: apt-get download left no .deb in {debs_dir}")
        out.append(p)
    return out


# --------------------------------------------------------------------------------------------------------
# the root file system


def _small_text(rnd: random.Random, size: int) -> bytes:
    words = [f"w{rnd.randrange(1 << 16):04x}" for _ in range(size // 5 + 1)]
    return " ".join(words).encode()[:size]


def _fill_small(rootfs: Path) -> None:
    """The small image's big layer: /etc/os-release and SMALL_FILES generated text files."""
    rnd = random.Random(20261128)
    (rootfs / "etc").mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/os-release").write_text('PRETTY_NAME="soci-py demo (small)"\nID=soci-demo\n')
    for i in range(SMALL_FILES):
        d = rootfs / f"usr/share/demo/data/d{i // 20:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:04d}.txt").write_bytes(_small_text(rnd, 12 * 1024))


def _entrypoint(small: bool) -> str:
    lines = [
        "#!/bin/sh",
        "# soci-py demo entrypoint (written by scripts/demo_image.py): the first line comes at once, then a",
        "# handful of known files are read (listed in /etc/demo/read-list) and a summary is printed.",
        f'echo "{FIRST_LINE}"',
        "n=0",
        "while IFS= read -r f; do",
        '  [ -n "$f" ] || continue',
        '  sha256sum "$f" || exit 1',
        "  n=$((n + 1))",
        "done < /etc/demo/read-list",
    ]
    if not small:
        files = " ".join(GOFMT_FILES)
        lines += [
            f"unformatted=$({GOFMT} -l {files}) || exit 1",
            f'echo "demo: gofmt checked {len(GOFMT_FILES)} files from the big layer'
            '${unformatted:+, unformatted: $unformatted}"',
        ]
    lines += [
        "total=$(find / -xdev -type f 2>/dev/null | wc -l)",
        f'echo "{DONE_PREFIX}: read $n of $total files"',
        "",
    ]
    return "\n".join(lines)


def _fill_app(rootfs: Path, small: bool, reads: tuple[str, ...]) -> None:
    """The app layer: busybox and its links, the entrypoint, its read list, the mount points runc wants."""
    for d in ("bin", "etc/demo", "proc", "sys", "dev", "tmp"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, rootfs / "bin/busybox")
    for a in APPLETS:
        link = rootfs / "bin" / a
        if not link.is_symlink():
            link.symlink_to("busybox")
    ep = rootfs / "entrypoint.sh"
    ep.write_text(_entrypoint(small))
    ep.chmod(0o755)
    (rootfs / "etc/demo/read-list").write_text("".join(r + "\n" for r in reads))


def _check_reads(rootfs: Path, reads: tuple[str, ...]) -> None:
    for r in reads:
        p = rootfs / r.lstrip("/")
        target = p.resolve() if p.is_symlink() else p
        if p.is_symlink() and str(os.readlink(p)).startswith("/"):
            target = rootfs / os.readlink(p).lstrip("/")
        if not target.is_file():
            raise NotFound(f"demo image: file {r!r} of the read list is not in the root file system")


# --------------------------------------------------------------------------------------------------------
# layout reading


def _blob(layout: Path, digest: str) -> Path:
    alg, hexd = digest.split(":", 1)
    return layout / "blobs" / alg / hexd


def read_manifest(layout: Path, tag: str = TAG) -> tuple[str, dict]:
    """(digest, manifest) of the image tagged ``tag`` in ``layout``.

    Raises:
        NotFound: no such tag.
    """
    index = json.loads((layout / "index.json").read_text())
    for d in index.get("manifests", []):
        if (d.get("annotations") or {}).get(REF_NAME) == tag:
            return d["digest"], json.loads(_blob(layout, d["digest"]).read_bytes())
    raise NotFound(f"OCI layout {str(layout)!r}: no image tagged {tag!r}")


def _image_bytes(layout: Path, mdigest: str, manifest: dict) -> int:
    size = _blob(layout, mdigest).stat().st_size + manifest["config"]["size"]
    return size + sum(lay["size"] for lay in manifest["layers"])


# --------------------------------------------------------------------------------------------------------
# build


def _inputs_key(small: bool, debs: list[Path]) -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(b"small" if small else b"full")
    for d in debs:
        h.update(f"{d.name}:{d.stat().st_size}\n".encode())
    h.update(_sha256_file(BUSYBOX).encode())
    return "sha256:" + h.hexdigest()


def default_out(small: bool, cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / ("image-small" if small else "image-full")


def build(
    *,
    small: bool = False,
    out: Path | None = None,
    cache: Path | None = None,
    force: bool = False,
    say: Callable[[str], None] = print,
) -> tuple[DemoImage, bool]:
    """Build the demo image into ``out/layout`` (default under ``cache``, default :func:`cache_dir`), or
    reuse the one built there.

    Returns:
        (the image, True when it was reused without building).

    Raises:
        FailedPrecondition: a tool (apt-get, dpkg-deb, umoci) failed.
        NotFound: a file of the read list is missing from the packages.
    """
    out = Path(out) if out is not None else default_out(small, cache)
    with _locked(out.parent / f".{out.name}.lock"):
        debs = [] if small else download_packages(FULL_PACKAGES, cache)
        key = _inputs_key(small, debs)
        stamp = out / "image.json"
        if not force and stamp.is_file():
            try:
                img = DemoImage.from_json(json.loads(stamp.read_text()))
            except (ValueError, TypeError, KeyError):
                img = None
            if img is not None and img.key == key and _layout_intact(img):
                return img, True
        say(f"building the {'small ' if small else ''}demo image in {out} (umoci)")
        img = _build(small, debs, out, key)
        tmp = stamp.with_suffix(".tmp")
        tmp.write_text(json.dumps(img.to_json(), indent=1) + "\n")
        os.replace(tmp, stamp)
        return img, False


def _layout_intact(img: DemoImage) -> bool:
    try:
        mdigest, manifest = read_manifest(img.layout, img.tag)
    except (OSError, ValueError, NotFound):
        return False
    blobs = [manifest["config"], *manifest["layers"]]
    ok = mdigest == img.manifest_digest
    return ok and all(_blob(img.layout, b["digest"]).stat().st_size == b["size"] for b in blobs)


def _build(small: bool, debs: list[Path], out: Path, key: str) -> DemoImage:
    out.mkdir(parents=True, exist_ok=True)
    (out / "image.json").unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
    try:
        layout = work / "layout"
        bundle = work / "bundle"
        image = f"{layout}:{TAG}"
        _run(["umoci", "init", "--layout", str(layout)])
        _run(["umoci", "new", "--image", image])
        _run(["umoci", "unpack", "--image", image, str(bundle)])
        rootfs = bundle / "rootfs"
        if small:
            _fill_small(rootfs)
            reads = SMALL_READS
        else:
            for deb in debs:
                _run(["dpkg-deb", "-x", str(deb), str(rootfs)])
            reads = (*FULL_READS, GOFMT)
        _check_reads(rootfs, reads)
        _run(["umoci", "repack", "--refresh-bundle", "--image", image, str(bundle)])
        _fill_app(rootfs, small, reads)
        _run(["umoci", "repack", "--refresh-bundle", "--image", image, str(bundle)])
        _run(
            [
                "umoci",
                "config",
                "--image",
                image,
                "--config.cmd",
                "/entrypoint.sh",
                "--config.env",
                "PATH=/bin:/usr/bin",
                "--config.workingdir",
                "/",
            ]
        )
        _run(["umoci", "gc", "--layout", str(layout)])
        files, content = _count_files(rootfs)
        if len(reads) >= 0.05 * files:
            raise FailedPrecondition(
                f"demo image: the read list ({len(reads)}) is not under 5% of {files} files"
            )
        final = out / "layout"
        if final.exists():
            shutil.rmtree(final)
        os.rename(layout, final)
        mdigest, manifest = read_manifest(final)
        return DemoImage(
            layout=final,
            tag=TAG,
            manifest_digest=mdigest,
            image_bytes=_image_bytes(final, mdigest, manifest),
            layer_sizes=tuple(lay["size"] for lay in manifest["layers"]),
            content_bytes=content,
            files=files,
            read_files=reads,
            small=small,
            key=key,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------
# variants


def variant_prefix(i: int) -> bytes:
    """The tar bytes (one regular file ``demo-variant``, no end-of-archive blocks) put before layer 1."""
    data = f"soci-py demo variant {i}\n".encode()
    ti = tarfile.TarInfo("demo-variant")
    ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_700_000_000
    pad = (-len(data)) % tarfile.BLOCKSIZE
    return ti.tobuf(format=tarfile.USTAR_FORMAT) + data + b"\0" * pad


def _inflate_chunks(path: Path) -> Iterator[bytes]:
    """The uncompressed bytes of a (possibly multi-member) gzip file, in chunks."""
    import zlib

    d = zlib.decompressobj(31)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            while chunk:
                yield d.decompress(chunk)
                if d.eof:
                    chunk = d.unused_data
                    d = zlib.decompressobj(31)
                else:
                    chunk = b""
    if not d.eof and d.decompress(b""):
        raise FormatError(f"layer {path.name}: truncated gzip stream")


def build_variants(
    base: DemoImage, count: int, out: Path | None = None, say: Callable[[str], None] = print
) -> list[DemoImage]:
    """``count`` images like ``base``, each in its own layout ``out/vNN/layout``, reused when already built.

    Variant ``i``'s first layer is ``gzip(variant_prefix(i))`` followed by ``base``'s first layer blob as is
    (a two-member gzip stream), so its tar holds one more file and its digest, diff_id and zTOC differ; the
    other layers are hard links to ``base``'s blobs. One pass over the base layer computes every digest.
    """
    out = Path(out) if out is not None else base.layout.parent / "variants"
    with _locked(out.parent / f".{out.name}.lock"):
        stamp = out / "variants.json"
        key = f"{base.key}|{base.manifest_digest}|{count}"
        if stamp.is_file():
            try:
                doc = json.loads(stamp.read_text())
                imgs = [DemoImage.from_json(d) for d in doc["images"]]
                if doc.get("key") == key and all(_layout_intact(i) for i in imgs):
                    return imgs
            except (ValueError, TypeError, KeyError):
                pass
        say(f"building {count} variants of the demo image in {out}")
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        imgs = _variants(base, count, out)
        stamp.write_text(json.dumps({"key": key, "images": [i.to_json() for i in imgs]}, indent=1) + "\n")
        return imgs


def _variants(base: DemoImage, count: int, out: Path) -> list[DemoImage]:
    _mdigest, manifest = read_manifest(base.layout, base.tag)
    config = json.loads(_blob(base.layout, manifest["config"]["digest"]).read_bytes())
    big = manifest["layers"][0]
    big_path = _blob(base.layout, big["digest"])
    prefixes = [variant_prefix(i) for i in range(count)]
    members = [gzip.compress(p, mtime=0) for p in prefixes]
    h_gz = [hashlib.sha256(m) for m in members]
    h_tar = [hashlib.sha256(p) for p in prefixes]
    layouts = [out / f"v{i:02d}" / "layout" for i in range(count)]
    for lay in layouts:
        (lay / "blobs" / "sha256").mkdir(parents=True)
    tmps = [open(lay / "blobs" / "sha256" / ".big.tmp", "wb") for lay in layouts]  # noqa: SIM115
    try:
        for f, m in zip(tmps, members, strict=True):
            f.write(m)
        with open(big_path, "rb") as src:
            while chunk := src.read(1 << 20):
                for h, f in zip(h_gz, tmps, strict=True):
                    h.update(chunk)
                    f.write(chunk)
    finally:
        for f in tmps:
            f.close()
    for chunk in _inflate_chunks(big_path):
        for h in h_tar:
            h.update(chunk)
    images = []
    for i, lay in enumerate(layouts):
        gz_digest = "sha256:" + h_gz[i].hexdigest()
        os.rename(lay / "blobs/sha256/.big.tmp", _blob(lay, gz_digest))
        cfg = json.loads(json.dumps(config))
        cfg["rootfs"]["diff_ids"][0] = "sha256:" + h_tar[i].hexdigest()
        cfg_bytes = json.dumps(cfg, separators=(",", ":")).encode()
        cfg_digest = "sha256:" + hashlib.sha256(cfg_bytes).hexdigest()
        _blob(lay, cfg_digest).write_bytes(cfg_bytes)
        for other in manifest["layers"][1:]:
            os.link(_blob(base.layout, other["digest"]), _blob(lay, other["digest"]))
        man = json.loads(json.dumps(manifest))
        man["config"].update(digest=cfg_digest, size=len(cfg_bytes))
        man["layers"][0].update(digest=gz_digest, size=big["size"] + len(members[i]))
        man_bytes = json.dumps(man, separators=(",", ":")).encode()
        man_digest = "sha256:" + hashlib.sha256(man_bytes).hexdigest()
        _blob(lay, man_digest).write_bytes(man_bytes)
        desc = {
            "mediaType": MT_MANIFEST,
            "digest": man_digest,
            "size": len(man_bytes),
            "annotations": {REF_NAME: base.tag},
        }
        (lay / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
        (lay / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        images.append(
            dataclasses.replace(
                base,
                layout=lay,
                manifest_digest=man_digest,
                image_bytes=_image_bytes(lay, man_digest, man),
                layer_sizes=(man["layers"][0]["size"], *base.layer_sizes[1:]),
                content_bytes=base.content_bytes + len(prefixes[i]) - tarfile.BLOCKSIZE,
                files=base.files + 1,
                key=f"{base.key}|variant {i}",
            )
        )
    return images


# --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build (or reuse) the soci-py demo image in an OCI layout.")
    ap.add_argument("--small", action="store_true", help="a few MB of generated files instead of packages")
    ap.add_argument("--out", type=Path, help="output directory (default: under the cache)")
    ap.add_argument("--cache", type=Path, help=f"cache dir (default $SOCI_DEMO_CACHE or {DEFAULT_CACHE})")
    ap.add_argument("--variants", type=int, default=0, help="also build N distinct variants")
    ap.add_argument("--force", action="store_true", help="rebuild even when the inputs are unchanged")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    say = lambda s: print(s, file=sys.stderr)  # noqa: E731
    img, reused = build(small=args.small, out=args.out, cache=args.cache, force=args.force, say=say)
    doc: dict[str, object] = {"image": img.to_json(), "reused": reused}
    if args.variants:
        doc["variants"] = [v.to_json() for v in build_variants(img, args.variants, say=say)]
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
