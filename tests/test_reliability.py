"""No request hangs or takes its batch-mates down, content is byte-exact, every
parameter is bounded: through real servers, with faults injected into the engine's
phases by `tests/faulty_server.py` where a real fault cannot be caused on demand.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from scripts.testmodels import build_random_model, build_scripted_model
from tests.chat_helpers import BASH_TOOL
from tests.ground_truth import GREETING, ground_truth_prompt_tokens
from tests.server_process import ROOT, ServerProcess

HELLO = [{"role": "user", "content": "Say hello."}]
WAIT_S = 120  # generous bound on waits for the server; never a speed assertion
NESTING = 3000
NESTED_CALL = (
    '<tool_call>\n{"name": "bash", "arguments": {"command": '
    + "[" * NESTING + "]" * NESTING + "}}\n</tool_call>"
)
CODE = "    def f(x):\n        return x\n"


def _messages(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def _chat(server, content: str = "Say hello.", model: str = "greeter", **kwargs) -> httpx.Response:
    body = {"model": model, "messages": _messages(content), "temperature": 0, **kwargs}
    return server.post("/v1/chat/completions", json=body)


def _stream_lines(server, body: dict) -> tuple[httpx.Response, list]:
    """The response and its decoded `data:` payloads ("[DONE]" kept as is)."""
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=WAIT_S) as response:
        data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    return response, [d if d == "[DONE]" else json.loads(d) for d in data]


def _content(payloads: list) -> str:
    return "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads
                   if isinstance(p, dict) and p.get("choices"))


def _wait_health(server, status: int) -> dict:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        response = server.get("/health")
        if response.status_code == status:
            return response.json()
        time.sleep(0.05)
    raise AssertionError(f"/health never answered {status}:\n{server.log()[-3000:]}")


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, greeting_model, random_model):
    logs = tmp_path_factory.mktemp("faulty")
    server = ServerProcess(
        logs,
        ["--model", str(greeting_model.path), "--model", str(random_model),
         "--max-loaded-models", "2", "--keep-alive", "2"],
        env={"MLXD_TEST_HOLD_RECOVERY": str(logs / "hold-recovery")},
        module="tests.faulty_server",
    ).start()
    server.hold = logs / "hold-recovery"
    yield server
    server.stop()


def _assert_serves(server) -> None:
    response = _chat(server)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == GREETING


# Faults tied to one request end that request alone -----------------------------


def test_a_fault_while_starting_a_request_fails_it_alone(faulty):
    response = _chat(faulty, "inject:admission")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "internal_error" and "admission fault injected" in error["message"]
    rid = response.headers["x-request-id"]
    assert f"[{rid}] could not start the request" in faulty.log()
    _assert_serves(faulty)
    assert faulty.get("/health").json()["status"] == "ok"


def test_a_fault_in_one_requests_output_leaves_its_batch_mate_alone(faulty, greeting_model):
    body = {"model": "greeter", "temperature": 0, "stream_options": {"include_usage": True}}
    with ThreadPoolExecutor(2) as pool:
        faulted = pool.submit(_stream_lines, faulty, {**body, "messages": _messages("inject:output")})
        plain = pool.submit(_stream_lines, faulty, {**body, "messages": HELLO})
        (r1, faulted), (r2, plain) = faulted.result(), plain.result()
    assert r1.status_code == r2.status_code == 200
    # The faulted stream: an error event, then its usage so far, then [DONE].
    *chunks, error, usage, done = faulted
    assert done == "[DONE]"
    assert error["error"]["code"] == "generation_failed" and "output fault injected" in error["error"]["message"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 2
    # Its batch-mate finished whole, with exact usage.
    assert plain[-1] == "[DONE]" and _content(plain) == GREETING
    assert plain[-2]["usage"]["prompt_tokens"] == ground_truth_prompt_tokens(greeting_model.path, HELLO)
    assert plain[-2]["usage"]["completion_tokens"] == len(greeting_model.script_token_ids) + 1
    assert "processing the output failed; ending this request" in faulty.log()


def test_a_fault_in_the_batch_step_ends_the_batch_and_the_engine_goes_on(faulty):
    response, payloads = _stream_lines(faulty, {"model": "greeter", "messages": _messages("inject:step"),
                                                "temperature": 0})
    assert response.status_code == 200
    assert payloads[-1] == "[DONE]"
    assert payloads[-3]["error"]["code"] == "generation_failed"
    assert "usage" in payloads[-2]
    _assert_serves(faulty)


# Faults the engine cannot pin on one request: 503 at once, degraded, restart ------


@pytest.mark.parametrize("phases", ["inbox", "inbox,recovery", "unload"])
def test_an_engine_fault_answers_503_then_the_engine_restarts(faulty, phases):
    faulty.hold.touch()  # the restart waits while this file exists
    try:
        response = _chat(faulty, f"inject:{phases}")
        if phases == "unload":  # served; the fault comes when the idle model is unloaded (--keep-alive 2)
            assert response.status_code == 200
        else:  # the request that was in the engine gets an error at once, not a hang
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "engine_unavailable"
        health = _wait_health(faulty, 503)
        assert health["status"] == "degraded" and f"{phases.split(',')[0]} fault injected" in health["reason"]
        refused = _chat(faulty)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "engine_unavailable"
        assert int(refused.headers["Retry-After"]) >= 1
    finally:
        faulty.hold.unlink()
    assert _wait_health(faulty, 200)["status"] == "ok"
    _assert_serves(faulty)  # the model loads again on first use
    if "recovery" in phases:
        assert "engine restart failed (attempt 1)" in faulty.log()


# Fault isolation in the output path --------------------------------------------


@pytest.fixture(scope="module")
def nested_model(models_dir):
    return build_scripted_model(models_dir / "nested", NESTED_CALL)


@pytest.fixture(scope="module")
def exact_model(models_dir):
    return build_scripted_model(models_dir / "exact", CODE)


@pytest.fixture(scope="module")
def script_server(tmp_path_factory, nested_model, exact_model):
    server = ServerProcess(
        tmp_path_factory.mktemp("scripts"),
        ["--model", str(nested_model.path), "--model", str(exact_model.path), "--max-loaded-models", "2"],
    ).start()
    yield server
    server.stop()


def test_arguments_nested_3000_deep_end_as_a_broken_call_beside_a_plain_request(script_server, nested_model):
    plain = {"model": "nested", "messages": HELLO, "temperature": 0}
    with_tools = {**plain, "tools": [BASH_TOOL]}
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda body: script_server.post("/v1/chat/completions", json=body),
                                  [with_tools, plain]))
    called, answered = (r.json() for r in responses)
    assert [r.status_code for r in responses] == [200, 200]
    # The plain request reads the markup as text, whole, with exact usage.
    assert answered["choices"][0]["message"]["content"] == NESTED_CALL
    assert answered["usage"]["completion_tokens"] == len(nested_model.script_token_ids) + 1
    assert answered["usage"]["prompt_tokens"] == ground_truth_prompt_tokens(nested_model.path, HELLO)
    # The call was announced, so it stays a call whose arguments do not parse.
    choice = called["choices"][0]
    assert choice["finish_reason"] == "stop"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "bash"
    assert call["function"]["arguments"] == '{"command": ' + "[" * NESTING + "]" * NESTING
    assert "tool call 'bash' is broken" in script_server.log()


# Byte-exact content ------------------------------------------------------------


def test_indentation_and_the_final_newline_arrive_byte_exact(script_server, exact_model):
    body = {"model": "exact", "messages": HELLO, "temperature": 0}
    whole = script_server.post("/v1/chat/completions", json=body).json()
    assert whole["choices"][0]["message"]["content"] == CODE
    response, payloads = _stream_lines(script_server, body)
    assert _content(payloads) == CODE
    assert payloads[-2]["usage"]["completion_tokens"] == len(exact_model.script_token_ids) + 1
    # A stop string cuts after the text before it, whitespace included.
    cut = script_server.post("/v1/chat/completions", json={**body, "stop": ["return"]}).json()
    assert cut["choices"][0]["message"]["content"] == "    def f(x):\n        "


# Bounded parameters ----------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": "x" * 1001}, "stop"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"tools": [BASH_TOOL] * 129}, "tools"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"n": 2}, "n"),
    ],
)
def test_out_of_bounds_parameters_are_a_400_naming_the_parameter(core_server, extra, param):
    response = _chat(core_server, **extra)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_parameters_at_their_bounds_are_served(core_server):
    response = _chat(core_server, seed=-1, stop=["x" * 1000, "a", "b", "c"], response_format={"type": "text"},
                     logit_bias={str(i): 0 for i in range(300)}, max_tokens=2)
    assert response.status_code == 200, response.text


# Request ids -------------------------------------------------------------------------


def test_every_response_names_its_request_id_and_the_log_line_carries_it(core_server):
    response = _chat(core_server)
    rid = response.headers["x-request-id"]
    assert rid == response.json()["id"]  # the chat door names a request by its response id
    streamed = core_server.post("/v1/chat/completions", json={"model": "greeter", "messages": HELLO, "stream": True})
    streamed_id = streamed.headers["x-request-id"]
    assert f'"id":"{streamed_id}"' in streamed.text
    refused = core_server.post("/v1/chat/completions", json={"model": "nope", "messages": HELLO})
    assert refused.status_code == 404 and refused.headers["x-request-id"].startswith("req_")
    log = core_server.log()
    for request_id in (rid, streamed_id):
        line = next(line for line in log.splitlines() if f"[{request_id}] request done (stop)" in line)
        assert "chat, model greeter" in line and "tokens/s" in line


# Model loading, queue timeout, CLI ------------------------------------------------


@pytest.fixture(scope="module")
def long_model(models_dir):
    """Tiny, with a long context: a stream holds the one slot for as long as a test needs."""
    return build_random_model(models_dir / "random-long-reliability", context_length=16384)


@pytest.fixture(scope="module")
def slot_server(tmp_path_factory, long_model, greeting_model):
    """One slot, a 2 s queue timeout, and a model whose weights are corrupt; DEBUG logs."""
    broken = shutil.copytree(greeting_model.path, tmp_path_factory.mktemp("models") / "broken")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    server = ServerProcess(
        tmp_path_factory.mktemp("slot"),
        ["--model", str(long_model), "--model", str(broken), "--max-loaded-models", "2",
         "--max-batch-size", "1", "--queue-timeout", "2", "--log-level", "DEBUG"],
    ).start()
    deadline = time.monotonic() + WAIT_S  # the queue timeout counts from submission: wait out the preload
    while "could not be loaded" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    yield server
    server.stop()


def test_a_failed_load_is_a_500_naming_the_cause_and_is_not_retried_at_once(slot_server):
    for _ in range(2):
        response = _chat(slot_server, model="broken")
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["code"] == "model_load_failed" and "'broken' could not be loaded" in error["message"]
        assert "safetensors" in error["message"].lower() or "header" in error["message"].lower()
    assert slot_server.log().count("loading broken failed") == 1  # at start; requests got the remembered error
    served = _chat(slot_server, model="random-long-reliability", max_tokens=2)
    assert served.status_code == 200
    assert slot_server.log().count("loading model random-long-reliability") == 1  # never evicted
    assert " DEBUG " in slot_server.log()  # --log-level after the subcommand


def test_a_request_that_waits_longer_than_the_queue_timeout_gets_503(slot_server):
    body = {"model": "random-long-reliability", "messages": _messages("Count forever."), "temperature": 0,
            "stream": True}
    with httpx.stream("POST", slot_server.base_url + "/v1/chat/completions", json=body, timeout=WAIT_S) as held:
        lines = held.iter_lines()
        next(line for line in lines if line.startswith("data: ") and '"content":"' in line and
             '"content":""' not in line)
        waited = _chat(slot_server, model="random-long-reliability", max_tokens=2)
    assert waited.status_code == 503
    assert waited.json()["error"]["code"] == "queue_timeout"
    assert int(waited.headers["Retry-After"]) >= 1
    assert f"[{waited.headers['x-request-id']}] request refused (queue_timeout)" in slot_server.log()


@pytest.mark.parametrize("case", ["duplicate", "too many"])
def test_serve_refuses_duplicate_or_too_many_models_at_start(greeting_model, random_model, case):
    second = greeting_model.path if case == "duplicate" else random_model  # --max-loaded-models is 1
    done = subprocess.run(
        [sys.executable, "-m", "mlxd.server.cli", "serve", "--model", str(greeting_model.path),
         "--model", str(second), "--port", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S,
    )
    assert done.returncode == 2
    assert ("more than once" if case == "duplicate" else "--max-loaded-models is 1") in done.stderr


# A client that stops reading --------------------------------------------------------


def test_a_client_that_stops_reading_is_dropped_and_its_generation_cancelled(long_model):
    """In-process with the real engine: the HTTP server's socket buffers would take
    megabytes of chunks before a stalled client held up the engine's queue."""
    import asyncio

    from mlxd.server.engine import Engine
    from mlxd.server.requests import GenerationRequest, ModelRef
    from mlxd.server.events import Failure, Finish

    engine = Engine(client_timeout=0.5, max_batch_size=1)
    engine.start()
    model = ModelRef("long", long_model)

    async def read_one_then_stop():
        handle = engine.submit(GenerationRequest(model, _messages("Count forever."), request_id="stalled"),
                               asyncio.get_running_loop())
        await asyncio.wait_for(handle.accepted, WAIT_S)
        await asyncio.wait_for(handle.next_events(), WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while handle.dropped is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # not reading
        last = None
        while last is None and time.monotonic() < deadline:
            events = await asyncio.wait_for(handle.next_events(), WAIT_S)
            last = next((e for e in events if isinstance(e, (Finish, Failure))), None)
        # Its one slot is free again: the next request is served.
        after = engine.submit(GenerationRequest(model, _messages("Hi."), max_tokens=2), asyncio.get_running_loop())
        await asyncio.wait_for(after.accepted, WAIT_S)
        done = None
        while done is None:
            events = await asyncio.wait_for(after.next_events(), WAIT_S)
            done = next((e for e in events if isinstance(e, (Finish, Failure))), None)
        return handle, last, done

    try:
        handle, last, done = asyncio.run(read_one_then_stop())
    finally:
        engine.stop()
    assert "read nothing" in handle.dropped
    assert isinstance(last, Failure) and last.message.startswith("dropped: the client read nothing")
    assert last.usage.completion_tokens < 16384 - last.usage.prompt_tokens  # cancelled, not run to the end
    assert isinstance(done, Finish) and done.usage.completion_tokens == 2


def test_a_model_is_unloaded_only_after_the_next_one_loaded(tmp_path, greeting_model, random_model):
    """In-process with real models: the model slots alone, one slot."""
    from mlxd.server.requests import ModelRef
    from mlxd.server.errors import ModelLoadFailed
    from mlxd.server.model_slots import ModelSlots

    broken = shutil.copytree(greeting_model.path, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    unloads = []  # (model unloaded, models loaded at that moment)
    slots = ModelSlots(max_loaded=1, keep_alive=-1, on_unload=lambda lm: unloads.append((lm.name, list(slots.loaded))))
    slots.ensure(ModelRef("greeter", greeting_model.path))
    with pytest.raises(ModelLoadFailed) as failed:
        slots.ensure(ModelRef("broken", broken))
    assert list(slots.loaded) == ["greeter"] and unloads == []  # the working model stays
    with pytest.raises(ModelLoadFailed) as again:
        slots.ensure(ModelRef("broken", broken))
    assert again.value is failed.value  # remembered, not loaded again
    slots.ensure(ModelRef("random", random_model))
    assert unloads == [("greeter", ["random"])]  # unloaded once the new one was in
    assert list(slots.loaded) == ["random"]
