"""`mlxd doctor`: real subprocesses, a real HF cache layout read by
huggingface_hub's own scanner, and a real HTTP server on 127.0.0.1 as the hub."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import platform
import socket
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path

import pytest

from mlxd.server.blas import BUNDLED, find_openblas
from mlxd.server.doctor import cached_models, hub_status, package_version

ROOT = Path(__file__).resolve().parents[1]


def make_cached_repo(cache: Path, repo_id: str, files: dict[str, str]) -> None:
    """Lay out a model the way huggingface_hub's downloads do: blobs, a snapshot of symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, text in files.items():
        blob = hashlib.sha256(text.encode()).hexdigest()
        (repo / "blobs" / blob).write_text(text)
        (snapshot / name).symlink_to(f"../../blobs/{blob}")


@pytest.fixture
def hf_home(tmp_path: Path) -> Path:
    """An HF_HOME with one MLX model by name, one by quantization config, one plain model."""
    cache = tmp_path / "hub"
    make_cached_repo(cache, "mlx-community/Tiny-4bit", {"config.json": "{}", "model.safetensors": "x" * 2000})
    make_cached_repo(cache, "someone/tiny-q", {"config.json": json.dumps({"quantization": {"bits": 4}})})
    make_cached_repo(cache, "someone/plain-bert", {"config.json": json.dumps({"model_type": "bert"})})
    return tmp_path


@pytest.fixture
def local_hub():
    """A stand-in hub endpoint on 127.0.0.1 that answers HEAD / with 200."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_doctor(*args: str, **env: str) -> str:
    child_env = {k: v for k, v in os.environ.items() if k not in ("MLXD_BLAS", "LD_PRELOAD", "HF_HUB_CACHE", "HF_HUB_OFFLINE")}
    child_env.update(env)
    out = subprocess.run(
        [sys.executable, "-m", "mlxd.server.doctor", *args], cwd=ROOT, env=child_env,
        capture_output=True, text=True, timeout=120, check=True,
    )
    return out.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="the BLAS choice is Linux-only")
@pytest.mark.parametrize("blas_env", ["off", None], ids=["blas-off", "blas-default"])
def test_doctor_json(blas_env, hf_home, local_hub):
    env = {"HF_HOME": str(hf_home), "HF_ENDPOINT": local_hub}
    if blas_env:
        env["MLXD_BLAS"] = blas_env
    data = json.loads(run_doctor("--json", **env))

    expected_blas = BUNDLED if blas_env == "off" else (find_openblas() or BUNDLED)
    assert data["blas"]["library"] == expected_blas
    assert data["blas"]["interposed"] is (expected_blas != BUNDLED)
    assert data["blas"]["summary"].startswith(f"BLAS: {expected_blas}")
    assert data["python"] == platform.python_version()
    assert data["versions"]["mlx"] == metadata.version("mlx")
    assert data["versions"]["mlx-lm"] == metadata.version("mlx-lm")
    assert data["device"].startswith("CPU")
    assert data["hf_cache"]["path"] == str(hf_home / "hub")
    assert data["hf_cache"]["free_bytes"] > 0
    assert [m["repo_id"] for m in data["models"]] == ["mlx-community/Tiny-4bit", "someone/tiny-q"]
    assert data["hub"] == {"endpoint": local_hub, "reachable": True, "status": 200, "error": None}


def test_doctor_table(hf_home):
    endpoint = f"http://127.0.0.1:{unused_port()}"
    table = run_doctor(HF_HOME=str(hf_home), HF_ENDPOINT=endpoint, MLXD_BLAS="off")
    rows = dict(line.split(None, 1) for line in table.splitlines() if not line.startswith(" "))
    assert rows["mlx"] == metadata.version("mlx")
    assert rows["models"] == "2 MLX model(s) in the cache"
    assert "  mlx-community/Tiny-4bit  2.0 KB" in table
    assert rows["hub"].startswith(f"NOT reachable ({endpoint}")
    if sys.platform == "linux":
        assert rows["blas"].startswith("bundled reference BLAS (disabled by MLXD_BLAS=off)")


def test_cached_models_keeps_mlx_models_only(hf_home):
    assert cached_models(str(hf_home / "hub")) == [
        {"repo_id": "mlx-community/Tiny-4bit", "size_bytes": 2002},
        {"repo_id": "someone/tiny-q", "size_bytes": len(json.dumps({"quantization": {"bits": 4}}))},
    ]


def test_cached_models_without_a_cache(tmp_path):
    assert cached_models(str(tmp_path / "missing")) == []


def test_hub_status_reachable(local_hub):
    assert hub_status(local_hub) == {"endpoint": local_hub, "reachable": True, "status": 200, "error": None}


def test_hub_status_unreachable():
    endpoint = f"http://127.0.0.1:{unused_port()}"
    status = hub_status(endpoint, timeout=2)
    assert status["reachable"] is False
    assert status["status"] is None
    assert status["error"]


def test_package_version_of_missing_package():
    assert package_version("mlxd-no-such-package") is None
    assert package_version("mlx") == metadata.version("mlx")
