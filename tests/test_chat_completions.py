"""POST /v1/chat/completions against a real server, through the real openai client.

Usage is checked against ground truth computed outside the server: the prompt
tokenized by the model's own tokenizer, and the scripted model's known tokens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import httpx
import pytest

from tests.ground_truth import GREETING, RANDOM_CONTEXT, ground_truth_prompt_tokens, tokenizer_of
from tests.server_process import ROOT, ServerProcess

HELLO = [{"role": "user", "content": "Say hello."}]


def _stream(client, **kwargs):
    return list(client.chat.completions.create(stream=True, **kwargs))


def _greeting_usage(greeting_model, messages=HELLO):
    prompt = ground_truth_prompt_tokens(greeting_model.path, messages)
    completion = len(greeting_model.script_token_ids) + 1  # the end token is sampled too
    return prompt, completion


def test_stream_with_include_usage_follows_the_spec(core_server, greeting_model):
    chunks = _stream(
        core_server.client(),
        model="greeter",
        messages=HELLO,
        temperature=0,
        stream_options={"include_usage": True},
    )
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == GREETING
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finish] == ["stop"]
    # The last chunk has no choices and carries usage; every other chunk has usage null.
    last = chunks[-1]
    assert last.choices == []
    assert all(c.usage is None for c in chunks[:-1])
    prompt, completion = _greeting_usage(greeting_model)
    assert last.usage.prompt_tokens == prompt
    assert last.usage.completion_tokens == completion
    assert last.usage.total_tokens == prompt + completion
    assert last.usage.completion_tokens_details.reasoning_tokens == 0


def test_stream_without_include_usage_puts_usage_on_the_finish_chunk(core_server, greeting_model):
    response = core_server.post(
        "/v1/chat/completions",
        json={"model": "greeter", "messages": HELLO, "stream": True, "temperature": 0},
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [l for l in response.text.splitlines() if l.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(l[6:]) for l in lines[:-1]]
    assert all(isinstance(c["choices"], list) and c["choices"] for c in chunks)
    assert all("usage" not in c for c in chunks[:-1])
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "stop"
    prompt, completion = _greeting_usage(greeting_model)
    assert last["usage"]["prompt_tokens"] == prompt
    assert last["usage"]["completion_tokens"] == completion
    assert last["usage"]["total_tokens"] == prompt + completion


def test_non_streaming_response_has_message_and_exact_usage(core_server, greeting_model):
    response = core_server.client().chat.completions.create(model="greeter", messages=HELLO, temperature=0)
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == GREETING
    assert response.choices[0].finish_reason == "stop"
    prompt, completion = _greeting_usage(greeting_model)
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt, completion)


def test_array_content_parts_are_joined_like_a_string(core_server, greeting_model):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hello."}]}]
    response = core_server.client().chat.completions.create(model="greeter", messages=parts, temperature=0)
    assert response.choices[0].message.content == GREETING
    prompt, _ = _greeting_usage(greeting_model, [{"role": "user", "content": "Say hello."}])
    assert response.usage.prompt_tokens == prompt


def test_max_tokens_cuts_with_finish_reason_length(core_server, greeting_model):
    tokenizer = tokenizer_of(greeting_model.path)
    chunks = _stream(
        core_server.client(),
        model="greeter",
        messages=HELLO,
        max_tokens=3,
        stream_options={"include_usage": True},
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tokenizer.decode(greeting_model.script_token_ids[:3])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 3


def test_stop_string_spanning_tokens_is_never_leaked(core_server, greeting_model):
    tokenizer = tokenizer_of(greeting_model.path)
    pieces = [tokenizer.decode([t]) for t in greeting_model.script_token_ids]
    # A stop string made of the end of one token and the start of the next.
    i = next(k for k in range(2, len(pieces) - 1) if len(pieces[k]) >= 2 and len(pieces[k + 1]) >= 2)
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    before = "".join(pieces[:i]) + pieces[i][:-2]
    assert GREETING.index(stop) == len(before)

    for stream in (True, False):
        response = core_server.client().chat.completions.create(
            model="greeter", messages=HELLO, stop=[stop, "never-appears"], stream=stream,
            **({"stream_options": {"include_usage": True}} if stream else {}),
        )
        if stream:
            chunks = list(response)
            deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
            text, usage = "".join(deltas), chunks[-1].usage
            reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            text, usage = response.choices[0].message.content, response.usage
            reasons = [response.choices[0].finish_reason]
        assert text == before
        assert reasons == ["stop"]
        # Generation stopped at the token that completed the stop string.
        assert usage.completion_tokens == i + 2


def test_max_tokens_beyond_the_context_generates_up_to_the_room_left(core_server, random_model):
    tokenizer = tokenizer_of(random_model)
    messages = [{"role": "user", "content": "Tell me a very long story."}]
    prompt = ground_truth_prompt_tokens(random_model, messages)
    response = core_server.client().chat.completions.create(
        model="random-qwen2",
        messages=messages,
        max_tokens=32000,
        temperature=0,
        logit_bias={str(tokenizer.eos_token_id): -100},  # keep going until the context is full
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage.prompt_tokens == prompt
    assert response.usage.completion_tokens == RANDOM_CONTEXT - prompt


def test_prompt_longer_than_the_context_is_rejected_with_openai_wording(core_server, random_model):
    messages = [{"role": "user", "content": "word " * (RANDOM_CONTEXT * 2)}]
    prompt = ground_truth_prompt_tokens(random_model, messages)
    response = core_server.post("/v1/chat/completions", json={"model": "random-qwen2", "messages": messages, "stream": True})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["message"].startswith(
        f"This model's maximum context length is {RANDOM_CONTEXT} tokens, but the prompt has {prompt} tokens"
    )


@pytest.mark.parametrize(
    "body, status, param, code",
    [
        ({"messages": HELLO}, 400, "model", "invalid_value"),
        ({"model": "greeter"}, 400, "messages", "invalid_value"),
        ({"model": "greeter", "messages": []}, 400, "messages", "invalid_value"),
        ({"model": "greeter", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", "invalid_value"),
        ({"model": "greeter", "messages": HELLO, "temperature": 7}, 400, "temperature", "invalid_value"),
        ({"model": "greeter", "messages": HELLO, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
        ({"model": "greeter", "messages": HELLO, "logit_bias": {"abc": 1}}, 400, "logit_bias", "invalid_value"),
        ({"model": "greeter", "messages": HELLO, "n": 2}, 400, "n", "invalid_value"),
        ({"model": "greeter", "messages": HELLO, "tool_choice": "required"}, 400, "tool_choice", "invalid_value"),
        ({"model": "greeter", "messages": HELLO, "logit_bias": {"999999": 5}}, 400, "logit_bias", "invalid_prompt"),
        ({"model": "greeter", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
         "messages[0].content[0].type", "invalid_value"),
        ({"model": "no-such-model", "messages": HELLO}, 404, "model", "model_not_found"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(core_server, body, status, param, code):
    response = core_server.post("/v1/chat/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["code"] == code
    assert error["message"]
    after = core_server.client().chat.completions.create(model="greeter", messages=HELLO, max_tokens=2)
    assert after.choices[0].finish_reason == "length"


def test_malformed_json_and_oversized_bodies(core_server):
    response = core_server.post("/v1/chat/completions", content=b'{"model": "greeter", "messages": [', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"

    huge = json.dumps({"model": "greeter", "messages": [{"role": "user", "content": "x" * (33 * 1024 * 1024)}]})
    response = core_server.post("/v1/chat/completions", content=huge, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert core_server.get("/health").json()["status"] == "ok"


def test_unknown_fields_are_ignored(core_server):
    response = core_server.post(
        "/v1/chat/completions",
        json={"model": "greeter", "messages": HELLO, "max_tokens": 2, "user": "x", "metadata": {"a": 1}, "store": False},
    )
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 2


def test_logprobs_are_returned_per_token(core_server, greeting_model):
    response = core_server.client().chat.completions.create(
        model="greeter", messages=HELLO, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = response.choices[0].logprobs.content
    assert len(content) == 4
    assert "".join(lp.token for lp in content) == response.choices[0].message.content
    for lp in content:
        assert lp.logprob <= 0
        assert len(lp.top_logprobs) == 2
        assert lp.top_logprobs[0].token == lp.token  # greedy picks the most likely token


def test_client_disconnect_stops_generation(core_server, random_model):
    tokenizer = tokenizer_of(random_model)
    body = {
        "model": "random-qwen2",
        "messages": [{"role": "user", "content": "Count forever."}],
        "stream": True,
        "max_tokens": 200,
        "logit_bias": {str(tokenizer.eos_token_id): -100},
    }
    with httpx.stream("POST", core_server.base_url + "/v1/chat/completions", json=body, timeout=60) as response:
        received = 0
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                received += 1
            if received >= 3:
                break
    deadline = time.monotonic() + 30
    pattern = re.compile(r"request cancelled by the client after (\d+) tokens")
    while time.monotonic() < deadline and not pattern.search(core_server.log()):
        time.sleep(0.1)
    match = pattern.search(core_server.log())
    assert match, core_server.log()[-2000:]
    assert int(match.group(1)) < 200
    after = core_server.client().chat.completions.create(model="greeter", messages=HELLO, temperature=0)
    assert after.choices[0].message.content == GREETING


def test_models_and_health(core_server):
    models = core_server.client().models.list()
    ids = {m.id for m in models.data}
    assert ids == {"greeter", "random-qwen2"}
    listed = core_server.get("/v1/models").json()["data"]
    random_entry = next(m for m in listed if m["id"] == "random-qwen2")
    assert random_entry["context_length"] == RANDOM_CONTEXT
    assert random_entry["size_bytes"] > 0
    assert core_server.get("/v1/models/greeter").json()["id"] == "greeter"
    assert core_server.get("/v1/models/nope").status_code == 404
    assert core_server.get("/health").json()["status"] == "ok"


def test_a_request_never_loads_a_directory_the_server_was_not_started_with(core_server, greeting_model, tmp_path):
    elsewhere = shutil.copytree(greeting_model.path, tmp_path / "elsewhere")
    # The server runs in the repository root; "tests/../..." is a relative path that exists there.
    relative = "tests/" + os.path.relpath(elsewhere, ROOT / "tests")
    for name in (str(elsewhere), relative):
        response = core_server.post("/v1/chat/completions", json={"model": name, "messages": HELLO})
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "model_not_found"
        assert "not served here" in response.json()["error"]["message"]
    assert core_server.get("/health").json()["status"] == "ok"


def test_a_failure_mid_generation_ends_with_an_error_and_usage_and_the_server_recovers(tmp_path, greeting_model):
    fail_after = 5
    server = ServerProcess(tmp_path, ["--model", str(greeting_model.path)],
                           env={"MLXD_TEST_FAIL_AFTER": str(fail_after), "MLXD_TEST_FAILURES": "2"},
                           module="tests.faulty_server").start()
    try:
        body = {"model": "greeter", "messages": HELLO, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=120) as response:
            assert response.status_code == 200
            data = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        *chunks, error, usage = [json.loads(d) for d in data[:-1]]
        # What was generated before the failure streamed; no finish_reason pretends the answer is complete.
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text and GREETING.startswith(text) and text != GREETING
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
        # The SDKs raise on an `error` event; the usage chunk still counts what was computed.
        assert error["error"]["code"] == "generation_failed"
        assert "Resource limit exceeded" in error["error"]["message"]
        assert usage["choices"] == []
        assert usage["usage"]["prompt_tokens"] == ground_truth_prompt_tokens(greeting_model.path, HELLO)
        assert usage["usage"]["completion_tokens"] == fail_after
        assert "generation failed" in server.log()

        # Not streaming: an HTTP 500 in OpenAI's shape (the SDK raises), with the usage so far.
        response = server.post("/v1/chat/completions", json={**body, "stream": False})
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "generation_failed"
        assert response.json()["usage"]["completion_tokens"] == fail_after

        answer = server.client().chat.completions.create(model="greeter", messages=HELLO, temperature=0)
        assert answer.choices[0].message.content == GREETING
    finally:
        server.stop()
