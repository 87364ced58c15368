"""Test helpers for the FUSE tests: real layers made with GNU tar, their zTOCs, extraction the way
containerd's overlayfs snapshotter applies a layer, whole-tree snapshots for comparison, and mounts that are
always undone.

Not a test module.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import random
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from soci_fs.builder import build_ztoc
from soci_fs.operations import LocalBlob, SpansLayerData
from soci_fs.spanread import LayerSpans
from soci_fs.ztoc import Ztoc

MTIME = 1_600_000_000
OPAQUE = "trusted.overlay.opaque"


def mounts_under(root: Path) -> list[str]:
    """Mountpoints in /proc/self/mounts at or below ``root``."""
    want = str(root)
    out = []
    with open("/proc/self/mounts", encoding="utf-8") as f:
        for line in f:
            mp = line.split()[1].replace("\\040", " ")
            if mp == want or mp.startswith(want + "/"):
                out.append(mp)
    return out


def run(*cmd: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.fspath(c) for c in cmd], capture_output=True, text=True, check=check)


# --------------------------------------------------------------------------------------- making trees


def _write(path: Path, data: bytes, mode: int = 0o644, mtime: int = MTIME, ns: int = 0) -> None:
    path.write_bytes(data)
    os.chmod(path, mode)
    os.utime(path, ns=(mtime * 10**9 + ns, mtime * 10**9 + ns))


def make_kinds_tree(root: Path, seed: int = 7) -> None:
    """A tree with every entry kind and the awkward cases: hardlinks, symlinks (relative, absolute,
    dangling, long), char/block devices, fifos, empty files, long names and paths, PAX xattrs, odd
    owners and modes, non-UTF-8 names, nanosecond mtimes, files crossing span boundaries."""
    rnd = random.Random(seed)
    root.mkdir(parents=True)
    (root / "dir" / "sub" / "deeper").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    _write(root / "dir" / "small.txt", b"hello\n")
    _write(root / "dir" / "empty", b"")
    _write(root / "dir" / "sub" / "big.bin", rnd.randbytes(3 * 1024 * 1024 + 12345), 0o600)
    _write(root / "dir" / "sub" / "text.txt", b"line\n" * 50_000, ns=123_456_789)
    _write(root / "setuid", b"#!/bin/sh\n", 0o4755)
    _write(root / "setgid", b"x", 0o2750)
    _write(root / "nomode", b"secret", 0o000)
    os.chmod(root / "empty-dir", 0o1777)
    # hardlinks: three names of one file, across directories
    _write(root / "dir" / "hl-a", b"linked content\n" * 100)
    os.link(root / "dir" / "hl-a", root / "dir" / "sub" / "hl-b")
    os.link(root / "dir" / "hl-a", root / "hl-c")
    # symlinks
    os.symlink("small.txt", root / "dir" / "ln-rel")
    os.symlink("/etc/passwd", root / "ln-abs")
    os.symlink("does/not/exist", root / "ln-dangling")
    os.symlink("t" * 200, root / "ln-long")
    # devices and fifos
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "blk", stat.S_IFBLK | 0o660, os.makedev(8, 300))
    os.mknod(root / "bigdev", stat.S_IFCHR | 0o600, os.makedev(300, 70000))
    os.mkfifo(root / "fifo", 0o640)
    # long names and long paths
    long_dir = root / ("d" * 120) / ("e" * 120)
    long_dir.mkdir(parents=True)
    _write(long_dir / ("f" * 255), b"long\n")
    _write(root / ("n" * 255), b"")
    # a non-UTF-8 name
    _write(Path(os.fsdecode(bytes(root) + b"/caf\xe9")), b"latin-1 name\n")
    # xattrs (user.*), including empty and binary values
    _write(root / "dir" / "xattrs", b"x")
    os.setxattr(root / "dir" / "xattrs", "user.plain", b"value")
    os.setxattr(root / "dir" / "xattrs", "user.empty", b"")
    os.setxattr(root / "dir" / "xattrs", "user.binary", bytes(range(256)))
    os.setxattr(root / "dir" / "sub", "user.on-dir", b"d")
    # odd owners
    os.chown(root / "dir" / "small.txt", 1000, 1000)
    os.chown(root / "dir" / "sub" / "text.txt", 123456, 65534)
    os.lchown(root / "dir" / "ln-rel", 42, 43)
    # many small files
    many = root / "many"
    many.mkdir()
    for i in range(300):
        _write(many / f"f{i:04d}", rnd.randbytes(rnd.randrange(0, 3000)))
    # fix directory mtimes last (creating children changes them)
    for dirpath, dirnames, _ in os.walk(root, topdown=False):
        for d in dirnames:
            os.utime(Path(dirpath) / d, ns=(MTIME * 10**9, MTIME * 10**9))
    os.utime(root, ns=(MTIME * 10**9, MTIME * 10**9))


# Three overlay layers, base first: whiteouts of a file and of a directory, an opaque directory, a file
# replaced by a directory and a directory replaced by a file. Used by the FUSE and the lazy-mount tests.
OVERLAY_TREES: dict[str, dict[str, bytes | str]] = {
    "ov1": {
        "a/keep.txt": b"keep\n",
        "a/gone.txt": b"gone\n",
        "b/old1": b"old1\n",
        "b/sub/old2": b"old2\n",
        "c/d/e.txt": b"e\n",
        "f-then-dir": b"file\n",
        "dir-then-f/x": b"x\n",
        "link": "->a/keep.txt",
        "same.txt": b"base version\n",
    },
    "ov2": {
        "a/.wh.gone.txt": b"",
        "a/new.txt": b"new in 2\n",
        "b/.wh..wh..opq": b"",
        "b/fresh": b"fresh\n",
        "same.txt": b"second version\n",
        ".wh.c": b"",
    },
    "ov3": {
        ".wh.f-then-dir": b"",
        "f-then-dir/inside": b"inside\n",
        ".wh.dir-then-f": b"",
        "dir-then-f": b"now a file\n",
        "c/again.txt": b"c is back\n",
        "a/.wh.new.txt": b"",
    },
}


def make_files(root: Path, files: dict[str, bytes | str | None]) -> None:
    """A small tree: ``name -> bytes`` (file), ``None`` (directory), ``"->target"`` (symlink)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            p.mkdir(exist_ok=True)
        elif isinstance(content, str):
            os.symlink(content.removeprefix("->"), p)
        else:
            _write(p, content)
    for dirpath, dirnames, _ in os.walk(root, topdown=False):
        for d in dirnames:
            os.utime(Path(dirpath) / d, ns=(MTIME * 10**9, MTIME * 10**9))
    os.utime(root, ns=(MTIME * 10**9, MTIME * 10**9))


# ------------------------------------------------------------------------------------------ layers


@dataclass
class BuiltLayer:
    tar: Path
    blob: Path
    ztoc: Ztoc

    def data(self) -> tuple[SpansLayerData, LocalBlob]:
        """A LayerData over the blob file (the caller closes the LocalBlob)."""
        blob = LocalBlob(self.blob)
        return SpansLayerData(LayerSpans.from_ztoc(self.ztoc, blob)), blob


def tar_dir(src: Path, out: Path, members: list[str] | None = None) -> Path:
    """GNU tar (PAX, numeric owners, user.* xattrs) of ``src`` (``.``) or of ``members`` below it."""
    cmd = [
        "tar",
        "--format=pax",
        "--xattrs",
        "--xattrs-include=user.*",
        "--numeric-owner",
        "-C",
        str(src),
        "-cf",
        str(out),
    ]
    if members is None:
        cmd.append(".")
    else:
        listing = out.with_suffix(".list")
        listing.write_text("\n".join(members) + "\n")
        cmd += ["--no-recursion", "-T", str(listing)]
    run(*cmd)
    return out


def usr_members(parts: list[str]) -> list[str]:
    """Member names (relative to /) for ``parts`` of /usr with every parent directory listed."""
    names: list[str] = []
    seen: set[str] = set()
    for part in parts:
        bits = part.split("/")
        for i in range(1, len(bits)):
            parent = "/".join(bits[:i])
            if parent not in seen:
                seen.add(parent)
                names.append(parent)
        top = Path("/") / part
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            rel = os.path.relpath(dirpath, "/")
            if rel not in seen:
                seen.add(rel)
                names.append(rel)
            for fn in sorted(filenames) + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
                names.append(f"{rel}/{fn}")
    return names


def build_layer(tar: Path, span_size: int) -> BuiltLayer:
    """Gzip ``tar`` and build its zTOC with ``span_size``."""
    blob = tar.with_name(f"{tar.stem}.{span_size}.tar.gz")
    if not blob.exists():
        blob.write_bytes(gzip.compress(tar.read_bytes(), compresslevel=6, mtime=0))
    with open(blob, "rb") as f:
        z = build_ztoc(f.read, span_size=span_size)
    return BuiltLayer(tar, blob, z)


# -------------------------------------------------------------------------------- extraction, overlay


def extract(tar: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    run("tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-p", "-C", dest, "-xf", tar)
    return dest


def convert_whiteouts(root: Path) -> None:
    """Turn an extracted layer into what containerd's overlayfs snapshotter keeps: ``.wh.<x>`` -> a 0/0
    character device ``<x>``; ``.wh..wh..opq`` -> ``trusted.overlay.opaque=y`` on its directory; directory
    times as the layer says."""
    for dirpath, _dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        st = d.lstat()
        for fn in filenames:
            if fn == ".wh..wh..opq":
                (d / fn).unlink()
                os.setxattr(d, OPAQUE, b"y")
            elif fn.startswith(".wh."):
                (d / fn).unlink()
                target = d / fn[4:]
                if not target.exists() and not target.is_symlink():
                    os.mknod(target, stat.S_IFCHR, 0)
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))  # containerd restores directory times last


@contextlib.contextmanager
def overlay(lowers: list[Path], merged: Path) -> Iterator[Path]:
    """A read-only overlayfs of ``lowers`` (top first) at ``merged``, always unmounted."""
    merged.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "overlay", "overlay", "-o", "lowerdir=" + ":".join(str(p) for p in lowers), merged)
    try:
        yield merged
    finally:
        run("umount", merged, check=False)
        if mounts_under(merged):
            run("umount", "-l", merged, check=False)


# ---------------------------------------------------------------------------------------- snapshots


def _xattrs(path: Path, prefixes: tuple[str, ...]) -> dict[str, bytes]:
    out = {}
    for name in os.listxattr(path, follow_symlinks=False):
        if name.startswith(prefixes):
            out[name] = os.getxattr(path, name, follow_symlinks=False)
    return out


def snapshot(
    root: Path, *, xattr_prefixes: tuple[str, ...] = ("user.", OPAQUE), with_data: bool = False
) -> dict[bytes, tuple]:
    """Everything ``stat``/``getfattr``/``readlink`` tell about each path below ``root`` (not the root):
    type and mode, uid, gid, size (not for directories), mtime in ns, nlink, rdev, symlink target, xattrs."""
    out: dict[bytes, tuple] = {}
    broot = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, broot)
            is_dir = stat.S_ISDIR(st.st_mode)
            target = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            data = None
            if with_data and stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    data = f.read()
            out[rel] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                None if is_dir else st.st_size,
                st.st_mtime_ns,
                st.st_nlink,
                st.st_rdev,
                target,
                _xattrs(Path(os.fsdecode(p)), xattr_prefixes),
                data,
            )
    return out


FIELDS = ("mode", "uid", "gid", "size", "mtime_ns", "nlink", "rdev", "target", "xattrs", "data")


def differences(got: dict[bytes, tuple], want: dict[bytes, tuple], limit: int = 20) -> list[str]:
    """Readable differences between two snapshots (empty when identical)."""
    out = []
    for p in sorted(set(got) | set(want)):
        if p not in got:
            out.append(f"{p!r}: missing")
        elif p not in want:
            out.append(f"{p!r}: unexpected")
        elif got[p] != want[p]:
            diffs = [f"{f} {a!r} != {b!r}" for f, a, b in zip(FIELDS, got[p], want[p], strict=True) if a != b]
            out.append(f"{p!r}: " + "; ".join(d[:300] for d in diffs))
        if len(out) >= limit:
            out.append("...")
            break
    return out


def diff_r(a: Path, b: Path) -> str:
    """``diff -r --no-dereference`` output (empty when the trees agree)."""
    res = run("diff", "-r", "--no-dereference", a, b, check=False)
    # diff cannot compare special files of the same kind; snapshot() compares their type and rdev.
    same_kind = re.compile(r"^File .* is an? (.+) while file .* is an? \1$")
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if not same_kind.match(ln)]
    return "\n".join(lines)


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
