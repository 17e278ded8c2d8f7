"""Stress matrix: scenario x concurrency x door against a real `mlxd serve`, then an audit
of the usage ledger against what the clients saw.

    python -m scripts.stress                          # concurrency 1, 4, 8; 2 rounds per client
    python -m scripts.stress --concurrency 1,4 --rounds 1

It builds tiny test models (a scripted text model, a scripted tool caller, a random
qwen2), serves them on a free loopback port with a fresh MLXD_HOME, and sends each
scenario through each door with N clients at once (each client `--rounds` requests):

  text       a whole answer, finish `stop`
  tool_call  a tool call, finish `tool_calls`
  stop       a stop string cuts the answer
  max_tokens `max_tokens` cuts the answer, finish `length`
  cache_hit  a long shared system prompt, read from the prefix cache
  hang_up    the client reads a few chunks and closes the stream

It prints p50/p95 time to first token and decode tokens/s (client side) per cell, then
checks the ledger: one row per request; every answered request's row holds exactly the
usage its client received; every hung-up request's row is cancelled with at least the
tokens the client read; the ledger's totals equal the clients' usage plus what the
hung-up requests computed. Exits 1 if any check fails. Everything is bounded: a fixed
number of requests, a token cap on each, a timeout on each.

A door is one function that sends a scenario's request (written in chat completions'
terms) in its own API and returns what its client saw, usage and finish mapped back to
the ledger's names: `chat` (/v1/chat/completions, a minimal SSE client), `messages`
(/v1/messages, a minimal SSE client; Anthropic's `input_tokens` leaves out the cached
`cache_read_input_tokens`) and `responses` (/v1/responses through the openai SDK's
stream; `input_tokens` includes the cached ones). The Responses API has no stop
strings, so that door skips the `stop` scenario.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.testmodels import build_random_model, build_scripted_model  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402

TIMEOUT_S = 120
TEXT = ("Stress testing mlxd means many clients at once, each with its own stop strings, limits and "
        "tools, and a ledger that must still add up to the last token.")
CALL = '<tool_call>\n{"name": "bash", "arguments": {"command": "ls -la /tmp"}}\n</tool_call>'
BASH = {"type": "function", "function": {"name": "bash", "description": "Run a shell command.", "parameters": {
    "type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}}
SHARED_SYSTEM = "You are a careful assistant working on a large code base. " * 60  # ~700 tokens
HANG_UP_AFTER = 4  # content chunks read before the client closes
COUNTS = ("prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens")
MESSAGES_MAX_TOKENS = 1024  # Anthropic's max_tokens is required; the scripts end well before it


@dataclass
class Scenario:
    name: str
    model: str
    body: dict
    finish: Optional[str]  # the finish reason the client must see; None for a hang-up
    hang_up: bool = False


def scenarios(tag: str) -> list[Scenario]:
    """`tag` makes a cell's prompts its own, so cache hits come only from the shared prompt."""
    ask = [{"role": "user", "content": f"{tag}: tell me about stress tests."}]
    return [
        Scenario("text", "writer", {"messages": ask, "temperature": 0}, "stop"),
        Scenario("tool_call", "caller", {"messages": ask, "tools": [BASH], "temperature": 0}, "tool_calls"),
        Scenario("stop", "writer", {"messages": ask, "temperature": 0, "stop": ["ledger"]}, "stop"),
        Scenario("max_tokens", "writer", {"messages": ask, "temperature": 0, "max_tokens": 8}, "length"),
        Scenario("cache_hit", "writer", {"messages": [{"role": "system", "content": SHARED_SYSTEM}, *ask],
                                         "temperature": 0}, "stop"),
        Scenario("hang_up", "babbler", {"messages": ask, "max_tokens": 2000}, None, hang_up=True),
    ]


@dataclass
class Seen:
    """What one client saw."""

    door: str
    scenario: str
    request_id: str = ""
    finish: Optional[str] = None
    usage: Optional[dict] = None  # the door's usage, in the ledger's field names
    ttft_s: Optional[float] = None
    chunks_read: int = 0
    error: str = ""


def _sse(response: httpx.Response):
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: "):])


def chat_door(base_url: str, scenario: Scenario) -> Seen:
    """POST /v1/chat/completions, streamed, read by a minimal SSE client."""
    seen = Seen("chat", scenario.name)
    body = {"model": scenario.model, "stream": True, "stream_options": {"include_usage": True}, **scenario.body}
    start = time.perf_counter()
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=TIMEOUT_S) as response:
        if response.status_code != 200:
            seen.error = f"HTTP {response.status_code}: {response.read()[:200]!r}"
            return seen
        for chunk in _sse(response):
            seen.request_id = chunk.get("id", seen.request_id)
            if "error" in chunk:
                seen.error = chunk["error"]["message"]
            delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
            if delta.get("content") or delta.get("tool_calls"):
                if seen.ttft_s is None:
                    seen.ttft_s = time.perf_counter() - start
                seen.chunks_read += 1
                if scenario.hang_up and seen.chunks_read >= HANG_UP_AFTER:
                    return seen  # leaving the block closes the connection
            if chunk.get("choices") and chunk["choices"][0]["finish_reason"]:
                seen.finish = chunk["choices"][0]["finish_reason"]
            if chunk.get("usage"):
                u = chunk["usage"]
                seen.usage = {
                    "prompt_tokens": u["prompt_tokens"],
                    "cached_tokens": u["prompt_tokens_details"]["cached_tokens"],
                    "completion_tokens": u["completion_tokens"],
                    "reasoning_tokens": u["completion_tokens_details"]["reasoning_tokens"],
                }
    return seen


def _split_system(messages: list[dict]) -> tuple[Optional[str], list[dict]]:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return system or None, [m for m in messages if m["role"] != "system"]


def _anthropic_body(scenario: Scenario) -> dict:
    chat = scenario.body
    system, messages = _split_system(chat["messages"])
    body = {"model": scenario.model, "messages": messages, "max_tokens": chat.get("max_tokens", MESSAGES_MAX_TOKENS),
            "stream": True}
    if system:
        body["system"] = system
    if "temperature" in chat:
        body["temperature"] = chat["temperature"]
    if chat.get("stop"):
        body["stop_sequences"] = chat["stop"]
    if chat.get("tools"):
        body["tools"] = [{"name": t["function"]["name"], "description": t["function"]["description"],
                          "input_schema": t["function"]["parameters"]} for t in chat["tools"]]
    return body


ANTHROPIC_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "tool_use": "tool_calls", "max_tokens": "length"}


def messages_door(base_url: str, scenario: Scenario) -> Seen:
    """POST /v1/messages, streamed, read by a minimal SSE client."""
    seen = Seen("messages", scenario.name)
    start = time.perf_counter()
    with httpx.stream("POST", base_url + "/v1/messages", json=_anthropic_body(scenario), timeout=TIMEOUT_S,
                      headers={"anthropic-version": "2023-06-01"}) as response:
        if response.status_code != 200:
            seen.error = f"HTTP {response.status_code}: {response.read()[:200]!r}"
            return seen
        for event in _sse(response):
            kind = event["type"]
            if kind == "message_start":
                seen.request_id = event["message"]["id"]
            elif kind == "error":
                seen.error = event["error"]["message"]
            elif kind == "content_block_delta" and event["delta"]["type"] in ("text_delta", "input_json_delta"):
                if seen.ttft_s is None:
                    seen.ttft_s = time.perf_counter() - start
                seen.chunks_read += 1
                if scenario.hang_up and seen.chunks_read >= HANG_UP_AFTER:
                    return seen
            elif kind == "message_delta":
                seen.finish = ANTHROPIC_FINISH[event["delta"]["stop_reason"]]
                u = event["usage"]
                seen.usage = {
                    "prompt_tokens": u["input_tokens"] + u["cache_read_input_tokens"],
                    "cached_tokens": u["cache_read_input_tokens"],
                    "completion_tokens": u["output_tokens"],
                    "reasoning_tokens": u["output_tokens_details"]["thinking_tokens"],
                }
    return seen


def _responses_kwargs(scenario: Scenario) -> dict:
    chat = scenario.body
    system, messages = _split_system(chat["messages"])
    kwargs = {"model": scenario.model, "input": messages, "max_output_tokens": chat.get("max_tokens")}
    if system:
        kwargs["instructions"] = system
    if "temperature" in chat:
        kwargs["temperature"] = chat["temperature"]
    if chat.get("tools"):
        kwargs["tools"] = [{"type": "function", "name": t["function"]["name"], "strict": False,
                            "description": t["function"]["description"], "parameters": t["function"]["parameters"]}
                           for t in chat["tools"]]
    return kwargs


def responses_door(base_url: str, scenario: Scenario) -> Seen:
    """POST /v1/responses through the openai SDK's event stream."""
    seen = Seen("responses", scenario.name)
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="stress", max_retries=0, timeout=TIMEOUT_S)
    start = time.perf_counter()
    try:
        with client.responses.create(stream=True, **_responses_kwargs(scenario)) as stream:
            for event in stream:
                if event.type == "response.created":
                    seen.request_id = event.response.id
                elif event.type in ("response.output_text.delta", "response.function_call_arguments.delta"):
                    if seen.ttft_s is None:
                        seen.ttft_s = time.perf_counter() - start
                    seen.chunks_read += 1
                    if scenario.hang_up and seen.chunks_read >= HANG_UP_AFTER:
                        return seen
                elif event.type == "response.failed":
                    seen.error = event.response.error.message
                elif event.type in ("response.completed", "response.incomplete"):
                    response = event.response
                    calls = any(item.type == "function_call" for item in response.output)
                    seen.finish = "length" if response.status == "incomplete" else "tool_calls" if calls else "stop"
                    u = response.usage
                    seen.usage = {
                        "prompt_tokens": u.input_tokens,
                        "cached_tokens": u.input_tokens_details.cached_tokens,
                        "completion_tokens": u.output_tokens,
                        "reasoning_tokens": u.output_tokens_details.reasoning_tokens,
                    }
    except openai.APIError as e:
        seen.error = f"{type(e).__name__}: {e}"
    finally:
        client.close()
    return seen


DOORS: dict[str, Callable[[str, Scenario], Seen]] = {
    "chat": chat_door, "messages": messages_door, "responses": responses_door,
}
# Scenarios a door's API cannot express.
SKIPPED = {"responses": {"stop"}}


def run_cell(base_url: str, door: str, scenario: Scenario, concurrency: int, rounds: int) -> list[Seen]:
    def client(_):
        return [DOORS[door](base_url, scenario) for _ in range(rounds)]

    with ThreadPoolExecutor(concurrency) as pool:
        return [seen for batch in pool.map(client, range(concurrency)) for seen in batch]


def pct(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, int(-(-len(ordered) * q // 100)) - 1)]


def fmt(x: Optional[float], digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_table(door: str, cells: list[tuple[str, int, list[Seen]]], rows: dict[str, dict]) -> None:
    print(f"\n{door} door: time to first token (ms, client side) and decode tokens/s (the ledger's, per request)")
    print("| scenario | concurrency | requests | TTFT p50 | TTFT p95 | tok/s p50 | tok/s p95 |")
    print("|---|---|---|---|---|---|---|")
    for name, c, seen in cells:
        ttft = [s.ttft_s * 1000 for s in seen if s.ttft_s is not None]
        tps = [rows[s.request_id]["decode_tps"] for s in seen
               if s.request_id in rows and rows[s.request_id]["decode_tps"] is not None]
        print(f"| {name} | {c} | {len(seen)} | {fmt(pct(ttft, 50), 0)} | {fmt(pct(ttft, 95), 0)} "
              f"| {fmt(pct(tps, 50), 1)} | {fmt(pct(tps, 95), 1)} |")


def wait_for_ledger(base_url: str, n: int) -> list[dict]:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        rows = httpx.get(base_url + "/v1/usage/requests", params={"limit": 1000}, timeout=30).json()["data"]
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def audit(base_url: str, seen: list[Seen], rows: list[dict]) -> list[str]:
    """What does not add up, as sentences; empty when the ledger matches the clients."""
    problems = [f"{s.door}/{s.scenario}: {s.error}" for s in seen if s.error]
    by_id = {r["request_id"]: r for r in rows}
    if len(rows) != len(seen) or len(by_id) != len(rows):
        problems.append(f"{len(rows)} ledger rows ({len(by_id)} ids) for {len(seen)} requests")
    client_sum = dict.fromkeys(COUNTS, 0)
    cancelled_sum = dict.fromkeys(COUNTS, 0)
    late = 0
    expected_finish = {s.name: s.finish for s in scenarios("")}
    for s in seen:
        row = by_id.get(s.request_id)
        if row is None:
            problems.append(f"{s.door}/{s.scenario}: no ledger row for {s.request_id}")
            continue
        if s.usage is not None:
            for k in COUNTS:
                client_sum[k] += s.usage[k]
            if any(row[k] != s.usage[k] for k in COUNTS) or row["finish_reason"] != s.finish:
                problems.append(f"{s.request_id}: ledger {row} != client {s.usage} {s.finish}")
        elif row["outcome"] == "cancelled" and row["finish_reason"] == "decode":
            for k in COUNTS:
                cancelled_sum[k] += row[k]
            if row["completion_tokens"] < s.chunks_read:
                problems.append(f"{s.request_id}: {row['completion_tokens']} tokens recorded, {s.chunks_read} read")
        elif row["outcome"] == "finished":  # ended before the server noticed the hang-up
            late += 1
            for k in COUNTS:
                cancelled_sum[k] += row[k]
        else:
            problems.append(f"{s.request_id}: hung up, but the ledger says {row['outcome']} ({row['finish_reason']})")
        if s.usage is not None and s.finish != expected_finish[s.scenario]:
            problems.append(f"{s.request_id}: finish {s.finish}, expected {expected_finish[s.scenario]}")
    totals = httpx.get(base_url + "/v1/usage", timeout=30).json()["totals"]
    print("\nledger audit")
    print("| tokens | ledger total | clients' usage | + hung-up requests computed | equal |")
    print("|---|---|---|---|---|")
    for k in COUNTS:
        equal = totals[k] == client_sum[k] + cancelled_sum[k]
        print(f"| {k} | {totals[k]:,} | {client_sum[k]:,} | {cancelled_sum[k]:,} | {'yes' if equal else 'NO'} |")
        if not equal:
            problems.append(f"{k}: ledger {totals[k]} != clients {client_sum[k]} + hung-up {cancelled_sum[k]}")
    hung = sum(1 for s in seen if s.usage is None and not s.error)
    print(f"\n{len(seen)} requests, {len(rows)} ledger rows; {hung} hang-ups "
          f"({hung - late} recorded as cancelled mid-decode, {late} finished before the server saw the hang-up)")
    return problems


def build_models(work: Path) -> list[str]:
    writer = build_scripted_model(work / "writer", TEXT)
    caller = build_scripted_model(work / "caller", CALL)
    babbler = build_random_model(work / "babbler", context_length=4096)
    return ["--model", str(writer.path), "--model", str(caller.path), "--model", str(babbler)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,4,8", help="clients at once, comma separated (default: 1,4,8)")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per cell (default: 2)")
    parser.add_argument("--doors", default=",".join(DOORS), help=f"doors to stress (default: {','.join(DOORS)})")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    doors = [d for d in args.doors.split(",") if d]
    with tempfile.TemporaryDirectory(prefix="mlxd-stress-") as tmp:
        work = Path(tmp)
        model_args = build_models(work)
        server = ServerProcess(work, model_args + ["--max-loaded-models", "3", "--max-batch-size", str(max(levels)),
                                                   "--keep-alive", "-1"], env={"MLXD_HOME": str(work / "home")})
        server.start()
        try:
            cells = {door: [] for door in doors}
            for door in doors:
                for scenario_index in range(len(scenarios(""))):
                    for c in levels:
                        scenario = scenarios(f"{door}-{c}")[scenario_index]
                        if scenario.name in SKIPPED.get(door, ()):
                            continue
                        cells[door].append((scenario.name, c, run_cell(server.base_url, door, scenario, c, args.rounds)))
            seen = [s for door in doors for _, _, cell in cells[door] for s in cell]
            rows = wait_for_ledger(server.base_url, len(seen))
            for door in doors:
                print_table(door, cells[door], {r["request_id"]: r for r in rows})
            problems = audit(server.base_url, seen, rows)
        finally:
            server.stop()
    for problem in problems:
        print("FAIL:", problem)
    print("ledger audit:", "FAILED" if problems else "passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
