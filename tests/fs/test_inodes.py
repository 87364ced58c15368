"""The inode tree of one layer (pure; no FUSE)."""

from __future__ import annotations

import stat
import time

import pytest

from soci_fs.errors import FormatError, NotFound
from soci_fs.inodes import OPAQUE_TRUSTED, OPAQUE_USER, ROOT_ID, InodeTree, linux_rdev
from soci_fs.ztoc import FileMetadata

T0 = "2020-09-13T12:26:40Z"  # 1_600_000_000
T1 = "2021-01-01T00:00:00.5Z"


def fm(
    name: str,
    type: str = "reg",
    *,
    size: int = 0,
    offset: int = 512,
    linkname: str = "",
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: str = T0,
    dev: tuple[int, int] = (0, 0),
    pax: dict[str, bytes] | None = None,
) -> FileMetadata:
    return FileMetadata(
        name=name,
        type=type,
        uncompressed_offset=offset,
        uncompressed_size=size,
        linkname=linkname,
        mode=mode,
        uid=uid,
        gid=gid,
        uname="",
        gname="",
        mod_time=mtime,
        devmajor=dev[0],
        devminor=dev[1],
        pax=tuple(sorted((pax or {}).items())),
    )


def tree_of(*entries: FileMetadata, **kw) -> InodeTree:
    return InodeTree.from_entries(entries, **kw)


def get(tree: InodeTree, path: str):
    node = tree.root
    for part in path.split("/"):
        if part:
            nxt = tree.lookup(node, part.encode())
            assert nxt is not None, f"{path}: {part} missing"
            node = nxt
    return node


def names(tree: InodeTree, path: str = "") -> list[bytes]:
    return [n for n, _ in tree.listing(get(tree, path))]


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ("./a/b", "a/b"),
        ("a/b/", "a/b"),
        ("/a//b/./c", "a/b/c"),
        ("a/../b", "b"),
        ("../../x", "x"),
        ("./", ""),
    ],
)
def test_names_are_cleaned(raw: str, path: str) -> None:
    t = tree_of(fm(raw, "dir" if raw.endswith("/") else "reg", mode=0o700))
    node = get(t, path)
    assert stat.S_IMODE(node.mode) == 0o700
    if path == "":
        assert node is t.root


def test_root_and_implied_dirs_have_upstream_defaults() -> None:
    t = tree_of(fm("a/b/c", size=3, uid=5, gid=6))
    assert t.root.id == ROOT_ID
    for node in (t.root, get(t, "a"), get(t, "a/b")):
        assert node.mode == stat.S_IFDIR | 0o755
        assert (node.uid, node.gid, node.mtime_ns) == (0, 0, 0)
    c = get(t, "a/b/c")
    assert c.mode == stat.S_IFREG | 0o644 and (c.uid, c.gid, c.size) == (5, 6, 3)
    assert c.mtime_ns == 1_600_000_000 * 10**9


def test_root_entry_updates_the_root() -> None:
    t = tree_of(fm("./", "dir", mode=0o700, uid=3, mtime=T1), fm("./x"))
    assert t.root.mode == stat.S_IFDIR | 0o700 and t.root.uid == 3
    assert t.root.mtime_ns == 1_609_459_200_500_000_000
    assert names(t) == [b"x"]


def test_later_entries_override_earlier_ones() -> None:
    t = tree_of(
        fm("d/f", size=1, offset=1024),
        fm("d/", "dir", mode=0o711, uid=9),  # re-describes the implied directory: all attributes
        fm("d/f", size=7, offset=4096, mode=0o600),
        fm("d/", "dir", mode=0o750, uid=0),
        fm("x", "symlink", linkname="d/f"),
        fm("x", "reg", size=2),
    )
    d = get(t, "d")
    assert d.mode == stat.S_IFDIR | 0o750 and d.uid == 0
    f = get(t, "d/f")
    assert (f.size, f.offset, stat.S_IMODE(f.mode)) == (7, 4096, 0o600)
    assert f.nlink == 1
    assert get(t, "x").is_reg and get(t, "x").target == b""
    assert names(t, "d") == [b"f"]


def test_directory_replaced_by_a_file_and_back() -> None:
    t = tree_of(fm("a/", "dir"), fm("a/old"), fm("a", "reg", size=4), fm("a/new"))
    a = get(t, "a")
    assert a.is_dir and names(t, "a") == [b"new"]
    assert t.root.nlink == 3


def test_hardlinks_share_one_node() -> None:
    t = tree_of(
        fm("d/", "dir"),
        fm("d/f", size=5, offset=2048, pax={"SCHILY.xattr.user.k": b"v"}),
        fm("d/g", "hardlink", linkname="./d/f"),
        fm("h", "hardlink", linkname="d/f"),
    )
    f, g, h = get(t, "d/f"), get(t, "d/g"), get(t, "h")
    assert f is g is h
    assert f.nlink == 3 and f.offset == 2048 and f.xattrs == {b"user.k": b"v"}
    # replacing one name unlinks it from the shared node
    t2 = tree_of(fm("f", size=1), fm("g", "hardlink", linkname="f"), fm("g", size=2))
    assert get(t2, "f").nlink == 1 and get(t2, "g").nlink == 1


@pytest.mark.parametrize(
    ("entries", "msg"),
    [
        ([fm("g", "hardlink", linkname="f"), fm("f")], "was not listed"),
        ([fm("d/", "dir"), fm("g", "hardlink", linkname="d")], "is a directory"),
    ],
)
def test_bad_hardlinks_are_format_errors(entries: list[FileMetadata], msg: str) -> None:
    with pytest.raises(FormatError, match=msg):
        InodeTree.from_entries(entries)


def test_symlinks_devices_fifos() -> None:
    t = tree_of(
        fm("ln", "symlink", linkname="target/path", mode=0o777),
        fm("null", "char", dev=(1, 3), mode=0o666),
        fm("sda", "block", dev=(8, 300), mode=0o660),
        fm("big", "char", dev=(300, 70000)),
        fm("pipe", "fifo", mode=0o640),
        fm("odd", "something-else", size=9),
        fm("s", "reg", mode=0o4755 | 0o2000 | 0o1000 | 0o100000),
    )
    ln = get(t, "ln")
    assert ln.mode == stat.S_IFLNK | 0o777 and ln.target == b"target/path" and ln.size == 11
    assert get(t, "null").mode == stat.S_IFCHR | 0o666 and get(t, "null").rdev == 0x103
    sda = get(t, "sda")
    assert stat.S_ISBLK(sda.mode) and sda.rdev == linux_rdev(8, 300)
    assert linux_rdev(8, 300) == (300 & 0xFF) | (8 << 8) | ((300 & 0xFFF00) << 12)
    assert get(t, "big").rdev == linux_rdev(300, 70000) & 0xFFFFFFFF
    assert get(t, "pipe").mode == stat.S_IFIFO | 0o640
    assert get(t, "odd").mode == stat.S_IFREG | 0o644
    assert get(t, "s").mode == stat.S_IFREG | 0o7755


def test_directory_link_counts() -> None:
    t = tree_of(
        fm("a/", "dir"), fm("a/b/", "dir"), fm("a/c/x"), fm("a/f"), fm("a/", "dir"), fm("a/b/", "dir")
    )
    assert t.root.nlink == 3
    assert get(t, "a").nlink == 4
    assert get(t, "a/b").nlink == 2


def test_whiteouts_are_0_0_char_devices_unless_a_real_child_exists() -> None:
    t = tree_of(
        fm("d/", "dir"),
        fm("d/.wh.gone", mtime=T1, uid=7, mode=0o644, size=0),
        fm("d/.wh.kept"),
        fm("d/kept", size=3),
        fm(".wh.topdir"),
    )
    d = get(t, "d")
    assert names(t, "d") == [b"gone", b"kept"]
    gone = t.lookup(d, b"gone")
    assert gone is not None
    assert (gone.mode, gone.rdev, gone.size, gone.uid, gone.gid, gone.nlink) == (stat.S_IFCHR, 0, 0, 0, 0, 1)
    assert gone.mtime_ns == 1_609_459_200_500_000_000
    assert t.lookup(d, b"kept").is_reg  # type: ignore[union-attr]
    assert t.lookup(d, b".wh.gone") is None
    assert t.lookup(d, b".wh.kept") is None
    assert t.lookup(d, b"nothing") is None
    assert names(t) == [b"d", b"topdir"]


@pytest.mark.parametrize(
    "keys",
    [(OPAQUE_TRUSTED,), (OPAQUE_USER,), (OPAQUE_TRUSTED, OPAQUE_USER)],
    ids=["trusted", "user", "both"],
)
def test_opaque_directories(keys: tuple[bytes, ...]) -> None:
    t = tree_of(
        fm("o/", "dir", pax={"SCHILY.xattr.user.mine": b"1"}),
        fm("o/.wh..wh..opq"),
        fm("o/f"),
        fm("p/", "dir"),
        opaque_keys=keys,
    )
    o, p = get(t, "o"), get(t, "p")
    assert names(t, "o") == [b"f"]
    assert t.lookup(o, b".wh..wh..opq") is None
    assert t.xattr_names(o) == [*keys, b"user.mine"]
    for k in keys:
        assert t.getxattr(o, k) == b"y"
    assert t.getxattr(o, b"user.mine") == b"1"
    assert t.getxattr(p, OPAQUE_TRUSTED) is None
    assert t.xattr_names(p) == []
    other = OPAQUE_USER if keys == (OPAQUE_TRUSTED,) else OPAQUE_TRUSTED if keys == (OPAQUE_USER,) else None
    if other:
        assert t.getxattr(o, other) is None


def test_pax_xattrs_all_kept_including_empty_values() -> None:
    pax = {
        "SCHILY.xattr.user.a": b"",
        "SCHILY.xattr.user.b": b"\x00\xff",
        "SCHILY.xattr.security.capability": b"\x01",
        "mtime": b"1600000000.5",
        "path": b"f",
    }
    t = tree_of(fm("f", pax=pax))
    f = get(t, "f")
    assert f.xattrs == {b"user.a": b"", b"user.b": b"\x00\xff", b"security.capability": b"\x01"}
    assert sorted(t.xattr_names(f)) == [b"security.capability", b"user.a", b"user.b"]
    assert t.getxattr(f, b"user.a") == b""
    assert t.getxattr(f, b"user.zzz") is None


def test_names_keep_any_bytes_and_sort_as_bytes() -> None:
    raw = b"caf\xe9".decode("utf-8", "surrogateescape")
    t = tree_of(fm("d/" + raw), fm("d/B"), fm("d/a"), fm("d/\u00e9"), fm("d/" + "n" * 255))
    assert names(t, "d") == sorted([b"caf\xe9", b"B", b"a", "\u00e9".encode(), b"n" * 255])
    assert t.lookup(get(t, "d"), b"caf\xe9") is not None


def test_node_ids_are_dense_and_paths_are_known() -> None:
    t = tree_of(fm("a/b/c"), fm("x"))
    assert len(t) == t.max_id == 5
    for i in range(1, t.max_id + 1):
        assert t.node(i).id == i
    with pytest.raises(NotFound):
        t.node(0)
    with pytest.raises(NotFound):
        t.node(6)
    assert t.path(get(t, "a/b/c")) == "/a/b/c"
    assert t.path(t.root) == "/"
    assert [p for p, _ in t.walk()] == [b"a", b"a/b", b"a/b/c", b"x"]


def test_45k_entries_build_well_under_a_second() -> None:
    entries = []
    off = 512
    for d in range(450):
        entries.append(fm(f"./usr/share/pkg{d:03d}/", "dir", mode=0o755))
        for i in range(99):
            kind = "symlink" if i % 10 == 9 else "reg"
            pax = {"SCHILY.xattr.user.i": str(i).encode()} if i % 50 == 0 else None
            entries.append(
                fm(
                    f"./usr/share/pkg{d:03d}/file-{i:05d}.dat",
                    kind,
                    size=1000 + i,
                    offset=off,
                    linkname="file-00000.dat" if kind == "symlink" else "",
                    mtime=f"2023-0{1 + i % 9}-0{1 + d % 9}T10:00:00Z",
                    pax=pax,
                )
            )
            off += 2048
    assert len(entries) == 45_000
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        tree = InodeTree.from_entries(entries)
        best = min(best, time.perf_counter() - t0)
    assert len(tree) == 45_000 + 3  # plus the root, usr, usr/share
    print(f"45k entries: {best:.3f} s")
    assert best < 0.5, f"{best:.3f} s for 45k entries"
    t0 = time.perf_counter()
    d = get(tree, "usr/share/pkg123")
    for i in range(99):
        assert tree.lookup(d, f"file-{i:05d}.dat".encode()) is not None
    assert len(tree.listing(d)) == 99
    assert time.perf_counter() - t0 < 0.05
