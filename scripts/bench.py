"""Benchmark mlxd against raw mlx-lm on the same model, in one run, and print ratios.

    python -m scripts.bench                      # builds a ~30M-parameter random model
    python -m scripts.bench --model DIR          # any local MLX model directory

Measures (all client side, streamed, through the real server):
  * decode tokens/s through the server / raw `mlx_lm.stream_generate` in-process;
  * time to first token of an opencode-shaped conversation: cold, warm (second
    turn adds a tool result), and warm after a title request in between;
  * aggregate decode tokens/s with 1, 4 and 8 concurrent streams;
  * peak memory of both.
Absolute numbers depend on the machine; compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.blas import setup_blas  # noqa: E402  (must run before mlx.core is imported)

BLAS = setup_blas()

import mlx.core as mx  # noqa: E402
import openai  # noqa: E402
from mlx_lm import load, stream_generate  # noqa: E402
from mlx_lm.sample_utils import make_logits_processors  # noqa: E402

from scripts.testmodels import build_random_model  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402

MODEL = "bench"  # replaced by the served model's id
SYSTEM_WORDS = "You are opencode, an interactive CLI coding agent. Follow the user's instructions exactly. "


def opencode_like_tools(n: int = 10) -> list[dict]:
    """Tools shaped like opencode's (with "$schema" keys), to make the prompt realistic."""
    return [
        {
            "type": "function",
            "function": {
                "name": f"tool_{i}",
                "description": f"Tool number {i}. " + "It does a useful thing with files and commands. " * 8,
                "parameters": {
                    "$schema": "http://json-schema.org/draft-07/schema#",
                    "type": "object",
                    "properties": {
                        "path": {"type": "string", "description": "The absolute path to operate on."},
                        "command": {"type": "string", "description": "The command to run, if any."},
                    },
                    "required": ["path"],
                    "additionalProperties": False,
                },
            },
        }
        for i in range(n)
    ]


def system_prompt_of(n_tokens: int, tokenizer) -> str:
    words = SYSTEM_WORDS
    text = ""
    while len(tokenizer.encode(text)) < n_tokens:
        text += words
    return text


def raw_decode(model_dir: Path, n_tokens: int) -> dict:
    """Decode speed of mlx-lm itself, in this process."""
    model, tokenizer = load(str(model_dir))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Write a story."}], add_generation_prompt=True)
    no_eos = make_logits_processors({t: -1e9 for t in tokenizer.eos_token_ids})
    mx.reset_peak_memory()
    last = None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=n_tokens, logits_processors=no_eos):
        pass
    return {"decode_tps": last.generation_tps, "prompt_tps": last.prompt_tps, "peak_gb": mx.get_peak_memory() / 1e9}


def stream_once(client, messages, *, max_tokens, tools=None, no_eos=None) -> dict:
    start = time.perf_counter()
    first = last = None
    usage = None
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=tools,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        logit_bias=no_eos,
    )
    for chunk in stream:
        if chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].delta.tool_calls):
            now = time.perf_counter()
            first = first or now
            last = now
        if chunk.usage:
            usage = chunk.usage
    ttft = (first or time.perf_counter()) - start
    decode_s = (last or 0) - (first or 0)
    return {
        "ttft": ttft,
        "decode_tps": (usage.completion_tokens - 1) / decode_s if decode_s > 0 else 0.0,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.prompt_tokens_details.cached_tokens,
        "prompt_tokens": usage.prompt_tokens,
        "elapsed": time.perf_counter() - start,
    }


def concurrent_streams(client, n: int, max_tokens: int, no_eos) -> float:
    """Aggregate decode tokens/s of n simultaneous streams (distinct prompts)."""
    results = [None] * n

    def run(i):
        results[i] = stream_once(client, [{"role": "user", "content": f"Story number {i}."}], max_tokens=max_tokens, no_eos=no_eos)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return sum(r["completion_tokens"] for r in results) / wall


def peak_rss_gb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model directory (default: build a random ~30M model)")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--system-tokens", type=int, default=1500, help="system prompt size of the agent turn")
    parser.add_argument("--skip-agent", action="store_true", help="only the decode comparison")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mlxd-bench-"))
    model_dir = args.model
    if model_dir is None:
        model_dir = build_random_model(work / "bench", hidden_size=512, num_layers=8, intermediate_size=1536,
                                       context_length=32768)
    print(f"model: {model_dir}  BLAS: {BLAS.library}")

    raw = raw_decode(model_dir, args.decode_tokens)
    server = ServerProcess(work, ["--model", str(model_dir), "--keep-alive", "-1"]).start()
    try:
        client = server.client()
        global MODEL
        MODEL = client.models.list().data[0].id
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        no_eos = {str(tokenizer.eos_token_id): -100}
        stream_once(client, [{"role": "user", "content": "warm up"}], max_tokens=4)
        served = stream_once(client, [{"role": "user", "content": "Write a story."}], max_tokens=args.decode_tokens, no_eos=no_eos)
        rows = [
            ("decode tokens/s, raw mlx_lm", f"{raw['decode_tps']:.1f}", ""),
            ("decode tokens/s, through mlxd", f"{served['decode_tps']:.1f}", f"ratio {served['decode_tps'] / raw['decode_tps']:.3f}"),
            ("time to first token, short prompt", f"{served['ttft'] * 1000:.0f} ms", ""),
        ]
        if not args.skip_agent:
            rows += agent_rows(client, tokenizer, args.system_tokens)
            one = concurrent_streams(client, 1, args.decode_tokens // 2, no_eos)
            for n in (1, 4, 8):
                agg = one if n == 1 else concurrent_streams(client, n, args.decode_tokens // 2, no_eos)
                rows.append((f"aggregate decode tokens/s, {n} streams", f"{agg:.1f}", f"x{agg / one:.2f} of 1 stream"))
        rows.append(("peak memory, raw mlx_lm (MLX)", f"{raw['peak_gb']:.2f} GB", ""))
        rows.append(("peak memory, mlxd process (RSS)", f"{peak_rss_gb(server.proc.pid):.2f} GB", ""))
    finally:
        server.stop()
    width = max(len(r[0]) for r in rows)
    print(f"\nBLAS: {BLAS.library}")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>12}  {note}")
    return 0


def agent_rows(client, tokenizer, system_tokens: int) -> list[tuple]:
    """Cold vs warm time to first token of an opencode-shaped conversation."""
    tools = opencode_like_tools()
    system = {"role": "system", "content": system_prompt_of(system_tokens, tokenizer)}
    turn1 = [system, {"role": "user", "content": [{"type": "text", "text": "List the files."}]}]
    cold = stream_once(client, turn1, max_tokens=8, tools=tools)
    call = {"id": "call00001", "type": "function", "function": {"name": "tool_0", "arguments": json.dumps({"path": "/tmp"})}}
    turn2 = turn1 + [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call00001", "content": "a.txt\nb.txt"},
    ]
    warm = stream_once(client, turn2, max_tokens=8, tools=tools)
    # The next turn, with and without a title request in between: the title
    # request must not evict the conversation's cache.
    turn3 = turn2 + [{"role": "assistant", "content": "Two files."}]
    warm_no_title = stream_once(client, turn3 + [{"role": "user", "content": "Thanks."}], max_tokens=8, tools=tools)
    stream_once(client, [{"role": "system", "content": "Generate a short title."},
                         {"role": "user", "content": "List the files."}], max_tokens=8)
    warm_after_title = stream_once(client, turn3 + [{"role": "user", "content": "Great."}], max_tokens=8, tools=tools)
    return [
        (f"agent turn 1 TTFT, cold ({cold['prompt_tokens']} prompt tokens)", f"{cold['ttft'] * 1000:.0f} ms", ""),
        (f"agent turn 2 TTFT, warm ({warm['cached_tokens']} cached)", f"{warm['ttft'] * 1000:.0f} ms",
         f"x{warm['ttft'] / cold['ttft']:.3f} of cold"),
        (f"agent turn 3 TTFT, no title between ({warm_no_title['cached_tokens']} cached)", f"{warm_no_title['ttft'] * 1000:.0f} ms", ""),
        (f"agent turn 3 TTFT, title between ({warm_after_title['cached_tokens']} cached)", f"{warm_after_title['ttft'] * 1000:.0f} ms",
         f"x{warm_after_title['ttft'] / warm_no_title['ttft']:.2f} of no title"),
    ]


if __name__ == "__main__":
    sys.exit(main())
