"""`mlxd pull | ls | rm | catalog | ps` as a user runs them, against the fake hub.

Each command runs in a fresh interpreter with HF_ENDPOINT / HF_HOME pointing at the fake
hub and a temporary cache, because huggingface_hub reads them once, at import.
"""

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mlxd.server import registry_cli
from tests.fakehub import FakeHub, write_model

ROOT = Path(__file__).resolve().parent.parent
CODER = "mlx-community/Qwen2.5-Coder-0.5B-Instruct-4bit"


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mlxd:
    """Runs `mlxd` commands in a subprocess against one HF home."""

    def __init__(self, endpoint: str, hf_home: Path):
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        self.env.update(
            HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1"
        )
        self.cache = hf_home / "hub"

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "mlxd.server.cli", *args],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip


@pytest.fixture
def hub(tmp_path):
    old_layout = write_model(tmp_path / "old")
    (old_layout / "model.safetensors").rename(old_layout / "weights.00.safetensors")
    repos = {
        CODER: write_model(tmp_path / "coder"),
        "gated-org/model": write_model(tmp_path / "gated"),
        "old-org/model": old_layout,
    }
    with FakeHub(repos, gated=("gated-org/model",)) as hub:
        yield hub


@pytest.fixture
def mlxd(hub, tmp_path):
    return Mlxd(hub.url, tmp_path / "hf")


def assert_clean_error(result, message):
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_pull_shows_progress_then_ls_lists_the_model(mlxd, hub):
    pulled = mlxd("pull", "qwen2.5-coder:0.5b")
    assert pulled.returncode == 0, pulled.stderr
    assert "Fetching 4 files" in pulled.stderr and "4/4" in pulled.stderr
    assert "qwen2.5-coder:0.5b-4bit is ready" in pulled.stdout
    # Only what mlx-lm loads: no README, no PyTorch weights, no remote code.
    fetched = {
        r.path.rsplit("/", 1)[1]
        for r in hub.requests
        if r.method == "GET" and "/resolve/" in r.path
    }
    assert fetched == {
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    }

    listed = mlxd("ls")
    assert listed.returncode == 0
    header, row = listed.stdout.splitlines()
    assert header.split() == ["NAME", "REPO", "SIZE", "CONTEXT"]
    assert row.split()[:2] == ["qwen2.5-coder:0.5b-4bit", CODER]
    assert row.split()[-1] == "4K"  # from the downloaded config.json, not the catalog


def test_a_dropped_connection_resumes_mid_file_with_a_range_request(
    mlxd, hub, tmp_path
):
    # Past huggingface_hub's 10 MiB read chunk, so the first 10 MiB are kept when the cut comes.
    weights = 12 * 2**20
    hub.repos[CODER] = write_model(tmp_path / "big", weight_bytes=weights)
    hub.cut_next_get("model.safetensors", at=11 * 2**20)
    pulled = mlxd("pull", CODER)
    assert pulled.returncode == 0, pulled.stderr
    assert "Trying to resume download" in pulled.stderr
    assert [r.range for r in hub.gets("model.safetensors")] == [
        None,
        f"bytes={10 * 2**20}-",
    ]
    blob = next(mlxd.cache.glob("models--*/snapshots/*/model.safetensors")).read_bytes()
    assert (
        hashlib.sha256(blob).digest()
        == hashlib.sha256((tmp_path / "big/model.safetensors").read_bytes()).digest()
    )


def test_an_interrupted_pull_is_invisible_and_the_next_pull_completes_it(mlxd, hub):
    hub.cut_next_get("model.safetensors")
    hub.fail_gets("model.safetensors")
    failed = mlxd("pull", "qwen2.5-coder:0.5b")
    assert_clean_error(failed, "pull again to resume")
    assert "no models downloaded" in mlxd("ls").stdout

    hub.heal()
    resumed = mlxd("pull", "qwen2.5-coder:0.5b")
    assert resumed.returncode == 0, resumed.stderr
    assert (
        len(hub.gets("config.json")) == 1
    )  # finished files were kept, not fetched again
    assert "qwen2.5-coder:0.5b-4bit" in mlxd("ls").stdout


def test_pulling_again_downloads_nothing(mlxd, hub):
    assert mlxd("pull", CODER).returncode == 0
    gets = len(hub.gets("model.safetensors"))
    again = mlxd("pull", "qwen2.5-coder:0.5b-4bit")
    assert again.returncode == 0
    assert len(hub.gets("model.safetensors")) == gets


def test_rm(mlxd):
    assert mlxd("pull", CODER).returncode == 0
    removed = mlxd("rm", "qwen2.5-coder:0.5b")
    assert removed.returncode == 0
    assert "removed qwen2.5-coder:0.5b" in removed.stdout
    assert "no models downloaded" in mlxd("ls").stdout
    assert_clean_error(
        mlxd("rm", "qwen2.5-coder:0.5b"), "qwen2.5-coder:0.5b-4bit is not downloaded"
    )


def test_unknown_repo(mlxd):
    assert_clean_error(
        mlxd("pull", "nobody/no-such-model"),
        "nobody/no-such-model was not found on the Hugging Face Hub",
    )


def test_gated_repo(mlxd):
    assert_clean_error(mlxd("pull", "gated-org/model"), "gated-org/model is gated")


def test_a_repo_mlx_lm_cannot_load_is_reported_not_listed(mlxd):
    failed = mlxd("pull", "old-org/model")
    assert_clean_error(
        failed,
        "old-org/model downloaded but is not a loadable MLX model: missing model*.safetensors",
    )
    assert "no models downloaded" in mlxd("ls").stdout


def test_offline_mode(mlxd, hub):
    mlxd.env["HF_HUB_OFFLINE"] = "1"
    assert_clean_error(mlxd("pull", CODER), "offline mode is on (HF_HUB_OFFLINE)")
    assert hub.requests == []


def test_pull_without_progress_prints_nothing(mlxd):
    script = "from mlxd import registry; print(registry.pull('qwen2.5-coder:0.5b', progress=False).name)"
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=mlxd.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        "qwen2.5-coder:0.5b-4bit\n",
        "",
    )


def test_unknown_name_suggests_close_matches(mlxd, hub):
    assert_clean_error(mlxd("pull", "qwen2.5-cder"), "did you mean: qwen2.5-coder")
    assert hub.requests == []


def test_unreachable_hub(tmp_path):
    mlxd = Mlxd(f"http://127.0.0.1:{unused_port()}", tmp_path / "hf")
    assert_clean_error(mlxd("pull", "qwen2.5-coder:0.5b"), "cannot be reached")


def run_in_process(capsys, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="mlxd")
    registry_cli.add_parsers(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_catalog_lists_every_family_and_a_family_lists_its_repos(capsys):
    code, out, _ = run_in_process(capsys, "catalog")
    assert code == 0
    families = [line.split()[0] for line in out.splitlines()[1:]]
    assert families[:3] == ["qwen2.5-coder", "qwen3", "qwen3-coder"]
    assert {"gpt-oss", "starcoder2", "codellama", "glm-4.7-flash"} <= set(families)
    assert "qwen2.5-coder:7b-4bit" in out

    code, out, _ = run_in_process(capsys, "catalog", "qwen2.5-coder")
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    assert len(rows) == 1 + 18
    assert [
        "qwen2.5-coder:32b-bf16",
        "mlx-community/Qwen2.5-Coder-32B-Instruct-bf16",
    ] in rows
    code, _, err = run_in_process(capsys, "catalog", "nope")
    assert code == 1 and "no family 'nope'" in err


@pytest.fixture
def server_with_models():
    """A stand-in for `mlxd serve`'s GET /v1/models."""
    models = {
        "object": "list",
        "data": [
            {"id": "qwen2.5-coder:7b-4bit", "object": "model", "loaded": True,
             "memory_bytes": 4_300_000_000, "idle_seconds": 125.4},
            {"id": "qwen3:8b-4bit", "object": "model", "loaded": False},
        ],
    }  # fmt: skip

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(models).encode() if self.path == "/v1/models" else b"{}"
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_ps_lists_loaded_models(capsys, server_with_models):
    code, out, _ = run_in_process(capsys, "ps", "--port", str(server_with_models))
    assert code == 0
    assert out.splitlines() == [
        "NAME                   MEMORY  IDLE",
        "qwen2.5-coder:7b-4bit  4.3 GB  2m05s",
    ]


def test_ps_without_a_server(capsys):
    port = unused_port()
    code, _, err = run_in_process(capsys, "ps", "--port", str(port))
    assert code == 1
    assert f"no mlxd server answered at http://127.0.0.1:{port}/v1/models" in err
