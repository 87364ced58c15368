"""FUSE serving cost once the data is local: our session vs squashfuse vs tmpfs.

Owns the measurement only. The "block cache" stand-in is the layer's uncompressed tar mmapped from tmpfs
(``BufferLayerData``: memoryview slices, no copy in Python), so the numbers are the cost of the FUSE path
(pyfuse3 + trio + our handlers), not of fetching or inflating.

* Sequential read: one 512 MiB file read with ``dd bs=1M`` in a child process. Before every run the
  file's page cache is dropped with ``posix_fadvise(DONTNEED)`` so every run goes through FUSE (tmpfs
  keeps its pages: it is the native limit). Our mount raises the bdi readahead to 1 MiB (mount.py); we
  also show it at the kernel default (128 KiB) and squashfuse at both.
* Metadata: ``find DIR -printf '%s %m %U %T@'`` (readdir + lstat of every entry) over 20,000 files in 20
  directories; cold = a fresh mount (ours: a fresh layer directory, so no cached dentries) per run; warm =
  the same mount again.

Run as root: ``.venv/bin/python bench/bench_fuse.py [--size-mib 512] [--files 20000] [--runs 5]``.
Targets: >= 0.8x squashfuse sequential, >= 1.0x squashfuse for find+stat.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from soci_fs.builder import build_ztoc
from soci_fs.mount import MountOptions, ThreadedSession, _mountinfo_entry
from soci_fs.operations import BufferLayerData


def sh(*cmd: str | os.PathLike[str]) -> None:
    subprocess.run([os.fspath(c) for c in cmd], check=True, capture_output=True)


def timed(fn: Callable[[], None], before: Callable[[], None] | None, runs: int) -> float:
    samples = []
    for _ in range(runs):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def drop_file_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def set_read_ahead(mountpoint: Path, kb: int) -> None:
    entry = _mountinfo_entry(mountpoint)
    assert entry is not None, mountpoint
    Path(f"/sys/class/bdi/{entry[0]}/read_ahead_kb").write_text(f"{kb}\n")


def dd(path: Path) -> None:
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], check=True, capture_output=True)


def find_stat(root: Path) -> None:
    subprocess.run(["find", str(root), "-printf", "%s %m %U %T@\n"], check=True, stdout=subprocess.DEVNULL)


class Squash:
    def __init__(self, image: Path, mnt: Path) -> None:
        self.image, self.mnt = image, mnt
        mnt.mkdir(exist_ok=True)

    def mount(self) -> None:
        sh("squashfuse", self.image, self.mnt)

    def umount(self) -> None:
        subprocess.run(["fusermount3", "-u", str(self.mnt)], check=False, capture_output=True)


def make_tar(src: Path, out: Path) -> None:
    sh("tar", "--format=pax", "--numeric-owner", "-C", src, "-cf", out, ".")


def mksquashfs(src: Path, out: Path) -> None:
    sh("mksquashfs", src, out, "-noI", "-noD", "-noF", "-noX", "-quiet", "-noappend")


def serve_tar(session: ThreadedSession, name: str, tar: Path, keep: list[object]) -> Path:
    with open(tar, "rb") as f:
        z = build_ztoc(f.read, span_size=4 << 20, compression="tar")
    f = open(tar, "rb")  # noqa: SIM115
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    keep += [f, m]
    return session.add_layer(name, z, BufferLayerData(m))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workdir", default="/dev/shm")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-fuse-", dir=args.workdir))
    mnt = work / "mnt"
    mnt.mkdir()
    squash = Squash(work / "big.sqfs", work / "sq")
    squash_meta = Squash(work / "tree.sqfs", work / "sq-tree")
    keep: list[object] = []
    session = None
    try:
        # ---- data
        big_src = work / "big-src"
        big_src.mkdir()
        with open(big_src / "file", "wb") as f:
            block = os.urandom(1 << 20)
            for i in range(args.size_mib):
                f.write(block[i % 7 :] + block[: i % 7])
        tree_src = work / "tree-src"
        per_dir = args.files // 20
        for d in range(20):
            (tree_src / f"d{d:02d}").mkdir(parents=True)
            for i in range(per_dir):
                (tree_src / f"d{d:02d}" / f"f{i:05d}").write_bytes(b"x" * (i % 100))
        make_tar(big_src, work / "big.tar")
        make_tar(tree_src, work / "tree.tar")
        mksquashfs(big_src, squash.image)
        mksquashfs(tree_src, squash_meta.image)

        session = ThreadedSession(mnt, MountOptions()).start()
        big = serve_tar(session, "big", work / "big.tar", keep) / "file"
        runs = args.runs
        mb = args.size_mib * (1 << 20) / 1e6

        results: dict[str, float] = {}
        tmpfs_file = big_src / "file"
        results["tmpfs"] = mb / timed(lambda: dd(tmpfs_file), None, runs)
        dd(big)  # warm up the mapping
        for kb in (1024, 128):
            set_read_ahead(mnt, kb)
            results[f"soci ra={kb}K"] = mb / timed(lambda: dd(big), lambda: drop_file_cache(big), runs)
        set_read_ahead(mnt, 1024)
        squash.mount()
        try:
            sq_file = squash.mnt / "file"
            dd(sq_file)
            for kb in (128, 1024):
                set_read_ahead(squash.mnt, kb)
                results[f"squashfuse ra={kb}K"] = mb / timed(
                    lambda: dd(sq_file), lambda: drop_file_cache(sq_file), runs
                )
        finally:
            squash.umount()

        print(f"sequential read of a {args.size_mib} MiB file, dd bs=1M, median of {runs} (MB/s):")
        for k, v in results.items():
            print(f"  {k:22s} {v:8.0f}   vs tmpfs {v / results['tmpfs']:.2f}")
        ratio = results["soci ra=1024K"] / results["squashfuse ra=128K"]
        print(f"  soci (default ra 1 MiB) / squashfuse (default ra 128 KiB): {ratio:.2f}x (target >= 0.8)")
        ratio2 = results["soci ra=1024K"] / results["squashfuse ra=1024K"]
        print(f"  soci / squashfuse, both ra 1 MiB: {ratio2:.2f}x")

        # ---- metadata
        counter = [0]

        def fresh_layer() -> None:
            counter[0] += 1
            if counter[0] > 1:
                session.remove_layer(f"tree{counter[0] - 1}")
            serve_tar(session, f"tree{counter[0]}", work / "tree.tar", keep)

        def ours_cold() -> None:
            find_stat(mnt / f"tree{counter[0]}")

        t_ours_cold = timed(ours_cold, fresh_layer, runs)
        t_ours_warm = timed(lambda: find_stat(mnt / f"tree{counter[0]}"), None, runs)
        t_sq_cold = timed(
            lambda: find_stat(squash_meta.mnt), lambda: (squash_meta.umount(), squash_meta.mount()), runs
        )
        t_sq_warm = timed(lambda: find_stat(squash_meta.mnt), None, runs)
        squash_meta.umount()
        t_tmpfs = timed(lambda: find_stat(tree_src), None, runs)
        n = args.files + 21
        print(f"find -printf '%s %m %U %T@' over {args.files} files in 20 dirs, median of {runs}:")
        for k, t in (
            ("tmpfs", t_tmpfs),
            ("soci cold", t_ours_cold),
            ("soci warm", t_ours_warm),
            ("squashfuse cold", t_sq_cold),
            ("squashfuse warm", t_sq_warm),
        ):
            print(f"  {k:22s} {t * 1000:8.1f} ms  {n / t / 1000:7.1f}k entries/s")
        print(f"  soci / squashfuse cold: {t_sq_cold / t_ours_cold:.2f}x (target >= 1.0)")
        print(f"  soci / squashfuse warm: {t_sq_warm / t_ours_warm:.2f}x (target >= 1.0)")
    finally:
        if session is not None:
            session.close()
        squash.umount()
        squash_meta.umount()
        for obj in keep:
            try:
                obj.close()  # type: ignore[attr-defined]
            except BufferError:
                pass  # an mmap still viewed by a layer's memoryview; freed with the process
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
