"""The AI SDK (@ai-sdk/openai-compatible, inside opencode too) and openai-node, streaming a
tool-calling chat from a real mlxd.

tests/clients/sdk_check.mjs runs the same two-turn conversation through both SDKs (the
call, then the answer to the tool's result) and prints what each SDK reports. Text and
the assembled call are known from the scripted model; token counts are checked against
ground truth: prompts tokenized here with the model's own tokenizer, completions from
the scripted ids plus the end token, cached tokens from mlxd's own log of each request.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from scripts.testmodels import build_scripted_model
from tests.clients.harness import CLIENTS, logged_requests, node_modules
from tests.ground_truth import ground_truth_prompt_tokens
from tests.server_process import ServerProcess

PROMPT = "What is the weather in Paris?"
TOOL = {
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"],
    },
}
ARGUMENTS = {"city": "Paris", "unit": "celsius"}
CALL = "<tool_call>\n" + json.dumps({"name": TOOL["name"], "arguments": ARGUMENTS}) + "\n</tool_call>"
TOOL_RESULT = "Sunny, 21 C"
ANSWER = "It is sunny in Paris, 21 degrees."
RUN_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def weather_model(tmp_path_factory):
    node_modules()  # skip before building anything when node is missing
    return build_scripted_model(tmp_path_factory.mktemp("sdk-models") / "weather", CALL, after_tool_result=ANSWER)


@pytest.fixture(scope="module")
def server(tmp_path_factory, weather_model):
    server = ServerProcess(tmp_path_factory.mktemp("sdk-logs"), ["--model", str(weather_model.path)]).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def report(server) -> dict:
    """sdk_check.mjs's report, and the usage mlxd logged for its four requests (AI SDK's two first)."""
    spec = {"baseURL": server.base_url + "/v1", "model": "weather", "prompt": PROMPT, "tool": TOOL,
            "toolResult": TOOL_RESULT}
    log_start = len(server.log())
    result = subprocess.run(
        ["node", str(CLIENTS / "sdk_check.mjs"), json.dumps(spec)],
        cwd=CLIENTS,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0, f"sdk_check.mjs failed:\n{result.stdout}\n{result.stderr}"
    logged = logged_requests(server.log()[log_start:])
    assert len(logged) == 4
    return {**json.loads(result.stdout), "logged": logged}


@pytest.fixture(scope="module")
def truth(weather_model) -> dict:
    """Prompt and completion tokens of the two turns, computed without the server."""
    tools = [{"type": "function", "function": TOOL}]
    user = {"role": "user", "content": PROMPT}
    # The template renders neither the call id nor empty content, so these stand for any SDK's messages.
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": TOOL["name"], "arguments": ARGUMENTS}}]}
    result = {"role": "tool", "content": TOOL_RESULT}
    return {
        "prompt": [
            ground_truth_prompt_tokens(weather_model.path, [user], tools),
            ground_truth_prompt_tokens(weather_model.path, [user, call, result], tools),
        ],
        "completion": [len(weather_model.script_token_ids) + 1, len(weather_model.after_tool_token_ids) + 1],
    }


def test_ai_sdk_stream_text_with_a_tool(report, truth):
    first, second = report["aiSdk"]
    [call] = first["toolCalls"]
    assert (call["name"], call["arguments"]) == (TOOL["name"], ARGUMENTS)
    assert call["id"]
    assert (first["text"], first["finishReason"]) == ("", "tool-calls")
    assert (second["text"], second["toolCalls"], second["finishReason"]) == (ANSWER, [], "stop")

    usage = [step["usage"] for step in (first, second)]
    cached = [r.cached_tokens for r in report["logged"][:2]]
    assert [u["inputTokens"] for u in usage] == truth["prompt"]
    assert [u["outputTokens"] for u in usage] == truth["completion"]
    assert [u["cacheReadTokens"] for u in usage] == cached
    assert [u["noCacheTokens"] for u in usage] == [p - c for p, c in zip(truth["prompt"], cached)]
    assert [u["totalTokens"] for u in usage] == [p + c for p, c in zip(truth["prompt"], truth["completion"])]
    assert cached[1] > 0  # the second step reuses the first one's prompt


def test_openai_node_streamed_tool_call_and_usage(report, truth):
    first, second = report["openai"]
    [call] = first["toolCalls"]
    assert (call["name"], call["arguments"]) == (TOOL["name"], ARGUMENTS)
    assert call["id"]
    assert (first["text"], first["finishReason"]) == ("", "tool_calls")
    assert (second["text"], second["toolCalls"], second["finishReason"]) == (ANSWER, [], "stop")

    usage = [turn["usage"] for turn in (first, second)]
    cached = [r.cached_tokens for r in report["logged"][2:]]
    assert [u["prompt_tokens"] for u in usage] == truth["prompt"]
    assert [u["completion_tokens"] for u in usage] == truth["completion"]
    assert [u["prompt_tokens_details"]["cached_tokens"] for u in usage] == cached
    assert [u["total_tokens"] for u in usage] == [p + c for p, c in zip(truth["prompt"], truth["completion"])]
    assert all(c > 0 for c in cached)  # the AI SDK sent the same conversation just before
