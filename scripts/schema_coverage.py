"""How many JSON Schemas constrained decoding answers, on a conformance suite's schemas.

    python -m scripts.schema_coverage SUITE_DIR [--model DIR] [--max-tokens N]

SUITE_DIR is a checkout of github.com/json-schema-org/JSON-Schema-Test-Suite (nothing
here downloads it); the schemas of `tests/draft2020-12/*.json` are used. Each schema is
compiled as `response_format` would be (server/constrained.py) and, when accepted,
answered by a random-weight test model with the grammar processor in this process.
Counts: schemas llguidance alone accepts as written; answers that validate
(jsonschema), under the full grammar or under a relaxed one whose answers are checked
and regenerated up to 3 times as the server does; schemas refused with a reason (the
400 a client gets); answers cut by --max-tokens; relaxed schemas with no valid answer
in 3 attempts (the client gets an error); and violations: answers the model ended
under the full grammar that do not validate (goal: 0).
A random model inside an unbounded JSON string rambles, so the quote token gets a
bias (--quote-bias): it ends strings sooner and cannot make an answer invalid.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlxd.server.blas import setup_blas  # noqa: E402  (before mlx.core is imported)

setup_blas()

import mlx.core as mx  # noqa: E402
from llguidance import LLMatcher  # noqa: E402
from mlx_lm import load, stream_generate  # noqa: E402
from mlx_lm.sample_utils import make_logits_processors, make_sampler  # noqa: E402

from mlxd.api.validated import ATTEMPTS  # noqa: E402
from mlxd.server import constrained  # noqa: E402
from scripts.testmodels import build_random_model  # noqa: E402


def suite_schemas(suite: Path) -> list[tuple[str, object]]:
    """(file: description, schema) of every test group in the draft 2020-12 directory."""
    out = []
    for path in sorted((suite / "tests" / "draft2020-12").glob("*.json")):
        for group in json.loads(path.read_text()):
            out.append((f"{path.stem}: {group['description']}", group["schema"]))
    return out


def llguidance_alone(schema) -> bool:
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema)
    except Exception:  # not a JSON object at all
        return False
    return not LLMatcher.validate_grammar_with_warnings(grammar)[0]


def answer(model, tokenizer, fmt: constrained.ResponseFormat, max_tokens: int, bias: dict) -> tuple[str, str]:
    processor = constrained.processor_for(
        tokenizer, response_format=fmt, tool_format=None, tools=None, tool_choice="auto",
        forced=False, think=None, starts_in_reasoning=False,
    )  # fmt: skip
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Answer in JSON."}], add_generation_prompt=True)
    text, reason = "", None
    for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(1.0),
                             logits_processors=make_logits_processors(bias) + [processor]):
        text += r.text
        reason = r.finish_reason
    return text, reason


def outcome_of(model, tokenizer, fmt: constrained.ResponseFormat, max_tokens: int, bias: dict) -> str:
    """What a client would get, the way the server decides it (api/validated.py for relaxed grammars)."""
    for _ in range(ATTEMPTS if fmt.validate else 1):
        text, reason = answer(model, tokenizer, fmt, max_tokens, bias)
        if reason == "length":
            return "cut by max_tokens"
        if constrained.validate(fmt.schema, text) is None:
            return "answered, checked" if fmt.validate else "answered, valid"
    return "no valid answer (error)" if fmt.validate else "violations"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", type=Path, help="a JSON-Schema-Test-Suite checkout")
    parser.add_argument("--model", type=Path, help="model directory (default: build a tiny random qwen2)")
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument("--quote-bias", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true", help="print every schema's outcome")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlxd-coverage-") as work:
        model_dir = args.model or build_random_model(Path(work) / "random", context_length=4096)
        model, tokenizer = load(str(model_dir))
        bias = {tokenizer.convert_tokens_to_ids('"'): args.quote_bias}
        mx.random.seed(args.seed)
        counts, refusals, violations = Counter(), Counter(), []
        schemas = suite_schemas(args.suite)
        for name, schema in schemas:
            counts["llguidance alone accepts"] += llguidance_alone(schema)
            try:
                checked, relaxed = constrained.check_schema(schema)
            except constrained.InvalidSchema as e:
                counts["refused (400)"] += 1
                refusals[str(e).split(": ", 1)[-1][:70]] += 1
                outcome = f"refused: {e}"
            else:
                fmt = constrained.ResponseFormat("json_schema", checked, validate=relaxed)
                outcome = outcome_of(model, tokenizer, fmt, args.max_tokens, bias)
                counts[outcome] += 1
                if outcome == "violations":
                    violations.append((name, schema))
            if args.verbose:
                print(f"{outcome[:90]:<90} {name}", flush=True)
    print(f"\n{len(schemas)} schemas in {args.suite / 'tests' / 'draft2020-12'}")
    keys = ("llguidance alone accepts", "answered, valid", "answered, checked", "refused (400)",
            "cut by max_tokens", "no valid answer (error)", "violations")
    for key in keys:
        print(f"  {key:<26} {counts[key]:>4}")
    print("\nrefusals by reason:")
    for why, n in refusals.most_common():
        print(f"  {n:>4}  {why}")
    for name, schema in violations:
        print(f"\nVIOLATION {name}: {json.dumps(schema)[:300]}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
