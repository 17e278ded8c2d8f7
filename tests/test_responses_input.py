"""Responses input items and tools -> the engine's messages and functions (pure functions).

The item shapes are the ones Codex 0.169 sends (logged from the real CLI); the
end-to-end tests in test_responses.py and test_codex.py run them through a server.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxd.api.openai.responses_input import (
    InputError,
    joined_name,
    messages_of,
    offered_tools,
    template_call_id,
    translate,
)
from mlxd.api.openai.responses_protocol import ResponsesRequest
from mlxd.server.requests import ModelRef

REF = ModelRef("m", Path("/nowhere"))


def text(role: str, value: str, kind: str = "input_text") -> dict:
    return {"type": "message", "role": role, "content": [{"type": kind, "text": value}]}


def test_a_codex_turn_becomes_chat_messages():
    items = [
        text("developer", "You are Codex."),
        text("developer", "<skills>...</skills>"),
        text("user", "<environment_context/>"),
        text("user", "Fix the bug."),
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "short"}],
         "content": [{"type": "reasoning_text", "text": "Look at the file first."}], "encrypted_content": None},
        text("assistant", "Reading it.", "output_text"),
        {"type": "function_call", "call_id": "call_1", "name": "exec_command", "arguments": '{"cmd": "cat a.py"}'},
        {"type": "function_call", "call_id": "call_2", "name": "close_agent", "namespace": "multi_agent_v1",
         "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "print(1)"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "closed"}]},
        {"type": "reasoning", "summary": [], "encrypted_content": "gAAAA-opaque"},
        {"type": "web_search_call", "status": "completed", "action": {"type": "search"}},
        text("assistant", "Done.", "output_text"),
    ]
    assert messages_of("Be careful.", items) == [
        {"role": "system", "content": "Be careful.\n\nYou are Codex.\n\n<skills>...</skills>"},
        {"role": "user", "content": "<environment_context/>\n\nFix the bug."},
        {"role": "assistant", "content": "Reading it.", "reasoning_content": "Look at the file first.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "exec_command", "arguments": '{"cmd": "cat a.py"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "multi_agent_v1__close_agent", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "print(1)"},
        {"role": "tool", "tool_call_id": "call_2", "content": "closed"},
        {"role": "assistant", "content": "Done."},
    ]


def test_reasoning_summary_is_kept_when_there_is_no_reasoning_text():
    items = [text("user", "hi"), {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Greeting."}]},
             text("assistant", "Hello.", "output_text"), text("developer", "Later note.")]
    assert messages_of(None, items) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello.", "reasoning_content": "Greeting."},
        {"role": "system", "content": "Later note."},
    ]


def test_tools_namespaces_joined_and_built_ins_left_out():
    tools = [
        {"type": "function", "name": "exec_command", "description": "Run.", "strict": False,
         "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}},
        {"type": "namespace", "name": "multi_agent_v1", "description": "Agents.",
         "tools": [{"type": "function", "name": "spawn_agent", "parameters": {"type": "object"}}]},
        {"type": "web_search", "external_web_access": False},
        {"type": "custom", "name": "apply_patch", "format": {"type": "grammar"}},
    ]
    functions, namespaced = offered_tools(tools)
    assert [f["function"]["name"] for f in functions] == ["exec_command", "multi_agent_v1__spawn_agent"]
    assert functions[0]["function"] == {"name": "exec_command", "description": "Run.",
                                        "parameters": tools[0]["parameters"]}
    assert namespaced == {"multi_agent_v1__spawn_agent": ("multi_agent_v1", "spawn_agent")}


def test_this_doors_call_ids_reach_the_template_as_the_engines_own():
    items = [text("user", "hi"),
             {"type": "function_call", "call_id": "call_abc123XYZ", "name": "f", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "call_abc123XYZ", "output": "ok"}]
    _, assistant, tool = messages_of(None, items)
    assert assistant["tool_calls"][0]["id"] == tool["tool_call_id"] == "abc123XYZ"
    assert template_call_id("toolu_01ABC") == "toolu_01ABC"  # another client's id stays as it came
    assert template_call_id("call_1") == "call_1"


def test_names_are_joined_the_way_codex_flattens_them():
    assert joined_name("multi_agent_v1", "spawn_agent") == "multi_agent_v1__spawn_agent"
    assert joined_name("mcp__docs__", "search") == "mcp__docs__search"  # an MCP namespace keeps one delimiter
    assert joined_name("ns_", "_f") == "ns__f"


def test_translate_sets_the_door_limits_and_tool_choice():
    body = ResponsesRequest(model="m", input="", max_output_tokens=1, temperature=0.2,
                            tools=[{"type": "namespace", "name": "ns", "tools": [{"type": "function", "name": "f"}]}],
                            tool_choice={"type": "function", "name": "f", "namespace": "ns"})
    translated = translate(body, REF, [], "resp_1")
    request = translated.generation
    assert request.door == "responses" and request.request_id == "resp_1"
    assert request.messages == [{"role": "user", "content": ""}]  # a probe with no input still renders
    assert request.max_tokens == 1 and request.sampling.temperature == 0.2
    assert request.tool_choice == {"type": "function", "function": {"name": "ns__f"}}
    assert translated.items == []
    assert translate(ResponsesRequest(model="m", input="x"), REF, [], "r").generation.tool_choice == "none"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"text": {"format": {"type": "json_schema", "name": "o"}}}, "text.format.schema"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0]"),
        ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "web_search"}}, "tool_choice"),
    ],
)
def test_what_this_door_cannot_read_is_a_named_error(fields, param):
    with pytest.raises(InputError) as error:
        translate(ResponsesRequest(model="m", **{"input": "x", **fields}), REF, [], "r")
    assert error.value.param == param
