"""OpenAI's Responses API (`/v1/responses`) through a real `mlxd serve` and the official openai SDK.

Scripted models make every answer known: a text, a function call (and its answer once
the call's output comes back), reasoning then text, a call to a namespaced function.
Every streamed event is checked against the SDK's own event types (pydantic validation,
not just parsing), and usage against the prompt rendered by the model's own tokenizer.
"""

from __future__ import annotations

import json
import typing

import httpx
import pytest
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from scripts.testmodels import build_scripted_model
from tests.ground_truth import GREETING, RANDOM_CONTEXT, ground_truth_prompt_tokens, tokenizer_of
from tests.server_process import ServerProcess

BASH_ARGS = {"command": "echo MARKER-1", "description": "Print a marker"}
BASH_CALL = f'<tool_call>\n{{"name": "bash", "arguments": {json.dumps(BASH_ARGS)}}}\n</tool_call>'
AFTER_TOOL = "The command printed MARKER-1."
CLOSE_CALL = '<tool_call>\n{"name": "multi_agent_v1__close_agent", "arguments": {"target": "agent-7"}}\n</tool_call>'
THOUGHT, ANSWER = "The user wants a greeting.", "Hello there, friend."
SCRIPTS = {
    "caller": dict(script=BASH_CALL, after_tool_result=AFTER_TOOL),
    # Devstral's family: its template wants alternating roles and 9-character call ids.
    "devstral": dict(script=f"[TOOL_CALLS]bash[ARGS]{json.dumps(BASH_ARGS)}", after_tool_result=AFTER_TOOL,
                     template="mistral"),
    "thinker": dict(script=f"<think>{THOUGHT}</think>\n{ANSWER}", template="qwen3"),
    "ns-caller": dict(script=CLOSE_CALL),
}
BASH_TOOL = {
    "type": "function",
    "name": "bash",
    "description": "Run a shell command.",
    "strict": False,
    "parameters": {"type": "object", "properties": {"command": {"type": "string"}, "description": {"type": "string"}},
                   "required": ["command"], "additionalProperties": False},
}
CLOSE_TOOL = {"type": "function", "name": "close_agent", "description": "Close an agent.", "strict": False,
              "parameters": {"type": "object", "properties": {"target": {"type": "string"}}, "required": ["target"]}}
NAMESPACE_TOOL = {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.", "tools": [CLOSE_TOOL]}
WEB_SEARCH = {"type": "web_search", "external_web_access": False}
TERMINAL = ("response.completed", "response.incomplete", "response.failed")
STREAM_EVENT = TypeAdapter(ResponseStreamEvent)
EVENT_CLASSES = typing.get_args(typing.get_args(ResponseStreamEvent)[0])


def chat_tool(tool: dict, name: str | None = None) -> dict:
    """A Responses function tool as the chat template sees it (what the server offers)."""
    function = {"name": name or tool["name"], "description": tool["description"], "parameters": tool["parameters"]}
    return {"type": "function", "function": function}


@pytest.fixture(scope="session")
def scripted(models_dir):
    return {name: build_scripted_model(models_dir / f"responses-{name}", **spec) for name, spec in SCRIPTS.items()}


@pytest.fixture(scope="session")
def server(tmp_path_factory, scripted, greeting_model, random_model):
    args = ["--model", str(greeting_model.path), "--model", str(random_model)]
    for model in scripted.values():
        args += ["--model", str(model.path)]
    # Keep-alive comments every 50 ms: every stream here must parse with them in it.
    server = ServerProcess(tmp_path_factory.mktemp("responses-logs"), [*args, "--max-loaded-models", "6"],
                           env={"MLXD_KEEPALIVE_SECONDS": "0.05"}).start()
    yield server
    server.stop()


def served(name: str) -> str:
    """The name `serve --model DIR` gives a scripted model: its directory's."""
    return f"responses-{name}"


def raw_events(server, body: dict) -> list[dict]:
    """The SSE stream as sent: each `event:` name must match its data's `type`."""
    with httpx.stream("POST", server.base_url + "/v1/responses", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = list(r.iter_lines())
    events, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            event = json.loads(line[len("data: "):])
            assert event["type"] == name
            events.append(event)
    assert_well_formed(events)
    return events


def assert_well_formed(events: list[dict]) -> None:
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert [e["type"] for e in events if e["type"] in TERMINAL] == [events[-1]["type"]]
    for event in events:
        if event["type"] == "response.failed" and event["response"]["error"]["code"] == "context_length_exceeded":
            continue  # OpenAI sends this code; the SDK's literal of failure codes lacks it
        STREAM_EVENT.validate_python(event)  # raises on a missing or mistyped field
    # Every item is added, then done, in output order, and the terminal response holds them all.
    added = [(e["output_index"], e["item"]["id"]) for e in events if e["type"] == "response.output_item.added"]
    done = [(e["output_index"], e["item"]["id"]) for e in events if e["type"] == "response.output_item.done"]
    assert added == done == [(i, item_id) for i, (_, item_id) in enumerate(added)]
    final = events[-1]["response"]
    assert [item["id"] for item in final["output"]] == [item_id for _, item_id in done]


def engine_id(call) -> str:
    """The id the template renders: the engine's own, without the door's `call_` prefix."""
    assert call.call_id.startswith("call_")
    return call.call_id[len("call_"):]


def sdk_events(server, **kwargs) -> list:
    events = list(server.client().responses.create(stream=True, **kwargs))
    assert all(isinstance(e, EVENT_CLASSES) for e in events), [type(e) for e in events]
    return events


def test_text_stream_and_usage(server, greeting_model):
    events = raw_events(server, {"model": "greeter", "input": "Say hello", "instructions": "Be brief."})
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(deltas) == GREETING and len(deltas) > 1
    final = events[-1]
    assert final["type"] == "response.completed" and final["response"]["status"] == "completed"
    [message] = final["response"]["output"]
    assert message["type"] == "message" and message["content"][0]["text"] == GREETING
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
    usage = final["response"]["usage"]
    assert usage["input_tokens"] == ground_truth_prompt_tokens(greeting_model.path, messages)
    assert usage["output_tokens"] == len(greeting_model.script_token_ids) + 1
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["output_tokens_details"]["reasoning_tokens"] == 0

    sdk = sdk_events(server, model="greeter", input="Say hello", instructions="Be brief.")
    assert sdk[-1].type == "response.completed"
    assert sdk[-1].response.output_text == GREETING
    assert sdk[-1].response.usage.input_tokens == usage["input_tokens"]
    # The same prompt again: the prefix cache serves it, and input_tokens still counts it whole.
    assert sdk[-1].response.usage.input_tokens_details.cached_tokens > 0

    whole = server.client().responses.create(model="greeter", input="Say hello", instructions="Be brief.")
    assert whole.output_text == GREETING and whole.status == "completed"
    assert whole.usage.output_tokens == usage["output_tokens"]


def test_function_call_streams_and_its_output_gets_an_answer(server, scripted):
    model = scripted["caller"]
    with server.client().responses.stream(model=served("caller"), input="Print the marker.", tools=[BASH_TOOL]) as s:
        for _ in s:
            pass
        final = s.get_final_response()
    [call] = final.output
    assert call.type == "function_call" and call.name == "bash" and call.status == "completed"
    assert json.loads(call.arguments) == BASH_ARGS
    assert call.call_id.startswith("call_")
    assert final.usage.output_tokens == len(model.script_token_ids) + 1
    messages = [{"role": "user", "content": "Print the marker."}]
    assert final.usage.input_tokens == ground_truth_prompt_tokens(model.path, messages, [chat_tool(BASH_TOOL)])

    # The arguments stream as generated, in more than one piece, and add up to the final ones.
    events = raw_events(server, {"model": served("caller"), "input": "Print the marker.", "tools": [BASH_TOOL]})
    fragments = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    [done] = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert len(fragments) > 1 and "".join(fragments) == done["arguments"] == call.arguments

    # Codex's next turn: the whole history, the call and its output.
    history = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Print the marker."}]},
        {"type": "function_call", "call_id": call.call_id, "name": "bash", "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "MARKER-1\n"},
    ]
    events = sdk_events(server, model=served("caller"), input=history, tools=[BASH_TOOL])
    after = events[-1].response
    assert after.output_text == AFTER_TOOL
    assert after.usage.output_tokens == len(model.after_tool_token_ids) + 1
    truth = messages + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": engine_id(call), "type": "function", "function": {"name": "bash", "arguments": BASH_ARGS}}]},
        {"role": "tool", "tool_call_id": engine_id(call), "content": "MARKER-1\n"},
    ]
    assert after.usage.input_tokens == ground_truth_prompt_tokens(model.path, truth, [chat_tool(BASH_TOOL)])
    assert after.usage.input_tokens_details.cached_tokens > 0  # the first turn's prompt


def test_a_codex_conversation_renders_for_a_strict_template(server, scripted):
    """Codex's two user messages in a row, and its `call_` ids, through Mistral's template."""
    model = scripted["devstral"]
    asked = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
             for text in ("<environment_context/>", "Print the marker.")]
    first = server.client().responses.create(model=served("devstral"), input=asked, tools=[BASH_TOOL])
    [call] = first.output
    assert json.loads(call.arguments) == BASH_ARGS
    history = asked + [
        {"type": "function_call", "call_id": call.call_id, "name": "bash", "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "MARKER-1\n"},
    ]
    after = server.client().responses.create(model=served("devstral"), input=history, tools=[BASH_TOOL])
    assert after.output_text == AFTER_TOOL
    truth = [
        {"role": "user", "content": "<environment_context/>\n\nPrint the marker."},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": engine_id(call), "type": "function", "function": {"name": "bash", "arguments": BASH_ARGS}}]},
        {"role": "tool", "tool_call_id": engine_id(call), "content": "MARKER-1\n"},
    ]
    assert after.usage.input_tokens == ground_truth_prompt_tokens(model.path, truth, [chat_tool(BASH_TOOL)])


def test_reasoning_then_text_with_a_summary(server, scripted):
    model = scripted["thinker"]
    body = {"model": served("thinker"), "input": "Greet me.", "reasoning": {"summary": "auto", "effort": "medium"}}
    events = raw_events(server, body)
    reasoning = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    summary = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_summary_text.delta")
    assert reasoning == summary == THOUGHT
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text.strip() == ANSWER
    thought, message = events[-1]["response"]["output"]
    assert thought["type"] == "reasoning" and thought["content"] == [{"type": "reasoning_text", "text": THOUGHT}]
    assert thought["summary"] == [{"type": "summary_text", "text": THOUGHT}]
    assert message["type"] == "message"
    usage = events[-1]["response"]["usage"]
    think_end = model.script_token_ids.index(tokenizer_of(model.path).convert_tokens_to_ids("</think>"))
    assert usage["output_tokens_details"]["reasoning_tokens"] == think_end + 1
    assert usage["output_tokens"] == len(model.script_token_ids) + 1

    # Without a summary asked for, only the reasoning text streams.
    events = raw_events(server, {**body, "reasoning": {"effort": "low"}})
    assert not [e for e in events if "summary" in e["type"]]

    # The reasoning comes back as history: readable text is kept, encrypted content is skipped.
    history = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Greet me."}]},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": THOUGHT}],
         "encrypted_content": "gAAAA-opaque"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": ANSWER}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Again."}]},
    ]
    again = server.client().responses.create(model=served("thinker"), input=history)
    truth = [{"role": "user", "content": "Greet me."},
             {"role": "assistant", "content": ANSWER, "reasoning_content": THOUGHT},
             {"role": "user", "content": "Again."}]
    assert again.usage.input_tokens == ground_truth_prompt_tokens(model.path, truth)


def test_namespaced_function_is_offered_joined_and_comes_back_split(server, scripted):
    model = scripted["ns-caller"]
    body = {"model": served("ns-caller"), "input": "Close agent 7.", "tools": [BASH_TOOL, NAMESPACE_TOOL, WEB_SEARCH]}
    events = raw_events(server, body)
    [call] = events[-1]["response"]["output"]
    assert (call["namespace"], call["name"]) == ("multi_agent_v1", "close_agent")
    assert json.loads(call["arguments"]) == {"target": "agent-7"}
    # web_search is left out of the prompt: it holds exactly the two functions.
    tools = [chat_tool(BASH_TOOL), chat_tool(CLOSE_TOOL, "multi_agent_v1__close_agent")]
    messages = [{"role": "user", "content": "Close agent 7."}]
    assert events[-1]["response"]["usage"]["input_tokens"] == ground_truth_prompt_tokens(model.path, messages, tools)
    assert server.log().count("tools of type 'web_search' are not offered") == 1
    raw_events(server, body)
    assert server.log().count("tools of type 'web_search' are not offered") == 1


def test_keep_alive_comments_while_a_long_prompt_is_read(server):
    body = {"model": "greeter", "input": "word " * 8000, "max_output_tokens": 2, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/responses", json=body, timeout=120) as r:
        lines = list(r.iter_lines())
    first_delta = next(i for i, line in enumerate(lines) if line == "event: response.output_text.delta")
    assert any(line.startswith(": ping") for line in lines[:first_delta])
    assert [line for line in lines if line.startswith("event: ")][-1] == "event: response.incomplete"


def test_max_output_tokens_ends_incomplete(server):
    events = raw_events(server, {"model": "greeter", "input": "Say hello", "max_output_tokens": 3})
    final = events[-1]
    assert final["type"] == "response.incomplete"
    assert final["response"]["status"] == "incomplete"
    assert final["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["response"]["usage"]["output_tokens"] == 3
    assert final["response"]["output"][0]["status"] == "incomplete"
    assert GREETING.startswith(final["response"]["output"][0]["content"][0]["text"])

    whole = server.client().responses.create(model="greeter", input="Say hello", max_output_tokens=3)
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize("empty", ["", []])
def test_probes_with_empty_input_and_one_token(server, empty):
    events = raw_events(server, {"model": "greeter", "input": empty, "max_output_tokens": 1})
    assert events[-1]["response"]["usage"]["output_tokens"] == 1
    whole = server.post("/v1/responses", json={"model": "greeter", "input": empty, "max_output_tokens": 1})
    assert whole.status_code == 200 and whole.json()["usage"]["output_tokens"] == 1


def test_prompt_longer_than_the_context_fails_with_context_length_exceeded(server, random_model):
    body = {"model": "random-qwen2", "input": "word " * (RANDOM_CONTEXT * 2)}
    events = raw_events(server, body)
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.failed"]
    error = events[-1]["response"]["error"]
    assert error["code"] == "context_length_exceeded"
    prompt = ground_truth_prompt_tokens(random_model, [{"role": "user", "content": body["input"]}])
    assert error["message"].startswith(f"This model's maximum context length is {RANDOM_CONTEXT} tokens, "
                                       f"but the prompt has {prompt} tokens")
    whole = server.post("/v1/responses", json=body)
    assert whole.status_code == 400
    assert (whole.json()["error"]["code"], whole.json()["error"]["param"]) == ("context_length_exceeded", "input")


def test_store_previous_response_id_and_get(server, scripted):
    client = server.client()
    first = client.responses.create(model=served("caller"), input="Print the marker.", tools=[BASH_TOOL], store=True)
    assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
    [call] = first.output
    follow = client.responses.create(
        model=served("caller"), previous_response_id=first.id, tools=[BASH_TOOL],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "MARKER-1\n"}],
    )
    assert follow.output_text == AFTER_TOOL and follow.previous_response_id == first.id
    truth = [{"role": "user", "content": "Print the marker."},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"id": engine_id(call), "type": "function", "function": {"name": "bash", "arguments": BASH_ARGS}}]},
             {"role": "tool", "tool_call_id": engine_id(call), "content": "MARKER-1\n"}]
    model = scripted["caller"]
    assert follow.usage.input_tokens == ground_truth_prompt_tokens(model.path, truth, [chat_tool(BASH_TOOL)])

    unstored = client.responses.create(model="greeter", input="Say hello", store=False)
    for missing in (unstored.id, "resp_nope"):
        response = server.get(f"/v1/responses/{missing}")
        assert response.status_code == 404
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    response = server.post("/v1/responses", json={"model": "greeter", "input": "x", "previous_response_id": "resp_nope"})
    assert response.status_code == 404 and response.json()["error"]["param"] == "previous_response_id"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": "x", "text": {"format": {"type": "json_schema", "name": "o"}}}, "text.format.schema"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
         "input[0].content[0]"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "tools": [BASH_TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0]"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, param):
    response = server.post("/v1/responses", json={"model": "greeter", **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["message"]
    assert server.client().responses.create(model="greeter", input="Say hello").output_text == GREETING


def test_failure_mid_stream_ends_with_response_failed(tmp_path, greeting_model):
    fail_after = 5
    server = ServerProcess(tmp_path, ["--model", str(greeting_model.path)],
                           env={"MLXD_TEST_FAIL_AFTER": str(fail_after)}, module="tests.faulty_server").start()
    try:
        events = raw_events(server, {"model": "greeter", "input": "Say hello"})
        final = events[-1]
        assert final["type"] == "response.failed"
        assert final["response"]["error"]["code"] == "server_error"
        assert "Resource limit exceeded" in final["response"]["error"]["message"]
        assert final["response"]["usage"]["output_tokens"] == fail_after
        assert final["response"]["output"][0]["status"] == "incomplete"
    finally:
        server.stop()
