"""Applying layers with :func:`soci_fs.unpack.apply_layer`: every entry kind, overlay whiteouts, implied
parents from lower layers, the diff_id, corrupt and hostile input, and a real overlayfs mount over applied
layers. Layers are built here with :mod:`tarfile` and, for the comparison with ``tar -x``, with GNU tar."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import logging
import os
import stat
import sys
import tarfile
import zlib
from pathlib import Path

import pytest

from soci_fs.errors import FailedPrecondition, FormatError, InvalidArgument, NotFound
from soci_fs.unpack import OPAQUE_XATTR, ApplyResult, apply_layer, compression_for_media_type
from tests.fs import fusehelp as fh

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod, trusted xattrs)")

MTIME = 1_600_000_000
NS = 10**9
CAPS = b"\x01\x00\x00\x02" + bytes(16)  # VFS_CAP_REVISION_2, no capabilities
EMPTY_LAYER_DIFF_ID = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"


# ------------------------------------------------------------------------------------ building layers


def _info(name: str, kind: bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0, **kw) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.uid = uid
    ti.gid = gid
    ti.mtime = kw.pop("mtime", MTIME)
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def reg(name: str, data: bytes = b"", **kw) -> tuple[tarfile.TarInfo, bytes]:
    ti = _info(name, tarfile.REGTYPE, **kw)
    ti.size = len(data)
    return ti, data


def dir_(name: str, **kw) -> tuple[tarfile.TarInfo, None]:
    kw.setdefault("mode", 0o755)
    return _info(name, tarfile.DIRTYPE, **kw), None


def sym(name: str, target: str, **kw) -> tuple[tarfile.TarInfo, None]:
    return _info(name, tarfile.SYMTYPE, linkname=target, mode=0o777, **kw), None


def hard(name: str, target: str, **kw) -> tuple[tarfile.TarInfo, None]:
    return _info(name, tarfile.LNKTYPE, linkname=target, **kw), None


def dev(name: str, kind: bytes, major: int = 0, minor: int = 0, **kw) -> tuple[tarfile.TarInfo, None]:
    return _info(name, kind, devmajor=major, devminor=minor, **kw), None


def tar_bytes(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return bio.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def apply_bytes(
    blob: bytes, dest: Path, *, compression: str = "tar", expected: str | None = None, parents=()
) -> ApplyResult:
    dest.mkdir(parents=True, exist_ok=True)
    return apply_layer(
        io.BytesIO(blob), dest, compression=compression, expected_diff_id=expected, parent_dirs=parents
    )


def apply_entries(entries, dest: Path, *, parents=(), gz: bool = False) -> ApplyResult:
    raw = tar_bytes(entries)
    blob = gzip.compress(raw, mtime=0) if gz else raw
    res = apply_bytes(blob, dest, compression="gzip" if gz else "tar", expected=sha(raw), parents=parents)
    assert res.diff_id == sha(raw)
    assert res.uncompressed_size == len(raw)
    return res


def is_whiteout(path: Path) -> bool:
    st = path.lstat()
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and st.st_mode & 0o7777 == 0


# ----------------------------------------------------------------- whole trees against GNU tar + containerd


def _whiteout_times_cleared(root: Path) -> dict[bytes, tuple]:
    """A snapshot without the mtimes of whiteouts (containerd leaves them at the time of creation)."""
    snap = fh.snapshot(root)
    for rel, row in snap.items():
        if stat.S_ISCHR(row[0]) and row[6] == 0:
            snap[rel] = (*row[:4], None, *row[5:])
    return snap


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("unpack")


@pytest.fixture(scope="module")
def kinds_tar(work: Path) -> Path:
    fh.make_kinds_tree(work / "kinds-src")
    return fh.tar_dir(work / "kinds-src", work / "kinds.tar")


@pytest.fixture(scope="module")
def overlay_tars(work: Path) -> list[Path]:
    out = []
    for name, files in fh.OVERLAY_TREES.items():
        fh.make_files(work / name, files)
        out.append(fh.tar_dir(work / name, work / f"{name}.tar"))
    return out


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "gzip"])
def test_every_entry_kind_matches_tar_x(work: Path, kinds_tar: Path, tmp_path: Path, gz: bool) -> None:
    raw = kinds_tar.read_bytes()
    blob = tmp_path / "layer"
    blob.write_bytes(gzip.compress(raw, compresslevel=1) if gz else raw)
    dest = tmp_path / "dest"
    dest.mkdir()
    res = apply_layer(blob, dest, compression="gzip" if gz else "tar", expected_diff_id=sha(raw))
    with tarfile.open(kinds_tar) as tf:
        members = len(tf.getmembers())
    assert res == ApplyResult(sha(raw), len(raw), members)

    want = work / "kinds-x"
    if not want.exists():
        fh.extract(kinds_tar, want)
    got_s = fh.snapshot(dest, with_data=True)
    want_s = fh.snapshot(want, with_data=True)
    assert not fh.differences(got_s, want_s)
    # the awkward ones, spelled out
    assert (dest / "setuid").stat().st_mode & 0o7777 == 0o4755
    assert (dest / "setgid").stat().st_mode & 0o7777 == 0o2750
    assert (dest / "empty-dir").stat().st_mode & 0o7777 == 0o1777
    assert (
        (dest / "dir/hl-a").stat().st_ino
        == (dest / "hl-c").stat().st_ino
        == (dest / "dir/sub/hl-b").stat().st_ino
    )
    assert os.getxattr(dest / "dir/xattrs", "user.binary") == bytes(range(256))
    assert (dest / "dir/sub/text.txt").stat().st_mtime_ns == MTIME * NS + 123_456_789


def test_overlay_layers_match_containerd_extraction(
    work: Path, overlay_tars: list[Path], tmp_path: Path
) -> None:
    for tar in overlay_tars:
        dest = tmp_path / tar.stem
        dest.mkdir()
        apply_layer(tar, dest, compression="tar", expected_diff_id=sha(tar.read_bytes()))
        want = work / f"{tar.stem}-x"
        if not want.exists():
            fh.extract(tar, want)
            fh.convert_whiteouts(want)
        assert not fh.differences(_whiteout_times_cleared(dest), _whiteout_times_cleared(want)), tar.stem
    assert is_whiteout(tmp_path / "ov2/a/gone.txt")
    assert is_whiteout(tmp_path / "ov2/c")
    assert os.getxattr(tmp_path / "ov2/b", OPAQUE_XATTR) == b"y"


def test_overlayfs_mount_over_applied_layers(overlay_tars: list[Path], tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for tar, dest in zip(overlay_tars[:2], (lower, upper), strict=True):
        dest.mkdir()
        apply_layer(tar, dest, compression="tar", expected_diff_id=None)
    merged = tmp_path / "merged"
    try:
        with fh.overlay([upper, lower], merged) as m:
            assert (m / "a/keep.txt").read_bytes() == b"keep\n"
            assert not (m / "a/gone.txt").exists()  # whiteout
            assert sorted(os.listdir(m / "b")) == ["fresh"]  # opaque: old1 and sub/ hidden
            assert not (m / "c").exists()  # whiteout of a directory
            assert (m / "same.txt").read_bytes() == b"second version\n"
            assert (m / "link").read_bytes() == b"keep\n"
    finally:
        leftover = fh.mounts_under(tmp_path)
        for mp in reversed(leftover):
            fh.run("umount", "-l", mp, check=False)
        assert not leftover, f"mounts left behind: {leftover}"


# ------------------------------------------------------------------------------------ entries one by one


def test_files_modes_owners_times_xattrs(tmp_path: Path) -> None:
    nsfile = reg("d/ns", b"n", pax_headers={"mtime": f"{MTIME}.000000042", "atime": f"{MTIME + 5}.5"})
    entries = [
        dir_("d", mode=0o2775, uid=7, gid=8, mtime=MTIME + 100),
        reg("d/suid", b"#!/bin/sh\n", mode=0o4711, uid=1000, gid=1001),
        reg("d/sticky", b"", mode=0o1600),
        nsfile,
        reg(
            "d/x",
            b"x",
            pax_headers={
                "SCHILY.xattr.user.a": "1",
                "SCHILY.xattr.trusted.t": "tv",
                "SCHILY.xattr.security.capability": CAPS.decode("latin-1"),
            },
        ),
        dir_("d/sub", mode=0o700),
        reg("d/sub/inner", b"i"),
        sym("d/ln", "/nowhere", uid=42, gid=43, mtime=MTIME + 7),
    ]
    dest = tmp_path / "dest"
    res = apply_entries(entries, dest, gz=True)
    assert res.entries == len(entries)
    d = dest / "d"
    st = d.lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o2775, 7, 8)
    assert st.st_mtime_ns == (MTIME + 100) * NS  # set after its children were written
    st = (d / "suid").lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4711, 1000, 1001)
    assert (d / "suid").read_bytes() == b"#!/bin/sh\n"
    assert (d / "suid").stat().st_gid == 1001  # not inherited from the set-gid directory
    assert stat.S_IMODE((d / "sticky").lstat().st_mode) == 0o1600
    assert stat.S_IMODE((d / "sub").lstat().st_mode) == 0o700
    st = (d / "ns").lstat()
    assert st.st_mtime_ns == MTIME * NS + 42
    assert st.st_atime_ns == (MTIME + 5) * NS + 500_000_000
    assert os.getxattr(d / "x", "user.a") == b"1"
    assert os.getxattr(d / "x", "trusted.t") == b"tv"
    assert os.getxattr(d / "x", "security.capability")[:4] == b"\x01\x00\x00\x02"
    st = (d / "ln").lstat()
    assert stat.S_ISLNK(st.st_mode) and os.readlink(d / "ln") == "/nowhere"
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (42, 43, (MTIME + 7) * NS)


def test_hardlinks_devices_fifos(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "pre").write_bytes(b"already here")  # a hard link may point at a file already in dest
    entries = [
        reg("a/file", b"shared", mode=0o640),
        hard("b/link", "a/file", mode=0o640),
        hard("./c", "/pre"),
        dev("dev/null", tarfile.CHRTYPE, 1, 3, mode=0o666),
        dev("dev/sda", tarfile.BLKTYPE, 8, 0, mode=0o660, gid=6),
        dev("run/fifo", tarfile.FIFOTYPE, mode=0o620),
    ]
    apply_entries(entries, dest)
    assert (dest / "a/file").stat().st_ino == (dest / "b/link").stat().st_ino
    assert (dest / "a/file").stat().st_nlink == 2
    assert (dest / "c").stat().st_ino == (dest / "pre").stat().st_ino
    st = (dest / "dev/null").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3) and stat.S_IMODE(st.st_mode) == 0o666
    st = (dest / "dev/sda").lstat()
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(8, 0) and st.st_gid == 6
    st = (dest / "run/fifo").lstat()
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620


def test_whiteouts_and_opaque_dirs(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "olddir").mkdir()
    (dest / "olddir/f").write_bytes(b"")
    entries = [
        dir_("etc"),
        reg("etc/.wh.passwd", uid=1000, gid=1001),
        reg(".wh.olddir"),  # replaces an existing directory
        reg("implied/deeper/.wh.gone"),  # parents not listed
        dir_("opq", mode=0o750),
        reg("opq/.wh..wh..opq"),
        reg("opq/kept", b"k"),
        reg("late/.wh..wh..opq"),  # opaque marker for a directory the tar never lists
        reg(".wh..wh.plnk/123", b"aufs"),  # aufs meta data: skipped
        reg("x/.wh..wh.aufs"),  # ditto
    ]
    res = apply_entries(entries, dest)
    assert res.entries == len(entries)
    for p in ("etc/passwd", "olddir", "implied/deeper/gone"):
        assert is_whiteout(dest / p), p
    assert (dest / "etc/passwd").lstat().st_uid == 1000
    assert (dest / "etc/passwd").lstat().st_gid == 1001
    assert not (dest / "etc/.wh.passwd").exists()
    assert os.getxattr(dest / "opq", OPAQUE_XATTR) == b"y"
    assert os.getxattr(dest / "late", OPAQUE_XATTR) == b"y"
    assert sorted(os.listdir(dest / "opq")) == ["kept"]
    assert stat.S_IMODE((dest / "opq").lstat().st_mode) == 0o750
    assert not (dest / ".wh..wh.plnk").exists()
    assert not (dest / "x").exists()


def test_whiteout_spares_this_layers_own_entry(tmp_path: Path) -> None:
    """OCI: a whiteout applies to lower layers only; an entry of the same layer stays, in either order."""
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "pre").write_bytes(b"")
    entries = [
        reg("f", b"kept"),
        reg(".wh.f"),
        reg(".wh.g"),
        dir_("g"),
        reg("g/x", b"x"),
        reg(".wh.pre"),
    ]
    apply_entries(entries, dest)
    assert (dest / "f").read_bytes() == b"kept"
    assert (dest / "g/x").read_bytes() == b"x"
    assert is_whiteout(dest / "pre")


@pytest.mark.parametrize("bad", [".wh..", ".wh."])
def test_invalid_whiteout_names(tmp_path: Path, bad: str) -> None:
    with pytest.raises(FormatError, match="invalid whiteout name"):
        apply_entries([reg(f"d/{bad}")], tmp_path / "dest")


def test_replacing_paths_of_another_kind(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    entries = [
        dir_("dir-then-file"),
        reg("dir-then-file/child", b"c"),
        reg("file-then-dir", b"f"),
        sym("link-then-dir", "/etc"),
        dir_("merge", mode=0o700),
        reg("merge/one", b"1"),
        reg("dir-then-file", b"now a file"),
        dir_("file-then-dir", mode=0o711),
        reg("file-then-dir/inside", b"i"),
        dir_("link-then-dir"),
        reg("link-then-dir/x", b"x"),
        dir_("merge", mode=0o755),  # a directory again: merged, last metadata wins
        reg("merge/two", b"2"),
        reg("file-twice", b"old"),
        reg("file-twice", b"new"),
    ]
    apply_entries(entries, dest)
    assert (dest / "dir-then-file").read_bytes() == b"now a file"
    assert (dest / "file-then-dir/inside").read_bytes() == b"i"
    assert stat.S_IMODE((dest / "file-then-dir").lstat().st_mode) == 0o711
    assert stat.S_ISDIR((dest / "link-then-dir").lstat().st_mode)
    assert not Path("/etc/x").exists()
    assert sorted(os.listdir(dest / "merge")) == ["one", "two"]
    assert stat.S_IMODE((dest / "merge").lstat().st_mode) == 0o755
    assert (dest / "file-twice").read_bytes() == b"new"


def test_implied_parents_take_the_nearest_lower_directory(tmp_path: Path) -> None:
    near, far = tmp_path / "near", tmp_path / "far"
    (near / "o").mkdir(parents=True)
    os.setxattr(near / "o", OPAQUE_XATTR, b"y")
    os.chmod(near / "o", 0o751)
    os.mknod(near / "w", stat.S_IFCHR, 0)  # whiteout: hides far/w
    (far / "x/y").mkdir(parents=True)
    (far / "w").mkdir()
    (far / "o/p").mkdir(parents=True)
    os.chown(far / "x", 5, 6)
    os.chmod(far / "x", 0o750)
    os.chmod(far / "x/y", 0o705)
    os.utime(far / "x", ns=(MTIME * NS, MTIME * NS))
    os.chmod(far / "w", 0o700)
    os.chmod(far / "o/p", 0o700)
    dest = tmp_path / "dest"
    entries = [
        reg("x/y/z", b"z"),  # x and x/y implied: far has them
        reg("w/f", b""),  # near whites w out: default
        reg("o/p/f", b""),  # near's o is opaque: o from near, o/p default
        reg("n/f", b""),  # nobody has n
    ]
    apply_entries(entries, dest, parents=[near, far])
    st = (dest / "x").lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (0o750, 5, 6, MTIME * NS)
    assert stat.S_IMODE((dest / "x/y").lstat().st_mode) == 0o705
    for p in ("w", "o/p", "n"):
        st = (dest / p).lstat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0), p
    assert stat.S_IMODE((dest / "o").lstat().st_mode) == 0o751
    assert OPAQUE_XATTR not in os.listxattr(dest / "o")  # lower metadata, never its opaque mark
    # the lower directories were only read
    assert sorted(os.listdir(far)) == ["o", "w", "x"]
    assert os.listdir(far / "x/y") == []


# ---------------------------------------------------------------------------------------- the stream


def test_diff_id_mismatch_names_both_digests(tmp_path: Path) -> None:
    raw = tar_bytes([reg("f", b"data")])
    wrong = "sha256:" + "0" * 64
    with pytest.raises(FormatError) as ei:
        apply_bytes(gzip.compress(raw), tmp_path / "dest", compression="gzip", expected=wrong)
    assert wrong in str(ei.value) and sha(raw) in str(ei.value)
    with pytest.raises(InvalidArgument):
        apply_bytes(raw, tmp_path / "dest2", expected="sha512:abc")
    with pytest.raises(InvalidArgument):
        apply_bytes(raw, tmp_path / "dest3", compression="bzip2")


def test_digest_covers_trailing_bytes(tmp_path: Path) -> None:
    raw = tar_bytes([reg("f", b"data")]) + bytes(64 * 1024)  # padding well past the end marker
    res = apply_bytes(gzip.compress(raw), tmp_path / "dest", compression="gzip", expected=sha(raw))
    assert (res.diff_id, res.uncompressed_size, res.entries) == (sha(raw), len(raw), 1)


def test_multi_member_gzip(tmp_path: Path) -> None:
    raw = tar_bytes([reg(f"f{i}", os.urandom(3000)) for i in range(20)])
    cuts = [0, 1, 700, 512 * 9 + 3, 40_000, len(raw)]
    blob = b"".join(gzip.compress(raw[a:b]) for a, b in itertools.pairwise(cuts))
    blob += gzip.compress(b"")  # an empty member at the end
    res = apply_bytes(blob, tmp_path / "dest", compression="gzip", expected=sha(raw))
    assert res.entries == 20
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        for m in tf.getmembers():
            assert (tmp_path / "dest" / m.name).read_bytes() == tf.extractfile(m).read()


def test_empty_layers(tmp_path: Path) -> None:
    res = apply_bytes(gzip.compress(bytes(1024)), tmp_path / "a", compression="gzip")
    assert res == ApplyResult(EMPTY_LAYER_DIFF_ID, 1024, 0)
    res = apply_bytes(b"", tmp_path / "b", compression="tar")
    assert res == ApplyResult(sha(b""), 0, 0)
    assert os.listdir(tmp_path / "a") == os.listdir(tmp_path / "b") == []


def test_path_and_file_object_inputs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = tar_bytes([reg("f", b"1")])
    (tmp_path / "blob").write_bytes(raw)
    (tmp_path / "d1").mkdir()
    apply_layer(str(tmp_path / "blob"), tmp_path / "d1", compression="tar", expected_diff_id=sha(raw))
    apply_bytes(raw, tmp_path / "d2")
    f = io.BytesIO(raw)
    (tmp_path / "d3").mkdir()
    apply_layer(f, str(tmp_path / "d3"), compression="tar", expected_diff_id=None)
    assert not f.closed
    done = [r for r in caplog.records if r.name == "soci_fs.unpack" and "applied layer" in r.getMessage()]
    assert len(done) == 3 and all(r.levelno == logging.DEBUG for r in done)
    with pytest.raises(NotFound):
        apply_layer(tmp_path / "missing", tmp_path / "d1", compression="tar", expected_diff_id=None)
    with pytest.raises(NotFound):
        apply_layer(f, tmp_path / "blob", compression="tar", expected_diff_id=None)


def test_zstd_without_the_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import fails whether or not it is installed
    with pytest.raises(FailedPrecondition, match=r"application/vnd\.oci\.image\.layer\.v1\.tar\+zstd"):
        apply_bytes(b"", tmp_path / "dest", compression="zstd")


def test_media_types() -> None:
    assert compression_for_media_type("application/vnd.oci.image.layer.v1.tar+gzip") == "gzip"
    assert compression_for_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip") == "gzip"
    assert compression_for_media_type("application/vnd.oci.image.layer.v1.tar") == "tar"
    assert compression_for_media_type("application/vnd.oci.image.layer.v1.tar+zstd") == "zstd"
    with pytest.raises(InvalidArgument):
        compression_for_media_type("application/vnd.oci.image.layer.v1.tar+bzip2")


# ------------------------------------------------------------------------------- corrupt and hostile input


def test_truncated_and_corrupt_gzip(tmp_path: Path) -> None:
    raw = tar_bytes([reg(f"f{i}", os.urandom(5000)) for i in range(10)])
    blob = gzip.compress(raw)
    with pytest.raises(FormatError, match="gzip: truncated"):
        apply_bytes(blob[: len(blob) // 2], tmp_path / "a", compression="gzip")
    with pytest.raises(FormatError, match="gzip: truncated"):
        apply_bytes(blob[:-4], tmp_path / "b", compression="gzip")  # only the trailer is missing
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(FormatError, match="gzip"):
        apply_bytes(bytes(bad), tmp_path / "c", compression="gzip")
    with pytest.raises(FormatError, match="do not start another gzip member"):
        apply_bytes(blob + b"\0\0\0\0", tmp_path / "d", compression="gzip")  # garbage after the member
    with pytest.raises(FormatError, match="gzip"):
        apply_bytes(raw, tmp_path / "e", compression="gzip")  # not gzip at all
    with pytest.raises(FormatError, match="empty"):
        apply_bytes(b"", tmp_path / "f", compression="gzip")


def test_truncated_and_corrupt_tar(tmp_path: Path) -> None:
    raw = tar_bytes([reg("a", b"x" * 3000), reg("b", b"y" * 10), reg("c", b"z")])
    with pytest.raises(FormatError, match=r"truncated|unexpected end"):
        apply_bytes(raw[:1500], tmp_path / "a")  # inside a's data
    with pytest.raises(FormatError, match="truncated"):
        apply_bytes(raw[: 512 * 8 + 100], tmp_path / "b")  # inside a header
    # a damaged second header: tarfile alone would take it for the end of the archive
    off = raw.index(b"b\0")
    damaged = raw[:off] + b"q" + raw[off + 1 :]
    with pytest.raises(FormatError, match="checksum"):
        apply_bytes(damaged, tmp_path / "c")
    # entry kinds Go reads but the layer format does not describe: refused, containerd takes over
    with_global = io.BytesIO()
    with tarfile.open(fileobj=with_global, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"c": "x"}) as tf:
        ti, data = reg("f", b"1")
        tf.addfile(ti, io.BytesIO(data))
    with pytest.raises(FormatError, match="unsupported"):
        apply_bytes(with_global.getvalue(), tmp_path / "d")


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/../x", "./../x"])
def test_names_climbing_out_are_refused(tmp_path: Path, name: str) -> None:
    dest = tmp_path / "box" / "dest"
    with pytest.raises(FormatError, match="climbs out") as ei:
        apply_entries([reg(name, b"evil")], dest)
    assert repr(name) in str(ei.value)
    assert sorted(os.listdir(tmp_path / "box")) == ["dest"]
    assert not (tmp_path / "x").exists()


def test_harmless_dot_dot_and_absolute_names_stay_inside(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    apply_entries([reg("/abs", b"1"), reg("./a/../b", b"2"), reg("c/./d/", b"3"), dir_("./")], dest)
    assert (dest / "abs").read_bytes() == b"1"
    assert (dest / "b").read_bytes() == b"2"
    assert (dest / "c/d").read_bytes() == b"3"
    assert sorted(os.listdir(dest)) == ["abs", "b", "c"]


def test_writing_through_a_symlink_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    for i, entries in enumerate(
        [
            [sym("link", str(outside)), reg("link/x", b"evil")],
            [sym("link", "../outside"), dir_("link/sub")],
            [sym("link", str(outside)), reg("link/.wh.x")],
            [sym("link", str(outside)), reg("link/.wh..wh..opq")],
            [sym("link", str(outside)), reg("link/deep/x", b"evil")],
        ]
    ):
        d = dest / str(i)
        with pytest.raises(FormatError, match="symlink") as ei:
            apply_entries(entries, d)
        assert repr(entries[1][0].name) in str(ei.value)
    assert os.listdir(outside) == []
    assert os.listxattr(outside) == []


def test_hardlink_targets_must_be_inside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    cases = [
        ([hard("h", "../outside/secret")], "outside the layer root"),
        ([sym("l", str(outside)), hard("h", "l/secret")], "symlink"),
        ([hard("h", "nothing/here")], "does not exist"),
        ([hard("h", "nothing")], "does not exist"),
        ([dir_("d"), hard("h", "d")], "is a directory"),
    ]
    for i, (entries, why) in enumerate(cases):
        with pytest.raises(FormatError, match=why):
            apply_entries(entries, tmp_path / "dest" / str(i))
    assert (outside / "secret").stat().st_nlink == 1


def test_parent_that_is_a_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="not a directory"):
        apply_entries([reg("f", b""), reg("f/g", b"")], tmp_path / "dest")


def test_hardlink_to_a_symlink_is_the_symlink(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    apply_entries([sym("l", "/etc/passwd"), hard("h", "l")], dest)
    assert os.readlink(dest / "h") == "/etc/passwd"
    assert (dest / "h").lstat().st_ino == (dest / "l").lstat().st_ino


def test_highly_compressed_data_streams(tmp_path: Path) -> None:
    """64 MiB of zeros from a ~64 KiB blob is inflated in bounded chunks and written whole."""
    raw = tar_bytes([reg("zeros", bytes(64 * 1024 * 1024))])
    blob = zlib.compressobj(9, zlib.DEFLATED, 31)
    data = blob.compress(raw) + blob.flush()
    assert len(data) < 200_000
    res = apply_bytes(data, tmp_path / "dest", compression="gzip", expected=sha(raw))
    assert res.uncompressed_size == len(raw)
    assert (tmp_path / "dest/zeros").stat().st_size == 64 * 1024 * 1024


def test_unsupported_xattrs_are_skipped_at_debug(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dest = tmp_path / "dest"
    xattrs = {"SCHILY.xattr.nonamespace.key": "v", "SCHILY.xattr.user.ok": "1"}
    apply_entries([reg("f", b"", pax_headers=xattrs), sym("l", "f", pax_headers=xattrs)], dest)
    assert os.getxattr(dest / "f", "user.ok") == b"1"
    assert os.listxattr(dest / "l", follow_symlinks=False) == []  # no user.* on symlinks: EPERM, skipped
    skipped = [r for r in caplog.records if "not set" in r.getMessage()]
    assert len(skipped) == 3 and all(r.levelno == logging.DEBUG for r in skipped)


def test_readers_must_agree(tmp_path: Path) -> None:
    """The guard against tarfile and Go's reader seeing different archives (not reachable with the
    archives above, where both agree): a difference in any entry, or in the count, is a FormatError."""
    from soci_fs.unpack import _Applier

    a = _Applier(str(tmp_path), [])
    a.seen = [("reg", "a", ""), ("dir", "b", "")]
    a.crosscheck([("reg", "a", ""), ("dir", "b", "")])
    with pytest.raises(FormatError, match=r"entry 1 reads as dir 'b'.*as reg 'b'"):
        a.crosscheck([("reg", "a", ""), ("reg", "b", "")])
    with pytest.raises(FormatError, match="2 entries were applied but the archive holds 3"):
        a.crosscheck([("reg", "a", ""), ("dir", "b", ""), ("reg", "c", "")])
