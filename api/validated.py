"""Answers checked against their schema before anyone sees them.

A `response_format` (or Responses `text.format`) schema with keywords no grammar enforces token by token
(`not`, `if`/`then`/`else`, `uniqueItems`, overlapping `oneOf`, ...) decodes under a
relaxed grammar (server/constrained.py), so its answer may still break the schema.
Such a request is generated whole, validated with jsonschema, and regenerated up to
ATTEMPTS times; the client gets the first valid answer (a stream carries it once it
is known valid, keep-alive pings until then), an answer cut by max_tokens (`length`), or an error naming the
violation: never an invalid answer with finish_reason `stop`. Usage counts every
attempt, since every attempt was computed.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import AsyncIterator, Awaitable, Optional, Union

from fastapi import Request

from mlxd.server import constrained
from mlxd.server.events import ContentDelta, Failure, Finish, ReasoningDelta, Usage
from mlxd.server.requests import GenerationRequest, RequestHandle

from .engine_stream import Answer, collect, submit

log = logging.getLogger("mlxd.api")

ATTEMPTS = 3


async def validated_answer(request: Request, generation: GenerationRequest, handle: RequestHandle) -> Optional[Answer]:
    """The first answer valid against the request's schema, starting from the
    already admitted first attempt `handle`; None when the client went away."""
    schema = generation.response_format.schema
    total, why = Usage(), ""
    for attempt in range(1, ATTEMPTS + 1):
        if attempt > 1:
            handle, admitted = await submit(request, _reseeded(generation, attempt))
            if admitted is None:
                return None
        answer = await collect(handle, request)
        if answer is None:
            return None
        _add(total, answer.last.usage)
        answer.last = replace(answer.last, usage=total)
        if isinstance(answer.last, Failure) or answer.last.reason != "stop":
            return answer
        why = constrained.validate(schema, "".join(answer.content))
        if why is None:
            return answer
        log.warning("answer %d of %d breaks the response_format schema: %s", attempt, ATTEMPTS, why)
    return Answer(last=Failure(f"no answer valid against the response_format schema in {ATTEMPTS} attempts: {why}", total))


async def replay(answer: Awaitable[Optional[Answer]]) -> AsyncIterator[Union[list, Finish, Failure]]:
    """A whole answer, once it is known, as `batched` would deliver it (a door streams it alike)."""
    answer = await answer
    if answer is None:  # the client went away
        return
    events = [ReasoningDelta(text) for text in answer.reasoning] + list(answer.logprobs)
    events += [ContentDelta(text) for text in answer.content]
    if events:
        yield events
    yield answer.last


def _reseeded(generation: GenerationRequest, attempt: int) -> GenerationRequest:
    """A seeded request stays reproducible, but each attempt draws differently."""
    seed = generation.sampling.seed
    if attempt == 1 or seed is None:
        return generation
    return replace(generation, sampling=replace(generation.sampling, seed=seed + attempt - 1))


def _add(total: Usage, usage: Usage) -> None:
    total.prompt_tokens += usage.prompt_tokens
    total.completion_tokens += usage.completion_tokens
    total.cached_tokens += usage.cached_tokens
    total.reasoning_tokens += usage.reasoning_tokens
