"""opencode itself, headless, against a real mlxd: a text answer and a bash tool round trip.

opencode (pinned in tests/clients/package.json) runs `opencode run --format json`
with HOME and the XDG directories in a temporary folder, nothing but loopback to
reach, and the provider block `mlxd opencode` writes (`@ai-sdk/openai-compatible`,
which opencode bundles, so nothing is installed at run time). Scripted models make
the answers known; the token counts opencode reports must be the usage mlxd logged.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from huggingface_hub import constants

from scripts.testmodels import build_scripted_model
from mlxd.server.opencode import provider_block, served_models
from tests.clients.harness import logged_requests, node_modules
from tests.server_process import ServerProcess

TEXT = "Hello from mlxd, through opencode."
# The shell computes the marker, so it can only reach the output if opencode ran the command.
COMMAND = "echo mlxd-marker-$((6*7))"
MARKER = "mlxd-marker-42"
BASH_CALL = (
    '<tool_call>\n{"name": "bash", "arguments": '
    f'{{"command": "{COMMAND}", "description": "Print the marker"}}}}\n</tool_call>'
)
AFTER_TOOL = "The marker is printed. All done."
RUN_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def opencode() -> Path:
    return node_modules() / ".bin" / "opencode"


@pytest.fixture(scope="module")
def scripted(opencode, tmp_path_factory):
    models = tmp_path_factory.mktemp("opencode-models")
    return {
        "texter": build_scripted_model(models / "texter", TEXT),
        "bash-caller": build_scripted_model(models / "bash-caller", BASH_CALL, after_tool_result=AFTER_TOOL),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, scripted):
    args = [arg for model in scripted.values() for arg in ("--model", str(model.path))]
    server = ServerProcess(tmp_path_factory.mktemp("opencode-logs"), [*args, "--max-loaded-models", "2"]).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def provider(server, scripted, tmp_path_factory) -> dict:
    """What `mlxd opencode --model DIR...` prints for these models (with an empty HF cache)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty-hub")))
        models = served_models([str(m.path) for m in scripted.values()])
    return provider_block(models, server.base_url + "/v1")


def _environment(home: Path, provider: dict) -> dict:
    """A clean environment: a fresh HOME, and every opencode feature that would go online turned off."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_STATE_HOME": str(home / ".local" / "state"),
        "OPENCODE_DISABLE_MODELS_FETCH": "1",
        "OPENCODE_DISABLE_AUTOUPDATE": "1",
        "OPENCODE_DISABLE_SHARE": "1",
        "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
        "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1",
        "OPENCODE_DISABLE_PROJECT_CONFIG": "1",
        "OPENCODE_DISABLE_CLAUDE_CODE": "1",
        "OPENCODE_CONFIG_CONTENT": json.dumps({"provider": {"mlxd": provider}}),
    }


def _mark_plugin_installed(home: Path, version: str) -> None:
    """opencode npm-installs @opencode-ai/plugin into its config dir in the background
    unless that dir's lock already lists it: list it, so the run stays offline."""
    config_dir = home / ".config" / "opencode"
    (config_dir / "node_modules").mkdir(parents=True)
    lock = {"packages": {"": {"dependencies": {"@opencode-ai/plugin": version}}}}
    (config_dir / "package-lock.json").write_text(json.dumps(lock))


def run_opencode(opencode: Path, provider: dict, tmp_path: Path, model: str, prompt: str) -> list[dict]:
    """`opencode run --format json` in an empty project; returns its JSON events."""
    home, project = tmp_path / "home", tmp_path / "project"
    project.mkdir()
    version = json.loads((opencode.resolve().parent.parent / "package.json").read_text())["version"]
    _mark_plugin_installed(home, version)
    result = subprocess.run(
        [str(opencode), "run", "--format", "json", "--model", f"mlxd/{model}", *prompt.split()],
        cwd=project,
        env=_environment(home, provider),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0, f"opencode failed:\n{result.stdout}\n{result.stderr}"
    assert not (home / ".npm").exists(), "opencode ran an npm install"
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [e for e in events if e["type"] == "error"] == []
    return events


def _parts(events: list[dict], kind: str) -> list[dict]:
    return [e["part"] for e in events if e["type"] == kind]


def _assert_tokens_are_mlxd_usage(steps: list[dict], completions: list[int], server_log: str) -> None:
    """Each step's tokens are one request's usage as mlxd logged it (opencode's
    `input` excludes the cached tokens it reports as `cache.read`)."""
    logged = {(r.prompt_tokens, r.cached_tokens, r.completion_tokens) for r in logged_requests(server_log)}
    assert [s["tokens"]["output"] for s in steps] == completions
    for step in steps:
        tokens = step["tokens"]
        assert tokens["input"] > 0 and tokens["output"] > 0
        usage = (tokens["input"] + tokens["cache"]["read"], tokens["cache"]["read"], tokens["output"])
        assert usage in logged


def test_text_answer(opencode, server, provider, scripted, tmp_path):
    log_start = len(server.log())
    events = run_opencode(opencode, provider, tmp_path, "texter", "Say hello")
    assert [p["text"] for p in _parts(events, "text")] == [TEXT]
    steps = _parts(events, "step_finish")
    assert [s["reason"] for s in steps] == ["stop"]
    completion = len(scripted["texter"].script_token_ids) + 1  # the end token is sampled too
    _assert_tokens_are_mlxd_usage(steps, [completion], server.log()[log_start:])


def test_bash_tool_round_trip(opencode, server, provider, scripted, tmp_path):
    log_start = len(server.log())
    events = run_opencode(opencode, provider, tmp_path, "bash-caller", "Print the marker")
    [call] = _parts(events, "tool_use")
    assert call["tool"] == "bash"
    assert call["state"]["status"] == "completed"
    assert call["state"]["input"]["command"] == COMMAND
    assert call["state"]["output"].strip() == MARKER
    # mlxd's answer to the request that carried the tool result.
    assert [p["text"] for p in _parts(events, "text")] == [AFTER_TOOL]
    steps = _parts(events, "step_finish")
    assert [s["reason"] for s in steps] == ["tool-calls", "stop"]
    model = scripted["bash-caller"]
    completions = [len(model.script_token_ids) + 1, len(model.after_tool_token_ids) + 1]
    _assert_tokens_are_mlxd_usage(steps, completions, server.log()[log_start:])
    # The follow-up reads the first turn's prompt from mlxd's prefix cache, and opencode shows it.
    assert steps[1]["tokens"]["cache"]["read"] > 0
