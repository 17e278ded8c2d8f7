"""OpenAI's Codex CLI itself, headless (`codex exec`), against a real mlxd over /v1/responses.

Codex (pinned in tests/clients/codex/package.json, the npm package ships its binary)
runs with HOME and CODEX_HOME in a temporary folder and the config that `mlxd codex
--write` merges into config.toml. Scripted models make the answers known: a text, and
a call of Codex's shell tool `exec_command` (arguments `{"cmd": ...}`), which Codex runs
(sandbox and approvals off) before it sends the output back for the model's last word,
and a qwen3 model's reasoning, which Codex shows before the answer.
The token count Codex prints must be the usage mlxd logged.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from huggingface_hub import constants

from scripts.testmodels import build_scripted_model
from mlxd.server.codex import ENV_KEY, chosen_model, settings, write_config
from tests.clients.harness import CODEX, logged_requests, node_modules
from tests.server_process import ServerProcess

TEXT = "Hello from mlxd, through Codex."
# The shell computes the marker, so it can only reach the file if Codex ran the command.
COMMAND = "echo mlxd-marker-$((6*7)) > marker.txt"
MARKER = "mlxd-marker-42"
EXEC_CALL = f'<tool_call>\n{{"name": "exec_command", "arguments": {json.dumps({"cmd": COMMAND})}}}\n</tool_call>'
AFTER_TOOL = "The marker file is written."
THOUGHT, ANSWER = "The user wants a greeting.", "Hello, thinking done."
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def codex() -> Path:
    return node_modules(CODEX) / ".bin" / "codex"


@pytest.fixture(scope="module")
def scripted(codex, tmp_path_factory):
    models = tmp_path_factory.mktemp("codex-models")
    return {
        "codex-texter": build_scripted_model(models / "codex-texter", TEXT),
        "codex-runner": build_scripted_model(models / "codex-runner", EXEC_CALL, after_tool_result=AFTER_TOOL),
        "codex-thinker": build_scripted_model(models / "codex-thinker", f"<think>{THOUGHT}</think>\n{ANSWER}",
                                              template="qwen3"),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, scripted):
    args = [arg for model in scripted.values() for arg in ("--model", str(model.path))]
    server = ServerProcess(tmp_path_factory.mktemp("codex-logs"), [*args, "--max-loaded-models", "3"]).start()
    yield server
    server.stop()


def run_codex(codex: Path, server, model: Path, tmp_path: Path, prompt: str, *flags: str):
    """`codex exec` in an empty project, configured as `mlxd codex --model DIR --write` configures it."""
    home, project = tmp_path / "home", tmp_path / "project"
    project.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "CODEX_HOME": str(home / ".codex"), ENV_KEY: "mlxd"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
        patch.setenv("CODEX_HOME", env["CODEX_HOME"])
        top, provider = settings(chosen_model(str(model)), server.base_url + "/v1")
        write_config(home / ".codex" / "config.toml", top, provider)
    result = subprocess.run(
        [str(codex), "exec", "--skip-git-repo-check", *flags, prompt],
        cwd=project, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0, f"codex failed:\n{result.stdout}\n{result.stderr}"
    return result, project


def tokens_used(stderr: str) -> int:
    lines = stderr.splitlines()
    return int(lines[lines.index("tokens used") + 1].replace(",", ""))


def codex_total(requests) -> int:
    """Codex's "tokens used": the turn's input tokens not read from the cache, plus its output tokens."""
    return sum(r.prompt_tokens - r.cached_tokens + r.completion_tokens for r in requests)


def test_text_answer_and_its_token_count(codex, server, scripted, tmp_path):
    log_start = len(server.log())
    result, _ = run_codex(codex, server, scripted["codex-texter"].path, tmp_path, "Say hello")
    assert result.stdout.strip() == TEXT
    [request] = logged_requests(server.log()[log_start:])
    assert request.completion_tokens == len(scripted["codex-texter"].script_token_ids) + 1
    assert tokens_used(result.stderr) == codex_total([request])


def test_exec_command_runs_and_its_output_goes_back(codex, server, scripted, tmp_path):
    log_start = len(server.log())
    result, project = run_codex(codex, server, scripted["codex-runner"].path, tmp_path, "Write the marker",
                                "--dangerously-bypass-approvals-and-sandbox")
    assert (project / "marker.txt").read_text().strip() == MARKER
    assert result.stdout.strip() == AFTER_TOOL  # the answer to the request that carried the command's output
    model = scripted["codex-runner"]
    requests = logged_requests(server.log()[log_start:])
    assert [r.completion_tokens for r in requests] == [len(model.script_token_ids) + 1,
                                                      len(model.after_tool_token_ids) + 1]
    assert [r.finish_reason for r in requests] == ["tool_calls", "stop"]
    assert requests[1].cached_tokens > 0  # the follow-up reads the first turn from the prefix cache
    assert tokens_used(result.stderr) == codex_total(requests)


def test_reasoning_is_shown_as_thinking(codex, server, scripted, tmp_path):
    log_start = len(server.log())
    result, _ = run_codex(codex, server, scripted["codex-thinker"].path, tmp_path, "Greet me")
    assert result.stdout.strip() == ANSWER
    lines = result.stderr.splitlines()
    assert lines.count(THOUGHT) == 1 and lines.index(THOUGHT) < lines.index("codex")  # once, before the answer
    [request] = logged_requests(server.log()[log_start:])
    assert tokens_used(result.stderr) == codex_total([request])
