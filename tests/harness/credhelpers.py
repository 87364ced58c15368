"""Real ``docker-credential-<name>`` executables for tests, in a directory the test puts on PATH.

Owns writing small Python scripts (run by this interpreter) that speak the helper protocol, each kind a
method of :class:`HelperDir`:

* :meth:`HelperDir.good` — fixed answers per server URL, "credentials not found" for the rest;
* :meth:`HelperDir.rotating` — answers read from a file on every call (:meth:`HelperDir.set_answer`);
* :meth:`HelperDir.hanging` — starts a grandchild, records both pids, and never answers;
* :meth:`HelperDir.garbage` — exits 0 with output that is not the JSON object;
* :meth:`HelperDir.failing` — exits non-zero with output (which may contain a secret the test looks for);
* a missing helper is simply one that was never written.

Every helper appends the server URL it read on stdin to ``<name>.calls`` (:meth:`HelperDir.calls`). It will
not install anything outside the directory it is given.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

_PRELUDE = """#!{python}
import json, os, sys, time
_dir = {dir!r}
_name = {name!r}
_url = sys.stdin.read()
with open(os.path.join(_dir, _name + ".calls"), "a") as _f:
    _f.write(json.dumps(_url) + "\\n")
if len(sys.argv) != 2 or sys.argv[1] != "get":
    print("unsupported", file=sys.stderr)
    sys.exit(2)
"""

_NOT_FOUND = """
print("credentials not found in native keychain")
sys.exit(1)
"""


class HelperDir:
    """A directory of fake credential helpers."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> str:
        """The value to use as PATH (just this directory)."""
        return str(self.dir)

    def _write(self, name: str, body: str) -> Path:
        exe = self.dir / f"docker-credential-{name}"
        exe.write_text(_PRELUDE.format(python=sys.executable, dir=str(self.dir), name=name) + body)
        exe.chmod(0o755)
        return exe

    def good(self, name: str, answers: dict[str, tuple[str, str]]) -> Path:
        """Answer ``{ServerURL, Username, Secret}`` for the URLs in ``answers``; not found otherwise."""
        table = {url: {"ServerURL": url, "Username": u, "Secret": s} for url, (u, s) in answers.items()}
        return self._write(
            name,
            f"_table = {json.dumps(table)!r}\n_t = json.loads(_table)\n"
            "if _url in _t:\n    print(json.dumps(_t[_url]))\n    sys.exit(0)\n" + _NOT_FOUND,
        )

    def rotating(self, name: str, user: str, secret: str) -> Path:
        """Answer whatever :meth:`set_answer` last wrote, for any URL."""
        self.set_answer(name, user, secret)
        answer = str(self.dir / f"{name}.answer")
        return self._write(
            name,
            f"with open({answer!r}) as _f:\n    _a = json.load(_f)\n"
            "_a['ServerURL'] = _url\nprint(json.dumps(_a))\n",
        )

    def set_answer(self, name: str, user: str, secret: str) -> None:
        tmp = self.dir / f"{name}.answer.tmp"
        tmp.write_text(json.dumps({"Username": user, "Secret": secret}))
        tmp.replace(self.dir / f"{name}.answer")

    def hanging(self, name: str, seconds: float = 60.0) -> Path:
        """Start a grandchild (``sleep``), write ``<name>.pids`` (helper and grandchild pid); never answer."""
        pids = str(self.dir / f"{name}.pids")
        return self._write(
            name,
            "import subprocess\n"
            f"_c = subprocess.Popen(['sleep', '{seconds:g}'])\n"
            f"with open({pids!r} + '.tmp', 'w') as _f:\n    _f.write(f'{{os.getpid()}} {{_c.pid}}')\n"
            f"os.replace({pids!r} + '.tmp', {pids!r})\n"
            f"time.sleep({seconds:g})\n",
        )

    def hanging_pids(self, name: str) -> tuple[int, int]:
        a, b = (self.dir / f"{name}.pids").read_text().split()
        return int(a), int(b)

    def garbage(self, name: str, output: str = "this is not json") -> Path:
        return self._write(name, f"sys.stdout.write({output!r})\nsys.exit(0)\n")

    def failing(self, name: str, status: int = 1, stdout: str = "", stderr: str = "") -> Path:
        return self._write(
            name, f"sys.stdout.write({stdout!r})\nsys.stderr.write({stderr!r})\nsys.exit({status})\n"
        )

    def calls(self, name: str) -> list[str]:
        """Server URLs the helper was asked for, in order."""
        f = self.dir / f"{name}.calls"
        if not f.exists():
            return []
        return [json.loads(line) for line in f.read_text().splitlines() if line]


def process_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return "Z" in line.split()[1]
    except FileNotFoundError:
        return True
    return False
