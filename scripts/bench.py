"""Benchmark mlxd against raw mlx-lm on the same model, in one run, and print a table.

    python -m scripts.bench                      # builds a ~30M-parameter random model
    python -m scripts.bench --model DIR          # any local MLX model directory

Measures, client side and streamed through a real server:
  * decode tokens/s through the server / raw `mlx_lm.stream_generate` in this
    process: same prompt, greedy, same max tokens, end tokens banned. Read by a
    minimal SSE client and by the openai SDK, whose per-chunk parsing competes
    with the model for a small machine's CPU. The three alternate for --rounds
    rounds and the medians are compared, because other work on the machine
    moves single runs more than the difference sought;
  * time to first token of an opencode-shaped conversation (a long system
    prompt plus tool schemas, then a second turn that adds a tool result):
    the first turn cold, the second warm;
  * the same second turn of fresh conversations with and without a title
    request in between (medians over --rounds conversations each);
  * aggregate decode tokens/s with 1, 4 and 8 concurrent streams;
  * decode tokens/s of one stream while another client sends an 8k-token
    prompt, over the same stream alone, and the longest wait between two of its
    tokens. The big prompt's prefill is cached beforehand, so what competes with
    decoding is building its prompt (template, tokenization, checkpoints), which
    runs off the MLX thread;
  * peak memory: MLX's peak in this process and in the server (the server's
    includes its prefix cache, bounded by --prompt-cache-gb), and the server's RSS;
  * the prefix cache (--cache-tokens, --restart-tokens): the TTFT of the warm
    turns of one agent conversation against their floor (this process prefilling
    just the new tokens onto a cache of the cached length, plus one decode step),
    the exact repeat's TTFT against two decode steps plus 20 ms, a branch of the
    conversation (read from a copy of its cache), and after a restart the next
    turn's TTFT (its history read from the disk tier) over the first turn's cold TTFT;
    then the same for a real model, SmolLM2-135M-Instruct from PyPI as float32
    (--real-cache-tokens, --real-restart-tokens; --skip-real leaves it out).
Absolute numbers depend on the machine; compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_client import (  # noqa: E402  (sets up the BLAS before MLX loads)
    BLAS, STORY, TOOL_SECONDS, Bench, _list, _ms, opencode_like_tools, peak_rss_gb, system_prompt_of,
)

import mlx.core as mx  # noqa: E402

from scripts.bench_cache import cache_rows, model_cache_rows, restart_rows, smollm2_float32  # noqa: E402
from scripts.testmodels import build_random_model  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402


def decode_rows(bench: Bench, n_tokens: int, rounds: int) -> list[tuple]:
    bench.stream(STORY, max_tokens=4)  # warm up both sides
    bench.raw_decode(4)
    raw, light, sdk = [], [], []
    for _ in range(rounds):
        raw.append(bench.raw_decode(n_tokens))
        light.append(bench.light_decode(n_tokens))
        sdk.append(bench.stream(STORY, max_tokens=n_tokens, no_eos=True)["decode_tps"])
    raw_tps = statistics.median(raw)

    def served_row(label: str, values: list[float]) -> tuple:
        tps = statistics.median(values)
        return (f"decode tokens/s, through mlxd, {label}", f"{tps:.1f}", f"ratio {tps / raw_tps:.3f}; {_list(values)}")

    return [
        ("decode tokens/s, raw mlx_lm", f"{raw_tps:.1f}", f"median of {rounds}: {_list(raw)}"),
        served_row("minimal SSE client", light),
        served_row("openai SDK", sdk),
    ]


def agent_rows(bench: Bench, system_tokens: int, rounds: int) -> list[tuple]:
    """Cold vs warm time to first token of an opencode-shaped conversation, and
    its second turn with and without a title request in between."""
    tools = opencode_like_tools()
    system = {"role": "system", "content": system_prompt_of(system_tokens, bench.tokenizer)}

    def turns(task: str) -> tuple[list, list]:
        turn1 = [system, {"role": "user", "content": [{"type": "text", "text": task}]}]
        call = {"id": "call00001", "type": "function",
                "function": {"name": "tool_0", "arguments": json.dumps({"path": "/tmp"})}}
        turn2 = turn1 + [
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call00001", "content": "a.txt\nb.txt"},
        ]
        return turn1, turn2

    def ask(messages, **kwargs) -> dict:
        return bench.stream(messages, max_tokens=1, **kwargs)

    def conversation(task: str, title: bool = False) -> tuple[dict, dict]:
        turn1, turn2 = turns(task)
        first = ask(turn1, tools=tools)
        if title:
            ask([{"role": "system", "content": "Generate a short title for this conversation."},
                 {"role": "user", "content": task}])
        time.sleep(TOOL_SECONDS)
        return first, ask(turn2, tools=tools)

    cold, warm = conversation("List the files.")
    plain, titled = [], []
    for i in range(rounds):  # alternating, so that load from elsewhere hits both alike
        plain.append(conversation(f"List the files in directory {i}.")[1])
        titled.append(conversation(f"Count the files in directory {i}.", title=True)[1])
    plain_ttft = statistics.median(r["ttft"] for r in plain)
    titled_ttft = statistics.median(r["ttft"] for r in titled)
    return [
        (f"agent turn 1 TTFT, cold ({cold['prompt_tokens']} prompt tokens)", _ms(cold["ttft"]), ""),
        (f"agent turn 2 TTFT, warm ({warm['prompt_tokens']} prompt, {warm['cached_tokens']} cached)",
         _ms(warm["ttft"]), f"x{warm['ttft'] / cold['ttft']:.3f} of cold"),
        (f"turn 2 TTFT, no title between ({plain[0]['cached_tokens']} cached)", _ms(plain_ttft),
         f"median of {rounds}: {_list(r['ttft'] * 1000 for r in plain)}"),
        (f"turn 2 TTFT, title between ({titled[0]['cached_tokens']} cached)", _ms(titled_ttft),
         f"x{titled_ttft / plain_ttft:.2f} of no title; {_list(r['ttft'] * 1000 for r in titled)}"),
    ]


def concurrency_rows(bench: Bench, max_tokens: int) -> list[tuple]:
    one = bench.concurrent(1, max_tokens)
    rows = [("aggregate decode tokens/s, 1 stream", f"{one:.1f}", "")]
    for n in (4, 8):
        agg = bench.concurrent(n, max_tokens)
        rows.append((f"aggregate decode tokens/s, {n} streams", f"{agg:.1f}", f"x{agg / one:.2f} of 1 stream"))
    return rows


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}


def structured_rows(bench: Bench, n_tokens: int, rounds: int) -> list[tuple]:
    """Constrained decoding: decode tokens/s of a stream held inside a JSON string
    (the mask allows almost every token, so it is computed in full each step) over
    the same stream unconstrained, through the server and in this process with raw
    mlx-lm; time to first token with a grammar compiled
    cold and cached (same prompt, prefix-cached, so the grammar is the difference);
    and, in this process, compile time and the per-token cost of the mask."""
    from mlxd.server import constrained

    story = _schema_format({"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]})
    bench.light_decode(4, story)
    free, held = [], []
    for _ in range(rounds):
        free.append(bench.light_decode(n_tokens))
        held.append(bench.light_decode(n_tokens, story))
    free_tps, held_tps = statistics.median(free), statistics.median(held)

    def story_processor():
        return constrained.processor_for(
            bench.tokenizer, response_format=constrained.ResponseFormat("json_schema", story["json_schema"]["schema"]),
            tool_format=None, tools=None, tool_choice="auto", forced=False, think=None, starts_in_reasoning=False,
        )  # fmt: skip

    raw_free, raw_held = [], []
    for _ in range(rounds):
        raw_free.append(bench.raw_decode(n_tokens))
        raw_held.append(bench.raw_decode(n_tokens, story_processor()))
    raw_ratio = statistics.median(raw_held) / statistics.median(raw_free)

    def tools_schema(i: int) -> dict:  # ten tool-shaped objects: a grammar worth compiling
        tools = opencode_like_tools()
        props = {f"{t['function']['name']}_{i}": t["function"]["parameters"] for t in tools}
        return {"type": "object", "properties": props, "required": list(props)[:1], "additionalProperties": False}

    def ttft(schema: dict) -> float:
        return bench.timed_first_chunk(_schema_format(schema))

    ttft(tools_schema(-1))  # the prompt is cached from here on
    cold, cached = [], []
    for i in range(rounds):
        cold.append(ttft(tools_schema(i)))
        cached.append(ttft(tools_schema(i)))

    compile_s, copy_s = [], []
    for i in range(rounds):
        grammar = constrained.response_grammar(
            constrained.ResponseFormat("json_schema", tools_schema(1000 + i)), {}, None, None, False
        )
        start = time.perf_counter()
        constrained.matcher(bench.tokenizer, grammar)
        compile_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        constrained.matcher(bench.tokenizer, grammar)
        copy_s.append(time.perf_counter() - start)

    from llguidance import LLMatcher, LLTokenizer, TokenizerWrapper

    grammar = constrained.response_grammar(
        constrained.ResponseFormat("json_schema", story["json_schema"]["schema"]), {}, None, None, False
    )
    small = constrained.matcher(bench.tokenizer, grammar)
    for token in bench.tokenizer.encode('{"story": "', add_special_tokens=False):
        small.consume_token(token)
    small_us = _mask_cost_us(small, bench.tokenizer.convert_tokens_to_ids("a"), len(bench.tokenizer))
    vocabulary = SyntheticVocabulary()
    big = LLMatcher(LLTokenizer(TokenizerWrapper(vocabulary)), constrained.GRAMMAR_OPTIONS + grammar)
    for token in b'{"story": "':
        big.consume_token(token)
    big_us = _mask_cost_us(big, ord("a"), len(vocabulary.tokens))
    return [
        ("decode tokens/s, unconstrained (minimal SSE client)", f"{free_tps:.1f}", f"median of {rounds}: {_list(free)}"),
        ("decode tokens/s, inside a JSON-schema string", f"{held_tps:.1f}",
         f"ratio {held_tps / free_tps:.3f}; {_list(held)}"),
        ("the same in process (mlx_lm, grammar processor or not)", f"{raw_ratio:.3f}",
         f"ratio of medians; {_list(raw_free)} / {_list(raw_held)}"),
        ("TTFT, new grammar (10 tool-shaped objects)", _ms(statistics.median(cold)), _list(v * 1000 for v in cold)),
        ("TTFT, cached grammar", _ms(statistics.median(cached)),
         f"x{statistics.median(cached) / statistics.median(cold):.2f} of new; {_list(v * 1000 for v in cached)}"),
        ("grammar compile, in process (cold / cached copy)",
         f"{statistics.median(compile_s) * 1000:.2f} ms", f"{statistics.median(copy_s) * 1000:.3f} ms cached"),
        (f"grammar processor per token, vocabulary {len(bench.tokenizer)}", f"{small_us:.0f} us",
         "in a JSON string: advance + full bitmask + MLX apply"),
        (f"grammar processor per token, vocabulary {len(vocabulary.tokens)} (synthetic)", f"{big_us:.0f} us", ""),
    ]


def _mask_cost_us(matcher, letter: int, width: int, steps: int = 200) -> float:
    """The grammar processor's time per step inside a JSON string (the matcher has
    read `{"story": "`), where nearly every token is allowed: advance by one letter,
    compute the full bitmask, apply it to the logits."""
    from mlxd.server import constrained

    processor = constrained.GrammarProcessor(matcher, [])
    processor.started = True  # each call advances the matcher by the last token: a letter
    logits = mx.zeros((1, width))
    tokens = mx.array([letter])
    start = time.perf_counter()
    for _ in range(steps):
        mx.eval(processor(tokens, logits))
    return (time.perf_counter() - start) / steps * 1e6


class SyntheticVocabulary:
    """A byte-level vocabulary of `size` tokens (every byte, then random text pieces):
    the mask's cost at the size of real models' vocabularies (Qwen: 151,936)."""

    def __init__(self, size: int = 151_936, seed: int = 0):
        import random

        rng, alphabet = random.Random(seed), "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-.,:;'()/\n"
        pieces = {bytes([b]) for b in range(256)}
        self.tokens = [bytes([b]) for b in range(256)]
        while len(self.tokens) < size - 1:
            piece = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 9))).encode()
            if piece not in pieces:
                pieces.add(piece)
                self.tokens.append(piece)
        self.tokens.append(b"<eos>")
        self.eos_token_id, self.bos_token_id, self.special_token_ids = size - 1, None, [size - 1]

    def __call__(self, text) -> list[int]:
        return list(text if isinstance(text, bytes) else text.encode())


def prompt_build_rows(bench: Bench, n_tokens: int, rounds: int, prompt_tokens: int = 8000) -> list[tuple]:
    """One stream's decode speed alone, and while another client sends an 8k-token
    prompt once its first token is out. The big prompt's prefill is cached first:
    what is left to compete is building the prompt (off the MLX thread) and the
    prefix-cache hit; a fresh 8k prefill would be the model's own compute."""
    big = [{"role": "system", "content": system_prompt_of(prompt_tokens, bench.tokenizer)},
           {"role": "user", "content": "Go on."}]
    sent = bench.stream(big, max_tokens=1)  # from now on its prefill is a cache hit
    bench.light_decode(4)
    alone, beside, gaps_alone, gaps_beside, builds = [], [], [], [], []
    for _ in range(rounds):
        alone.append(bench.light_decode(n_tokens))
        gaps_alone.append(bench.max_gap * 1000)
        sender = threading.Thread(target=lambda: builds.append(bench.stream(big, max_tokens=1)["ttft"]))
        beside.append(bench.light_decode(n_tokens, on_first=sender.start))
        gaps_beside.append(bench.max_gap * 1000)
        sender.join()
    ratio = statistics.median(beside) / statistics.median(alone)
    return [
        ("decode tokens/s, one stream alone", f"{statistics.median(alone):.1f}",
         f"median of {rounds}: {_list(alone)}; longest gap {_list(gaps_alone)} ms"),
        (f"decode tokens/s, while a {sent['prompt_tokens']}-token prompt is sent", f"{statistics.median(beside):.1f}",
         f"ratio {ratio:.2f}; {_list(beside)}; longest gap {_list(gaps_beside)} ms; "
         f"the prompt's first token after {_list(b * 1000 for b in builds)} ms"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model directory (default: build a random ~30M model)")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7, help="repetitions of the noisy comparisons")
    parser.add_argument("--system-tokens", type=int, default=4500,
                        help="system prompt size of the agent turn; the ten tool schemas add about 3,600 "
                             "tokens with the random model's small vocabulary")
    parser.add_argument("--skip-agent", action="store_true", help="only the decode comparison")
    parser.add_argument("--only-prompt-build", action="store_true",
                        help="only decode beside a big prompt's build")
    parser.add_argument("--cache-only", action="store_true", help="only the prefix-cache figures")
    parser.add_argument("--cache-tokens", default="2000,16000",
                        help="system prompt sizes of the warm-turn figures, comma-separated")
    parser.add_argument("--restart-tokens", type=int, default=8000,
                        help="system prompt size of the restart figure")
    parser.add_argument("--skip-structured", action="store_true", help="leave out constrained decoding")
    parser.add_argument("--skip-real", action="store_true",
                        help="leave out the prefix-cache figures of the real model (SmolLM2-135M, from PyPI)")
    parser.add_argument("--real-cache-tokens", default="2000,6000",
                        help="the real model's warm-turn sizes (its context is 8k tokens)")
    parser.add_argument("--real-restart-tokens", type=int, default=6000)
    args = parser.parse_args()
    print(f"BLAS: {BLAS.library}", flush=True)
    with tempfile.TemporaryDirectory(prefix="mlxd-bench-") as work:
        print_table(measure(args, Path(work)))
        if not args.skip_agent and not args.skip_real:
            print("\nthe prefix-cache figures of SmolLM2-135M-Instruct (float32)", flush=True)
            print_table(model_cache_rows(smollm2_float32(Path(work)), Path(work),
                                         [int(n) for n in args.real_cache_tokens.split(",")],
                                         args.real_restart_tokens, min(args.rounds, 3), "SmolLM2-135M"))
    return 0


def print_table(rows: list[tuple]) -> None:
    width = max(len(r[0]) for r in rows)
    print()
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>10}  {note}", flush=True)


def measure(args: argparse.Namespace, work: Path) -> list[tuple]:
    """The table's rows; `work` holds the built model and the server's log."""
    model_dir = args.model
    if model_dir is None:
        model_dir = build_random_model(work / "bench", hidden_size=512, num_layers=8, intermediate_size=1536,
                                       context_length=32768)
    print(f"model: {model_dir}", flush=True)

    server = ServerProcess(work, ["--model", str(model_dir), "--keep-alive", "-1"]).start()
    try:
        bench = Bench(server, model_dir)
        if args.only_prompt_build:
            return prompt_build_rows(bench, args.decode_tokens, args.rounds)
        mx.reset_peak_memory()
        rows = [] if args.cache_only else decode_rows(bench, args.decode_tokens, args.rounds)
        raw_peak = mx.get_peak_memory() / 1e9
        if not args.skip_agent and not args.cache_only:
            rows += agent_rows(bench, args.system_tokens, args.rounds)
            rows += concurrency_rows(bench, args.decode_tokens)
            rows += prompt_build_rows(bench, args.decode_tokens, args.rounds)
        if not args.skip_agent:
            rows += cache_rows(bench, [int(n) for n in args.cache_tokens.split(",")], min(args.rounds, 3))
        if not args.skip_structured:
            rows += structured_rows(bench, args.decode_tokens, args.rounds)
        memory = server.get("/health").json()["memory"]
        rows.append(("peak memory, raw mlx_lm (MLX)", f"{raw_peak:.2f} GB", ""))
        rows.append(("peak memory, mlxd (MLX)", f"{memory['mlx_peak_bytes'] / 1e9:.2f} GB",
                     f"prefix cache holds {memory['prompt_cache_bytes'] / 1e9:.2f} GB "
                     f"of its {memory['prompt_cache_budget_bytes'] / 1e9:.2f} GB budget"))
        rows.append(("peak memory, mlxd process (RSS)", f"{peak_rss_gb(server.proc.pid):.2f} GB",
                     "Linux only"))
    finally:
        server.stop()
    if not args.skip_agent:
        rows += restart_rows(bench, model_dir, work, args.restart_tokens)
    return rows


if __name__ == "__main__":
    sys.exit(main())
