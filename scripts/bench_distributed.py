"""Benchmark a 2-rank group on loopback against one process, same model, and print a table.

    python -m scripts.bench_distributed              # builds a ~30M-parameter random model
    python -m scripts.bench_distributed --model DIR  # any local MLX model directory

For each of one process, 2 ranks by tensor parallelism and 2 ranks by pipeline:
decode tokens/s of one greedy stream (end tokens banned) and time to first token
of a short prompt, medians over --rounds, and their ratio to one process.

On one machine the ranks share its cores and talk over loopback, so this shows
the cost of the protocol (a broadcast per step, the model's collectives), never
a speed-up: that needs two machines, each with its own memory bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.testmodels import build_random_model  # noqa: E402
from tests.server_process import GroupProcess, ServerProcess  # noqa: E402

STORY = [{"role": "user", "content": "Write a story."}]


def stream_once(server: ServerProcess, model: str, n_tokens: int, no_eos: dict) -> tuple[float, float]:
    """(time to first token, decode tokens/s) of one greedy stream, read by a minimal SSE client."""
    body = {"model": model, "messages": STORY, "max_tokens": n_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logit_bias": no_eos}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    assert tokens == n_tokens, tokens
    return first - start, (tokens - 1) / (last - first)


def measure(server: ServerProcess, n_tokens: int, rounds: int) -> tuple[float, float]:
    model = server.client().models.list().data[0].id
    eos = json.loads((Path(server.args[server.args.index("--model") + 1]) / "generation_config.json").read_text())
    ends = eos["eos_token_id"] if isinstance(eos["eos_token_id"], list) else [eos["eos_token_id"]]
    no_eos = {str(t): -100 for t in ends}
    stream_once(server, model, 4, no_eos)  # warm up
    runs = [stream_once(server, model, n_tokens, no_eos) for _ in range(rounds)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a local MLX model directory (default: a random ~30M qwen2)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = args.model or build_random_model(work / "bench-random", hidden_size=512, num_layers=8, num_heads=8)
        # Two ranks on one machine share its cores: one BLAS thread each, or their thread
        # pools spin against each other.
        one_thread = {"OPENBLAS_NUM_THREADS": "1"}
        setups = [("1 process", ServerProcess, [], None),
                  ("2 ranks, tensor", GroupProcess, ["--shard", "tensor"], one_thread),
                  ("2 ranks, pipeline", GroupProcess, ["--shard", "pipeline"], one_thread)]
        rows = []
        for label, kind, extra, env in setups:
            server = kind(work, ["--model", str(model), "--no-starter", *extra], env=env).start()
            try:
                rows.append((label, *measure(server, args.tokens, args.rounds)))
            finally:
                server.stop()
    base_ttft, base_tps = rows[0][1], rows[0][2]
    print(f"{'setup':<20} {'TTFT':>9} {'decode tok/s':>13} {'decode ratio':>13}")
    for label, ttft, tps in rows:
        print(f"{label:<20} {ttft * 1000:>7.0f}ms {tps:>13.1f} {tps / base_tps:>12.2f}x"
              f"{'' if label == rows[0][0] else f'  (TTFT {ttft / base_ttft:.2f}x)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
