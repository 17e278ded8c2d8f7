"""Prompt building off the MLX thread.

Rendering a chat template and tokenizing a long conversation (plus the prefix
tokenizations that find prompt-cache checkpoints) takes seconds for a large
prompt. Done on the engine thread, it would stall every stream's decoding; so a
small pool of worker threads does it, checks the context length and the
logit_bias token ids there, and hands the engine a plain token list.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .errors import ContextLengthExceeded, EngineError, InternalError, InvalidPrompt
from .prompt import Prompt, offered_tools, request_prompt

log = logging.getLogger("mlxd.engine")

# Two builders: one long prompt does not hold up the short ones behind it, and
# on a small machine the builders leave the MLX thread its core.
BUILDER_THREADS = 2


@dataclass
class Prepared:
    """A request's prompt, ready for the batch (tokens, checkpoints, the forced prefix
    the parser starts from as `prompt.suffix`), the tools it parses, and its token budget."""

    prompt: Prompt
    tools: Optional[list]
    max_tokens: int


def prepare(request, lm) -> Prepared:
    """Render and tokenize one request for loaded model `lm`; raises EngineError
    for what the client must fix (bad messages, too long, bad token ids)."""
    tokenizer = lm.tokenizer
    try:
        # A trimmable cache is saved whole at the end and serves every prefix of
        # it, so only the system prompt is checkpointed, for requests that share
        # it while this one runs; other caches resume at message checkpoints.
        prompt = request_prompt(tokenizer, lm.output_format, request, recent_checkpoints=not lm.cache_trimmable)
    except ValueError as e:
        raise InvalidPrompt(str(e)) from e
    n_prompt = len(prompt.tokens)
    if n_prompt >= lm.context_length:
        raise ContextLengthExceeded(lm.context_length, n_prompt)
    bias = request.sampling.logit_bias or {}
    if any(not 0 <= t < len(tokenizer) for t in bias):
        raise InvalidPrompt(f"logit_bias token ids must be between 0 and {len(tokenizer) - 1}", param="logit_bias")
    room = lm.context_length - n_prompt
    max_tokens = min(request.max_tokens, room) if request.max_tokens else room
    return Prepared(prompt, offered_tools(request), max_tokens)


class PromptBuilders:
    """A bounded pool that prepares requests and reports each result through `done(handle, result)`,
    where result is a `Prepared` or the EngineError to answer with."""

    def __init__(self, done: Callable[[Any, Any], None], threads: int = BUILDER_THREADS):
        self._done = done
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mlxd-prompt")

    def build(self, handle, lm) -> None:
        self._pool.submit(self._build, handle, lm)

    def _build(self, handle, lm) -> None:
        try:
            result: Any = prepare(handle.request, lm)
        except EngineError as e:
            result = e
        except Exception as e:  # a template or tokenizer bug ends this request alone
            log.exception("[%s] building the prompt failed", handle.request.request_id)
            result = InternalError(f"could not build the prompt: {type(e).__name__}: {e}")
        self._done(handle, result)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
