"""Loopback range-read benchmark: our registry client vs curl (keep-alive) against the same registry.

Starts docker-registry with token auth (the test harness), pushes a random blob (default 128 MiB), then does
sequential 1 MiB range reads of the whole blob with ``RemoteBlob.read`` and with one ``curl -K`` process
(``url``/``range``/``next`` entries, so one keep-alive connection), and prints MB/s, requests/s, the ratio
(target >= 0.7x) and the number of token requests our client made (1 expected: the token stays valid).

Run: ``.venv/bin/python bench/bench_registry.py [--size-mib 128] [--rounds 3]``. Owns nothing else.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soci_fs.registry import reference
from soci_fs.registry.client import RegistryClient
from soci_fs.registry.credentials import Credentials
from tests.harness.registry import PASSWORD, USER, RawPusher, Registry
from tests.harness.token_server import TokenServer

MIB = 1 << 20


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="soci-bench-"))
    ts = TokenServer(work / "token", ttl=3600).start()
    ts.set_password(USER, PASSWORD)
    reg = Registry(work / "reg", auth="token", token_server=ts).start()
    try:
        size = args.size_mib * MIB
        data = os.urandom(size)
        repo = "bench/layer"
        digest = RawPusher(reg).push_blob(repo, data)
        del data
        url = f"{reg.url}/v2/{repo}/blobs/{digest}"
        ref = reference.parse(f"{reg.host}/{repo}:v1")
        token, _ = ts.make_token(USER, [f"repository:{repo}:pull"])
        cfg = work / "curl.cfg"
        with cfg.open("w") as f:
            os.chmod(cfg, 0o600)
            entries = [
                f'url = "{url}"\nrange = "{off}-{off + MIB - 1}"\n'
                f'header = "Authorization: Bearer {token}"\noutput = "/dev/null"\n'
                for off in range(0, size, MIB)
            ]
            f.write("next\n".join(entries))
        n = size // MIB
        ours, curls = [], []
        ts.reset()
        client = RegistryClient(lambda h, r: Credentials(USER, PASSWORD))
        rb = client.blob(ref, digest, size=size)
        rb.read(0, 1)  # resolve + first token
        first_tokens = ts.total_token_requests()
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for off in range(0, size, MIB):
                got = rb.read(off, MIB)
                assert len(got) == MIB
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            subprocess.run(["curl", "-s", "-f", "-K", str(cfg)], check=True)
            curls.append(time.perf_counter() - t0)
        tokens_after = ts.total_token_requests()
        o, c = statistics.median(ours), statistics.median(curls)
        print(f"blob {args.size_mib} MiB, {n} sequential 1 MiB range reads, {args.rounds} rounds (median)")
        print(f"  soci-py RemoteBlob.read: {o:.2f} s  {n / o:.0f} req/s  {size / o / 1e6:.0f} MB/s")
        print(f"  curl -K keep-alive      : {c:.2f} s  {n / c:.0f} req/s  {size / c / 1e6:.0f} MB/s")
        print(f"  ratio (ours/curl throughput): {c / o:.2f}x (target >= 0.7x)")
        print(
            f"  token requests: {first_tokens} for the first read, {tokens_after - first_tokens} afterwards"
        )
        print(f"  client statistics: {client.statistics()}")
        client.close()
    finally:
        reg.stop()
        ts.stop()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
