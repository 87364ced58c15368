"""The local content store, the sqlite artifacts DB and rebuild-db."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from soci_fs import index as soci_index
from soci_fs.errors import FormatError, InvalidArgument, NotFound
from soci_fs.oci import Descriptor, Platform
from soci_fs.store import (
    TYPE_INDEX,
    TYPE_LAYER,
    ArtifactEntry,
    ArtifactsDB,
    ContentStore,
    Store,
    rebuild_db,
)
from tests.fs.ocigen import compact, digest


def test_content_put_read_verify(tmp_path: Path) -> None:
    cs = ContentStore(tmp_path / "content")
    cs.init()
    assert (tmp_path / "content" / "oci-layout").exists()
    d = cs.put(b"abc")
    assert d == digest(b"abc") and cs.has(d) and cs.read(d, 3) == b"abc"
    assert oct(cs.blob_path(d).stat().st_mode & 0o777) == "0o644"
    with pytest.raises(FormatError, match="hashes to"):
        cs.put(b"abc", "sha256:" + "0" * 64)
    with pytest.raises(NotFound):
        cs.read("sha256:" + "1" * 64)
    cs.blob_path(d).write_bytes(b"abd")
    with pytest.raises(FormatError, match="digest mismatch"):
        cs.read(d)
    assert cs.read_range(digest(b"abc"), 1, 2) == b"bd"
    with pytest.raises(FormatError, match="short read"):
        cs.read_range(d, 2, 5)


def test_writer_verifies_and_leaves_nothing_on_mismatch(tmp_path: Path) -> None:
    cs = ContentStore(tmp_path)
    cs.init()
    good = digest(b"hello world")
    with cs.writer(good, 11) as w:
        w(b"hello ")
        w(b"world")
    assert cs.read(good) == b"hello world"
    bad = digest(b"other")
    with pytest.raises(FormatError), cs.writer(bad, 5) as w:
        w(b"xxxxx")
    assert not cs.has(bad)
    assert [p.name for p in (tmp_path / "blobs" / "sha256").iterdir()] == [good[7:]]
    src = tmp_path / "f"
    src.write_bytes(b"other")
    cs.put_file(src, bad, 5)
    assert cs.has(bad)


def test_db_roundtrip_order_and_transactions(tmp_path: Path) -> None:
    with ArtifactsDB(tmp_path / "a.sqlite") as db:
        e1 = ArtifactEntry("sha256:" + "b" * 64, 10, "/x", TYPE_LAYER, oci_digest="L", span_size=65536)
        e2 = ArtifactEntry(
            "sha256:" + "a" * 64, 20, "/x", TYPE_INDEX, image_digest="M", platform="linux/amd64"
        )
        db.put(e1, e2)
        assert db.get(e1.digest) == e1
        assert [e.digest for e in db.entries()] == [e2.digest, e1.digest]
        assert [e.digest for e in db.entries(TYPE_INDEX)] == [e2.digest]
        assert db.find_ztoc("L", 65536) == e1 and db.find_ztoc("L", 1) is None
        # All or nothing.
        bad = ArtifactEntry("sha256:" + "c" * 64, 1, "/x", "bogus")
        with pytest.raises(InvalidArgument):
            db.put(ArtifactEntry("sha256:" + "d" * 64, 1, "/x", TYPE_LAYER), bad)
        assert db.get("sha256:" + "d" * 64) is None
        with pytest.raises(sqlite3.IntegrityError), db.transaction() as conn:
            conn.execute(
                "INSERT INTO artifacts (digest, size, location, type) VALUES ('y', 1, '/', 'soci_index')"
            )
            conn.execute("INSERT INTO artifacts (digest, size, location, type) VALUES ('z', 1, '/', 'bogus')")
        assert db.get("y") is None  # rolled back
        db.remove(e1.digest)
        assert db.get(e1.digest) is None


def test_store_open_creates_root_single_level(tmp_path: Path) -> None:
    with Store.open(tmp_path / "root") as s:
        assert oct((tmp_path / "root").stat().st_mode & 0o777) == "0o700"
        assert s.db.entries() == []
    assert (tmp_path / "root" / "artifacts.sqlite").exists()
    with pytest.raises(NotFound, match="parent"):
        Store.open(tmp_path / "no" / "such")


def _v1_index(store: Store, subject: Descriptor, ztoc_bytes: bytes) -> tuple[str, str]:
    layer = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", "sha256:" + "e" * 64, 100)
    zd = store.content.put(ztoc_bytes)
    zdesc = soci_index.ztoc_descriptor(zd, len(ztoc_bytes), layer, 65536, False)
    m = soci_index.index_manifest([zdesc], version=1, subject=subject)
    return store.content.put(m.marshal()), zd


def test_rebuild_db_drops_missing_and_rediscovers_v1(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "root")
    cfg = compact({"architecture": "arm64", "os": "linux", "variant": "v8"})
    cd = store.content.put(cfg)
    man = compact(
        {
            "schemaVersion": 2,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": cd,
                "size": len(cfg),
            },
            "layers": [],
        }
    )
    md = store.content.put(man)
    subject = Descriptor("application/vnd.oci.image.manifest.v1+json", md, len(man))
    idx, zd = _v1_index(store, subject, b"ztoc-bytes-1")
    # A v2 index is never rediscovered; a stale entry is dropped.
    v2 = soci_index.index_manifest([], version=2)
    store.content.put(v2.marshal())
    gone = ArtifactEntry("sha256:" + "9" * 64, 1, "/x", TYPE_INDEX)
    store.db.put(gone)
    report = rebuild_db(store)
    assert report.removed == (gone.digest,)
    assert set(report.added) == {idx, zd}
    e = store.db.get(idx)
    assert e is not None and e.type == TYPE_INDEX and e.image_digest == md and e.platform == "linux/arm64/v8"
    assert e.manifest_version == "v1"
    z = store.db.get(zd)
    assert (
        z is not None
        and z.type == TYPE_LAYER
        and z.span_size == 65536
        and z.oci_digest == "sha256:" + "e" * 64
    )
    assert rebuild_db(store).added == ()
    # Subject not in the store: platform left empty.
    other = Descriptor("application/vnd.oci.image.manifest.v1+json", "sha256:" + "4" * 64, 5)
    idx2, _ = _v1_index(store, other, b"ztoc-bytes-2")
    rebuild_db(store)
    e2 = store.db.get(idx2)
    assert e2 is not None and e2.platform == ""
    store.close()


def test_lookup_ztoc_needs_blob(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "root")
    zd = store.content.put(b"z")
    store.db.put(ArtifactEntry(zd, 1, "/x", TYPE_LAYER, oci_digest="sha256:" + "a" * 64, span_size=4096))
    assert store.lookup_ztoc("sha256:" + "a" * 64, 4096) == b"z"
    assert store.lookup_ztoc("sha256:" + "a" * 64, 8192) is None
    os.unlink(store.content.blob_path(zd))
    assert store.lookup_ztoc("sha256:" + "a" * 64, 4096) is None
    store.close()


def test_platform_str_used_by_db() -> None:
    assert str(Platform("arm64", "linux", variant="v8")) == "linux/arm64/v8"
