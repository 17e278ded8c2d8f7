"""The Messages door's pure parts: request translation, the event writer, late system
messages in templates that refuse or drop them, `--alias` and `mlxd claude`.
tests/test_anthropic_messages.py drives the same code through a real server."""

from __future__ import annotations

import json
import shlex

import pytest
from mlx_lm.utils import load_tokenizer

from mlxd.api.anthropic.messages import MessageWriter, engine_error_response, stop_reason, system_messages, to_generation_request
from mlxd.api.anthropic.protocol import CountTokensRequest, TextBlock
from mlxd.server.claude import environment, parse_aliases, script, serve_command
from mlxd.server.errors import QueueFull
from mlxd.server.events import ContentDelta, Finish, ReasoningDelta, ToolCallArguments, ToolCallStart, Usage
from mlxd.server.prompt import build_prompt, late_system_as_user
from mlxd.server.requests import Accepted, ModelRef
from scripts.testmodels import build_tokenizer_files

REF = ModelRef("m", path=None)
BILLING = {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.328.593; cc_entrypoint=sdk-cli;"}


def _request(**body) -> dict:
    return to_generation_request(CountTokensRequest(model="m", **body), REF).__dict__


def test_the_billing_header_is_dropped_and_system_blocks_join():
    blocks = [BILLING, {"type": "text", "text": "You are Claude Code."}, {"type": "text", "text": "Be brief."}]
    request = CountTokensRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 "system": blocks})
    assert system_messages(request.system) == [{"role": "system", "content": "You are Claude Code.\n\nBe brief."}]
    assert system_messages(BILLING["text"] + "\nYou are Claude Code.") == [
        {"role": "system", "content": "You are Claude Code."}]
    assert system_messages("Later text mentioning x-anthropic-billing-header: stays.") == [
        {"role": "system", "content": "Later text mentioning x-anthropic-billing-header: stays."}]
    assert system_messages([TextBlock(**BILLING)]) == [] == system_messages(None)


def test_messages_become_the_engine_s_neutral_shape():
    request = _request(
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "List files.", "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "I should run ls.", "signature": "abc"},
                {"type": "text", "text": "Running ls."},
                {"type": "tool_use", "id": "toolu_a1b2c3d4e", "name": "Bash", "input": {"command": "ls"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_a1b2c3d4e", "content": [{"type": "text", "text": "a.txt"}]},
                {"type": "text", "text": "<system-reminder>be brief</system-reminder>"},
            ]},
            {"role": "system", "content": "# Environment"},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "is_error": True,
                                          "content": "no such file"}]},
        ],
        tools=[{"name": "Bash", "description": "Run a command.", "input_schema": {"type": "object"}},
               {"type": "web_search_20250305", "name": "web_search"}],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        thinking={"type": "adaptive"},
    )
    assert request["messages"] == [
        {"role": "user", "content": "List files."},
        {"role": "assistant", "content": "Running ls.", "reasoning_content": "I should run ls.",
         "tool_calls": [{"id": "a1b2c3d4e", "type": "function",
                         "function": {"name": "Bash", "arguments": json.dumps({"command": "ls"})}}]},
        {"role": "tool", "tool_call_id": "a1b2c3d4e", "content": "a.txt"},
        {"role": "user", "content": "<system-reminder>be brief</system-reminder>"},
        {"role": "system", "content": "# Environment"},
        {"role": "tool", "tool_call_id": "x", "content": "Error: no such file"},
    ]
    # Server tools (web search) run at Anthropic: not offered to a local model.
    assert request["tools"] == [{"type": "function", "function": {
        "name": "Bash", "description": "Run a command.", "parameters": {"type": "object"}}}]
    assert request["tool_choice"] == "required" and request["parallel_tool_calls"] is False
    assert request["thinking"] is True and request["door"] == "messages"


@pytest.mark.parametrize("choice, expected", [
    (None, "auto"), ({"type": "auto"}, "auto"), ({"type": "none"}, "none"),
    ({"type": "tool", "name": "Bash"}, {"type": "function", "function": {"name": "Bash"}}),
])
def test_tool_choice(choice, expected):
    tools = [{"name": "Bash", "input_schema": {"type": "object"}}]
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": tools}
    if choice:
        body["tool_choice"] = choice
    assert _request(**body)["tool_choice"] == expected
    assert _request(messages=body["messages"])["tool_choice"] == "none"  # no tools: nothing to choose
    assert _request(messages=body["messages"], thinking={"type": "disabled"})["thinking"] is False
    assert _request(messages=body["messages"])["thinking"] is None  # the template's default


def test_the_writer_opens_and_closes_blocks_in_order():
    writer = MessageWriter("msg_1", "claude-haiku-4-5", Accepted("m", prompt_tokens=100, cached_tokens=60))
    start = writer.start()
    assert start["message"]["usage"] == {"input_tokens": 40, "cache_creation_input_tokens": 0,
                                         "cache_read_input_tokens": 60, "output_tokens": 0}
    events = writer.events([ReasoningDelta("Hm"), ReasoningDelta("m."), ContentDelta("Let me look.")])
    events += writer.events([ToolCallStart(0, "abc", "Bash"), ToolCallArguments(0, '{"command"'),
                             ToolCallArguments(0, ': "ls"}'), ToolCallStart(1, "def", "Read"),
                             ToolCallArguments(1, "{}")])
    events += writer.finish(Finish("tool_calls", Usage(prompt_tokens=100, cached_tokens=60, completion_tokens=9)))
    spelled = [(e["type"], e.get("index"), (e.get("delta") or e.get("content_block") or {}).get("type")) for e in events]
    assert spelled == [
        ("content_block_start", 0, "thinking"), ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "thinking_delta"), ("content_block_delta", 0, "signature_delta"),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, "text"), ("content_block_delta", 1, "text_delta"), ("content_block_stop", 1, None),
        ("content_block_start", 2, "tool_use"), ("content_block_delta", 2, "input_json_delta"),
        ("content_block_delta", 2, "input_json_delta"), ("content_block_stop", 2, None),
        ("content_block_start", 3, "tool_use"), ("content_block_delta", 3, "input_json_delta"),
        ("content_block_stop", 3, None),
        ("message_delta", None, None), ("message_stop", None, None),
    ]
    assert events[8]["content_block"] == {"type": "tool_use", "id": "toolu_abc", "name": "Bash", "input": {}}
    assert events[-2]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[-2]["usage"]["output_tokens"] == 9 and events[-2]["usage"]["input_tokens"] == 40


@pytest.mark.parametrize("finish, expected", [
    (Finish("stop", Usage()), "end_turn"), (Finish("length", Usage()), "max_tokens"),
    (Finish("tool_calls", Usage()), "tool_use"), (Finish("stop", Usage(), "END"), "stop_sequence"),
])
def test_stop_reasons(finish, expected):
    assert stop_reason(finish) == expected


def test_a_full_queue_is_overloaded_on_anthropic_s_door():
    response = engine_error_response(QueueFull(retry_after=2))
    assert response.status_code == 529 and json.loads(response.body)["error"]["type"] == "overloaded_error"
    assert response.headers["retry-after"] == "2"


LATE = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi."},
    {"role": "assistant", "content": "Hello."},
    {"role": "system", "content": "The user prefers short answers."},
    {"role": "user", "content": "Tell me more."},
]


def test_late_system_messages_become_marked_user_turns_in_place():
    assert late_system_as_user(LATE) == [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "<system>\nThe user prefers short answers.\n</system>\n\nTell me more."},
    ]


@pytest.mark.parametrize("template", ["mistral-small-3.2", "gpt-oss", "chatml"])
def test_templates_that_refuse_or_drop_a_late_system_message_still_read_it_in_place(tmp_path, template):
    family = {"mistral-small-3.2": "mistral", "gpt-oss": "harmony", "chatml": "chatml"}[template]
    build_tokenizer_files(tmp_path, family)
    tokenizer = load_tokenizer(tmp_path)
    text = tokenizer.decode(build_prompt(tokenizer, LATE).tokens)
    # Mistral refuses it (roles must alternate); gpt-oss silently drops it; chatml renders it as a system turn.
    assert text.index("Hello.") < text.index("The user prefers short answers.") < text.index("Tell me more.")


def test_parse_aliases():
    served = {"/models/qwen-small": "qwen-small"}
    assert parse_aliases(["claude-haiku-4-5=/models/qwen-small", "sonnet = qwen2.5-coder:7b"], served) == {
        "claude-haiku-4-5": "qwen-small", "sonnet": "qwen2.5-coder:7b"}
    for bad in ("claude-haiku-4-5", "=x", "x="):
        with pytest.raises(ValueError, match="NAME=MODEL"):
            parse_aliases([bad], served)


def test_mlxd_claude_prints_an_environment_a_shell_can_eval():
    env = environment("http://127.0.0.1:8080", "qwen2.5-coder:7b", "qwen2.5-coder:1.5b", 32768)
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:8080" and env["ANTHROPIC_AUTH_TOKEN"]
    assert env["ANTHROPIC_MODEL"] == env["ANTHROPIC_DEFAULT_SONNET_MODEL"] == "qwen2.5-coder:7b"
    assert env["ANTHROPIC_DEFAULT_HAIKU_MODEL"] == env["ANTHROPIC_SMALL_FAST_MODEL"] == "qwen2.5-coder:1.5b"
    assert env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    serve = serve_command("qwen2.5-coder:7b", "qwen2.5-coder:1.5b", "127.0.0.1", 9000)
    assert serve == ["mlxd", "serve", "--model", "qwen2.5-coder:7b", "--model", "qwen2.5-coder:1.5b",
                     "--max-loaded-models", "2", "--port", "9000"]
    exported = {}
    for line in script(env, serve).splitlines():
        if not line.startswith("#"):
            key, value = line.removeprefix("export ").split("=", 1)
            exported[key] = shlex.split(value)[0]
    assert exported == env
