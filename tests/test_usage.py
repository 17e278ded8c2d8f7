"""The usage ledger through real servers: one row per request however it ends, with the
counts the client saw; /v1/usage, `mlxd usage`, /metrics and the dashboard read the same
SQLite file; restarts, old schemas and a stuck writer.

Rows are matched to requests by the response id (the ledger's request id). Counts are
checked against what the real openai client received and against ground truth computed
outside the server (the model's own tokenizer, the scripted model's known tokens).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlxd.server import ledger
from scripts.testmodels import build_random_model, build_scripted_model
from tests.ground_truth import GREETING, ground_truth_prompt_tokens, prompt_ids, tokenizer_of
from tests.server_process import ROOT, ServerProcess

WAIT_S = 60  # generous bound on waits for the server; never a speed assertion
HELLO = [{"role": "user", "content": "Say hello."}]
THINK_CALL = '<think>I should run it.</think>\n<tool_call>\n{"name": "bash", "arguments": {"command": "ls"}}\n</tool_call>'
BASH = {"type": "function", "function": {"name": "bash", "parameters": {
    "type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}}
FILLER = "The quick brown fox jumps over the lazy dog. " * 230  # ~3,000 tokens: six prefill chunks
MODELS = ("greeter", "random-qwen2", "usage-thinker", "usage-long")
COUNTS = ("prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens", "computed_prompt_tokens")


# ----------------------------------------------------------------------
# Helpers


def rows(server) -> list[dict]:
    """Every ledger row, newest first."""
    return server.get("/v1/usage/requests?limit=1000").json()["data"]


def wait_rows(server, n: int) -> list[dict]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        data = rows(server)
        if len(data) >= n:
            return data
        time.sleep(0.05)
    raise AssertionError(f"the ledger did not reach {n} rows: {rows(server)}")


def row_of(server, request_id: str) -> dict:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        found = [r for r in rows(server) if r["request_id"] == request_id]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no ledger row for {request_id}")


def assert_counts(row: dict, usage) -> None:
    """The row holds exactly the usage the client received."""
    assert row["prompt_tokens"] == usage.prompt_tokens
    assert row["cached_tokens"] == usage.prompt_tokens_details.cached_tokens
    assert row["completion_tokens"] == usage.completion_tokens
    assert row["reasoning_tokens"] == usage.completion_tokens_details.reasoning_tokens
    assert row["computed_prompt_tokens"] == usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens


def stream(server, **kwargs):
    chunks = list(server.client().chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    return chunks[0].id, chunks[-1].usage, chunks


def sse_json(line: str):
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    return json.loads(line[len("data: "):])


def settle(server, extra_model: str = "greeter") -> list[dict]:
    """One more request, then every row: a duplicate row of an earlier request would
    have been queued to the (first-in first-out) writer before this one's."""
    before = len(rows(server))
    response = server.client().chat.completions.create(model=extra_model, messages=HELLO, max_tokens=1)
    row_of(server, response.id)
    data = rows(server)
    assert len(data) == before + 1
    return data


def cli_usage(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "MLXD_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "mlxd.server.cli", "usage", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=True)


def metrics_of(server) -> dict[str, list]:
    families = text_string_to_metric_families(server.get("/metrics").text)
    return {f.name: f.samples for f in families}


def assert_metrics_equal_ledger(server) -> dict:
    """The request and token counters equal the ledger's sums (polled: the counters move
    just after the writer's commit)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        summary = server.get("/v1/usage?group_by=door,model,outcome").json()
        by_model = server.get("/v1/usage?group_by=model").json()
        metrics = metrics_of(server)
        requests = {(s.labels["door"], s.labels["model"], s.labels["outcome"]): s.value
                    for s in metrics["mlxd_requests"] if s.name == "mlxd_requests_total"}
        tokens = {(s.labels["kind"], s.labels["model"]): s.value
                  for s in metrics["mlxd_tokens"] if s.name == "mlxd_tokens_total"}
        want_requests = {(g["key"]["door"], g["key"]["model"], g["key"]["outcome"]): g["requests"]
                         for g in summary["groups"]}
        want_tokens = {(kind, g["key"]["model"]): g[f"{kind}_tokens"]
                       for g in by_model["groups"] for kind in ("prompt", "cached", "completion", "reasoning")}
        if (requests, tokens) == (want_requests, want_tokens) or time.monotonic() > deadline:
            assert requests == want_requests
            assert tokens == want_tokens
            return metrics
        time.sleep(0.1)


# ----------------------------------------------------------------------
# One server, one request slot: every way a request can end


@pytest.fixture(scope="module")
def usage_models(models_dir, greeting_model, random_model):
    thinker = build_scripted_model(models_dir / "usage-thinker", THINK_CALL, template="qwen3")
    long = build_random_model(models_dir / "usage-long", context_length=16384)
    return {"greeter": greeting_model.path, "random-qwen2": random_model, "usage-thinker": thinker.path,
            "usage-long": long}


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("usage-home")


@pytest.fixture(scope="module")
def server(tmp_path_factory, usage_models, home):
    args = [a for path in usage_models.values() for a in ("--model", str(path))]
    args += ["--max-loaded-models", "4", "--max-batch-size", "1", "--max-queue", "4"]
    proc = ServerProcess(tmp_path_factory.mktemp("usage-logs"), args, env={"MLXD_HOME": str(home)}).start()
    yield proc
    proc.stop()


def test_finished_requests_are_one_row_each_with_the_usage_the_client_saw(server, greeting_model):
    prompt = ground_truth_prompt_tokens(greeting_model.path, HELLO)
    first_id, first, chunks = stream(server, model="greeter", messages=HELLO, temperature=0)
    assert first.prompt_tokens == prompt and first.completion_tokens == len(greeting_model.script_token_ids) + 1
    again_id, again, _ = stream(server, model="greeter", messages=HELLO, temperature=0)  # a prefix-cache hit
    assert again.prompt_tokens_details.cached_tokens > 0
    cut = server.client().chat.completions.create(model="greeter", messages=HELLO, max_tokens=3)
    call_id, call, call_chunks = stream(server, model="usage-thinker", messages=HELLO, tools=[BASH], temperature=0)
    assert call_chunks[-2].choices[0].finish_reason == "tool_calls"
    assert call.completion_tokens_details.reasoning_tokens > 0

    for request_id, usage, reason in ((first_id, first, "stop"), (again_id, again, "stop"),
                                      (cut.id, cut.usage, "length"), (call_id, call, "tool_calls")):
        row = row_of(server, request_id)
        assert (row["outcome"], row["finish_reason"], row["door"], row["client"]) == ("finished", reason, "chat", "openai-python")
        assert_counts(row, usage)
        assert row["ttft_s"] is not None and row["duration_s"] >= row["ttft_s"] >= row["queue_s"] >= 0
    assert row_of(server, first_id)["model"] == "greeter"
    assert row_of(server, first_id)["decode_tps"] > 0
    ids = [r["request_id"] for r in settle(server)]
    assert len(ids) == len(set(ids))


def test_a_prompt_rejected_for_context_length_is_one_row(server, random_model):
    messages = [{"role": "user", "content": "word " * 600}]
    before = len(rows(server))
    response = server.post("/v1/chat/completions", json={"model": "random-qwen2", "messages": messages})
    assert response.status_code == 400
    row = wait_rows(server, before + 1)[0]
    assert (row["outcome"], row["finish_reason"], row["client"]) == ("rejected", "context_length_exceeded", "other")
    assert row["prompt_tokens"] == ground_truth_prompt_tokens(random_model, messages)
    assert (row["completion_tokens"], row["computed_prompt_tokens"], row["ttft_s"]) == (0, 0, None)


def test_a_hang_up_mid_decode_records_the_tokens_sampled(server, usage_models):
    eos = tokenizer_of(usage_models["usage-long"]).eos_token_id
    body = {"model": "usage-long", "messages": [{"role": "user", "content": "Count forever."}], "stream": True,
            "logit_bias": {str(eos): -100}}
    read = 0
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=WAIT_S) as response:
        for line in response.iter_lines():
            chunk = sse_json(line)
            if chunk and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                read += 1
                request_id = chunk["id"]
            if read >= 3:
                break
    row = row_of(server, request_id)
    assert (row["outcome"], row["finish_reason"]) == ("cancelled", "decode")
    assert row["completion_tokens"] >= read  # at least the chunks the client read
    assert row["prompt_tokens"] == len(prompt_ids(usage_models["usage-long"], body["messages"]))
    assert row["computed_prompt_tokens"] == row["prompt_tokens"] - row["cached_tokens"]


def test_cancelled_while_queued_and_during_prefill_are_one_row_each(server, usage_models):
    url = server.base_url + "/v1/chat/completions"
    before = len(rows(server))
    eos = tokenizer_of(usage_models["usage-long"]).eos_token_id
    held = {"model": "usage-long", "messages": [{"role": "user", "content": "Hold the slot."}], "stream": True,
            "logit_bias": {str(eos): -100}}
    with httpx.stream("POST", url, json=held, timeout=WAIT_S) as response:
        lines = response.iter_lines()  # kept: dropping it would close the stream
        for line in lines:  # the one slot is taken once a token arrives
            chunk = sse_json(line)
            if chunk and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                held_id = chunk["id"]
                break
        with pytest.raises(httpx.ReadTimeout):  # waits in the queue, then gives up
            httpx.post(url, json={"model": "greeter", "messages": HELLO}, timeout=httpx.Timeout(WAIT_S, read=1.0))
        queued = wait_rows(server, before + 1)[0]
    assert (queued["outcome"], queued["finish_reason"], queued["model"]) == ("cancelled", "queued", "greeter")
    assert all(queued[k] == 0 for k in COUNTS)
    assert row_of(server, held_id)["finish_reason"] == "decode"

    messages = [{"role": "system", "content": "Prefill cancelled. " + FILLER}, {"role": "user", "content": "Go on."}]
    body = {"model": "usage-long", "messages": messages, "stream": True, "max_tokens": 4, "temperature": 0}
    with httpx.stream("POST", url, json=body, timeout=WAIT_S) as response:
        for line in response.iter_lines():  # accepted: the prompt is being read
            chunk = sse_json(line)
            if chunk:
                request_id = chunk["id"]
                break
    row = row_of(server, request_id)
    n_prompt = len(prompt_ids(usage_models["usage-long"], messages))
    assert (row["outcome"], row["finish_reason"]) == ("cancelled", "prefill")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (n_prompt, 0)
    read = row["cached_tokens"] + row["computed_prompt_tokens"]
    assert read < n_prompt
    # What it read stays in the prefix cache: the retry starts exactly there.
    retry = server.client().chat.completions.create(model="usage-long", messages=messages, max_tokens=1, temperature=0)
    assert retry.usage.prompt_tokens_details.cached_tokens == read
    settle(server)


def test_usage_endpoint_groups_and_filters(server):
    data = rows(server)
    expected: dict = defaultdict(lambda: defaultdict(int))
    for r in data:
        group = expected[(r["model"], r["outcome"])]
        group["requests"] += 1
        for k in COUNTS:
            group[k] += r[k]
    summary = server.get("/v1/usage", params={"group_by": "model,outcome"}).json()
    assert summary["object"] == "usage.summary"
    assert summary["totals"]["requests"] == len(data)
    got = {(g["key"]["model"], g["key"]["outcome"]): {k: g[k] for k in ("requests", *COUNTS)} for g in summary["groups"]}
    assert got == {key: dict(v) for key, v in expected.items()}
    assert {"finished", "cancelled", "rejected"} <= {o for _, o in got}

    greeter = server.get("/v1/usage", params={"model": "greeter"}).json()["totals"]
    assert greeter["completion_tokens"] == sum(r["completion_tokens"] for r in data if r["model"] == "greeter")
    other = server.get("/v1/usage", params=[("client", "other"), ("group_by", "client"), ("group_by", "day")]).json()
    assert [g["key"]["client"] for g in other["groups"]] == ["other"]
    assert other["totals"]["requests"] == sum(1 for r in data if r["client"] == "other")
    assert server.get("/v1/usage", params={"since": "2999-01-01"}).json()["totals"]["requests"] == 0
    assert server.get("/v1/usage", params={"until": "2000-01-01"}).json()["totals"]["requests"] == 0

    for params, param in (({"group_by": "weather"}, "group_by"), ({"since": "yesterday-ish"}, "since")):
        response = server.get("/v1/usage", params=params)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == param


def test_cli_json_equals_the_endpoint_and_prints_a_table(server, home):
    cli = json.loads(cli_usage(home, "--json", "--since", "all", "--by", "model,outcome").stdout)
    assert cli == server.get("/v1/usage", params={"group_by": "model,outcome"}).json()
    table = cli_usage(home, "--since", "all", "--by", "model").stdout
    totals = server.get("/v1/usage").json()["totals"]
    assert "greeter" in table and "usage-long" in table
    assert f"{totals['completion_tokens']:,}" in table.splitlines()[-1]


def touch_every_model(server) -> None:
    """A short request to each model: all loaded, each with a row, whatever ran before."""
    for name in MODELS:
        row_of(server, server.client().chat.completions.create(model=name, messages=HELLO, max_tokens=2).id)


def test_metrics_parse_and_equal_the_ledger(server):
    touch_every_model(server)
    metrics = assert_metrics_equal_ledger(server)
    data = rows(server)
    ttft = {s.name: s.value for s in metrics["mlxd_time_to_first_token_seconds"]}
    assert ttft["mlxd_time_to_first_token_seconds_count"] == sum(1 for r in data if r["ttft_s"] is not None)
    gauges = {name: samples[0].value for name, samples in metrics.items() if len(samples) == 1}
    assert gauges["mlxd_loaded_models"] == 4
    assert (gauges["mlxd_queue_depth"], gauges["mlxd_batch_size"]) == (0, 0)
    assert gauges["mlxd_mlx_peak_memory_bytes"] >= gauges["mlxd_mlx_active_memory_bytes"] > 0
    assert gauges["mlxd_prefix_cache_bytes"] > 0
    memory = {s.labels["model"]: s.value for s in metrics["mlxd_model_memory_bytes"]}
    assert set(memory) == set(MODELS) and min(memory.values()) > 0


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=8000", "--window-size=1280,1500", "--hide-scrollbars"]


def chromium(tmp_path: Path, *args: str) -> str:
    profile = tmp_path / f"chromium-profile-{time.monotonic_ns()}"
    done = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run does)")
def test_dashboard_renders_models_and_ledger_totals_in_headless_chromium(server, tmp_path):
    touch_every_model(server)
    totals = server.get("/v1/usage").json()["totals"]
    dom = chromium(tmp_path, "--dump-dom", server.base_url + "/")
    assert 'id="status" class="status ok">ok<' in dom
    models_table = dom.split('id="models"')[1].split("</tbody>")[0]
    for name in MODELS:
        assert f"<td>{name}</td>" in models_table
    for key, cell in (("requests", "requests"), ("prompt_tokens", "prompt"), ("cached_tokens", "cached"),
                      ("completion_tokens", "completion"), ("computed_prompt_tokens", "computed")):
        assert f'id="total-{cell}">{totals[key]:,}<' in dom
    last = rows(server)[0]
    assert last["request_id"] and f"<td>{last['model']}</td>" in dom.split('id="requests"')[1]
    assert dom.count("<rect") > 0  # the tokens-per-day bars

    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = artifacts / "dashboard.png"
    shot.unlink(missing_ok=True)
    chromium(tmp_path, f"--screenshot={shot}", server.base_url + "/")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------
# Servers of their own: old schema and restart, a failure, a stuck writer


def test_an_older_database_migrates_and_a_restart_keeps_the_totals(tmp_path, greeting_model):
    home = tmp_path / "home"
    home.mkdir()
    old = sqlite3.connect(home / "usage.db")  # what the first schema of the ledger wrote
    old.executescript(ledger.MIGRATIONS[0])
    old.executescript("CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (1);")
    old.execute("INSERT INTO requests (ts, request_id, door, model, client, outcome, finish_reason, prompt_tokens, "
                "cached_tokens, completion_tokens) VALUES (?, 'old-1', 'chat', 'greeter', 'opencode', 'finished', "
                "'stop', 100, 40, 20)", (time.time() - 3600,))
    old.commit()
    old.close()

    args = ["--model", str(greeting_model.path)]
    first = ServerProcess(tmp_path, args, env={"MLXD_HOME": str(home)}).start()
    try:
        old_row = row_of(first, "old-1")
        assert (old_row["reasoning_tokens"], old_row["computed_prompt_tokens"], old_row["ttft_s"]) == (0, 0, None)
        answer = first.client().chat.completions.create(model="greeter", messages=HELLO, temperature=0)
        assert answer.choices[0].message.content == GREETING
        assert_counts(row_of(first, answer.id), answer.usage)
        assert_metrics_equal_ledger(first)
        totals = first.get("/v1/usage").json()["totals"]
        assert totals["requests"] == 2 and totals["prompt_tokens"] == 100 + answer.usage.prompt_tokens
    finally:
        first.stop()

    second = ServerProcess(tmp_path, args, env={"MLXD_HOME": str(home)}).start()
    try:
        assert second.get("/v1/usage").json()["totals"] == totals
        metrics = assert_metrics_equal_ledger(second)  # counters start from what the ledger holds
        assert sum(s.value for s in metrics["mlxd_requests"] if s.name == "mlxd_requests_total") == 2
    finally:
        second.stop()
    conn = sqlite3.connect(home / "usage.db")
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(ledger.SCHEMA_VERSION,)]
    conn.close()


def test_a_failure_mid_stream_is_one_failed_row_with_the_usage_so_far(tmp_path, greeting_model):
    home = tmp_path / "home"
    server = ServerProcess(tmp_path, ["--model", str(greeting_model.path)], module="tests.faulty_server",
                           env={"MLXD_HOME": str(home), "MLXD_TEST_FAIL_AFTER": "5"}).start()
    try:
        body = {"model": "greeter", "messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=WAIT_S) as response:
            chunks = [c for c in map(sse_json, response.iter_lines()) if c]
        usage = chunks[-1]["usage"]
        row = row_of(server, chunks[0]["id"])
        assert (row["outcome"], row["finish_reason"]) == ("failed", "generation_failed")
        assert (row["prompt_tokens"], row["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
        assert row["completion_tokens"] == 5
    finally:
        server.stop()


def test_a_stuck_ledger_writer_never_blocks_a_stream(tmp_path, greeting_model):
    gate = tmp_path / "open"
    server = ServerProcess(tmp_path, ["--model", str(greeting_model.path)], module="tests.slow_ledger_server",
                           env={"MLXD_HOME": str(tmp_path / "home"), "MLXD_TEST_LEDGER_GATE": str(gate)}).start()
    try:
        answers = [stream(server, model="greeter", messages=HELLO, temperature=0) for _ in range(3)]
        for _, usage, chunks in answers:  # whole streams, usage included, while nothing could be stored
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == GREETING
            assert usage.completion_tokens == len(greeting_model.script_token_ids) + 1
        assert server.get("/v1/usage").json()["totals"]["requests"] == 0
        gate.touch()
        for request_id, usage, _ in answers:
            assert_counts(row_of(server, request_id), usage)
    finally:
        server.stop()
