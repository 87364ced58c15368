#!/usr/bin/env python3
"""Build soci-py's .deb and .rpm from the working tree (`make deb`, `make rpm`, `make packages`).

Run it with the project's virtualenv interpreter (``.venv/bin/python scripts/build_packages.py``): that
interpreter builds the wheel (it has Cython and grpcio-tools) and its ``pip freeze`` pins the vendored
libraries to the versions the test suite ran against.

Steps, all in a scratch directory (kept with ``--work``):

1. Copy the working tree (tracked and untracked, not ignored, files) and build soci-py's wheel from the copy,
   so a concurrent build in the repository is not disturbed and ignored build products do not leak in.
2. Stage the installed tree: the wheel and its runtime dependencies (from the package index, constrained to
   the virtualenv's versions) ``pip install --target``-ed into ``/usr/lib/soci-py/site``; entry points in
   ``/usr/bin`` that run ``/usr/bin/python3.X -IS`` on that directory (X.Y = the build interpreter's, since
   the compiled extensions are for its ABI); the systemd units from ``packaging/systemd``; the default
   configuration, every line commented out, as ``/etc/soci-snapshotter-grpc/config.toml``; the documents
   from ``packaging/doc`` in ``/usr/share/doc/soci-py``.
3. Work out the run-time requirements from the ELF files: every ``DT_NEEDED`` library not shipped in the
   tree must be a system library. For the deb it is mapped to its Debian package (``dpkg -S``; ``libc6``
   with the newest ``GLIBC_`` version referenced); for the rpm it becomes an rpm-style soname requirement
   (``libfuse3.so.3()(64bit)``), which is portable across RPM distributions. Both also require the
   interpreter and fuse3.
4. ``dpkg-deb --build --root-owner-group`` (zstd) and ``rpmbuild -bb`` over the same staged tree.

Missing build tools that Debian packages provide (``rpm`` for rpmbuild, ``binutils`` for objdump) are
installed with apt-get. It will not: sign packages, build source packages, or run on a non-Debian host.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGING = REPO / "packaging"
NAME = "soci-py"
SITE = "/usr/lib/soci-py/site"
UNIT_DIR = "usr/lib/systemd/system"
CONFIG = "etc/soci-snapshotter-grpc/config.toml"
DOC_DIR = "usr/share/doc/soci-py"
DEFAULT_MAINTAINER = "soci-py developers <soci-py@localhost>"
ALWAYS_DEPENDS = ["fuse3"]  # fusermount3, /etc/fuse.conf and the /dev/fuse permissions; not an ELF dependency
CONFIG_HEADER = """\
# soci-snapshotter-grpc configuration (soci-py).
#
# Every key is shown commented out at its default value; uncomment and edit the ones to change.
# `soci-snapshotter-grpc config dump` prints the configuration in effect, `config default` the defaults.
# Unknown keys are ignored (and logged at start-up).

"""


_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"build_packages: [{time.monotonic() - _T0:5.1f}s] {msg}", file=sys.stderr, flush=True)


def run(
    *cmd: str | os.PathLike[str], cwd: Path | None = None, **kw: object
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; on failure exit with its output."""
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, text=True, capture_output=True, check=False, **kw)
    if res.returncode != 0:
        sys.stderr.write(res.stdout + res.stderr)
        sys.exit(f"build_packages: {' '.join(map(str, cmd))} failed with status {res.returncode}")
    return res


def ensure_apt(binaries: dict[str, str]) -> None:
    """Install the Debian package of every missing program in ``binaries`` (program -> package)."""
    missing = sorted({pkg for exe, pkg in binaries.items() if shutil.which(exe) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(
            f"build_packages: missing Debian packages {' '.join(missing)} (install them, or run as root)"
        )
    log(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    if subprocess.run(cmd, env=env, check=False, capture_output=True).returncode != 0:
        run("apt-get", "update", "-qq", env=env)
        run(*cmd, env=env)


def project() -> dict[str, object]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def copy_tree(dst: Path) -> None:
    """The working tree's tracked and untracked-but-not-ignored files, as they are now."""
    out = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO).stdout
    for rel in sorted(set(filter(None, out.split("\0")))):
        src = REPO / rel
        if not src.is_file() and not src.is_symlink():
            continue  # deleted in the working tree
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)


def constraints(path: Path) -> None:
    """Pin every library to the version installed in the build interpreter's environment."""
    out = run(sys.executable, "-m", "pip", "freeze", "--exclude-editable").stdout
    pins = [line for line in out.splitlines() if re.fullmatch(r"[A-Za-z0-9._-]+==[^ ]+", line.strip())]
    path.write_text("\n".join(pins) + "\n")


def write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def stage(work: Path, meta: dict[str, object]) -> Path:
    """Build the wheel and lay out the installed tree under ``work/stage``; returns the stage root."""
    src, wheels, root = work / "src", work / "wheel", work / "stage"
    log("copying the working tree")
    copy_tree(src)
    log("building the soci-py wheel (Cython extensions, gRPC code)")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run(*pip, "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", wheels, src)
    (wheel,) = wheels.glob("soci_py-*.whl")
    constraints(work / "constraints.txt")
    site = root / SITE.lstrip("/")
    log(f"installing the wheel and its dependencies into {SITE}")
    run(
        *pip,
        "install",
        "-q",
        "--no-warn-script-location",
        "--target",
        site,
        "-c",
        work / "constraints.txt",
        wheel,
    )
    shutil.rmtree(site / "bin", ignore_errors=True)  # pip's console scripts; ours follow

    python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    template = (PACKAGING / "bin" / "entry-point.in").read_text()
    for name, target in dict(meta.get("scripts", {})).items():  # type: ignore[arg-type]
        module, func = str(target).split(":")
        text = template.replace("@PYTHON@", python).replace("@SITE@", SITE).replace("@NAME@", name)
        write(root / "usr/bin" / name, text.replace("@MODULE@", module).replace("@FUNC@", func), 0o755)
    for unit in sorted((PACKAGING / "systemd").iterdir()):
        write(root / UNIT_DIR / unit.name, unit.read_text())
    default = run(
        sys.executable,
        "-IS",
        "-c",
        "import site, sys; site.addsitedir(sys.argv[1]); from soci_grpc import config; "
        "sys.stdout.write(config.default_toml())",
        site,
    ).stdout
    commented = "".join(f"# {line}" if line.strip() else line for line in default.splitlines(keepends=True))
    write(root / CONFIG, CONFIG_HEADER + commented)
    for doc in sorted((PACKAGING / "doc").iterdir()):
        write(root / DOC_DIR / doc.name, doc.read_text())
    for d in (root / "etc/soci-snapshotter-grpc",):
        d.chmod(0o755)
    return root


# -- run-time requirements --------------------------------------------------------------------------------


def elf_files(root: Path) -> list[Path]:
    found = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath, f)
            if p.is_symlink() or not p.is_file():
                continue
            with open(p, "rb") as fh:
                if fh.read(4) == b"\x7fELF":
                    found.append(p)
    return sorted(found)


def needed(root: Path) -> dict[str, set[str]]:
    """External libraries the ELF files link: soname -> symbol versions referenced (e.g. ``GLIBC_2.34``)."""
    files = elf_files(root)
    shipped = {p.name for p in files}
    libs: dict[str, set[str]] = {}
    for p in files:
        current = None
        for line in run("objdump", "-p", p).stdout.splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[0] == "NEEDED":
                libs.setdefault(fields[1], set())
            elif len(fields) == 3 and fields[0] == "required" and fields[1] == "from":
                current = fields[2].rstrip(":")
            elif current and len(fields) == 4 and fields[0].startswith("0x"):
                libs.setdefault(current, set()).add(fields[3])
            elif not line.startswith(" "):
                current = None
    return {lib: vers for lib, vers in libs.items() if lib not in shipped}


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


def deb_depends(libs: dict[str, set[str]], python: str) -> list[str]:
    """Debian package relations for ``libs`` (resolved on this host), the interpreter and fuse3."""
    cache = {}
    for line in run("ldconfig", "-p").stdout.splitlines()[1:]:
        m = re.match(r"\s*(\S+) \((.*)\) => (\S+)", line)
        if m and ("x86-64" in m.group(2) or "64bit" in m.group(2) or "x86_64" in m.group(2)):
            cache.setdefault(m.group(1), m.group(3))
    packages: dict[str, str] = {}
    for lib, versions in sorted(libs.items()):
        path = cache.get(lib)
        if path is None:
            sys.exit(f"build_packages: no system library provides {lib} (needed by a vendored extension)")
        candidates = {path, os.path.realpath(path)}
        candidates |= {c.removeprefix("/usr") for c in list(candidates)} | {
            "/usr" + c for c in list(candidates)
        }
        owner = None
        for c in sorted(candidates):
            res = subprocess.run(["dpkg", "-S", c], capture_output=True, text=True, check=False)
            if res.returncode == 0:
                owner = res.stdout.split(":")[0].strip()
                break
        if owner is None:
            sys.exit(f"build_packages: {lib} ({path}) belongs to no Debian package")
        glibc = sorted(
            (v.removeprefix("GLIBC_") for v in versions if v.startswith("GLIBC_2")), key=_version_key
        )
        if glibc:
            old = packages.get(owner, "")
            newest = max([glibc[-1], old] if old else [glibc[-1]], key=_version_key)
            packages[owner] = newest
        else:
            packages.setdefault(owner, "")
    relations = [f"{pkg} (>= {ver})" if ver else pkg for pkg, ver in sorted(packages.items())]
    return [python.rsplit("/", 1)[-1], *ALWAYS_DEPENDS, *relations]


def rpm_requires(libs: dict[str, set[str]], python: str) -> list[str]:
    """rpm ``Requires:`` in the form rpm's own ELF generator writes them, plus the interpreter and fuse3."""
    reqs = [python, *ALWAYS_DEPENDS]
    for lib, versions in sorted(libs.items()):
        reqs.append(f"{lib}()(64bit)")
        reqs += [
            f"{lib}({v})(64bit)" for v in sorted(versions, key=lambda v: (v.split("_")[0], _version_key(v)))
        ]
    return reqs


# -- packages ------------------------------------------------------------------------------------------


def build_deb(root: Path, out: Path, version: str, release: str, depends: list[str]) -> Path:
    arch = run("dpkg", "--print-architecture").stdout.strip()
    control = root / "DEBIAN"
    shutil.rmtree(control, ignore_errors=True)
    control.mkdir(mode=0o755)
    try:
        size_kib = 0
        sums = []
        conffiles = {"/" + CONFIG}
        for dirpath, dirs, files in os.walk(root):
            dirs.sort()
            if Path(dirpath) == control:
                continue
            size_kib += 1
            for f in sorted(files):
                p = Path(dirpath, f)
                rel = p.relative_to(root).as_posix()
                if rel.startswith("DEBIAN/"):
                    continue
                size_kib += (p.lstat().st_size + 1023) // 1024
                if not p.is_symlink() and "/" + rel not in conffiles:
                    sums.append(f"{hashlib.md5(p.read_bytes()).hexdigest()}  {rel}\n")
        text = (PACKAGING / "deb" / "control.in").read_text()
        fields = {
            "@VERSION@": f"{version}-{release}",
            "@ARCH@": arch,
            "@MAINTAINER@": os.environ.get("DEB_MAINTAINER", DEFAULT_MAINTAINER),
            "@INSTALLED_SIZE@": str(size_kib),
            "@DEPENDS@": ", ".join(depends),
        }
        for key, value in fields.items():
            text = text.replace(key, value)
        write(control / "control", text)
        write(control / "conffiles", "".join(f"{c}\n" for c in sorted(conffiles)))
        write(control / "md5sums", "".join(sums))
        for script in ("postinst", "prerm", "postrm"):
            write(control / script, (PACKAGING / "deb" / script).read_text(), 0o755)
        deb = out / f"{NAME}_{version}-{release}_{arch}.deb"
        log(f"building {deb.name}")
        run("dpkg-deb", "--build", "--root-owner-group", "-Zzstd", "-z3", root, deb)
        return deb
    finally:
        shutil.rmtree(control, ignore_errors=True)


def build_rpm(root: Path, work: Path, out: Path, version: str, release: str, requires: list[str]) -> Path:
    arch = run("rpm", "--eval", "%{_arch}").stdout.strip()
    top = work / "rpmbuild"
    spec = top / "SPECS" / f"{NAME}.spec"
    text = (PACKAGING / "rpm" / f"{NAME}.spec.in").read_text()
    fields = {
        "@VERSION@": version,
        "@RELEASE@": release,
        "@RPM_ARCH@": arch,
        "@REQUIRES@": "\n".join(f"Requires:       {r}" for r in requires),
    }
    for key, value in fields.items():
        text = text.replace(key, value)
    write(spec, text)
    log(f"building {NAME}-{version}-{release}.{arch}.rpm")
    run(
        "rpmbuild",
        "-bb",
        "--quiet",
        "--define",
        f"_topdir {top}",
        "--define",
        f"stage {root}",
        "--define",
        f"_rpmdir {top / 'RPMS'}",
        spec,
    )
    (built,) = (top / "RPMS").rglob(f"{NAME}-{version}-{release}.*.rpm")
    rpm = out / built.name
    shutil.move(built, rpm)
    return rpm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deb", action="store_true", help="build the .deb (default: both)")
    parser.add_argument("--rpm", action="store_true", help="build the .rpm (default: both)")
    parser.add_argument("--out", type=Path, default=REPO / "dist", help="output directory (default dist/)")
    parser.add_argument(
        "--work", type=Path, help="scratch directory to use and keep (default: a temporary one)"
    )
    parser.add_argument("--release", default="1", help="package release / Debian revision (default 1)")
    args = parser.parse_args(argv)
    if not args.deb and not args.rpm:
        args.deb = args.rpm = True
    os.umask(0o022)
    tools = {"dpkg-deb": "dpkg", "objdump": "binutils", "git": "git"}
    if args.rpm:
        tools["rpmbuild"] = "rpm"
    ensure_apt(tools)
    meta = project()
    version = str(meta["version"])
    python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="soci-py-pkg-"))
    if args.work:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    try:
        root = stage(work, meta)
        libs = needed(root)
        log(f"system libraries linked: {' '.join(sorted(libs))}")
        if args.deb:
            print(build_deb(root, args.out, version, args.release, deb_depends(libs, python)))
        if args.rpm:
            print(build_rpm(root, work, args.out, version, args.release, rpm_requires(libs, python)))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
