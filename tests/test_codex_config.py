"""`mlxd codex`: Codex's settings for mlxd, printed or merged into $CODEX_HOME/config.toml.

The merge is textual; these tests hold it to its promise: the user's other settings and
comments survive byte for byte, an old mlxd table is replaced, the old file is backed up,
and a file the edit cannot handle is refused and left alone.
"""

from __future__ import annotations

import argparse
import tomllib

import pytest
from huggingface_hub import constants

from mlxd.server.codex import add_parser, merged_toml, settings
from mlxd.server.opencode import OpencodeModel

MODEL = OpencodeModel("qwen2.5-coder:7b", 32768, True)
TOP, PROVIDER = settings(MODEL, "http://127.0.0.1:8080/v1")
USER_CONFIG = """\
# my settings
model = "gpt-5"
approval_policy = "on-request"

[model_providers.mlxd]  # an older mlxd block
name = "old"
base_url = "http://127.0.0.1:1234/v1"

[mcp_servers.docs]
command = "npx"
args = ["-y", "docs-server"]
"""


def mlxd_codex(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="mlxd")
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["codex", *argv])
    return args.func(args)


def test_settings_point_codex_at_the_responses_door_with_the_window():
    assert TOP == {"model": "qwen2.5-coder:7b", "model_provider": "mlxd", "model_context_window": 32768}
    assert PROVIDER == {"name": "mlxd", "base_url": "http://127.0.0.1:8080/v1", "wire_api": "responses",
                        "env_key": "MLXD_API_KEY"}
    assert tomllib.loads(merged_toml("", TOP, PROVIDER)) == {**TOP, "model_providers": {"mlxd": PROVIDER}}


def test_merge_keeps_the_users_settings_and_replaces_the_old_block():
    merged = merged_toml(USER_CONFIG, TOP, PROVIDER)
    config = tomllib.loads(merged)
    assert config == {
        **TOP,
        "approval_policy": "on-request",
        "mcp_servers": {"docs": {"command": "npx", "args": ["-y", "docs-server"]}},
        "model_providers": {"mlxd": PROVIDER},
    }
    for kept in ("# my settings", 'approval_policy = "on-request"', '[mcp_servers.docs]', 'args = ["-y", "docs-server"]'):
        assert kept in merged.splitlines()
    assert "old" not in merged
    assert merged_toml(merged, TOP, PROVIDER) == merged  # a second run changes nothing


def test_a_file_the_edit_cannot_handle_is_refused():
    inline = 'model_providers = { mlxd = { name = "inline" } }\n'
    with pytest.raises(tomllib.TOMLDecodeError):
        merged_toml(inline, TOP, PROVIDER)  # the table would be defined twice


def test_cli_writes_backs_up_and_refuses_broken_files(tmp_path, monkeypatch, greeting_model, capsys):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("CODEX_HOME", str(tmp_path / "codex"))
    path = tmp_path / "codex" / "config.toml"

    assert mlxd_codex("--model", str(greeting_model.path), "--port", "9000") == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed["model"] == "greeter" and printed["model_context_window"] == 32768
    assert printed["model_providers"]["mlxd"]["base_url"] == "http://127.0.0.1:9000/v1"
    assert not path.exists()

    path.parent.mkdir()
    path.write_text(USER_CONFIG)
    assert mlxd_codex("--model", str(greeting_model.path), "--write") == 0
    [backup] = path.parent.glob("config.toml.*.bak")
    assert backup.read_text() == USER_CONFIG
    config = tomllib.loads(path.read_text())
    assert config["model"] == "greeter" and config["mcp_servers"]["docs"]["command"] == "npx"

    path.write_text("model = [unclosed\n")
    assert mlxd_codex("--model", str(greeting_model.path), "--write") == 1
    assert "cannot merge" in capsys.readouterr().err
    assert path.read_text() == "model = [unclosed\n"
