"""Streamed tool calls and reasoning through the real server and the real openai client.

Scripted models emit Qwen/Hermes `<tool_call>` JSON (mlx-lm's `json_tools`
format); tests/test_tool_formats.py covers the other formats.
"""

from __future__ import annotations

import json
import re

import pytest

from scripts.testmodels import build_scripted_model
from tests.chat_helpers import (
    assembled_calls,
    assert_arguments_never_complete_early,
    assert_first_deltas_announce_calls,
    content_of,
    finish_reasons,
    tool_deltas,
)
from tests.ground_truth import tokenizer_of
from tests.server_process import ServerProcess

BASH_CALL = '<tool_call>\n{"name": "bash", "arguments": {"command": "echo MARKER-1", "description": "Print a marker"}}\n</tool_call>'
READ_CALL = '<tool_call>\n{"name": "read", "arguments": {"path": "/tmp/notes.txt"}}\n</tool_call>'
SCRIPTS = {
    "one-call": dict(script=BASH_CALL, after_tool_result="The command printed MARKER-1."),
    "two-calls": dict(script=BASH_CALL + "\n" + READ_CALL),
    "text-then-call": dict(script="Let me check that for you.\n" + BASH_CALL),
    "malformed": dict(script='<tool_call>\n{"name": "bash", "arguments": {"command": "echo oops"\n</tool_call>'),
    "garbled": dict(script="<tool_call>\nbash -c 'echo oops'\n</tool_call>"),
    # Models that continue a forced prefix: they write what follows "<tool_call>\n",
    # or what follows '<tool_call>\n{"name": "bash", "arguments": '.
    "after-required": dict(script='{"name": "bash", "arguments": {"command": "echo MARKER-1", "description": "Print a marker"}}\n</tool_call>',
                           prompt_suffix="<tool_call>\n"),
    "after-named": dict(script='{"command": "echo MARKER-1", "description": "Print a marker"}}\n</tool_call>',
                        prompt_suffix='<tool_call>\n{"name": "bash", "arguments": '),
    "thinker": dict(script="<think>I should call a tool.</think>\n" + BASH_CALL, template="qwen3"),
}
MARKUP = ("<tool_call>", "</tool_call>", "<think>", "</think>", "<|im_end|>")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "bash",
            "description": "Run a shell command.",
            "parameters": {
                "$schema": "http://json-schema.org/draft-07/schema#",
                "type": "object",
                "properties": {"command": {"type": "string"}, "description": {"type": "string"}},
                "required": ["command"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "read",
            "description": "Read a file.",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
        },
    },
]
ASK = [{"role": "user", "content": [{"type": "text", "text": "Print the marker."}]}]
BASH_ARGS = {"command": "echo MARKER-1", "description": "Print a marker"}


@pytest.fixture(scope="session")
def tool_models(models_dir):
    return {name: build_scripted_model(models_dir / name, **spec) for name, spec in SCRIPTS.items()}


@pytest.fixture(scope="session")
def tool_server(tmp_path_factory, tool_models):
    args = []
    for model in tool_models.values():
        args += ["--model", str(model.path)]
    server = ServerProcess(tmp_path_factory.mktemp("tool-logs"), args + ["--max-loaded-models", str(len(tool_models))]).start()
    yield server
    server.stop()


def prompt_tokens(model, messages, tools=TOOLS, suffix=""):
    """Ground truth: the template rendered by the model's own tokenizer (+ a forced prefix)."""
    tokenizer = tokenizer_of(model.path)
    flat = [{**m, "content": "".join(p["text"] for p in m["content"])} if isinstance(m.get("content"), list) else m for m in messages]
    text = tokenizer.apply_chat_template(flat, tools=tools, add_generation_prompt=True, tokenize=False)
    return len(tokenizer.encode(text + suffix, add_special_tokens=False))


def stream(server, model, **kwargs):
    kwargs.setdefault("messages", ASK)
    kwargs.setdefault("tools", TOOLS)
    chunks = list(server.client().chat.completions.create(
        model=model, stream=True, stream_options={"include_usage": True}, **kwargs
    ))
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    return chunks, chunks[-1].usage


def assert_no_markup(chunks):
    for c in chunks:
        if c.choices:
            for marker in MARKUP:
                assert marker not in (c.choices[0].delta.content or "")


def test_single_call_streams_as_tool_call_deltas(tool_server, tool_models):
    model = tool_models["one-call"]
    chunks, usage = stream(tool_server, "one-call")
    calls = assembled_calls(chunks)
    assert list(calls) == [0]
    assert calls[0]["name"] == "bash"
    assert json.loads(calls[0]["arguments"]) == BASH_ARGS
    assert_first_deltas_announce_calls(chunks)
    assert_arguments_never_complete_early(chunks, 0)
    assert_no_markup(chunks)
    assert content_of(chunks) == ""
    assert finish_reasons(chunks) == ["tool_calls"]
    assert usage.prompt_tokens == prompt_tokens(model, ASK)
    assert usage.completion_tokens == len(model.script_token_ids) + 1


def test_openai_sdk_stream_helper_assembles_the_call(tool_server):
    with tool_server.client().chat.completions.stream(model="one-call", messages=ASK, tools=TOOLS) as s:
        for _ in s:
            pass
        final = s.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert call.function.name == "bash"
    assert json.loads(call.function.arguments) == BASH_ARGS
    assert final.choices[0].finish_reason == "tool_calls"


def test_two_parallel_calls_get_indexes_0_and_1(tool_server, tool_models):
    chunks, usage = stream(tool_server, "two-calls")
    calls = assembled_calls(chunks)
    assert [calls[i]["name"] for i in sorted(calls)] == ["bash", "read"]
    assert json.loads(calls[1]["arguments"]) == {"path": "/tmp/notes.txt"}
    assert calls[0]["id"] != calls[1]["id"]
    assert_first_deltas_announce_calls(chunks)
    assert finish_reasons(chunks) == ["tool_calls"]
    assert usage.completion_tokens == len(tool_models["two-calls"].script_token_ids) + 1

    chunks, _ = stream(tool_server, "two-calls", parallel_tool_calls=False)
    assert [c["name"] for c in assembled_calls(chunks).values()] == ["bash"]
    assert finish_reasons(chunks) == ["tool_calls"]


def test_text_then_call_keeps_markup_out_of_content(tool_server):
    chunks, _ = stream(tool_server, "text-then-call")
    assert content_of(chunks) == "Let me check that for you."
    assert_no_markup(chunks)
    assert [c["name"] for c in assembled_calls(chunks).values()] == ["bash"]
    assert finish_reasons(chunks) == ["tool_calls"]


def test_non_streaming_message_carries_tool_calls(tool_server, tool_models):
    response = tool_server.client().chat.completions.create(model="text-then-call", messages=ASK, tools=TOOLS)
    message = response.choices[0].message
    assert message.content == "Let me check that for you."
    assert json.loads(message.tool_calls[0].function.arguments) == BASH_ARGS
    assert response.choices[0].finish_reason == "tool_calls"

    response = tool_server.client().chat.completions.create(model="one-call", messages=ASK, tools=TOOLS)
    assert response.choices[0].message.content is None
    assert re.fullmatch(r"[A-Za-z0-9]{9}", response.choices[0].message.tool_calls[0].id)
    assert response.usage.completion_tokens == len(tool_models["one-call"].script_token_ids) + 1


def test_garbled_call_comes_back_as_content_and_is_logged(tool_server):
    chunks, _ = stream(tool_server, "garbled")
    assert tool_deltas(chunks) == []
    assert content_of(chunks) == "<tool_call>\nbash -c 'echo oops'\n</tool_call>"
    assert finish_reasons(chunks) == ["stop"]
    assert "WARNING mlxd.output" in tool_server.log()


def test_malformed_arguments_after_the_name_stay_an_unparseable_call(tool_server):
    # Clients already hold the announced call; it keeps arguments that never parse
    # (opencode reports it back to the model as an invalid call), and it is not
    # counted as a finished call.
    chunks, _ = stream(tool_server, "malformed")
    calls = assembled_calls(chunks)
    assert calls[0]["name"] == "bash"
    with pytest.raises(json.JSONDecodeError):
        json.loads(calls[0]["arguments"])
    assert finish_reasons(chunks) == ["stop"]


def test_call_cut_by_max_tokens_never_vanishes(tool_server):
    # Cut before the name is known: the raw text comes back as content.
    chunks, usage = stream(tool_server, "one-call", max_tokens=2)
    assert tool_deltas(chunks) == [] and content_of(chunks).strip()
    assert finish_reasons(chunks) == ["length"]
    assert usage.completion_tokens == 2
    # Cut inside the arguments: the call was announced, its arguments never parse.
    chunks, _ = stream(tool_server, "one-call", max_tokens=12)
    calls = assembled_calls(chunks)
    assert calls[0]["name"] == "bash"
    with pytest.raises(json.JSONDecodeError):
        json.loads(calls[0]["arguments"])
    assert finish_reasons(chunks) == ["length"]


def test_reasoning_streams_as_reasoning_content_and_is_counted(tool_server, tool_models):
    model = tool_models["thinker"]
    chunks, usage = stream(tool_server, "thinker")
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert reasoning == "I should call a tool."
    assert content_of(chunks) == ""
    assert_no_markup(chunks)
    assert json.loads(assembled_calls(chunks)[0]["arguments"]) == BASH_ARGS
    # Reasoning tokens: <think> through </think>, taken from the script's own ids.
    tokenizer = tokenizer_of(model.path)
    think_end = model.script_token_ids.index(tokenizer.convert_tokens_to_ids("</think>"))
    assert usage.completion_tokens_details.reasoning_tokens == think_end + 1
    assert usage.prompt_tokens == prompt_tokens(model, ASK)

    response = tool_server.client().chat.completions.create(model="thinker", messages=ASK, tools=TOOLS)
    assert response.choices[0].message.model_extra["reasoning_content"] == "I should call a tool."


def test_tool_choice_none_offers_no_tools_and_parses_no_calls(tool_server, tool_models):
    chunks, usage = stream(tool_server, "one-call", tool_choice="none")
    assert tool_deltas(chunks) == []
    assert '"name": "bash"' in content_of(chunks)
    assert finish_reasons(chunks) == ["stop"]
    assert usage.prompt_tokens == prompt_tokens(tool_models["one-call"], ASK, tools=None)


@pytest.mark.parametrize(
    "model_name, tool_choice, prefix",
    [
        ("after-required", "required", "<tool_call>\n"),
        ("after-named", {"type": "function", "function": {"name": "bash"}}, '<tool_call>\n{"name": "bash", "arguments": '),
    ],
)
def test_required_and_named_tool_choice_force_a_call(tool_server, tool_models, model_name, tool_choice, prefix):
    model = tool_models[model_name]
    # Left to itself (auto), this model's text is no call at all.
    chunks, _ = stream(tool_server, model_name)
    assert tool_deltas(chunks) == [] and content_of(chunks)
    # Forced, the prompt ends inside a call and the same text completes it.
    chunks, usage = stream(tool_server, model_name, tool_choice=tool_choice)
    calls = assembled_calls(chunks)
    assert [c["name"] for c in calls.values()] == ["bash"]
    assert json.loads(calls[0]["arguments"]) == BASH_ARGS
    assert content_of(chunks) == ""
    assert finish_reasons(chunks) == ["tool_calls"]
    assert usage.prompt_tokens == prompt_tokens(model, ASK, suffix=prefix)
    assert usage.completion_tokens == len(model.script_token_ids) + 1


def test_history_round_trip_with_tool_results(tool_server, tool_models):
    model = tool_models["one-call"]
    history = ASK + [
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "The user wants the marker.",
            "tool_calls": [{"id": "abc123XYZ", "type": "function",
                            "function": {"name": "bash", "arguments": json.dumps(BASH_ARGS)}}],
        },
        {"role": "tool", "tool_call_id": "abc123XYZ", "content": "MARKER-1\n"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "def456UVW", "type": "function",
                                                             "function": {"name": "invalid", "arguments": "{\"tool\": \"bsh\"}"}}]},
        {"role": "tool", "tool_call_id": "def456UVW", "content": "The arguments provided to the tool are invalid."},
        {"role": "user", "content": "What did it print?"},
    ]
    chunks, usage = stream(tool_server, "one-call", messages=history)
    assert content_of(chunks) == "The command printed MARKER-1."
    assert finish_reasons(chunks) == ["stop"]
    assert usage.completion_tokens == len(model.after_tool_token_ids) + 1
    # Ground truth: the same history with arguments as objects, as the template expects.
    rendered = [dict(m) for m in history]
    for m in rendered:
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        if m.get("content") is None:
            m["content"] = ""
    assert usage.prompt_tokens == prompt_tokens(model, rendered)
