"""Reading streamed chat chunks the way clients do: shared by the tool-call tests."""

from __future__ import annotations

import json
import re

import pytest

BASH_TOOL = {
    "type": "function",
    "function": {
        "name": "bash",
        "description": "Run a shell command.",
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "string"}},
            "required": ["command"],
        },
    },
}


def tool_deltas(chunks):
    return [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]


def content_of(chunks):
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def finish_reasons(chunks):
    return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


def assembled_calls(chunks) -> dict[int, dict]:
    """Assemble calls the way the OpenAI SDK's helpers and the AI SDK do: by index."""
    calls: dict[int, dict] = {}
    for tc in tool_deltas(chunks):
        call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
        if tc.id:
            call["id"] = tc.id
        if tc.function and tc.function.name:
            call["name"] += tc.function.name
        if tc.function and tc.function.arguments:
            call["arguments"] += tc.function.arguments
    return calls


def assert_first_deltas_announce_calls(chunks):
    seen = set()
    for tc in tool_deltas(chunks):
        if tc.index not in seen:
            seen.add(tc.index)
            assert re.fullmatch(r"[A-Za-z0-9]{9}", tc.id)
            assert tc.type == "function"
            assert tc.function.name
        else:
            assert tc.id is None and not tc.function.name


def assert_arguments_never_complete_early(chunks, index):
    fragments = [tc.function.arguments or "" for tc in tool_deltas(chunks) if tc.index == index]
    for n in range(1, len(fragments)):
        partial = "".join(fragments[:n])
        with pytest.raises(json.JSONDecodeError):
            json.loads(partial)
