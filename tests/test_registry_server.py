"""The server serves pulled models by registry name, and lists exactly the complete downloads.

The fake hub on 127.0.0.1 serves scripted test models through the real
huggingface_hub download code; the server and the CLI run as subprocesses with
HF_ENDPOINT and HF_HOME pointing at it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from scripts.testmodels import build_scripted_model
from tests.ground_truth import GREETING
from tests.fakehub import FakeHub
from tests.server_process import ROOT, ServerProcess

CODER_REPO = "mlx-community/Qwen2.5-Coder-0.5B-Instruct-4bit"
QWEN3_REPO = "mlx-community/Qwen3-0.6B-4bit"
OTHER_REPO = "other-org/tiny-model"  # on the hub, not in the catalog
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    models = tmp_path_factory.mktemp("hub-repos")
    coder = build_scripted_model(models / "coder", GREETING).path
    qwen3 = build_scripted_model(models / "qwen3", "I am Qwen3.").path
    other = build_scripted_model(models / "other", "I am another model.").path
    with FakeHub({CODER_REPO: coder, QWEN3_REPO: qwen3, OTHER_REPO: other}) as hub:
        yield hub


@pytest.fixture(scope="module")
def hf_env(hub, tmp_path_factory) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path_factory.mktemp("hf-home")), HF_HUB_DISABLE_TELEMETRY="1")
    return env


def mlxd(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlxd.server.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def pulled(hub, hf_env):
    """qwen2.5-coder:0.5b pulled completely; qwen3:0.6b left broken mid-download."""
    assert mlxd(hf_env, "pull", "qwen2.5-coder:0.5b").returncode == 0
    hub.cut_next_get("model.safetensors")
    hub.fail_gets("model.safetensors")
    broken = mlxd(hf_env, "pull", "qwen3:0.6b")
    assert broken.returncode == 1 and "Traceback" not in broken.stderr
    hub.heal()
    return hf_env


@pytest.fixture(scope="module")
def registry_server(pulled, tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("registry-logs"), [], env=pulled).start()
    yield server
    server.stop()


def test_models_lists_exactly_the_complete_downloads(registry_server):
    data = registry_server.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["qwen2.5-coder:0.5b-4bit"]
    entry = data[0]
    assert entry["repo"] == CODER_REPO
    assert entry["context_length"] == 32768
    assert entry["size_bytes"] > 0
    assert entry["object"] == "model"


@pytest.mark.parametrize("name", ["qwen2.5-coder:0.5b", "qwen2.5-coder:0.5b-4bit", CODER_REPO, CODER_REPO.upper(),
                                  " QWEN2.5-Coder:0.5b "])
def test_a_pulled_model_is_served_by_any_of_its_names(registry_server, name):
    response = registry_server.client().chat.completions.create(model=name, messages=HELLO, temperature=0)
    assert response.choices[0].message.content == GREETING
    assert response.model == "qwen2.5-coder:0.5b-4bit"
    entry = registry_server.get("/v1/models/qwen2.5-coder:0.5b-4bit").json()
    assert entry["loaded"] is True
    assert entry["memory_bytes"] > 0


@pytest.mark.parametrize(
    "name, hint",
    [
        ("qwen3:0.6b", "mlxd pull qwen3:0.6b"),  # broken download: never served
        ("llama-3.2:3b", "mlxd pull llama-3.2:3b"),  # in the catalog, not downloaded
        ("qwen2.5-codr", "qwen2.5-coder"),  # a typo gets close matches
        ("../../etc", "not served here"),  # names cannot reach outside the store
        ("/etc", "not served here"),
        ("mlx-community/../../x", "not served here"),
    ],
)
def test_models_that_are_not_present_get_404_with_a_hint(registry_server, name, hint):
    response = registry_server.post("/v1/chat/completions", json={"model": name, "messages": HELLO})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert hint in error["message"]


def test_ps_shows_what_the_server_has_loaded(registry_server, pulled):
    registry_server.client().chat.completions.create(model="qwen2.5-coder:0.5b", messages=HELLO, max_tokens=1)
    result = mlxd(pulled, "ps", "--port", str(registry_server.port))
    assert result.returncode == 0, result.stderr
    assert "qwen2.5-coder:0.5b-4bit" in result.stdout


def test_pull_on_demand_only_when_allowed(hub, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1")
    server = ServerProcess(tmp_path, ["--pull", "--no-starter"], env=env).start()
    try:
        response = server.client().chat.completions.create(model="qwen3:0.6b", messages=HELLO, temperature=0)
        assert response.choices[0].message.content == "I am Qwen3."
        assert [m["id"] for m in server.get("/v1/models").json()["data"]] == ["qwen3:0.6b-4bit"]
        # --pull downloads catalog models only: a client cannot make it fetch any repo.
        refused = server.post("/v1/chat/completions", json={"model": OTHER_REPO, "messages": HELLO})
        assert refused.status_code == 404
        assert "downloads only catalog models" in refused.json()["error"]["message"]
        assert not [r for r in hub.requests if OTHER_REPO in r.path]
    finally:
        server.stop()


def test_pull_any_downloads_any_repo_and_matches_its_id_in_any_case(hub, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1")
    start = mlxd(env, "serve", "--model", OTHER_REPO, "--pull")
    assert start.returncode == 2 and "--pull downloads only catalog models" in start.stderr
    server = ServerProcess(tmp_path, ["--pull-any"], env=env).start()
    try:
        for name in (OTHER_REPO, OTHER_REPO.upper()):
            response = server.client().chat.completions.create(model=name, messages=HELLO, temperature=0)
            assert response.choices[0].message.content == "I am another model."
            assert response.model == OTHER_REPO
    finally:
        server.stop()
