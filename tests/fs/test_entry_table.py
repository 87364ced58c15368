"""The packed entries a served layer keeps (soci_fs.ztoc.EntryTable) and what the inode tree holds on to."""

from __future__ import annotations

import gc
import posixpath
import stat
import sys
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from soci_fs import inodes
from soci_fs.errors import FormatError
from soci_fs.inodes import InodeTree, Node
from soci_fs.operations import BufferLayerData, LayerOperations
from soci_fs.verify import header_offsets
from soci_fs.ztoc import EntryTable, FileMetadata

_text = st.one_of(
    st.text(max_size=20),  # lone surrogates included: the table must give every str back unchanged
    st.binary(max_size=12).map(lambda b: b.decode("utf-8", "surrogateescape")),
)
_i64 = st.integers(-(2**63), 2**63 - 1)


@st.composite
def _entries(draw: st.DrawFn) -> list[FileMetadata]:
    out = []
    for _ in range(draw(st.integers(0, 12))):
        pax = tuple(draw(st.lists(st.tuples(_text, st.binary(max_size=6)), max_size=3)))
        out.append(
            FileMetadata(
                name=draw(_text),
                type=draw(st.sampled_from(["reg", "dir", "symlink", "hardlink", "char", "fifo", "x"])),
                uncompressed_offset=draw(_i64),
                uncompressed_size=draw(_i64),
                linkname=draw(_text),
                mode=draw(st.one_of(st.just(0o644), _i64)),
                uid=draw(st.integers(0, 2**32 - 1)),
                gid=draw(st.sampled_from([0, 1000])),
                uname=draw(st.sampled_from(["", "root"])),
                gname=draw(_text),
                mod_time=draw(st.sampled_from(["", "2024-01-02T03:04:05Z", "2021-01-01T00:00:00.5Z"])),
                devmajor=draw(st.one_of(st.just(0), _i64)),
                devminor=draw(st.one_of(st.just(0), _i64)),
                pax=pax,
            )
        )
    return out


def fm(name: str, offset: int, size: int, **kw: object) -> FileMetadata:
    base: dict[str, object] = {
        "type": "reg",
        "linkname": "",
        "mode": 0o644,
        "uid": 0,
        "gid": 0,
        "uname": "",
        "gname": "",
        "mod_time": "2020-09-13T12:26:40Z",
        "devmajor": 0,
        "devminor": 0,
    }
    base.update(kw)
    return FileMetadata(name=name, uncompressed_offset=offset, uncompressed_size=size, **base)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ the table


@settings(max_examples=300, deadline=None)
@given(_entries())
def test_every_entry_comes_back_equal(entries: list[FileMetadata]) -> None:
    table = EntryTable(entries)
    assert len(table) == len(entries)
    assert list(table) == entries
    assert [table[i] for i in range(-len(entries), 0)] == entries
    assert table[1:3] == tuple(entries[1:3])
    for i, e in enumerate(entries):
        assert table.uncompressed_offset(i) == e.uncompressed_offset
        assert table.uncompressed_size(i) == e.uncompressed_size


@pytest.mark.parametrize(
    "odd",
    [
        fm("big", 2**63, 1),  # does not fit int64
        fm("neg", -(2**63) - 1, 1),
        fm("notint", 0, 1.5),  # type: ignore[arg-type]
        fm(b"bytes-name", 0, 1),  # type: ignore[arg-type]
    ],
)
def test_values_that_do_not_pack_are_kept_as_given(odd: FileMetadata) -> None:
    entries = [fm("a", 512, 3), odd]
    table = EntryTable(entries)
    assert list(table) == entries
    assert table[1] is odd
    assert table.uncompressed_offset(1) == odd.uncompressed_offset


def test_index_errors_and_repr() -> None:
    table = EntryTable([fm("a", 512, 1)])
    with pytest.raises(IndexError):
        table[1]
    with pytest.raises(IndexError):
        table[-2]
    assert len(EntryTable()) == 0
    assert "1 entries" in repr(table)


def test_packing_shares_repeated_attributes_and_keeps_no_entry_object() -> None:
    entries = [fm(f"usr/share/doc/pkg/file{i:05d}", 512 + 1024 * i, 10) for i in range(2000)]
    table = EntryTable(entries)
    assert len(table._attrs) == 1  # one (type, mode, uid, gid, uname, gname, dev) tuple for all of them
    held = _reachable(table)
    assert not any(isinstance(o, FileMetadata) for o in held)
    size = sum(sys.getsizeof(o) for o in held)
    assert size < 120 * len(entries)  # name bytes plus a few array slots; a FileMetadata alone is more


def _layout(n_unsorted: bool) -> list[FileMetadata]:
    entries = [fm("./", 512, 0, type="dir"), fm("./a", 1024, 700), fm("./b", 2560, 0), fm("./c", 3584, 1)]
    return [entries[0], entries[2], entries[1], entries[3]] if n_unsorted else entries


@pytest.mark.parametrize("unsorted", [False, True])
def test_header_ranges_are_the_verifiers(unsorted: bool) -> None:
    entries = _layout(unsorted)
    table = EntryTable(entries)
    want = header_offsets(entries)
    assert [table.header_range(i) for i in range(len(entries))] == [
        (want[i], e.uncompressed_offset) for i, e in enumerate(entries)
    ]


@pytest.mark.parametrize("odd", [False, True])
def test_an_invalid_toc_entry_fails_the_same_way(odd: bool) -> None:
    entries = [fm("a", 512, 1000), fm("b", 1024, 1)]  # a's data runs past b's derived header
    if odd:
        entries.append(fm("big", 2**63, 0))  # the kept-as-given table computes the same way
    table = EntryTable(entries)
    with pytest.raises(FormatError) as ours:
        table.header_range(0)
    with pytest.raises(FormatError) as theirs:
        header_offsets(entries)
    assert str(ours.value) == str(theirs.value)


# --------------------------------------------------------------------------------- the tree and layer


def _tree_entries() -> Iterator[FileMetadata]:
    yield fm("./", 0, 0, type="dir", mode=0o755)
    yield fm("./etc/", 512, 0, type="dir", mode=0o755)
    yield fm("./etc/passwd", 1536, 100, uid=1000)
    yield fm("./etc/ln", 2048, 0, type="symlink", linkname="passwd")
    yield fm("./etc/hard", 2560, 0, type="hardlink", linkname="etc/passwd")
    yield fm("./dev/null", 3072, 0, type="char", devmajor=1, devminor=3)
    yield fm("./etc/.wh.gone", 3584, 0)
    yield fm("./etc/.wh..wh..opq", 4096, 0)
    yield fm("./x", 4608, 0, pax=(("SCHILY.xattr.user.k", b"v"),))


def _reachable(root: object) -> list[object]:
    seen: dict[int, object] = {}
    stack = [root]
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, type):
            continue
        seen[id(o)] = o
        stack.extend(gc.get_referents(o))
    return list(seen.values())


def test_the_tree_keeps_packed_entries_not_the_metadata_objects() -> None:
    entries = list(_tree_entries())
    tree = InodeTree.from_entries(iter(entries))  # any iterable
    assert isinstance(tree.entries, EntryTable)
    assert list(tree.entries) == entries
    assert not any(isinstance(o, FileMetadata) for o in _reachable(tree))
    ops = LayerOperations()
    layer = ops.add_layer(b"l", tree, BufferLayerData(bytes(8192)), verify=True)
    assert layer.verifier is not None
    assert layer.verifier.header_range(2) == tuple(EntryTable(entries).header_range(2))
    assert not any(isinstance(o, FileMetadata) for o in _reachable(layer))


def test_nodes_store_only_what_their_kind_needs() -> None:
    tree = InodeTree.from_entries(list(_tree_entries()))
    etc = tree.lookup(tree.root, b"etc")
    assert etc is not None and etc.is_dir and etc.opaque
    passwd = tree.lookup(etc, b"passwd")
    ln = tree.lookup(etc, b"ln")
    gone = tree.lookup(etc, b"gone")
    null = tree.lookup(tree.lookup(tree.root, b"dev"), b"null")  # type: ignore[arg-type]
    assert passwd is not None and ln is not None and gone is not None and null is not None
    # defaults read from the class where a kind has no such field
    assert (passwd.children, passwd.whiteouts, passwd.listing, passwd.opaque) == (None, None, None, False)
    assert (passwd.target, passwd.rdev, ln.rdev, null.target) == (b"", 0, 0, b"")
    assert ln.target == b"passwd" and ln.size == 6
    assert stat.S_ISCHR(null.mode) and null.rdev == (3 | 1 << 8)
    assert stat.S_ISCHR(gone.mode) and gone.rdev == 0  # a whiteout shown as a 0/0 device
    assert tree.lookup(tree.root, b"x").xattrs == {b"user.k": b"v"}  # type: ignore[union-attr]
    # a directory without whiteouts has no whiteout dict; lookups and listings still work
    dev = tree.lookup(tree.root, b"dev")
    assert dev is not None and dev.whiteouts is None and tree.lookup(dev, b"nothing") is None
    assert [n for n, _ in tree.listing(dev)] == [b"null"]
    # a plain file node is smaller than a directory node
    assert sys.getsizeof(passwd) < sys.getsizeof(etc)
    assert isinstance(passwd, Node) and isinstance(etc, Node)
    # equal modes share one int object
    files = [tree.node(i) for i in range(1, tree.max_id + 1) if tree.node(i).is_reg]
    assert len({id(n.mode) for n in files if n.mode == stat.S_IFREG | 0o644}) == 1


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.sampled_from(["a", "b.c", ".", "..", "/", "./", ".h", "//", "x/"]), max_size=6).map("".join)
)
def test_name_cleaning_fast_path_agrees_with_path_clean(name: str) -> None:
    assert inodes._clean(name) == posixpath.normpath("/" + name.lstrip("/")).lstrip("/")
