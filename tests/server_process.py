"""Drive a real `mlxd serve` process on a free loopback port (after llama.cpp's server tests)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def downloaded(hf_home: Path, model_dir: Path, repo: str) -> dict:
    """`model_dir` as a complete download of `repo` in a Hugging Face cache at `hf_home`; the
    env that points a server there. A server serves it on request without loading it at start."""
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model_dir, folder / "snapshots" / ("0" * 40))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


class ServerProcess:
    """One `mlxd serve` subprocess; its log goes to a file the tests can read."""

    def __init__(self, log_dir: Path, args: list[str], env: Optional[dict] = None, module: str = "mlxd.server.cli"):
        self.port = free_port()
        self.args = args
        self.module = module
        # Each server keeps its own data (the disk prefix cache) beside its log, unless told otherwise.
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLXD_HOME": str(log_dir / "mlxd-home"), **(env or {})}
        self.log_path = log_dir / f"mlxd-{self.port}.log"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module, "serve", "--port", str(self.port), *self.args]

    def start(self) -> "ServerProcess":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlxd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlxd did not become healthy in {START_TIMEOUT_S} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="mlxd", max_retries=0, timeout=120, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(self.base_url + path, timeout=120, **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.base_url + path, timeout=30, **kwargs)


def free_port_pair() -> int:
    """A port P with P+1 free too: mlx.launch's ring listens on one port per rank."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


class GroupProcess(ServerProcess):
    """`mlxd launch -n 2 -- serve ...`: two ranks on loopback; rank 0 answers HTTP."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mlxd.server.cli", "launch", "--hosts", "127.0.0.1", "-n", "2",
                "--starting-port", str(free_port_pair()), "--", "serve", "--port", str(self.port), *self.args]

    def rank_pid(self, rank: int) -> int:
        m = re.search(rf"rank {rank} of 2 \(pid (\d+)\)", self.log())
        assert m, self.log()
        return int(m.group(1))
