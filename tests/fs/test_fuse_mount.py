"""Real FUSE mounts of real layers, compared with ``tar -x`` of the same layers and with overlayfs over
what containerd's overlayfs snapshotter would have extracted."""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from soci_fs import ztoc as ztoc_mod
from soci_fs.cache import BlockCache, CacheConfig
from soci_fs.errors import FailedPrecondition, Unavailable
from soci_fs.mount import MountOptions, ThreadedSession, serve_layers
from soci_fs.operations import BufferLayerData, LocalBlob
from soci_fs.spans import RemoteLayer
from soci_fs.ztoc import Ztoc
from tests.fs import fusehelp as fh

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs /dev/fuse and root"
    ),
]

USR_PARTS = [
    "usr/share/zoneinfo",
    "usr/lib/python3.11/email",
    "usr/lib/x86_64-linux-gnu/perl-base",
]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuse")


@pytest.fixture(scope="module")
def kinds_tar(work: Path) -> Path:
    fh.make_kinds_tree(work / "kinds-src")
    return fh.tar_dir(work / "kinds-src", work / "kinds.tar")


@pytest.fixture(scope="module")
def usr_tar(work: Path) -> Path:
    return fh.tar_dir(Path("/"), work / "usr.tar", fh.usr_members(USR_PARTS))


@pytest.fixture(scope="module")
def overlay_tars(work: Path) -> list[Path]:
    """Three layers, base first: whiteouts of a file and of a directory, an opaque directory, a file
    replaced by a directory and a directory replaced by a file."""
    out = []
    for name, files in fh.OVERLAY_TREES.items():
        fh.make_files(work / name, files)
        out.append(fh.tar_dir(work / name, work / f"{name}.tar"))
    return out


@pytest.fixture
def session(tmp_path: Path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    s = ThreadedSession(mnt, MountOptions(allow_other=True))
    try:
        s.start()
        yield s
    finally:
        s.close()
        leftover = fh.mounts_under(tmp_path)
        for mp in reversed(leftover):
            fh.run("umount", "-l", mp, check=False)
        assert not leftover, f"mounts left behind: {leftover}"


def _add(session: ThreadedSession, name: str, layer: fh.BuiltLayer, request: pytest.FixtureRequest) -> Path:
    data, blob = layer.data()
    request.addfinalizer(blob.close)
    return session.add_layer(name, layer.ztoc, data)


def _normalize_whiteouts(snap: dict[bytes, tuple]) -> dict[bytes, tuple]:
    """Whiteouts are compared by type and device number only (their owner and time are not part of the
    contract: containerd makes them with mknod at extraction time)."""
    out = {}
    for p, v in snap.items():
        if stat.S_ISCHR(v[0]) and v[6] == 0:
            v = (v[0], None, None, None, None, None, v[6], None, v[8], None)
        out[p] = v
    return out


@pytest.mark.parametrize("span_size", [64 * 1024, 1024 * 1024])
def test_layers_match_tar_x(
    session: ThreadedSession,
    kinds_tar: Path,
    usr_tar: Path,
    work: Path,
    span_size: int,
    request: pytest.FixtureRequest,
) -> None:
    for tar in (kinds_tar, usr_tar):
        layer = fh.build_layer(tar, span_size)
        served = _add(session, f"{tar.stem}-{span_size}", layer, request)
        want_dir = work / f"{tar.stem}-x"
        if not want_dir.exists():
            fh.extract(tar, want_dir)
        assert fh.diff_r(served, want_dir) == ""
        got = fh.snapshot(served, with_data=True)
        want = fh.snapshot(want_dir, with_data=True)
        assert len(got) > 10
        assert fh.differences(got, want) == []
    # both layers are served side by side in one session
    assert sorted(os.listdir(session.mountpoint)) == [f"kinds-{span_size}", f"usr-{span_size}"]


def test_whiteouts_and_opaque_dirs_as_overlay_expects(
    session: ThreadedSession, overlay_tars: list[Path], work: Path, request: pytest.FixtureRequest
) -> None:
    for tar in overlay_tars[1:]:
        served = _add(session, tar.stem, fh.build_layer(tar, 64 * 1024), request)
        want_dir = work / f"{tar.stem}-conv"
        if not want_dir.exists():
            fh.convert_whiteouts(fh.extract(tar, want_dir))
        got = _normalize_whiteouts(fh.snapshot(served, with_data=True))
        want = _normalize_whiteouts(fh.snapshot(want_dir, with_data=True))
        assert fh.differences(got, want) == []
    mid = session.mountpoint / "ov2"
    assert os.getxattr(mid / "b", "trusted.overlay.opaque") == b"y"
    assert os.listxattr(mid / "b") == ["trusted.overlay.opaque"]
    st = os.lstat(mid / "a" / "gone.txt")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and stat.S_IMODE(st.st_mode) == 0
    assert ".wh.gone.txt" not in os.listdir(mid / "a")
    assert not os.path.lexists(mid / "a" / ".wh.gone.txt")
    assert not os.path.lexists(mid / "b" / ".wh..wh..opq")


def test_overlay_of_our_layers_equals_overlay_of_extracted_layers(
    session: ThreadedSession,
    overlay_tars: list[Path],
    kinds_tar: Path,
    work: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    tars = [kinds_tar, *overlay_tars]  # base first
    ours, theirs = [], []
    for tar in tars:
        ours.append(_add(session, tar.stem, fh.build_layer(tar, 64 * 1024), request))
        conv = work / f"{tar.stem}-conv"
        if not conv.exists():
            fh.convert_whiteouts(fh.extract(tar, conv))
        theirs.append(conv)
    for n in (2, 3, 4):
        lowers_ours, lowers_theirs = ours[-n:][::-1], theirs[-n:][::-1]  # top first
        with (
            fh.overlay(lowers_ours, tmp_path / f"m-ours-{n}") as m1,
            fh.overlay(lowers_theirs, tmp_path / f"m-theirs-{n}") as m2,
        ):
            assert fh.diff_r(m1, m2) == ""
            got = fh.snapshot(m1, with_data=True)
            want = fh.snapshot(m2, with_data=True)
            assert fh.differences(got, want) == []
            if n >= 3:
                names = set(os.listdir(m1))
                assert {"a", "b", "same.txt", "dir-then-f"} <= names
                assert (m1 / "same.txt").read_bytes() == b"second version\n"
                assert os.listdir(m1 / "b") == ["fresh"]
                assert not (m1 / "a" / "gone.txt").exists()
                # ov2 whited out c/; ov3 brings a new c/ that must not show the base's c/d
                assert os.listdir(m1 / "c") == ["again.txt"]
                assert os.listdir(m1 / "f-then-dir") == ["inside"]
                assert (m1 / "dir-then-f").read_bytes() == b"now a file\n"


class _Exploding:
    """LayerData that fails for reads touching [bad_lo, bad_hi) and delegates the rest."""

    def __init__(self, inner, bad_lo: int, bad_hi: int, exc: Exception) -> None:
        self.inner, self.bad_lo, self.bad_hi, self.exc = inner, bad_lo, bad_hi, exc

    async def read(self, offset: int, length: int):
        if offset < self.bad_hi and offset + length > self.bad_lo:
            raise self.exc
        return await self.inner.read(offset, length)


@pytest.mark.expect_log
@pytest.mark.parametrize("exc", [RuntimeError("boom"), Unavailable("registry down")])
def test_read_failure_is_eio_and_the_mount_keeps_serving(
    session: ThreadedSession, kinds_tar: Path, exc: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    layer = fh.build_layer(kinds_tar, 64 * 1024)
    tar = kinds_tar.read_bytes()
    entry = next(e for e in layer.ztoc.files if e.name == "./dir/sub/text.txt")
    bad = _Exploding(BufferLayerData(tar), entry.uncompressed_offset, entry.uncompressed_offset + 10, exc)
    root = session.add_layer("bad", layer.ztoc, bad)
    with pytest.raises(OSError) as info:
        (root / "dir" / "sub" / "text.txt").read_bytes()
    assert info.value.errno == errno.EIO
    assert (root / "dir" / "small.txt").read_bytes() == b"hello\n"
    assert len(os.listdir(root / "many")) == 300
    with pytest.raises(OSError) as info:
        (root / "dir" / "sub" / "text.txt").read_bytes()
    assert info.value.errno == errno.EIO
    assert any("dir/sub/text.txt" in r.getMessage() and "'bad'" in r.getMessage() for r in caplog.records)


def test_statfs_writes_and_removal(session: ThreadedSession, kinds_tar: Path) -> None:
    layer = fh.build_layer(kinds_tar, 1024 * 1024)
    root = session.add_layer("k", layer.ztoc, BufferLayerData(kinds_tar.read_bytes()))
    sv = os.statvfs(session.mountpoint)
    assert sv.f_namemax == 255 and sv.f_bsize == 4096 and sv.f_blocks > 0 and sv.f_files > 300
    assert os.statvfs(root / "dir").f_namemax == 255
    with pytest.raises(OSError) as info:
        open(root / "dir" / "small.txt", "r+b")  # noqa: SIM115
    assert info.value.errno == errno.EROFS
    with pytest.raises(OSError) as info:
        os.mkdir(root / "newdir")
    assert info.value.errno == errno.EROFS
    with pytest.raises(OSError) as info:
        os.setxattr(root / "dir" / "small.txt", "user.x", b"1")
    assert info.value.errno == errno.EROFS
    with pytest.raises(FileNotFoundError):
        os.lstat(root / "dir" / "no-such-file")
    with pytest.raises(FileNotFoundError):
        os.lstat(root / "dir" / ".wh.small.txt")
    # an open file survives the removal of its layer; new lookups do not
    with open(root / "dir" / "small.txt", "rb") as f:
        session.remove_layer("k")
        assert f.read() == b"hello\n"
    assert os.listdir(session.mountpoint) == []
    assert not os.path.exists(root)
    assert os.stat(session.mountpoint).st_nlink == 2
    # the name can be used again, for a new slot
    root2 = session.add_layer("k", layer.ztoc, BufferLayerData(kinds_tar.read_bytes()))
    assert (root2 / "dir" / "small.txt").read_bytes() == b"hello\n"


@pytest.mark.trio
async def test_one_session_per_process(session: ThreadedSession, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(FailedPrecondition):
        await serve_layers(other)
    assert fh.mounts_under(other) == []


def test_unmounted_even_when_the_body_fails(tmp_path: Path) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    with pytest.raises(ZeroDivisionError), ThreadedSession(mnt):
        assert fh.mounts_under(mnt) == [str(mnt)]
        1 / 0  # noqa: B018
    assert fh.mounts_under(mnt) == []


def test_unmounted_from_outside_ends_the_session(tmp_path: Path) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    s = ThreadedSession(mnt).start()
    try:
        fh.run("umount", mnt)
        assert s._thread is not None
        s._thread.join(10)
        assert not s._thread.is_alive()
    finally:
        s.close()
    assert fh.mounts_under(mnt) == []


# ---------------------------------------------------------------------------------------------------------
# tar header verification, the state directory, disable-xattrs


def _altered(z: Ztoc, name: str, **change: object) -> Ztoc:
    """``z`` with one entry's metadata changed, serialized and parsed again (as a registry would serve it)."""
    files = tuple(dataclasses.replace(f, **change) if f.name == name else f for f in z.files)
    assert files != z.files
    return ztoc_mod.parse(ztoc_mod.serialize(dataclasses.replace(z, files=files)))


def _state(root: Path) -> dict:
    d = root / ".soci-snapshotter"
    (name,) = os.listdir(d)
    raw = (d / name).read_bytes()
    assert raw.startswith(b'{"') and raw.endswith(b"}\n")
    assert os.stat(d / name).st_size == len(raw)
    return {"name": name, "raw": raw, **json.loads(raw)}


@pytest.mark.expect_log
@pytest.mark.parametrize("change", [{"mode": 0o600}, {"uid": 4242}, {"mod_time": "2001-01-01T00:00:00Z"}])
def test_altered_ztoc_metadata_fails_the_read_unless_verification_is_off(
    session: ThreadedSession,
    kinds_tar: Path,
    work: Path,
    change: dict,
    caplog: pytest.LogCaptureFixture,
) -> None:
    layer = fh.build_layer(kinds_tar, 64 * 1024)
    z = _altered(layer.ztoc, "./dir/small.txt", **change)
    tar = kinds_tar.read_bytes()
    root = session.add_layer("altered", z, BufferLayerData(tar))
    assert stat.S_IMODE(os.stat(root / "dir" / "small.txt").st_mode) == (change.get("mode") or 0o644)
    with pytest.raises(OSError) as info:
        (root / "dir" / "small.txt").read_bytes()
    assert info.value.errno == errno.EIO
    # every other file reads (and verifies) fine
    want = work / "kinds-x"
    if not want.exists():
        fh.extract(kinds_tar, want)
    for name in ("dir/sub/text.txt", "dir/sub/big.bin", "dir/hl-a", "dir/xattrs", "many/f0007"):
        assert (root / name).read_bytes() == (want / name).read_bytes()
    field = {"mode": "mode", "uid": "uid", "mod_time": "mtime"}[next(iter(change))]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("'altered'" in m and "/dir/small.txt" in m and f"field {field}" in m for m in errors), errors
    assert not any("hello" in m for m in errors)
    state = _state(root)
    assert f"field {field}" in state["error"] and "/dir/small.txt" in state["error"]
    # the same zTOC with verification off (config disable_verification = true) reads the file
    plain = session.add_layer("altered-unverified", z, BufferLayerData(tar), verify=False)
    assert (plain / "dir" / "small.txt").read_bytes() == b"hello\n"
    assert "error" not in _state(plain)


def test_every_file_of_an_unaltered_layer_verifies(
    session: ThreadedSession, usr_tar: Path, work: Path
) -> None:
    layer = fh.build_layer(usr_tar, 64 * 1024)
    data = BufferLayerData(usr_tar.read_bytes())
    root = session.add_layer("usr-verified", layer.ztoc, data)
    assert session.session.ops.layers.by_name[b"usr-verified"].verifier is not None
    want_dir = work / "usr-x"
    if not want_dir.exists():
        fh.extract(usr_tar, want_dir)
    assert fh.diff_r(root, want_dir) == ""


class _CountingBlob:
    """``fetch(start, end)`` over a local blob that counts the bytes it hands out."""

    def __init__(self, path: Path) -> None:
        self.blob = LocalBlob(path)
        self.bytes = 0

    def __call__(self, start: int, end: int) -> bytes:
        self.bytes += end - start
        return self.blob(start, end)


def test_state_directory_reports_what_a_lazy_layer_fetched(
    session: ThreadedSession, kinds_tar: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    layer = fh.build_layer(kinds_tar, 64 * 1024)
    fetch = _CountingBlob(layer.blob)
    request.addfinalizer(fetch.blob.close)
    digest = "sha256:" + hashlib.sha256(layer.blob.read_bytes()).hexdigest()
    size = layer.blob.stat().st_size
    cache = BlockCache(None, CacheConfig())
    remote = session.call(functools.partial(RemoteLayer.open, layer.ztoc, fetch, digest, cache))
    assert remote.span_count > 10
    root = session.add_layer("lazy", layer.ztoc, remote, size=size)
    # lookup-only: not listed, but there
    assert ".soci-snapshotter" not in os.listdir(root)
    st = os.lstat(root / ".soci-snapshotter")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o500
    assert (st.st_uid, st.st_gid, st.st_nlink, st.st_mtime) == (0, 0, 1, 0)
    before = _state(root)
    assert before["name"] == f"{digest}.json"
    assert list(before)[1:] == ["raw", "digest", "size", "fetchedSize", "fetchedPercent"]
    assert (before["digest"], before["size"], before["fetchedSize"]) == (digest, size, 0)
    assert before["raw"] == (
        f'{{"digest":"{digest}","size":{size},"fetchedSize":0,"fetchedPercent":0}}\n'.encode()
    )
    f = root / ".soci-snapshotter" / f"{digest}.json"
    fst = os.lstat(f)
    assert stat.S_ISREG(fst.st_mode) and stat.S_IMODE(fst.st_mode) == 0o400 and fst.st_uid == 0
    assert (root / "dir" / "small.txt").read_bytes() == b"hello\n"
    after = _state(root)
    assert 0 < after["fetchedSize"] < size
    assert after["fetchedSize"] <= fetch.bytes
    assert after["fetchedPercent"] == pytest.approx(100 * after["fetchedSize"] / size)
    assert after["fetchedSize"] == remote.statistics()["fetched_size"]
    assert "error" not in after
    # the kernel asks again on every stat and read (the content changes as spans arrive)
    (root / "dir" / "sub" / "big.bin").read_bytes()
    assert _state(root)["fetchedSize"] > after["fetchedSize"]
    with pytest.raises(FileNotFoundError):
        os.lstat(root / ".soci-snapshotter" / "other.json")
    with pytest.raises(FileNotFoundError):
        os.lstat(root / "dir" / ".soci-snapshotter")


@pytest.mark.expect_log
def test_state_file_keeps_the_last_failure(session: ThreadedSession, kinds_tar: Path) -> None:
    layer = fh.build_layer(kinds_tar, 64 * 1024)
    tar = kinds_tar.read_bytes()
    entry = next(e for e in layer.ztoc.files if e.name == "./dir/sub/text.txt")
    lo = entry.uncompressed_offset
    bad = _Exploding(BufferLayerData(tar), lo, lo + 10, Unavailable("registry down for the test"))
    root = session.add_layer("failing", layer.ztoc, bad, size=len(tar))
    assert "error" not in _state(root)
    with pytest.raises(OSError):
        (root / "dir" / "sub" / "text.txt").read_bytes()
    state = _state(root)
    assert "registry down for the test" in state["error"] and "/dir/sub/text.txt" in state["error"]
    assert list(state)[:3] == ["name", "raw", "error"]  # "error" comes first when set
    assert state["fetchedSize"] == state["size"] == len(tar)  # data without fetched_size(): all there
    assert (root / "dir" / "small.txt").read_bytes() == b"hello\n"
    assert "registry down for the test" in _state(root)["error"]  # kept until the next failure


def test_disable_xattrs_layer_shows_none_and_the_others_keep_theirs(
    session: ThreadedSession, kinds_tar: Path, overlay_tars: list[Path]
) -> None:
    kinds = fh.build_layer(kinds_tar, 64 * 1024)
    ov2_tar = overlay_tars[1]
    ov2 = fh.build_layer(ov2_tar, 64 * 1024)
    nox = session.add_layer(
        "kinds-nox", kinds.ztoc, BufferLayerData(kinds_tar.read_bytes()), disable_xattrs=True
    )
    nox_ov = session.add_layer(
        "ov2-nox", ov2.ztoc, BufferLayerData(ov2_tar.read_bytes()), disable_xattrs=True
    )
    plain = session.add_layer("kinds", kinds.ztoc, BufferLayerData(kinds_tar.read_bytes()))
    ov = session.add_layer("ov2", ov2.ztoc, BufferLayerData(ov2_tar.read_bytes()))
    for _ in range(2):  # the answer for the disabled layers does not make the kernel stop asking
        for path, key in ((nox / "dir" / "xattrs", "user.plain"), (nox_ov / "b", fh.OPAQUE)):
            with pytest.raises(OSError) as info:
                os.getxattr(path, key)
            assert info.value.errno == errno.ENODATA
            assert os.listxattr(path) == []
        assert os.getxattr(plain / "dir" / "xattrs", "user.plain") == b"value"
        assert sorted(os.listxattr(plain / "dir" / "xattrs")) == ["user.binary", "user.empty", "user.plain"]
        assert os.getxattr(ov / "b", fh.OPAQUE) == b"y"
    # data and metadata of the disabled layer are unaffected
    assert (nox / "dir" / "xattrs").read_bytes() == b"x"
