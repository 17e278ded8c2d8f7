"""What the real-client tests share: the pinned Node clients, and mlxd's own record of each request.

`node_modules()` installs opencode, the AI SDK and openai-node at the versions of the
committed lock, only when the lock changed since the last install, so the ~400 MB of
node_modules (opencode's binaries) stay cached between runs. `node_modules(CODEX)` does
the same for the Codex CLI, which has its own package.json and lock in `codex/`. It runs
`npm install --no-save`, not `npm ci`: the lock holds only the opencode binaries the registry had
for Linux x64, and `npm ci` refuses a lock without every platform's optional package.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

CLIENTS = Path(__file__).resolve().parent
NODE_MODULES = CLIENTS / "node_modules"
CODEX = CLIENTS / "codex"
# The oldest Node the pinned packages support (their `engines`); Debian 12's apt has 18.
MIN_NODE_MAJOR = 18
INSTALL_TIMEOUT_S = 600
_DONE = re.compile(
    r"request done \((\w+)\): prompt (\d+) tokens \((\d+) cached\), completion (\d+) tokens"
)


@dataclass(frozen=True)
class LoggedRequest:
    """One finished request as the server logged it: the usage it reported."""

    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


def logged_requests(log: str) -> list[LoggedRequest]:
    """The server's `request done (...)` log lines, in order."""
    return [
        LoggedRequest(m.group(1), *map(int, m.group(2, 3, 4))) for m in _DONE.finditer(log)
    ]


def _lock_digest(where: Path) -> str:
    return hashlib.sha256((where / "package-lock.json").read_bytes()).hexdigest()


def _node_major(node: str) -> int:
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout
    match = re.match(r"v(\d+)\.", version.strip())
    return int(match.group(1)) if match else 0


@functools.cache
def node_modules(where: Path = CLIENTS) -> Path:
    """Skip the calling test without node/npm; else install `where`'s lock if it changed, and return its node_modules."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node and npm are needed for the client tests (apt-get install nodejs npm)")
    if _node_major(node) < MIN_NODE_MAJOR:
        pytest.skip(f"the client tests need Node >= {MIN_NODE_MAJOR}")
    stamp = where / "node_modules" / ".mlxd-lock-sha256"
    with open(where / ".install.lock", "w") as lock:  # one installer at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.exists() or stamp.read_text() != _lock_digest(where):
            result = subprocess.run(
                [npm, "install", "--no-save", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=where,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT_S,
            )
            if result.returncode != 0:
                raise RuntimeError(f"npm install failed in {where}:\n{result.stdout}\n{result.stderr}")
            stamp.write_text(_lock_digest(where))
    return where / "node_modules"
