"""Test helper for the ``soci`` CLI tests: run it in-process or as the installed executable, and make images.

Not a test module.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from soci_fs.oci import Layout
from soci_grpc.cli.soci import main

REPO = Path(__file__).resolve().parents[2]
SOCI_EXE = REPO / ".venv" / "bin" / "soci"


@dataclass
class Result:
    rc: int
    out: bytes
    err: str

    @property
    def text(self) -> str:
        return self.out.decode("utf-8", "surrogateescape")


def run(*argv: str | os.PathLike[str]) -> Result:
    """``soci argv...`` in this process, capturing stdout (bytes) and stderr."""
    out = io.BytesIO()
    err = io.StringIO()
    wrapper = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    with contextlib.redirect_stdout(wrapper), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
        wrapper.flush()
    return Result(rc, out.getvalue(), err.getvalue())


def run_exe(*argv: str | os.PathLike[str], env: dict[str, str] | None = None) -> Result:
    """The installed ``soci`` executable as a subprocess."""
    p = subprocess.run(
        [str(SOCI_EXE), *map(str, argv)],
        capture_output=True,
        env={**os.environ, **(env or {})},
        timeout=300,
        check=False,
    )
    return Result(p.returncode, p.stdout, p.stderr.decode())


def umoci_image(workdir: Path, steps: list[dict[str, bytes | Path]]) -> Path:
    """An OCI layout made by umoci, one layer per step (``{rootfs path: bytes or a source dir}``)."""
    layout = workdir / "layout"
    bundle = workdir / "bundle"
    subprocess.run(["umoci", "init", "--layout", layout], check=True, capture_output=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:test"], check=True, capture_output=True)
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:test", bundle], check=True, capture_output=True)
    rootfs = bundle / "rootfs"
    for step in steps:
        for rel, content in step.items():
            dest = rootfs / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copytree(content, dest, symlinks=True)
            else:
                dest.write_bytes(content)
        subprocess.run(
            ["umoci", "repack", "--refresh-bundle", "--image", f"{layout}:test", bundle],
            check=True,
            capture_output=True,
        )
    return layout


def tar_x(layer_blob: Path, dest: Path) -> dict[str, bytes]:
    """Regular files of a layer as ``tar -x`` writes them (name as in the tar -> bytes)."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-f", layer_blob, "-C", dest], check=True, capture_output=True)
    out: dict[str, bytes] = {}
    with tarfile.open(layer_blob) as tf:
        for m in tf:
            if m.isreg() or m.islnk():
                out[m.name] = (dest / m.name).read_bytes()
    return out


def layout_files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def ok(r: Result) -> Result:
    assert r.rc == 0, f"rc={r.rc} stderr={r.err!r}"
    return r


def open_layout(path: Path) -> contextlib.AbstractContextManager[Layout]:
    return Layout.open(path)
