"""Loading models and knowing what they can do.

`load_model` wraps `mlx_lm.load` and reads what the server needs besides the
weights: context length and the checkpoint's own sampling defaults.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxd.registry import config_context_length

log = logging.getLogger("mlxd.models")

DEFAULT_CONTEXT_LENGTH = 4096
# Keys of generation_config.json that map onto our sampling parameters.
_SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: Any
    tokenizer: Any
    context_length: int
    sampling_defaults: dict = field(default_factory=dict)
    nbytes: int = 0  # of the weights
    # Plain KV caches can be cut back to any prefix; rotating (sliding-window)
    # and recurrent ones cannot once they are full.
    cache_trimmable: bool = True
    output_format: Any = None  # server.output.OutputFormat, set by the engine at load
    last_used: float = field(default_factory=time.monotonic)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def sampling_defaults_of(path: Path) -> dict:
    """The model authors' recommended sampling, from generation_config.json."""
    config = read_json(path / "generation_config.json")
    if config.get("do_sample") is False:
        return {"temperature": 0.0}
    return {k: config[k] for k in _SAMPLING_DEFAULT_KEYS if isinstance(config.get(k), (int, float))}


def _keep_first_space(tokenizer) -> None:
    """mlx-lm's byte-level BPE detokenizer drops the first space of an answer (an
    SPM habit); in byte-level BPE that space is the model's text, so keep it."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

    class ExactBPEStreamingDetokenizer(BPEStreamingDetokenizer):
        def _maybe_trim_space(self, current_text):
            return current_text

    if type(tokenizer._detokenizer) is BPEStreamingDetokenizer:
        tokenizer._detokenizer.__class__ = ExactBPEStreamingDetokenizer


def loaded_model(name: str, path: Path, model, tokenizer) -> LoadedModel:
    """What the engine keeps of a model loaded whole or as one rank's shard: the first
    space kept by its detokenizer, its context, sampling defaults, size and cache kind."""
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache

    _keep_first_space(tokenizer)
    return LoadedModel(
        name=name,
        path=path,
        model=model,
        tokenizer=tokenizer,
        context_length=config_context_length(path) or DEFAULT_CONTEXT_LENGTH,
        sampling_defaults=sampling_defaults_of(path),
        nbytes=sum(v.nbytes for _, v in tree_flatten(model.parameters())),
        cache_trimmable=all(type(c) in (KVCache, QuantizedKVCache) for c in make_prompt_cache(model)),
    )


def load_model(name: str, path: Path, trust_remote_code: bool = False) -> LoadedModel:
    """Load weights and tokenizer with mlx-lm, logging what loaded and how long it took."""
    from mlx_lm import load

    log.info("loading model %s from %s", name, path)
    start = time.perf_counter()
    model, tokenizer = load(str(path), trust_remote_code=trust_remote_code)
    loaded = loaded_model(name, path, model, tokenizer)
    seconds = time.perf_counter() - start
    log.info(
        "loaded model %s in %.2f s (%.1f MB, context %d tokens)",
        name,
        seconds,
        loaded.nbytes / 1e6,
        loaded.context_length,
    )
    return loaded

