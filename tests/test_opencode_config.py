"""`mlxd opencode`: the provider block for the models in a real HF cache and local directories,
printed or merged into opencode's config.

The cache is filled by huggingface_hub's own snapshot_download from the fake hub. Whether a
model calls tools comes from the catalog for catalog repos (their stub tokenizer is never
read) and from the real tokenizer files otherwise, as the server itself decides.
"""

from __future__ import annotations

import argparse
import json

import pytest
from huggingface_hub import constants, snapshot_download

from mlxd.registry.hub import ALLOW_PATTERNS
from scripts.testmodels import build_tokenizer_files
from mlxd.server.opencode import (
    OpencodeModel,
    add_parser,
    merged_config,
    output_limit,
    provider_block,
    served_models,
)
from tests.fakehub import FakeHub, write_model

CODER = "mlx-community/Qwen2.5-Coder-0.5B-Instruct-4bit"
TINY = "someone/tiny-chat"
PLAIN_TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"


def _chat_model(root, context_length: int, tools: bool):
    """A model directory with a real tokenizer; its template renders tools or not."""
    write_model(root, max_position_embeddings=context_length)
    build_tokenizer_files(root, "chatml")
    if not tools:
        config = json.loads((root / "tokenizer_config.json").read_text())
        (root / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": PLAIN_TEMPLATE}))
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An HF cache holding a catalog repo and a repo the catalog does not know."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    repos = {
        CODER: write_model(tmp_path / "coder", max_position_embeddings=32768),
        TINY: _chat_model(tmp_path / "tiny", 131072, tools=True),
    }
    with FakeHub(repos) as hub:
        for repo in repos:
            snapshot_download(repo, endpoint=hub.url, cache_dir=cache, allow_patterns=ALLOW_PATTERNS)
    return cache


@pytest.fixture
def config_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config" / "opencode"


def mlxd_opencode(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="mlxd")
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["opencode", *argv])
    return args.func(args)


def test_output_limit_is_a_quarter_of_the_window_up_to_opencodes_cap():
    assert output_limit(4096) == 1024
    assert output_limit(32768) == 8192
    assert output_limit(131072) == 32000
    assert output_limit(1_000_000) == 32000


def test_provider_block_is_an_openai_compatible_provider_with_limits():
    models = [OpencodeModel("qwen2.5-coder:7b-4bit", 32768, True), OpencodeModel("plain", 4096, False)]
    assert provider_block(models, "http://127.0.0.1:8080/v1") == {
        "npm": "@ai-sdk/openai-compatible",
        "name": "mlxd",
        "options": {"baseURL": "http://127.0.0.1:8080/v1"},
        "models": {
            "qwen2.5-coder:7b-4bit": {
                "name": "qwen2.5-coder:7b-4bit",
                "tool_call": True,
                "limit": {"context": 32768, "output": 8192},
            },
            "plain": {"name": "plain", "tool_call": False, "limit": {"context": 4096, "output": 1024}},
        },
    }


def test_merge_replaces_only_the_mlxd_provider():
    block = provider_block([OpencodeModel("new", 8192, True)], "http://127.0.0.1:8080/v1")
    user = {
        "theme": "dark",
        "model": "anthropic/claude-sonnet-4",
        "provider": {"ollama": {"npm": "@ai-sdk/openai-compatible"}, "mlxd": {"models": {"old": {}}}},
    }
    merged = merged_config(user, block)
    assert merged["theme"] == "dark"
    assert merged["model"] == "anthropic/claude-sonnet-4"  # the user's choice stands
    assert merged["provider"] == {"ollama": {"npm": "@ai-sdk/openai-compatible"}, "mlxd": block}
    assert user["provider"]["mlxd"] == {"models": {"old": {}}}  # the input is not modified


def test_merge_picks_a_default_model_that_calls_tools_when_there_is_none():
    models = [OpencodeModel("chat-only", 4096, False), OpencodeModel("agent", 32768, True)]
    merged = merged_config({}, provider_block(models, "http://127.0.0.1:8080/v1"))
    assert merged["model"] == "mlxd/agent"
    assert merged["$schema"] == "https://opencode.ai/config.json"


def test_models_come_from_the_cache_and_local_directories(cache, tmp_path):
    plain = _chat_model(tmp_path / "plain-chat", 2048, tools=False)
    assert served_models([str(plain)]) == [
        OpencodeModel("qwen2.5-coder:0.5b-4bit", 32768, True),  # catalog: its family calls tools
        OpencodeModel(TINY, 131072, True),  # detected from the Qwen template
        OpencodeModel("plain-chat", 2048, False),  # named as `serve --model DIR` names it
    ]


def test_print_shows_a_whole_config_and_writes_nothing(cache, config_home, capsys):
    assert mlxd_opencode("--port", "9000") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["$schema"] == "https://opencode.ai/config.json"
    block = printed["provider"]["mlxd"]
    assert block["options"]["baseURL"] == "http://127.0.0.1:9000/v1"
    assert list(block["models"]) == ["qwen2.5-coder:0.5b-4bit", TINY]
    assert printed["model"] == "mlxd/qwen2.5-coder:0.5b-4bit"
    assert not config_home.exists()


def test_write_merges_into_the_users_config_and_backs_it_up(cache, config_home, tmp_path, capsys):
    config_home.mkdir(parents=True)
    old = {"theme": "dark", "provider": {"mlxd": {"models": {"gone": {}}}}}
    (config_home / "opencode.json").write_text(json.dumps(old))
    local = _chat_model(tmp_path / "local-model", 4096, tools=True)

    assert mlxd_opencode("--write", "--model", str(local)) == 0
    config = json.loads((config_home / "opencode.json").read_text())
    assert config["theme"] == "dark"
    assert list(config["provider"]["mlxd"]["models"]) == ["qwen2.5-coder:0.5b-4bit", TINY, "local-model"]
    assert config["model"] == "mlxd/qwen2.5-coder:0.5b-4bit"
    [backup] = config_home.glob("opencode.json.*.bak")
    assert json.loads(backup.read_text()) == old
    assert str(backup) in capsys.readouterr().out


def test_write_refuses_a_config_it_cannot_parse(cache, config_home, capsys):
    config_home.mkdir(parents=True)
    text = '{\n  // my settings\n  "theme": "dark"\n}\n'
    (config_home / "opencode.json").write_text(text)
    assert mlxd_opencode("--write") == 1
    assert "paste" in capsys.readouterr().err
    assert (config_home / "opencode.json").read_text() == text
    assert sorted(p.name for p in config_home.iterdir()) == ["opencode.json"]


def test_no_models_is_an_error_with_a_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    assert mlxd_opencode() == 1
    assert "mlxd pull" in capsys.readouterr().err


def test_a_model_that_is_not_downloaded_is_an_error(cache, capsys):
    assert mlxd_opencode("--model", "qwen3:8b") == 1
    assert "mlxd pull qwen3:8b" in capsys.readouterr().err
