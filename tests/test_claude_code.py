"""Claude Code itself, headless, against a real mlxd: a text answer, a Bash tool round trip, thinking.

Claude Code (pinned in tests/clients/claude/package.json; its npm package ships a native
binary, nothing else is downloaded) runs `claude -p` with HOME in a temporary folder and
the environment `mlxd claude` prints, so every model name it sends is one mlxd serves.
Scripted models make the answers known; the usage Claude Code reports must add up to the
usage mlxd logged for its requests (Claude Code sums its requests' usage).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from mlxd.server.claude import environment
from scripts.testmodels import build_scripted_model
from tests.clients.harness import CLIENTS, logged_requests, node_modules
from tests.server_process import ServerProcess

TEXT = "Hello from mlxd, through Claude Code."
# The shell computes the marker, so it can only reach the output if Claude Code ran the command.
COMMAND = "echo mlxd-marker-$((6*7))"
MARKER = "mlxd-marker-42"
BASH_CALL = (
    '<tool_call>\n{"name": "Bash", "arguments": '
    f'{{"command": "{COMMAND}", "description": "Print the marker"}}}}\n</tool_call>'
)
AFTER_TOOL = "The marker is printed. All done."
THOUGHT, ANSWER = "The user wants a greeting.", "Hello, thoughtfully."
_REASONING = re.compile(r"request done \(\w+\): .* completion \d+ tokens \((\d+) reasoning\)")
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def claude() -> Path:
    return node_modules(CLIENTS / "claude") / ".bin" / "claude"


@pytest.fixture(scope="module")
def scripted(claude, tmp_path_factory):
    models = tmp_path_factory.mktemp("claude-models")
    return {
        "texter": build_scripted_model(models / "texter", TEXT),
        "bash-caller": build_scripted_model(models / "bash-caller", BASH_CALL, after_tool_result=AFTER_TOOL),
        "thinker": build_scripted_model(models / "thinker", f"<think>{THOUGHT}</think>\n{ANSWER}", template="qwen3"),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, scripted):
    args = [arg for model in scripted.values() for arg in ("--model", str(model.path))]
    server = ServerProcess(tmp_path_factory.mktemp("claude-logs"), [*args, "--max-loaded-models", "3"]).start()
    yield server
    server.stop()


def run_claude(claude: Path, server, home: Path, model: str, prompt: str, *flags: str) -> str:
    """`claude -p PROMPT --model MODEL` in an empty project, with a fresh HOME; returns its stdout."""
    project = home.parent / "project"
    project.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "DISABLE_AUTOUPDATER": "1",
        **environment(server.base_url, model, "texter", 32768),
    }
    result = subprocess.run(
        [str(claude), "-p", prompt, "--model", model, *flags],
        cwd=project,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0, f"claude failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _assert_usage_is_mlxd_s(usage: dict, server_log: str) -> None:
    """Claude Code's usage is the sum of its requests' usage, as mlxd logged them."""
    logged = logged_requests(server_log)
    assert logged
    assert usage["input_tokens"] == sum(r.prompt_tokens - r.cached_tokens for r in logged)
    assert usage["cache_read_input_tokens"] == sum(r.cached_tokens for r in logged)
    assert usage["cache_creation_input_tokens"] == 0
    assert usage["output_tokens"] == sum(r.completion_tokens for r in logged)


def test_text_answer_with_mlxd_s_usage(claude, server, scripted, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    log_start = len(server.log())
    result = json.loads(run_claude(claude, server, home, "texter", "Say hello", "--output-format", "json"))
    assert result["is_error"] is False and result["result"] == TEXT and result["stop_reason"] == "end_turn"
    _assert_usage_is_mlxd_s(result["usage"], server.log()[log_start:])
    [request] = logged_requests(server.log()[log_start:])
    assert request.completion_tokens == len(scripted["texter"].script_token_ids) + 1  # the end token is sampled too

    # A second session reads the first one's whole prompt (system prompt, 12 tools) from the prefix cache.
    log_start = len(server.log())
    again = json.loads(run_claude(claude, server, home, "texter", "Say hello", "--output-format", "json"))
    _assert_usage_is_mlxd_s(again["usage"], server.log()[log_start:])
    assert again["usage"]["cache_read_input_tokens"] == request.prompt_tokens - 1  # the last token is always fed


def test_bash_tool_round_trip(claude, server, scripted, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    log_start = len(server.log())
    out = run_claude(claude, server, home, "bash-caller", "Print the marker", "--output-format", "stream-json",
                     "--verbose", "--allowedTools", "Bash", "--max-turns", "2")
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    blocks = [(e["type"], b) for e in events if e["type"] in ("assistant", "user") for b in e["message"]["content"]]
    [call] = [b for kind, b in blocks if b["type"] == "tool_use"]
    assert call["name"] == "Bash" and call["input"]["command"] == COMMAND and call["id"].startswith("toolu_")
    [tool_result] = [b for kind, b in blocks if b["type"] == "tool_result"]
    assert tool_result["tool_use_id"] == call["id"] and tool_result["is_error"] is False
    assert tool_result["content"].strip() == MARKER
    assert [b["text"] for kind, b in blocks if b["type"] == "text"] == [AFTER_TOOL]

    [result] = [e for e in events if e["type"] == "result"]
    assert result["is_error"] is False and result["num_turns"] == 2
    log = server.log()[log_start:]
    _assert_usage_is_mlxd_s(result["usage"], log)
    first, second = logged_requests(log)
    model = scripted["bash-caller"]
    assert (first.finish_reason, first.completion_tokens) == ("tool_calls", len(model.script_token_ids) + 1)
    assert (second.finish_reason, second.completion_tokens) == ("stop", len(model.after_tool_token_ids) + 1)
    # The request with the tool result reads the first turn from the prefix cache.
    assert second.cached_tokens >= first.prompt_tokens


def test_thinking_reaches_claude_code_as_a_signed_block(claude, server, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    log_start = len(server.log())
    out = run_claude(claude, server, home, "thinker", "Say hello", "--output-format", "stream-json", "--verbose")
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    blocks = [b for e in events if e["type"] == "assistant" for b in e["message"]["content"]]
    assert [b["type"] for b in blocks] == ["thinking", "text"]
    assert blocks[0]["thinking"] == THOUGHT and blocks[0]["signature"] and blocks[1]["text"] == ANSWER
    [result] = [e for e in events if e["type"] == "result"]
    log = server.log()[log_start:]
    _assert_usage_is_mlxd_s(result["usage"], log)
    assert result["usage"]["output_tokens_details"]["thinking_tokens"] == sum(map(int, _REASONING.findall(log))) > 0
