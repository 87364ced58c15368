"""The .deb and .rpm that ``scripts/build_packages.py`` builds: metadata, contents, scripts, units, config.

The packages are built once per working tree (see :func:`pkghelp.built_packages`); the first test here pays
for the build. Installing and running the .deb is tested in ``test_nspawn_install.py``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
import tomllib
from pathlib import Path

import pytest

from soci_grpc import config as configmod
from tests.packaging import pkghelp

PYPROJECT = tomllib.loads((pkghelp.REPO / "pyproject.toml").read_text())["project"]
VERSION = PYPROJECT["version"]
SITE = "usr/lib/soci-py/site"
UNITS = ("soci-snapshotter-grpc.service", "soci-snapshotter-grpc.socket")
TOOLS = ("dpkg-deb", "rpm", "rpmbuild", "objdump", "systemd-analyze")

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in TOOLS),
    reason=f"needs {', '.join(TOOLS)} (Debian packages dpkg, rpm, binutils, systemd)",
)


def sh(*cmd: str | Path) -> str:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def packages() -> pkghelp.Packages:
    return pkghelp.built_packages()


@pytest.fixture(scope="module")
def deb_tree(packages: pkghelp.Packages, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deb-x")
    sh("dpkg-deb", "-x", packages.deb, root)
    return root


def deb_files(deb: Path) -> dict[str, str]:
    """Every member of the .deb's data archive: path (without ``./``) -> ``ls -l``-style mode string."""
    out = {}
    for line in sh("dpkg-deb", "-c", deb).splitlines():
        fields = line.split()
        out[fields[5].removeprefix("./").rstrip("/")] = fields[0]
    out.pop("", None)
    return out


def test_deb_metadata(packages: pkghelp.Packages) -> None:
    assert packages.deb.name == f"soci-py_{VERSION}-1_{sh('dpkg', '--print-architecture').strip()}.deb"
    fields = dict(
        line.split(": ", 1)
        for line in sh("dpkg-deb", "-f", packages.deb).splitlines()
        if not line.startswith(" ")
    )
    assert fields["Package"] == "soci-py" and fields["Version"] == f"{VERSION}-1"
    depends = [d.strip() for d in fields["Depends"].split(",")]
    names = {d.split()[0] for d in depends}
    # the interpreter the extensions were built for, FUSE, and the libraries the extensions link
    assert {"python3.11", "fuse3", "libfuse3-3", "libisal2", "zlib1g", "libc6"} <= names, depends
    assert depends[0] == "python3.11"
    assert re.fullmatch(r"libc6 \(>= 2\.\d+\)", next(d for d in depends if d.startswith("libc6")))
    assert fields["Recommends"] == "containerd" and fields["Suggests"] == "pigz"
    assert int(fields["Installed-Size"]) > 10_000  # KiB: the vendored libraries
    assert sh("dpkg-deb", "-I", packages.deb, "conffiles") == "/etc/soci-snapshotter-grpc/config.toml\n"


def test_deb_contents(packages: pkghelp.Packages) -> None:
    files = deb_files(packages.deb)
    for path, mode in {
        "usr/bin/soci": "-rwxr-xr-x",
        "usr/bin/soci-snapshotter-grpc": "-rwxr-xr-x",
        "usr/lib/systemd/system/soci-snapshotter-grpc.service": "-rw-r--r--",
        "usr/lib/systemd/system/soci-snapshotter-grpc.socket": "-rw-r--r--",
        "etc/soci-snapshotter-grpc/config.toml": "-rw-r--r--",
        "usr/share/doc/soci-py/README.md": "-rw-r--r--",
        "usr/share/doc/soci-py/containerd-soci.toml": "-rw-r--r--",
        "usr/share/doc/soci-py/copyright": "-rw-r--r--",
        f"{SITE}/soci_grpc/sockact.py": "-rw-r--r--",
        f"{SITE}/soci_grpc/_proto/soci/snapshots_pb2.py": "-rw-r--r--",
    }.items():
        assert files.get(path) == mode, (path, files.get(path))
    site = [p for p in files if p.startswith(SITE + "/")]
    assert any(re.fullmatch(rf"{SITE}/soci_fs/_ext/_zinfo\.cpython-311-[^/]+\.so", p) for p in site)
    assert f"{SITE}/soci_py-{VERSION}.dist-info/METADATA" in files
    for dist in ("grpc", "google/protobuf", "trio", "pyfuse3", "requests"):
        assert any(p.startswith(f"{SITE}/{dist}/__init__.") for p in site), dist
    assert any(p.endswith(".cpython-311.pyc") for p in site), "bytecode is compiled at build time"
    assert not any(p.startswith(f"{SITE}/bin") for p in files), "pip's own console scripts are dropped"
    assert not any(p.startswith(("DEBIAN", "tmp", "root", "home")) for p in files)


def test_entry_points_run_the_vendored_tree_isolated(deb_tree: Path) -> None:
    for name, target in PYPROJECT["scripts"].items():
        text = (deb_tree / "usr/bin" / name).read_text()
        module, func = target.split(":")
        assert text.startswith("#!/usr/bin/python3.11 -IS\n"), text
        assert 'site.addsitedir("/usr/lib/soci-py/site")' in text and f"from {module} import {func}" in text


def test_shipped_config_is_the_commented_default(deb_tree: Path) -> None:
    text = (deb_tree / "etc/soci-snapshotter-grpc/config.toml").read_text()
    assert all(not line.strip() or line.startswith("#") for line in text.splitlines())
    assert configmod.parse(text) == configmod.Config()
    body = text.split("\n\n", 1)[1]  # after the header paragraph
    uncommented = "".join(line.removeprefix("# ") + "\n" for line in body.splitlines())
    assert uncommented.replace("#\n", "\n") == configmod.default_toml()


def test_maintainer_scripts(packages: pkghelp.Packages, tmp_path: Path) -> None:
    sh("dpkg-deb", "-e", packages.deb, tmp_path / "DEBIAN")
    for script in ("postinst", "prerm", "postrm"):
        p = tmp_path / "DEBIAN" / script
        assert p.stat().st_mode & 0o777 == 0o755
        sh("sh", "-n", p)  # parses
    postinst = (tmp_path / "DEBIAN/postinst").read_text()
    assert "deb-systemd-helper enable" in postinst and "deb-systemd-invoke start" in postinst
    postrm = (tmp_path / "DEBIAN/postrm").read_text()
    assert "/var/lib/soci-snapshotter-grpc" not in postrm.split("set -e", 1)[1], "user data is never deleted"


def test_units_verify(deb_tree: Path, tmp_path: Path) -> None:
    """``systemd-analyze verify`` in a scratch root: the host's systemd units plus the package's files."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    for unit in UNITS:
        shutil.copy(deb_tree / "usr/lib/systemd/system" / unit, root / "usr/lib/systemd/system" / unit)
    shutil.copytree(deb_tree / "usr/bin", root / "usr/bin")
    res = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", *(f"/usr/lib/systemd/system/{u}" for u in UNITS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (res.returncode, res.stderr) == (0, "")
    service = (root / "usr/lib/systemd/system/soci-snapshotter-grpc.service").read_text()
    for line in (
        "Type=notify",
        "ExecStart=/usr/bin/soci-snapshotter-grpc --address fd://",
        "Restart=always",
        "RestartSec=5",
        "Before=containerd.service",
        "WantedBy=multi-user.target",
    ):
        assert f"\n{line}\n" in service, line
    socket_unit = (root / "usr/lib/systemd/system/soci-snapshotter-grpc.socket").read_text()
    for line in (
        "ListenStream=/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock",
        "SocketMode=0660",
        "DirectoryMode=0700",
        "WantedBy=sockets.target",
    ):
        assert f"\n{line}\n" in socket_unit, line


def test_rpm_metadata_and_contents(packages: pkghelp.Packages) -> None:
    assert packages.rpm.name == f"soci-py-{VERSION}-1.x86_64.rpm"
    info = sh("rpm", "-qp", "--queryformat", "%{NAME} %{VERSION} %{RELEASE} %{ARCH}\n", packages.rpm)
    assert info == f"soci-py {VERSION} 1 x86_64\n"
    requires = set(sh("rpm", "-qp", "--requires", packages.rpm).split("\n"))
    for req in (
        "/usr/bin/python3.11",
        "fuse3",
        "libfuse3.so.3()(64bit)",
        "libisal.so.2()(64bit)",
        "libz.so.1()(64bit)",
    ):
        assert req in requires, (req, sorted(requires))
    assert not [r for r in requires if "cpython" in r or "site/" in r], "no requirement on vendored files"
    provides = sh("rpm", "-qp", "--provides", packages.rpm).splitlines()
    assert provides == [f"soci-py = {VERSION}-1", f"soci-py(x86-64) = {VERSION}-1"], (
        "nothing vendored is provided"
    )
    assert sh("rpm", "-qp", "--configfiles", packages.rpm) == "/etc/soci-snapshotter-grpc/config.toml\n"
    scripts = sh("rpm", "-qp", "--scripts", packages.rpm)
    assert "systemctl enable soci-snapshotter-grpc.socket soci-snapshotter-grpc.service" in scripts
    # the same files as the .deb, with the same modes
    rpm_files = {}
    for line in sh(
        "rpm", "-qp", "--queryformat", "[%{FILEMODES:perms} %{FILENAMES}\n]", packages.rpm
    ).splitlines():
        mode, name = line.split(" ", 1)
        rpm_files[name.lstrip("/")] = mode
    deb = {p: m for p, m in deb_files(packages.deb).items() if not m.startswith("d")}
    assert {p: m for p, m in rpm_files.items() if not m.startswith("d")} == deb
    assert rpm_files["usr/lib/soci-py"].startswith("d")


def test_build_log_names_the_linked_system_libraries(packages: pkghelp.Packages) -> None:
    libs = re.search(r"system libraries linked: (.*)", packages.build_log)
    assert libs is not None, packages.build_log
    assert {"libfuse3.so.3", "libisal.so.2", "libz.so.1", "libc.so.6"} <= set(libs.group(1).split())


def test_data_archive_has_no_build_host_paths(packages: pkghelp.Packages, tmp_path: Path) -> None:
    """Nothing in the package refers to the build machine's virtualenv or scratch directories."""
    with open(tmp_path / "data.tar", "wb") as f:
        subprocess.run(["dpkg-deb", "--fsys-tarfile", str(packages.deb)], stdout=f, check=True)
    bad = []
    with tarfile.open(tmp_path / "data.tar") as tar:
        for member in tar:
            if member.isfile() and member.name.startswith(("./usr/bin/", "./etc/", "./usr/lib/systemd/")):
                text = tar.extractfile(member).read().decode()  # type: ignore[union-attr]
                if ".venv" in text or "soci-py-pkg-" in text or "/work/" in text:
                    bad.append(member.name)
    assert bad == []


@pytest.mark.skipif(not Path("/usr/bin/python3.11").exists(), reason="needs Debian's python3.11")
def test_rpm_payload_installs_and_runs_on_the_system_interpreter(
    packages: pkghelp.Packages, tmp_path: Path
) -> None:
    """``rpm -i`` into an empty root (no scripts, no dependency check), then the vendored tree's CLI runs on
    the distribution's interpreter (not the build's), the way the installed entry point runs it."""
    root = tmp_path / "root"
    sh("rpm", "--root", root, "--initdb")
    sh("rpm", "--root", root, "--nodeps", "--noscripts", "-i", packages.rpm)
    assert sh("rpm", "--root", root, "-q", "soci-py").strip() == f"soci-py-{VERSION}-1.x86_64"
    entry = (root / "usr/bin/soci-snapshotter-grpc").read_text()
    code = entry.split('"""', 2)[2].replace('"/usr/lib/soci-py/site"', repr(str(root / SITE)))
    res = subprocess.run(
        ["/usr/bin/python3.11", "-IS", "-c", code, "config", "default"],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(pkghelp.REPO)},  # ignored under -I
    )
    assert (res.returncode, res.stderr) == (0, "")
    assert res.stdout == configmod.default_toml()
