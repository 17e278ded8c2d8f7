"""Ground truth computed outside the server: the test models' known text, and
prompts rendered and tokenized by the model's own tokenizer (transformers, not mlx-lm)."""

from __future__ import annotations

import functools
from pathlib import Path

from transformers import AutoTokenizer

GREETING = "Hello from mlxd. The quick brown fox jumps over the lazy dog."
# Small context so that overflow and "max_tokens beyond the room left" are cheap to reach.
RANDOM_CONTEXT = 256


@functools.lru_cache(maxsize=None)
def tokenizer_of(model_path: Path | str):
    return AutoTokenizer.from_pretrained(str(model_path))


def prompt_ids(model_path: Path | str, messages: list[dict], tools=None) -> list[int]:
    """The templated prompt, tokenized independently of the server."""
    return tokenizer_of(model_path).apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False
    )


def ground_truth_prompt_tokens(model_path: Path | str, messages: list[dict], tools=None) -> int:
    return len(prompt_ids(model_path, messages, tools))
