"""``soci push`` end to end against a real docker-registry (htpasswd and token auth).

The image is made by umoci, copied to the registry by skopeo (an independent tool, digests preserved), its v1
indexes are built with ``soci create --oci-layout`` into a temp root, and ``soci push`` (in-process, and the
installed ``.venv/bin/soci`` for the credential paths) uploads them. Everything is then read back with the
registry client: the index through the referrers tag fallback (registry 2.8 has no referrers API), the zTOC
and config blobs, byte for byte.
"""

from __future__ import annotations

import base64
import itertools
import json
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from soci_fs import index as si
from soci_fs.errors import InvalidArgument
from soci_fs.oci import Platform, host_platform
from soci_fs.registry import reference
from soci_fs.registry.client import RegistryClient
from soci_fs.registry.credentials import Credentials
from soci_fs.registry.reference import HttpConfig, RegistryConfig
from soci_fs.store import TYPE_INDEX, ArtifactEntry, Store, now_rfc3339
from soci_grpc.cli import cmd_push
from tests.fs.ocigen import MT_LAYER_GZIP, LayoutBuilder, generated_tree, gz, make_tar
from tests.grpc.clihelp import ok, run, run_exe, umoci_image
from tests.harness.credhelpers import HelperDir
from tests.harness.registry import (  # noqa: F401  (pytest finds fixtures by name)
    PASSWORD,
    USER,
    Registry,
    harness_dir,
    htpasswd_registry,
    token_registry,
    token_server,
)
from tests.harness.token_server import TokenServer

pytestmark = pytest.mark.integration

FAST = RegistryConfig(http=HttpConfig(max_retries=2, min_wait_msec=1, max_wait_msec=20))
_repo_counter = itertools.count()


# ---------------------------------------------------------------------------------------------------------
# Helpers shared with test_secrets_audit.py (no test_ names here)


def make_umoci_layout(work: Path) -> Path:
    """A two-layer image made by umoci, tagged ``test`` in the layout."""
    rnd = random.Random(11)
    return umoci_image(
        work,
        [
            {"etc/hello.txt": b"hello\n", "data/a.bin": rnd.randbytes(150_000)},
            {"data/random.bin": rnd.randbytes(300_000), "data/text.txt": b"lorem ipsum\n" * 20_000},
        ],
    )


def skopeo_push(layout: Path, registry: Registry, repo: str, tag: str, user: str, password: str) -> None:
    """Copy the layout's ``test`` image to the registry with skopeo (digests preserved)."""
    p = subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
            "--dest-creds",
            f"{user}:{password}",
            f"oci:{layout}:test",
            f"docker://{registry.host}/{repo}:{tag}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert p.returncode == 0, p.stderr


def reader(user: str = USER, password: str = PASSWORD) -> RegistryClient:
    creds = Credentials(user, password)
    return RegistryClient(lambda h, r: creds, config=FAST)


def write_docker_config(path: Path, doc: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(doc))
    return path


def basic_auth_entry(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


@dataclass
class Pushed:
    """An image in the registry with v1 indexes recorded in a local root."""

    registry: Registry
    repo: str
    ref: str  # host/repo:tag
    root: Path
    manifest: str  # the platform manifest digest
    index: str  # the newest v1 index digest recorded for it

    def parsed(self) -> reference.Reference:
        return reference.parse(self.ref)


def prepare(
    layout: Path,
    registry: Registry,
    root: Path,
    *,
    user: str = USER,
    password: str = PASSWORD,
    span_size: int = 65536,
    name: str = "push",
) -> Pushed:
    """skopeo the image to a fresh repository and ``soci create`` its v1 index into ``root``."""
    repo = f"cli/{name}{next(_repo_counter)}"
    skopeo_push(layout, registry, repo, "v1", user, password)
    r = ok(
        run(
            "--root",
            root,
            "create",
            "--oci-layout",
            layout,
            "test",
            "--min-layer-size",
            "0",
            "--span-size",
            str(span_size),
        )
    )
    assert "-> ztoc" in r.text
    with Store.open(root) as store:
        entries = sorted(store.db.entries(TYPE_INDEX), key=lambda e: e.created_at, reverse=True)
    ref = f"{registry.host}/{repo}:v1"
    with reader(user, password) as c:
        manifest = c.get_manifest(reference.parse(ref)).digest
    newest = next(e for e in entries if e.image_digest == manifest)
    return Pushed(registry, repo, ref, root, manifest, newest.digest)


def assert_index_in_registry(p: Pushed, user: str = USER, password: str = PASSWORD) -> None:
    """The index is a referrer of the manifest (tag fallback) and every blob equals the local bytes."""
    with Store.open(p.root) as store, reader(user, password) as c:
        found = c.referrers(p.parsed(), p.manifest, si.ARTIFACT_TYPE_V1)
        assert [d.digest for d in found] == [p.index]
        tag_index = c.get_manifest(p.parsed(), "sha256-" + p.manifest.split(":", 1)[1]).json()
        assert [m["digest"] for m in tag_index["manifests"]] == [p.index]
        remote = c.get_manifest(p.parsed(), p.index)
        local = store.content.read(p.index)
        assert remote.data == local
        idx = si.parse_index(remote.data)
        assert idx.version == 1 and idx.subject is not None and idx.subject.digest == p.manifest
        assert c.get_blob(p.parsed(), si.EMPTY_CONFIG_DIGEST) == b"{}"
        assert idx.ztocs
        for z in idx.ztocs:
            data = c.get_blob(p.parsed(), z.descriptor.digest, size=z.descriptor.size)
            assert data == store.content.read(z.descriptor.digest)


def push_lines(p: Pushed) -> list[str]:
    """The lines a first, verbose push of ``p`` prints (order of the blob lines is not fixed)."""
    return [
        "checking if a soci index already exists in remote repository...",
        f"pushing soci index with digest: {p.index}",
    ]


# ---------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_umoci_layout(tmp_path_factory.mktemp("umoci"))


@pytest.fixture(params=["htpasswd", "token"])
def registry(
    request: pytest.FixtureRequest,
    htpasswd_registry: Registry,  # noqa: F811
    token_registry: Registry,  # noqa: F811
    token_server: TokenServer,  # noqa: F811
) -> Iterator[Registry]:
    token_server.reset()
    yield htpasswd_registry if request.param == "htpasswd" else token_registry
    token_server.reset()


# ---------------------------------------------------------------------------------------------------------
# Tests


def test_push_with_user_then_found_through_referrers(
    layout: Path, registry: Registry, tmp_path: Path
) -> None:
    p = prepare(layout, registry, tmp_path / "root")
    r = ok(run("--root", p.root, "push", "--user", f"{USER}:{PASSWORD}", "--plain-http", p.ref))
    lines = r.text.splitlines()
    assert lines[:2] == push_lines(p)
    with Store.open(p.root) as store:
        idx = si.parse_index(store.content.read(p.index))
    blob_digests = {si.EMPTY_CONFIG_DIGEST} | {z.descriptor.digest for z in idx.ztocs}
    pushed = {
        x.split(": ", 1)[1] for x in lines if x.startswith("successfully pushed artifact with digest: ")
    }
    assert pushed == blob_digests | {p.index}
    assert lines[-1] == f"successfully pushed artifact with digest: {p.index}"  # the manifest goes last
    assert PASSWORD not in r.text and PASSWORD not in r.err
    assert_index_in_registry(p)


def test_exe_push_with_user_docker_config_and_helper(
    layout: Path, registry: Registry, tmp_path: Path
) -> None:
    """The installed executable, with credentials from --user, a config ``auths`` entry and a helper."""
    empty_home = tmp_path / "home"
    empty_home.mkdir()
    base_env = {"HOME": str(empty_home), "DOCKER_CONFIG": str(tmp_path / "no-config")}

    p1 = prepare(layout, registry, tmp_path / "r1", name="exeuser")
    r = run_exe("--root", p1.root, "push", "-u", f"{USER}:{PASSWORD}", p1.ref, env=base_env)
    assert r.rc == 0, r.err
    assert_index_in_registry(p1)

    p2 = prepare(layout, registry, tmp_path / "r2", name="execonfig")
    cfg = write_docker_config(
        tmp_path / "dc-auths", {"auths": {registry.host: basic_auth_entry(USER, PASSWORD)}}
    )
    r = run_exe(
        "--root", p2.root, "push", "--plain-http", p2.ref, env={**base_env, "DOCKER_CONFIG": str(cfg)}
    )
    assert r.rc == 0, r.err
    assert_index_in_registry(p2)

    p3 = prepare(layout, registry, tmp_path / "r3", name="exehelper")
    helpers = HelperDir(tmp_path / "bin")
    helpers.good("pushtest", {registry.host: (USER, PASSWORD)})
    cfg = write_docker_config(
        tmp_path / "dc-helper",
        {
            "auths": {registry.host: basic_auth_entry(USER, "not-used")},
            "credHelpers": {registry.host: "pushtest"},
        },
    )
    env = {**base_env, "DOCKER_CONFIG": str(cfg), "PATH": f"{helpers.path}:/usr/bin:/bin"}
    r = run_exe("--root", p3.root, "push", "-q", p3.ref, env=env)
    assert r.rc == 0, r.err
    assert r.text == p3.index + "\n"
    assert helpers.calls("pushtest") and set(helpers.calls("pushtest")) == {registry.host}
    assert_index_in_registry(p3)


@pytest.mark.parametrize("how", ["user", "config"])
def test_wrong_password_is_exit_4_naming_the_host(
    layout: Path, registry: Registry, tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = prepare(layout, registry, tmp_path / "root")
    bad = "Wr0ng-Passw0rd-zz9"
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "DOCKER_CONFIG": str(tmp_path / "none")}
    argv: list[str | Path] = ["--root", p.root, "push", p.ref]
    if how == "user":
        argv[3:3] = ["--user", f"{USER}:{bad}"]
    else:
        cfg = write_docker_config(tmp_path / "dc", {"auths": {registry.host: basic_auth_entry(USER, bad)}})
        env["DOCKER_CONFIG"] = str(cfg)
    r = run_exe(*argv, "--debug", env=env)
    assert r.rc == 4, (r.rc, r.err)
    err_lines = [x for x in r.err.splitlines() if x.startswith("soci: ")]
    assert len(err_lines) == 1
    assert f"registry {registry.host} refused the request" in err_lines[0]
    assert ("--user soci" if how == "user" else "docker-config:") in err_lines[0]
    encoded = base64.b64encode(f"{USER}:{bad}".encode()).decode()
    for text in (r.text, r.err):
        assert bad not in text and encoded not in text
    with reader() as c:
        assert c.referrers(p.parsed(), p.manifest, si.ARTIFACT_TYPE_V1) == []


def test_existing_index_warn_skip_allow_and_quiet(layout: Path, registry: Registry, tmp_path: Path) -> None:
    p = prepare(layout, registry, tmp_path / "root")
    user = ("--user", f"{USER}:{PASSWORD}")
    ok(run("--root", p.root, "push", *user, p.ref))
    found = f"soci index found in remote repository with digest: {p.index}"

    r = ok(run("--root", p.root, "push", *user, "--existing-index", "skip", p.ref))
    assert r.text.splitlines() == [
        "checking if a soci index already exists in remote repository...",
        f"{found}: skipping pushing artifacts for image manifest: {p.manifest}",
    ]
    r = ok(run("--root", p.root, "push", *user, "--existing-index", "skip", "-q", p.ref))
    assert r.text == ""

    r = ok(run("--root", p.root, "push", *user, p.ref))  # warn is the default
    lines = r.text.splitlines()
    assert lines[:3] == [
        "checking if a soci index already exists in remote repository...",
        f"[WARN] {found}: pushing index anyway",
        f"pushing soci index with digest: {p.index}",
    ]
    assert all(x.startswith("skipped artifact with digest: ") for x in lines[3:]) and len(lines) > 4
    r = ok(run("--root", p.root, "push", *user, "-q", p.ref))
    assert r.text.splitlines() == [f"[WARN] {found}: pushing index anyway", p.index]

    r = ok(run("--root", p.root, "push", *user, "--existing-index", "allow", p.ref))
    assert (
        "checking if" not in r.text and r.text.splitlines()[0] == f"pushing soci index with digest: {p.index}"
    )

    # A second, newer index for the same manifest (other span size): it is the one pushed, and then the
    # registry holds two referrers.
    ok(
        run(
            "--root",
            p.root,
            "create",
            "--oci-layout",
            layout,
            "test",
            "--min-layer-size",
            "0",
            "--span-size",
            "131072",
        )
    )
    with Store.open(p.root) as store:
        newest = max(
            (e for e in store.db.entries(TYPE_INDEX) if e.image_digest == p.manifest),
            key=lambda e: e.created_at,
        )
    assert newest.digest != p.index
    r = ok(run("--root", p.root, "push", *user, "-q", p.ref))
    assert r.text.splitlines() == [f"[WARN] {found}: pushing index anyway", newest.digest]
    r = ok(run("--root", p.root, "push", *user, "--existing-index", "skip", p.ref))
    assert r.text.splitlines()[1] == (
        "multiple soci indices found in remote repository: skipping pushing artifacts for image manifest: "
        + p.manifest
    )
    with reader() as c:
        digests = {d.digest for d in c.referrers(p.parsed(), p.manifest, si.ARTIFACT_TYPE_V1)}
    assert digests == {p.index, newest.digest}


def test_v2_indexes_are_skipped_with_the_warning(
    layout: Path,
    htpasswd_registry: Registry,  # noqa: F811
    tmp_path: Path,
) -> None:
    p = prepare(layout, htpasswd_registry, tmp_path / "root")
    with Store.open(p.root) as store:
        v2 = ArtifactEntry(
            digest="sha256:" + "ab" * 32,
            size=100,
            location=p.manifest,
            type=TYPE_INDEX,
            oci_digest=p.manifest,
            image_digest=p.manifest,
            platform="linux/amd64",
            media_type=si.MT_OCI_MANIFEST
            if hasattr(si, "MT_OCI_MANIFEST")
            else "application/vnd.oci.image.manifest.v1+json",
            artifact_type=si.ARTIFACT_TYPE_V2,
            created_at=now_rfc3339(),  # newer than the v1 index, still not chosen
        )
        store.db.put(v2)
    r = ok(run("--root", p.root, "push", "-u", f"{USER}:{PASSWORD}", "-q", p.ref))
    assert r.text.splitlines() == [cmd_push.V2_WARNING, p.index]
    assert_index_in_registry(p)

    with Store.open(p.root) as store:
        store.db.remove(p.index)
    r = run("--root", p.root, "push", "-u", f"{USER}:{PASSWORD}", p.ref)
    assert r.rc != 0
    assert r.text.splitlines() == [cmd_push.V2_WARNING]
    assert "could not find any soci index manifest v1 to push for platform linux/amd64" in r.err


def test_flag_errors_and_unreachable_registry(tmp_path: Path) -> None:
    r = run("--root", tmp_path / "root", "push", "--existing-index", "sometimes", "127.0.0.1:1/x:y")
    assert r.rc == 2
    assert "unexpected value for flag existing-index: sometimes, expected types [warn skip allow]" in r.err
    r = run("--root", tmp_path / "root", "push", "--max-concurrent-uploads", "-1", "127.0.0.1:1/x:y")
    assert r.rc == 2
    # Nothing listens on port 1: exit 5, the message names the URL.
    r = run("--root", tmp_path / "root", "push", "--user", "u:p4ss-unused", "127.0.0.1:1/x:y")
    assert r.rc == 5, r.err
    assert "127.0.0.1:1" in r.err and "p4ss-unused" not in r.err
    r = run("--root", tmp_path / "root", "push", "--max-concurrent-uploads", str(1 << 64), "127.0.0.1:1/x:y")
    assert r.rc == 5
    assert (
        r.text
        == "warning: overflow for setting --max-concurrent-uploads=18446744073709551616; defaulting to 3"
    )


def test_user_without_password(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    args = argparse.Namespace(user="alice")
    with pytest.raises(InvalidArgument, match="not a terminal"):
        cmd_push.credential_source(args, "reg.example", stdin_isatty=lambda: False)
    asked: list[str] = []

    def prompt(text: str) -> str:
        asked.append(text)
        return "typed-Secret"

    src = cmd_push.credential_source(args, "reg.example", prompt=prompt, stdin_isatty=lambda: True)
    creds = src.credential("reg.example", "")
    assert creds is not None and (creds.username, creds.password) == ("alice", "typed-Secret")
    assert asked == ["Password for alice at reg.example: "]
    assert "typed-Secret" not in src.description
    assert cmd_push.split_user("bob:pa:ss") == ("bob", "pa:ss")
    assert cmd_push.split_user("bob:") == ("bob", "")
    with pytest.raises(InvalidArgument) as e:
        cmd_push.split_user(":only-Secret")
    assert "only-Secret" not in str(e.value)
    # The executable with stdin not a terminal: exit 2 and a clear message.
    r = run_exe("push", "--user", "alice", "127.0.0.1:1/x:y")
    assert r.rc == 2 and "stdin is not a terminal" in r.err


def test_oci_layout_push_of_a_converted_image(layout: Path, registry: Registry, tmp_path: Path) -> None:
    out = tmp_path / "soci.tar"
    ok(run("convert", "--standalone", "--min-layer-size", "0", "--span-size", "65536", layout, out))
    repo = f"cli/layout{next(_repo_counter)}"
    ref = f"{registry.host}/{repo}:soci"
    r = ok(run("push", "--user", f"{USER}:{PASSWORD}", "--oci-layout", out, ref))
    lines = r.text.splitlines()
    root_digest = lines[0].split(": ", 1)[1]
    assert lines[0] == f"pushing image with digest: {root_digest}"
    assert not any(x.startswith("note:") for x in lines)
    assert lines[-1] == f"tagged {registry.host}/{repo}:soci as {root_digest}"
    parsed = reference.parse(ref)
    with reader() as c:
        top = c.get_manifest(parsed)
        assert top.digest == root_digest and top.media_type == "application/vnd.oci.image.index.v1+json"
        entries = top.json()["manifests"]
        socis = [e for e in entries if e.get("artifactType") == si.ARTIFACT_TYPE_V2]
        images = [e for e in entries if e.get("artifactType") != si.ARTIFACT_TYPE_V2]
        assert len(socis) == 1 and len(images) == 1
        soci_desc, image_desc = socis[0], images[0]
        # The chain: OCI index -> image manifest (annotated) -> v2 SOCI index -> zTOCs.
        assert soci_desc["annotations"][si.ANN_MANIFEST_DIGEST] == image_desc["digest"]
        assert image_desc["annotations"][si.ANN_INDEX_DIGEST] == soci_desc["digest"]
        manifest = c.get_manifest(parsed, image_desc["digest"]).json()
        assert manifest["annotations"][si.ANN_INDEX_DIGEST] == soci_desc["digest"]
        for layer in manifest["layers"]:
            assert c.blob_exists(parsed, layer["digest"])
        idx = si.parse_index(c.get_manifest(parsed, soci_desc["digest"]).data)
        assert idx.version == 2 and idx.subject is None and idx.ztocs
        assert {z.layer_digest for z in idx.ztocs} <= {x["digest"] for x in manifest["layers"]}
        for z in idx.ztocs:
            assert len(c.get_blob(parsed, z.descriptor.digest, size=z.descriptor.size)) == z.descriptor.size
    # Pushing again uploads nothing new; quiet prints only the digest.
    r = ok(run("push", "-u", f"{USER}:{PASSWORD}", "-q", "--oci-layout", out, ref))
    assert r.text == root_digest + "\n"


def test_platform_selection_on_a_multi_platform_image(registry: Registry, tmp_path: Path) -> None:
    b = LayoutBuilder(tmp_path / "img")
    g = gz(make_tar(generated_tree(41, n_files=15)))
    g_arm = gz(make_tar(generated_tree(42, n_files=10)))
    amd = b.image([(MT_LAYER_GZIP, g)], platform=Platform("amd64", "linux"))
    arm = b.image([(MT_LAYER_GZIP, g_arm)], platform=Platform("arm64", "linux", variant="v8"))
    idx = b.index([(amd, Platform("amd64", "linux")), (arm, Platform("arm64", "linux", variant="v8"))])
    b.write_index_json(idx, ref_names=["test"])
    repo = f"cli/multi{next(_repo_counter)}"
    p = subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
            "--dest-creds",
            f"{USER}:{PASSWORD}",
            f"oci:{tmp_path / 'img'}:test",
            f"docker://{registry.host}/{repo}:v1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    root = tmp_path / "root"
    ok(
        run(
            "--root",
            root,
            "create",
            "--oci-layout",
            tmp_path / "img",
            "test",
            "--all-platforms",
            "--min-layer-size",
            "0",
        )
    )
    with Store.open(root) as store:
        by_manifest = {e.image_digest: e.digest for e in store.db.entries(TYPE_INDEX)}
    ref = f"{registry.host}/{repo}:v1"
    user = ("-u", f"{USER}:{PASSWORD}")
    r = ok(run("--root", root, "push", *user, "-q", "-p", "linux/arm64", ref))
    assert r.text.split() == [by_manifest[arm.digest]]
    r = ok(run("--root", root, "push", *user, "-q", "--existing-index", "allow", ref))  # host platform
    host_manifest = arm if host_platform().architecture == "arm64" else amd
    assert r.text.split() == [by_manifest[host_manifest.digest]]
    r = ok(run("--root", root, "push", *user, "-q", "--existing-index", "skip", "--all-platforms", ref))
    assert r.text == ""  # both already have an index in the registry
    r = run("--root", root, "push", *user, "-p", "linux/s390x", ref)
    assert r.rc == 3 and "no manifest for platform linux/s390x" in r.err
    with reader() as c:
        for manifest, index in by_manifest.items():
            found = c.referrers(reference.parse(ref), manifest, si.ARTIFACT_TYPE_V1)
            assert [d.digest for d in found] == [index]
