"""POST /v1/chat/completions: request in, engine events out as chunks or one response."""

from __future__ import annotations

import json
import time
import uuid
from typing import AsyncIterator, Callable, Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from mlxd.server import constrained
from mlxd.server.events import (
    ContentDelta,
    Failure,
    Finish,
    ReasoningDelta,
    TokenLogprob,
    ToolCallArguments,
    ToolCallStart,
    Usage,
)
from mlxd.server.requests import Accepted, GenerationRequest, RequestHandle, SamplingParams

from ..clients import client_of
from ..engine_stream import KEEPALIVE_SECONDS, Answer, batched, collect, resolve_model, submit
from ..errors import error_body
from ..structured import response_format
from ..validated import replay, validated_answer
from .protocol import ChatCompletionRequest, ResponseFormat

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    ref = await resolve_model(request, body.model)
    generation = to_generation_request(body, ref)
    generation.client = client_of(request)
    generation.request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"  # the response's id, and the ledger row's
    if generation.response_format is not None and generation.response_format.validate:
        return await _validated(body, request, generation)
    handle, accepted = await submit(request, generation)
    if accepted is None:  # client left while queued
        return JSONResponse(error_body("client disconnected", 499), status_code=499)
    response = ChatResponse(body, accepted, generation.request_id)
    if body.stream:
        return _event_stream(_stream(response, batched(handle), handle.cancel))
    return await _complete(response, handle, request)


async def _validated(body: ChatCompletionRequest, request: Request, generation: GenerationRequest):
    """A schema the grammar enforces only in part: the answer is whole and valid before it is sent."""
    handle, accepted = await submit(request, generation)  # a request the engine refuses is refused here
    if accepted is None:
        return JSONResponse(error_body("client disconnected", 499), status_code=499)
    response = ChatResponse(body, accepted, generation.request_id)
    answer = validated_answer(request, generation, handle)
    if body.stream:
        return _event_stream(_stream(response, replay(answer), handle.cancel))
    answer = await answer
    if answer is None:
        return JSONResponse(error_body("client disconnected", 499), status_code=499)
    return _answer_response(response, answer)


def _event_stream(chunks: AsyncIterator[dict]) -> EventSourceResponse:
    return EventSourceResponse(
        chunks,
        ping=KEEPALIVE_SECONDS,
        sep="\n",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def to_generation_request(body: ChatCompletionRequest, ref) -> GenerationRequest:
    """Protocol schema -> the engine's plain request (no pydantic below this line)."""
    messages = []
    for m in body.messages:
        message = m.model_dump(exclude_none=True)
        if message["role"] == "developer":
            message["role"] = "system"
        messages.append(message)
    tool_choice = body.tool_choice or "auto"
    if not isinstance(tool_choice, str):
        tool_choice = tool_choice.model_dump()
    return GenerationRequest(
        model=ref,
        messages=messages,
        tools=[t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
        tool_choice=tool_choice if body.tools else "none",
        parallel_tool_calls=body.parallel_tool_calls,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        stop=body.stop or [],
        sampling=SamplingParams(
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            seed=body.seed,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
            logit_bias={int(k): v for k, v in body.logit_bias.items()} if body.logit_bias else None,
        ),
        logprobs=body.logprobs,
        top_logprobs=body.top_logprobs or 0,
        response_format=response_format_of(body.response_format),
    )


def response_format_of(fmt: Optional[ResponseFormat]) -> Optional[constrained.ResponseFormat]:
    """The engine's constraint; a schema that cannot be enforced raises InvalidSchema (400) here."""
    if fmt is None:
        return None
    spec = fmt.json_schema
    return response_format(fmt.type, spec.schema_ if spec else None, spec.name if spec else "",
                           param="response_format.json_schema.schema")


def usage_dict(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def _logprob_dict(lp: TokenLogprob) -> dict:
    return {
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": lp.bytes,
        "top_logprobs": [{"token": t, "logprob": v, "bytes": b} for t, v, b in lp.top],
    }


class ChatResponse:
    """Turns engine events into chat.completion(.chunk) objects for one request."""

    def __init__(self, body: ChatCompletionRequest, accepted: Accepted, id: str):
        self.id = id
        self.created = int(time.time())
        self.model = accepted.model
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(self, delta: dict, finish_reason=None, logprobs=None, usage: Optional[Usage] = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._envelope([choice], usage)

    def usage_chunk(self, usage: Usage) -> dict:
        return self._envelope([], usage)

    def _envelope(self, choices: list, usage: Optional[Usage]) -> dict:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if usage is not None:
            chunk["usage"] = usage_dict(usage)
        elif self.include_usage:
            chunk["usage"] = None
        return chunk

    def deltas(self, events: list) -> list[dict]:
        """Chunks for one batch of events; logprobs ride on the chunk of their text."""
        chunks, logprobs = [], []
        for event in events:
            if isinstance(event, TokenLogprob):
                logprobs.append(_logprob_dict(event))
                continue
            delta = _delta_of(event)
            if delta is not None:
                lp = {"content": logprobs} if logprobs else None
                chunks.append(self.chunk(delta, logprobs=lp))
                logprobs = []
        if logprobs:
            chunks.append(self.chunk({}, logprobs={"content": logprobs}))
        return chunks


def _delta_of(event) -> Optional[dict]:
    if isinstance(event, ContentDelta):
        return {"content": event.text}
    if isinstance(event, ReasoningDelta):
        return {"reasoning_content": event.text}
    if isinstance(event, ToolCallStart):
        call = {"index": event.index, "id": event.id, "type": "function",
                "function": {"name": event.name, "arguments": ""}}
        return {"tool_calls": [call]}
    if isinstance(event, ToolCallArguments):
        return {"tool_calls": [{"index": event.index, "function": {"arguments": event.fragment}}]}
    return None


async def _stream(response: ChatResponse, batches: AsyncIterator, cancel: Callable[[], None] = lambda: None) -> AsyncIterator[dict]:
    try:
        yield _data(response.chunk({"role": "assistant", "content": ""}))
        async for event in batches:
            if isinstance(event, list):
                for chunk in response.deltas(event):
                    yield _data(chunk)
            elif isinstance(event, Finish):
                if response.include_usage:
                    yield _data(response.chunk({}, finish_reason=event.reason))
                    yield _data(response.usage_chunk(event.usage))
                else:
                    yield _data(response.chunk({}, finish_reason=event.reason, usage=event.usage))
            elif isinstance(event, Failure):
                yield _data(error_body(event.message, event.status, code=event.code or "generation_failed"))
                yield _data(response.usage_chunk(event.usage))
        yield {"data": "[DONE]"}
    finally:
        cancel()  # no-op once finished; stops generation if the client left


def _data(obj: dict) -> dict:
    return {"data": json.dumps(obj, separators=(",", ":"), ensure_ascii=False)}


async def _complete(response: ChatResponse, handle: RequestHandle, request: Request) -> JSONResponse:
    """The whole answer as one chat.completion; 499 if the client went away."""
    answer = await collect(handle, request)
    if answer is None:
        return JSONResponse(error_body("client disconnected", 499), status_code=499)
    return _answer_response(response, answer)


def _answer_response(response: ChatResponse, answer: Answer) -> JSONResponse:
    last = answer.last
    if isinstance(last, Failure):
        body = error_body(last.message, last.status, code=last.code or "generation_failed")
        body["usage"] = usage_dict(last.usage)
        return JSONResponse(body, status_code=last.status)
    return JSONResponse({
        "id": response.id,
        "object": "chat.completion",
        "created": response.created,
        "model": response.model,
        "system_fingerprint": None,
        "choices": [{
            "index": 0,
            "message": _message(answer),
            "logprobs": {"content": [_logprob_dict(lp) for lp in answer.logprobs]} if answer.logprobs else None,
            "finish_reason": last.reason,
        }],
        "usage": usage_dict(last.usage),
    })


def _message(answer: Answer) -> dict:
    message = {
        "role": "assistant",
        "content": "".join(answer.content) if answer.content or not answer.calls else None,
    }
    if answer.reasoning:
        message["reasoning_content"] = "".join(answer.reasoning)
    if answer.calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": "".join(c.arguments)}}
            for c in answer.ordered_calls()
        ]
    return message
