"""Side-by-side speed of MLX on the CPU with the system OpenBLAS and with the bundled reference BLAS.

Each BLAS runs in its own child process (the choice must precede the first
`import mlx.core`): sgemm GFLOP/s, then a random ~30M-parameter qwen2: cold
time to first token on a long prompt, single-stream decode, and aggregate
decode of several concurrent streams through mlx-lm's BatchGenerator.

    python scripts/blas_bench.py [--prompt-tokens 1536] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlxd.server.blas import describe, setup_blas  # noqa: E402  (must precede mlx)


def build_model(dtype: str):
    """A random qwen2 of ~30M parameters; tied embeddings, like the small real ones."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2

    mx.random.seed(0)
    args = qwen2.ModelArgs(
        model_type="qwen2", hidden_size=512, num_hidden_layers=6, intermediate_size=1536,
        num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=24000,
    )
    model = qwen2.Model(args)
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    return model, args.vocab_size, params


def child(opts: argparse.Namespace) -> dict:
    """All measurements under whichever BLAS setup_blas() put in effect."""
    info = setup_blas()
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator, generate_step

    from mlxd.server.blas import measure_gflops

    results = {"blas": describe(info), "sgemm_1024_gflops": measure_gflops(n=1024, repeats=2)}
    model, vocab, params = build_model(opts.dtype)
    results["params_m"] = params / 1e6

    prompt = mx.random.randint(0, vocab, (opts.prompt_tokens,)).tolist()
    start = time.perf_counter()
    steps = generate_step(mx.array(prompt), model, max_tokens=opts.decode_tokens + 1)
    next(steps)
    results["ttft_s"] = time.perf_counter() - start
    start = time.perf_counter()
    decoded = sum(1 for _ in steps)
    results["decode_tps"] = decoded / (time.perf_counter() - start)

    short = [mx.random.randint(0, vocab, (64,)).tolist() for _ in range(opts.streams)]
    batch = BatchGenerator(model, max_tokens=opts.decode_tokens)
    batch.insert(short)
    with batch.stats() as stats:
        while batch.next_generated():
            pass
    batch.close()
    results["batch_decode_tps"] = stats.generation_tps
    return results


ROWS = (
    ("sgemm_1024_gflops", "sgemm 1024x1024 float32, GFLOP/s", True),
    ("ttft_s", "cold time to first token, s", False),
    ("decode_tps", "decode, tokens/s (1 stream)", True),
    ("batch_decode_tps", "decode, tokens/s ({streams} streams)", True),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=1536)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        print(json.dumps(child(opts)))
        return

    runs = {}
    for label, blas in (("system", None), ("reference", "off")):
        env = {k: v for k, v in os.environ.items() if k != "MLXD_BLAS"}
        if blas:
            env["MLXD_BLAS"] = blas
        out = subprocess.run(
            [sys.executable, __file__, "--child", *sys.argv[1:]],
            env=env, capture_output=True, text=True, timeout=400, check=True,
        )
        runs[label] = json.loads(out.stdout.strip().splitlines()[-1])

    fast, slow = runs["system"], runs["reference"]
    print(f"model: random qwen2, {fast['params_m']:.1f}M parameters, {opts.dtype}; "
          f"prompt {opts.prompt_tokens} tokens, {opts.decode_tokens} decoded tokens; {os.cpu_count()} CPUs")
    print(f"A: {fast['blas']}")
    print(f"B: {slow['blas']}")
    print(f"{'':38} {'A':>9} {'B':>9} {'A vs B':>8}")
    for key, label, higher_is_better in ROWS:
        a, b = fast[key], slow[key]
        ratio = a / b if higher_is_better else b / a
        print(f"{label.format(streams=opts.streams):38} {a:9.2f} {b:9.2f} {ratio:7.1f}x")


if __name__ == "__main__":
    main()
