"""The snapshot metadata store: containerd's snapshot model (keys, parents, kinds, labels, usage) in sqlite.

Owns ``<root>/snapshotter/metadata.db``. A snapshot row has an ``id`` (an increasing integer that is never
reused, so a directory named after an id can only belong to that snapshot), a ``key`` (the active/view key,
or the committed name after Commit), a ``parent`` (a committed snapshot), a ``kind``, timestamps, the usage
stored at Commit, and labels. Every operation of the snapshotter runs in exactly one transaction
(:meth:`MetaStore.transaction`), which is serialised with every other one; the database is in WAL mode with
``synchronous=FULL``, so a committed transaction survives a crash and an interrupted one leaves nothing.

Errors are ``soci_fs.errors`` values naming the snapshot: ``NotFound``, ``AlreadyExists``,
``InvalidArgument`` (bad kind, parent not committed, label too long), ``FailedPrecondition`` (not active,
has children).

Will not: touch the snapshot directories (the snapshotter does), or know about mounts, grpc or remote
layers.
"""

from __future__ import annotations

import contextlib
import enum
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from soci_fs.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

MAX_LABEL_SIZE = 4096  # containerd's limit on len(key) + len(value)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent_id INTEGER REFERENCES snapshots(id),
    kind INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE TABLE IF NOT EXISTS labels (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, name)
);
"""


class Kind(enum.IntEnum):
    """Snapshot kinds with containerd's wire numbers."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass(frozen=True)
class Info:
    """What Stat/List report: ``name`` is the key (active/view) or the committed name."""

    name: str
    kind: Kind
    parent: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    created_ns: int = 0
    updated_ns: int = 0


@dataclass(frozen=True)
class Snapshot:
    """An active or view snapshot as the snapshotter needs it: its id and its parents' ids, nearest first."""

    id: str
    kind: Kind
    parent_ids: tuple[str, ...]


@dataclass(frozen=True)
class Usage:
    """Disk usage: bytes (allocated blocks) and inodes."""

    size: int = 0
    inodes: int = 0


def validate_labels(labels: Mapping[str, str]) -> None:
    """containerd's rule: each label's key plus value is at most 4096 bytes; keys are not empty."""
    for k, v in labels.items():
        if not k:
            raise InvalidArgument("label key must not be empty")
        if len(k.encode()) + len(v.encode()) > MAX_LABEL_SIZE:
            raise InvalidArgument(
                f"label key and value length (including key) {k!r} exceeds {MAX_LABEL_SIZE} bytes"
            )


class Tx:
    """One transaction; only valid inside :meth:`MetaStore.transaction`."""

    def __init__(self, db: sqlite3.Connection, writable: bool) -> None:
        self._db = db
        self.writable = writable

    # -- helpers -------------------------------------------------------------------------------------

    def _row(self, key: str) -> sqlite3.Row:
        row = self._db.execute("SELECT * FROM snapshots WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return row

    def _labels(self, sid: int) -> dict[str, str]:
        rows = self._db.execute("SELECT name, value FROM labels WHERE snapshot_id = ? ORDER BY name", (sid,))
        return {r["name"]: r["value"] for r in rows}

    def _set_labels(self, sid: int, labels: Mapping[str, str]) -> None:
        self._db.execute("DELETE FROM labels WHERE snapshot_id = ?", (sid,))
        self._db.executemany(
            "INSERT INTO labels (snapshot_id, name, value) VALUES (?, ?, ?)",
            [(sid, k, v) for k, v in labels.items()],
        )

    def _info(self, row: sqlite3.Row) -> Info:
        parent = ""
        if row["parent_id"] is not None:
            parent = self._db.execute(
                "SELECT key FROM snapshots WHERE id = ?", (row["parent_id"],)
            ).fetchone()[0]
        return Info(
            name=row["key"],
            kind=Kind(row["kind"]),
            parent=parent,
            labels=self._labels(row["id"]),
            created_ns=row["created_ns"],
            updated_ns=row["updated_ns"],
        )

    def _need_write(self) -> None:
        if not self.writable:
            raise RuntimeError("read-only transaction")

    # -- operations ----------------------------------------------------------------------------------

    def create(
        self, kind: Kind, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> Snapshot:
        """A new ACTIVE or VIEW snapshot on ``parent`` (a committed snapshot, or "" for none)."""
        self._need_write()
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise InvalidArgument(
                f"snapshot type {kind.name} invalid; only snapshots of type ACTIVE or VIEW can be created"
            )
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        labels = dict(labels or {})
        validate_labels(labels)
        parent_id = None
        if parent:
            prow = self._row(parent)
            if prow["kind"] != Kind.COMMITTED:
                raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
            parent_id = prow["id"]
        if self._db.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone():
            raise AlreadyExists(f"snapshot {key!r} already exists")
        now = time.time_ns()
        cur = self._db.execute(
            "INSERT INTO snapshots (key, parent_id, kind, created_ns, updated_ns) VALUES (?, ?, ?, ?, ?)",
            (key, parent_id, int(kind), now, now),
        )
        sid = cur.lastrowid
        assert sid is not None
        self._set_labels(sid, labels)
        return Snapshot(str(sid), kind, self._parent_ids(parent_id))

    def _parent_ids(self, parent_id: int | None) -> tuple[str, ...]:
        out: list[str] = []
        while parent_id is not None:
            out.append(str(parent_id))
            parent_id = self._db.execute(
                "SELECT parent_id FROM snapshots WHERE id = ?", (parent_id,)
            ).fetchone()[0]
        return tuple(out)

    def snapshot(self, key: str) -> Snapshot:
        """The active or view snapshot ``key`` (FailedPrecondition for a committed one)."""
        row = self._row(key)
        if row["kind"] not in (Kind.ACTIVE, Kind.VIEW):
            raise FailedPrecondition(f"requested snapshot {key!r} is not active or view")
        return Snapshot(str(row["id"]), Kind(row["kind"]), self._parent_ids(row["parent_id"]))

    def info(self, key: str) -> tuple[str, Info, Usage]:
        """Id, Info and the stored usage of any snapshot."""
        row = self._row(key)
        return str(row["id"]), self._info(row), Usage(row["size"], row["inodes"])

    def update(self, info: Info, fieldpaths: tuple[str, ...] = ()) -> Info:
        """Change the labels of ``info.name``: no paths = replace all; ``labels`` = replace all;
        ``labels.<k>`` = set (or delete, when ``info`` has no such label) one."""
        self._need_write()
        row = self._row(info.name)
        labels = self._labels(row["id"])
        if not fieldpaths:
            labels = dict(info.labels)
        for path in fieldpaths:
            if path == "labels":
                labels = dict(info.labels)
            elif path.startswith("labels."):
                k = path[len("labels.") :]
                if k in info.labels:
                    labels[k] = info.labels[k]
                else:
                    labels.pop(k, None)
            else:
                raise InvalidArgument(f"cannot update {path!r} field on snapshot {info.name!r}")
        validate_labels(labels)
        self._set_labels(row["id"], labels)
        self._db.execute("UPDATE snapshots SET updated_ns = ? WHERE id = ?", (time.time_ns(), row["id"]))
        return self._info(self._row(info.name))

    def commit(self, key: str, name: str, usage: Usage, labels: Mapping[str, str] | None = None) -> str:
        """Turn active ``key`` into committed ``name`` (same id, same directory); the committed snapshot's
        labels are ``labels`` (containerd: the Commit options); returns the id."""
        self._need_write()
        if not name:
            raise InvalidArgument("snapshot name must not be empty")
        labels = dict(labels or {})
        validate_labels(labels)
        row = self._row(key)
        if row["kind"] != Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is not active")
        if self._db.execute("SELECT 1 FROM snapshots WHERE key = ?", (name,)).fetchone():
            raise AlreadyExists(f"snapshot {name!r} already exists")
        now = time.time_ns()
        self._db.execute(
            "UPDATE snapshots SET key = ?, kind = ?, created_ns = ?, updated_ns = ?, size = ?, inodes = ?"
            " WHERE id = ?",
            (name, int(Kind.COMMITTED), now, now, usage.size, usage.inodes, row["id"]),
        )
        self._set_labels(row["id"], labels)
        return str(row["id"])

    def remove(self, key: str) -> tuple[str, Kind]:
        """Delete ``key``; FailedPrecondition while another snapshot has it as parent."""
        self._need_write()
        row = self._row(key)
        if self._db.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (row["id"],)).fetchone():
            raise FailedPrecondition(f"cannot remove snapshot {key!r}: it has children")
        self._db.execute("DELETE FROM snapshots WHERE id = ?", (row["id"],))
        return str(row["id"]), Kind(row["kind"])

    def walk(self) -> Iterator[Info]:
        """Every snapshot, ordered by key."""
        for row in self._db.execute("SELECT * FROM snapshots ORDER BY key").fetchall():
            yield self._info(row)

    def ids(self) -> set[str]:
        """The ids of every snapshot (for Cleanup)."""
        return {str(r[0]) for r in self._db.execute("SELECT id FROM snapshots")}


class MetaStore:
    """The sqlite database; one connection shared by the server threads, one transaction at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._lock:
            self._db.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")

    @contextlib.contextmanager
    def transaction(self, writable: bool = False) -> Iterator[Tx]:
        """One transaction: committed when the block ends normally, rolled back when it raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE" if writable else "BEGIN")
            try:
                yield Tx(self._db, writable)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()
