"""The benchmark layers: ~500 MB tars of real files from /usr and their ``gzip -6`` blobs.

Made once and cached under ``bench/out/`` (git-ignored); every benchmark that wants a large real layer takes
it from here, so the files are built one time for all of them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
MB = 1e6
SOURCES = [
    "usr/lib/python3.11",
    "usr/lib/python3",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/vim",
    "usr/share/perl",
    "usr/share/icons",
    "usr/lib/x86_64-linux-gnu/perl",
    "usr/lib/x86_64-linux-gnu/gconv",
    "usr/lib/x86_64-linux-gnu/libLLVM-15.so.1",
]


def make_tar(tar: Path, *tar_flags: str) -> None:
    """Write ``tar`` from the /usr paths in SOURCES that exist here (GNU tar, extra flags e.g. --format)."""
    paths = [p for p in SOURCES if Path("/", p).exists()]
    print(f"building {tar.name} from {len(paths)} /usr paths {' '.join(tar_flags)} ...", flush=True)
    tmp = tar.with_suffix(".tmp")
    subprocess.run(
        ["tar", *tar_flags, "-C", "/", "-cf", str(tmp), *paths], check=False, stderr=subprocess.DEVNULL
    )
    tmp.rename(tar)


def gzip_file(tar: Path, gz: Path) -> None:
    """Write ``gz`` = ``gzip -6`` of ``tar``."""
    print(f"compressing {tar.name} with gzip -6 ({tar.stat().st_size / MB:.0f} MB) ...", flush=True)
    tmp = gz.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        subprocess.run(["gzip", "-6", "-c", str(tar)], stdout=out, check=True)
    tmp.rename(gz)


def ensure(tar: Path, gz: Path, *tar_flags: str) -> None:
    """Make ``tar`` (with ``tar_flags``) and ``gz`` unless both exist."""
    OUT.mkdir(parents=True, exist_ok=True)
    if not tar.exists():
        make_tar(tar, *tar_flags)
    if not gz.exists():
        gzip_file(tar, gz)
