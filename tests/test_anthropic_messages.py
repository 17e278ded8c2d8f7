"""Anthropic's Messages API through a real `mlxd serve` and the official `anthropic` SDK.

Scripted models make every answer known: text, a tool call, reasoning (Qwen3's
`<think>`). Every streamed event is validated against the SDK's own event types,
and usage is checked against the prompt tokenized outside the server.
"""

from __future__ import annotations

import json
import subprocess
import sys

import anthropic
import httpx
import pytest
from anthropic.types import RawMessageStreamEvent
from pydantic import TypeAdapter

from scripts.testmodels import build_scripted_model
from tests.ground_truth import tokenizer_of
from tests.server_process import ServerProcess, downloaded

TEXT = "Hello from mlxd, through the Messages API."
WEATHER_ARGS = {"city": "Paris", "units": "celsius"}
WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps(WEATHER_ARGS) + "}\n</tool_call>"
AFTER_TOOL = "It is sunny in Paris."
THOUGHT = "The user wants the answer."
ANSWER = "The answer is 42."
SMALL_CONTEXT = 96

TOOLS = [{
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "units": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"],
    },
}]
ASK = [{"role": "user", "content": "Say hello."}]
BILLING = "x-anthropic-billing-header: cc_version=2.1.328.{}; cc_entrypoint=sdk-cli;"
SYSTEM = "You are a careful assistant. " * 20
_EVENTS = TypeAdapter(RawMessageStreamEvent)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("anthropic-models")
    return {
        "texter": build_scripted_model(root / "texter", TEXT),
        "weather": build_scripted_model(root / "weather", WEATHER_CALL, after_tool_result=AFTER_TOOL),
        "thinker": build_scripted_model(root / "thinker", f"<think>{THOUGHT}</think>\n{ANSWER}", template="qwen3"),
        "tiny": build_scripted_model(root / "tiny", TEXT, context_length=SMALL_CONTEXT),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, models):
    args = [arg for model in models.values() for arg in ("--model", str(model.path))]
    server = ServerProcess(
        tmp_path_factory.mktemp("anthropic-logs"),
        [*args, "--max-loaded-models", "4", "--alias", f"claude-haiku-4-5={models['texter'].path}"],
        env={"MLXD_KEEPALIVE_SECONDS": "0.05"},
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key="mlxd", max_retries=0, timeout=120)


def raw_events(server, body: dict, pings: list | None = None) -> list[dict]:
    """The SSE events of a streamed request, each checked against the SDK's event types
    and against its `event:` line; pings go to `pings` (with how many events came before each)."""
    events, name = [], None
    with httpx.stream("POST", server.base_url + "/v1/messages", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
                assert data["type"] == name
                if name == "ping":
                    assert data == {"type": "ping"}
                    if pings is not None:
                        pings.append(len(events))
                    continue
                if name != "error":
                    _EVENTS.validate_python(data)
                events.append(data)
    return events


def assert_well_formed(events: list[dict]) -> None:
    """message_start, then blocks opened and closed in index order, message_delta, message_stop."""
    types = [e["type"] for e in events]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    open_index, next_index = None, 0
    for e in events[1:-2]:
        if e["type"] == "content_block_start":
            assert open_index is None and e["index"] == next_index
            open_index, next_index = e["index"], next_index + 1
        elif e["type"] == "content_block_delta":
            assert e["index"] == open_index
        else:
            assert e["type"] == "content_block_stop" and e["index"] == open_index
            open_index = None
    assert open_index is None


def blocks(events: list[dict]) -> list[tuple[str, str]]:
    """(block type, concatenated delta text) per content block."""
    out = []
    for e in events:
        if e["type"] == "content_block_start":
            out.append([e["content_block"]["type"], ""])
        elif e["type"] == "content_block_delta":
            d = e["delta"]
            out[-1][1] += d.get("text") or d.get("thinking") or d.get("partial_json") or ""
    return [tuple(b) for b in out]


def prompt_length(model, messages: list[dict], tools=None, **kwargs) -> int:
    """The prompt's token count, rendered and tokenized by transformers, not by mlxd."""
    ids = tokenizer_of(model.path).apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False, **kwargs
    )
    return len(ids)


def count(client, **body) -> int:
    return client.messages.count_tokens(**body).input_tokens


def test_streamed_text_with_the_usage_split_anthropic_s_way(server, client, models):
    body = {"model": "texter", "max_tokens": 200, "messages": ASK}
    events = raw_events(server, body)
    assert_well_formed(events)
    assert blocks(events) == [("text", TEXT)]
    start, delta = events[0]["message"], events[-2]
    assert start["content"] == [] and start["stop_reason"] is None and start["model"] == "texter"
    assert start["id"].startswith("msg_")
    prompt = prompt_length(models["texter"], ASK)
    # message_start already carries the real input count; the three input fields add up to the prompt.
    usage = start["usage"]
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] + usage["cache_creation_input_tokens"] == prompt
    assert usage["cache_creation_input_tokens"] == 0
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == len(models["texter"].script_token_ids) + 1  # and the end token
    assert delta["usage"]["output_tokens_details"] == {"thinking_tokens": 0}
    assert delta["usage"]["input_tokens"] == usage["input_tokens"]
    assert delta["usage"]["cache_read_input_tokens"] == usage["cache_read_input_tokens"]
    assert count(client, model="texter", messages=ASK) == prompt

    # The SDK assembles the same message.
    with client.messages.stream(model="texter", max_tokens=200, messages=ASK) as stream:
        streamed = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert streamed == TEXT and message.content[0].text == TEXT
    assert message.stop_reason == "end_turn"
    u = message.usage
    assert u.input_tokens + u.cache_read_input_tokens == prompt
    assert u.cache_read_input_tokens > 0  # the same prompt again: read from the prefix cache


def test_pings_keep_the_stream_alive_while_a_long_prompt_is_read(server, client):
    # ~8k prompt tokens take far longer to read than the test server's 0.05 s ping interval.
    long = [{"role": "user", "content": "Pings keep this stream alive. " + "lorem ipsum dolor " * 2000}]
    pings = []
    events = raw_events(server, {"model": "texter", "max_tokens": 200, "messages": long}, pings)
    assert_well_formed(events)
    assert blocks(events) == [("text", TEXT)]
    assert pings and pings[0] == 1  # the first ping came after message_start, before any content


def test_a_streamed_tool_call_and_its_result(server, client, models):
    body = {"model": "weather", "max_tokens": 200, "tools": TOOLS,
            "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    events = raw_events(server, body)
    assert_well_formed(events)
    [start] = [e for e in events if e["type"] == "content_block_start"]
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["name"] == "get_weather"
    assert start["content_block"]["id"].startswith("toolu_") and start["content_block"]["input"] == {}
    fragments = [e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"]
    assert len(fragments) > 1  # streamed as generated, not whole at the end
    assert json.loads("".join(fragments)) == WEATHER_ARGS
    assert events[-2]["delta"]["stop_reason"] == "tool_use"

    with client.messages.stream(**body) as stream:
        message = stream.get_final_message()
    [call] = message.content
    assert call.type == "tool_use" and call.input == WEATHER_ARGS and call.id.startswith("toolu_")
    assert message.stop_reason == "tool_use"

    # The tool result goes back; the model's second script answers, reading the first turn from cache.
    follow_up = body["messages"] + [
        {"role": "assistant", "content": [c.model_dump(exclude_none=True) for c in message.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 24 C"}]},
    ]
    answer = client.messages.create(model="weather", max_tokens=200, tools=TOOLS, messages=follow_up)
    assert answer.content[0].text == AFTER_TOOL and answer.stop_reason == "end_turn"
    assert answer.usage.cache_read_input_tokens > 0
    assert answer.usage.input_tokens + answer.usage.cache_read_input_tokens == count(
        client, model="weather", tools=TOOLS, messages=follow_up
    )


def test_tool_choice_none_hides_the_tools(client, models):
    body = {"model": "weather", "tools": TOOLS, "messages": ASK}
    assert count(client, **body, tool_choice={"type": "none"}) == prompt_length(models["weather"], ASK)
    assert count(client, **body) > count(client, **body, tool_choice={"type": "none"})


def test_reasoning_streams_as_a_signed_thinking_block(server, client, models):
    body = {"model": "thinker", "max_tokens": 200, "messages": ASK, "thinking": {"type": "enabled", "budget_tokens": 1024}}
    events = raw_events(server, body)
    assert_well_formed(events)
    assert blocks(events) == [("thinking", THOUGHT), ("text", ANSWER)]
    thinking_deltas = [e["delta"]["type"] for e in events if e["type"] == "content_block_delta" and e["index"] == 0]
    assert thinking_deltas[-1] == "signature_delta" and set(thinking_deltas[:-1]) == {"thinking_delta"}

    with client.messages.stream(**body) as stream:
        message = stream.get_final_message()
    thinking, text = message.content
    assert thinking.type == "thinking" and thinking.thinking == THOUGHT and thinking.signature
    assert text.text == ANSWER
    # Thinking tokens: <think> through </think>, taken from the script's own ids.
    script = models["thinker"].script_token_ids
    think_end = script.index(tokenizer_of(models["thinker"].path).convert_tokens_to_ids("</think>"))
    assert message.usage.output_tokens_details.thinking_tokens == think_end + 1
    assert message.usage.output_tokens == len(script) + 1

    # thinking on/off is the template's enable_thinking switch: the prompts differ as the template says.
    model = models["thinker"]
    assert count(client, model="thinker", messages=ASK, thinking={"type": "adaptive"}) == prompt_length(
        model, ASK, enable_thinking=True)
    assert count(client, model="thinker", messages=ASK, thinking={"type": "disabled"}) == prompt_length(
        model, ASK, enable_thinking=False) != prompt_length(model, ASK, enable_thinking=True)

    # Not streaming: the same blocks, and the thinking goes back as reasoning in the next turn.
    message = client.messages.create(**body)
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == THOUGHT


def test_stop_sequence_and_max_tokens(server, client, models):
    with client.messages.stream(model="texter", max_tokens=200, messages=ASK, stop_sequences=["through"]) as stream:
        message = stream.get_final_message()
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "through"
    assert message.content[0].text == TEXT[: TEXT.index("through")]

    events = raw_events(server, {"model": "texter", "max_tokens": 3, "messages": ASK})
    assert events[-2]["delta"]["stop_reason"] == "max_tokens"
    assert events[-2]["usage"]["output_tokens"] == 3
    message = client.messages.create(model="texter", max_tokens=3, messages=ASK)
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3
    assert TEXT.startswith(message.content[0].text)


def test_non_streaming_message(client, models):
    message = client.messages.create(model="texter", max_tokens=200, messages=ASK, system="Be brief.")
    assert message.type == "message" and message.role == "assistant" and message.model == "texter"
    assert [b.type for b in message.content] == ["text"] and message.content[0].text == TEXT
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    u = message.usage
    prompt = prompt_length(models["texter"], [{"role": "system", "content": "Be brief."}, *ASK])
    assert u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens == prompt
    assert u.output_tokens == len(models["texter"].script_token_ids) + 1


def _claude_code_request(session: int, question: str) -> dict:
    """A request shaped like Claude Code's: a billing header that changes per session, cache_control."""
    system = [
        {"type": "text", "text": BILLING.format(session)},
        {"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}},
    ]
    return {"model": "weather", "max_tokens": 200, "system": system, "tools": TOOLS,
            "messages": [{"role": "user", "content": [{"type": "text", "text": question, "cache_control": {"type": "ephemeral"}}]}],
            "metadata": {"user_id": "someone"},
            "extra_body": {"context_management": {"edits": []}, "output_config": {"effort": "high"}}}


def test_two_sessions_with_different_billing_headers_share_the_cached_system_prompt(client, models):
    first = client.messages.create(**_claude_code_request(101, "What is the weather in Paris?"))
    second = client.messages.create(**_claude_code_request(202, "And how is the weather in Rome?"))
    # The billing header is not part of the prompt.
    system = [{"role": "system", "content": SYSTEM}]
    tools = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                               "parameters": t["input_schema"]}} for t in TOOLS]
    model = models["weather"]
    one = tokenizer_of(model.path).apply_chat_template(
        [*system, {"role": "user", "content": "What is the weather in Paris?"}], tools=tools,
        add_generation_prompt=True, tokenize=True, return_dict=False)
    two = tokenizer_of(model.path).apply_chat_template(
        [*system, {"role": "user", "content": "And how is the weather in Rome?"}], tools=tools,
        add_generation_prompt=True, tokenize=True, return_dict=False)
    common = next(i for i, (a, b) in enumerate(zip(one, two)) if a != b)
    assert first.usage.input_tokens + first.usage.cache_read_input_tokens == len(one)
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens == len(two)
    # The second session reads everything up to its own question from the first one's cache.
    assert second.usage.cache_read_input_tokens == common > len(tokenizer_of(model.path).encode(SYSTEM))


def test_a_mid_conversation_system_message_stays_in_place(client, models):
    messages = [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "system", "content": "The user prefers short answers."},
        {"role": "user", "content": "Say hello."},
    ]
    assert count(client, model="texter", messages=messages) == prompt_length(models["texter"], messages)
    message = client.messages.create(model="texter", max_tokens=200, messages=messages)
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == prompt_length(models["texter"], messages)


def test_an_alias_serves_a_fixed_model_name(client):
    message = client.messages.create(model="claude-haiku-4-5", max_tokens=200, messages=ASK)
    assert message.content[0].text == TEXT and message.model == "claude-haiku-4-5"


def _error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind
    return body["error"]["message"]


def test_bad_requests_answer_in_anthropic_s_envelope(server, client, models):
    post = lambda body, **kw: server.post("/v1/messages", json=body, **kw)  # noqa: E731
    assert "max_tokens" in _error(post({"model": "texter", "messages": ASK}), 400, "invalid_request_error")
    assert "parse the JSON" in _error(
        server.post("/v1/messages", content=b"{not json", headers={"content-type": "application/json"}),
        400, "invalid_request_error")
    too_big = b"{" + b" " * (32 * 1024 * 1024)  # past the 32 MiB body limit
    _error(server.post("/v1/messages", content=too_big, headers={"content-type": "application/json"}),
           413, "request_too_large")
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    message = _error(post({"model": "texter", "max_tokens": 10, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]}), 400, "invalid_request_error")
    assert "text only" in message and "image" in message
    message = _error(post({"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": ASK}), 404, "not_found_error")
    assert "claude-sonnet-4-5" in message and "texter" in message and "--alias" in message
    assert "not in tools" in _error(post({"model": "weather", "max_tokens": 10, "messages": ASK, "tools": TOOLS,
                                          "tool_choice": {"type": "tool", "name": "nope"}}), 400, "invalid_request_error")
    message = _error(post({"model": "texter", "max_tokens": 10, "messages": [
        {"role": "user", "content": [{"type": "video", "url": "x"}]}]}), 400, "invalid_request_error")
    assert "messages[0].content[0]" in message and "'video'" in message

    # A prompt longer than the context, in the words Claude Code's recovery looks for.
    long = [{"role": "user", "content": "word " * 200}]
    n = count(client, model="tiny", messages=long)
    with pytest.raises(anthropic.BadRequestError) as error:
        client.messages.create(model="tiny", max_tokens=10, messages=long)
    assert error.value.body["error"]["message"] == f"prompt is too long: {n} tokens > {SMALL_CONTEXT} maximum"
    # max_tokens beyond the room left is clamped, as on the chat door.
    message = client.messages.create(model="tiny", max_tokens=100_000, messages=ASK)
    assert message.content[0].text == TEXT

    # count_tokens answers in the same envelope, and the server keeps serving.
    _error(server.post("/v1/messages/count_tokens", json={"model": "nope", "messages": ASK}), 404, "not_found_error")
    assert client.messages.create(model="texter", max_tokens=200, messages=ASK).content[0].text == TEXT


def test_a_failure_mid_stream_sends_an_error_event(tmp_path, models):
    # Only texter is loaded at start; count_tokens on a downloaded model lends just its tokenizer.
    env = downloaded(tmp_path / "hf", models["weather"].path, "test/weather")
    server = ServerProcess(tmp_path, ["--model", str(models["texter"].path)],
                           env={**env, "MLXD_TEST_FAIL_AFTER": "3", "MLXD_TEST_FAILURES": "1"},
                           module="tests.faulty_server").start()
    try:
        response = server.post("/v1/messages/count_tokens",
                               json={"model": "test/weather", "messages": ASK, "tools": TOOLS})
        assert "loading model test/weather" not in server.log()
        tools = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                   "parameters": t["input_schema"]}} for t in TOOLS]
        assert response.json() == {"input_tokens": prompt_length(models["weather"], ASK, tools)}

        events = raw_events(server, {"model": "texter", "max_tokens": 200, "messages": ASK})
        assert events[0]["type"] == "message_start" and events[-1]["type"] == "error"
        assert events[-1]["error"]["type"] == "api_error"
        assert "Resource limit exceeded" in events[-1]["error"]["message"]
        assert "message_stop" not in [e["type"] for e in events]
        client = anthropic.Anthropic(base_url=server.base_url, api_key="mlxd", max_retries=0, timeout=120)
        assert client.messages.create(model="texter", max_tokens=200, messages=ASK).content[0].text == TEXT
    finally:
        server.stop()


def test_mlxd_claude_names_served_models_and_the_serve_line(models):
    texter, weather = str(models["texter"].path), str(models["weather"].path)
    result = subprocess.run(
        [sys.executable, "-m", "mlxd.server.cli", "claude", "--model", weather, "--small-model", texter, "--port", "9123"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"#   mlxd serve --model {weather} --model {texter} --max-loaded-models 2 --port 9123" in lines
    assert "export ANTHROPIC_BASE_URL=http://127.0.0.1:9123" in lines
    assert "export ANTHROPIC_MODEL=weather" in lines and "export ANTHROPIC_DEFAULT_HAIKU_MODEL=texter" in lines
    assert "export CLAUDE_CODE_AUTO_COMPACT_WINDOW=32768" in lines
