"""POST /v1/responses (and GET /v1/responses/{id}): OpenAI's Responses API on the engine.

The engine's typed events become Responses stream events: each has a `type` and a
strictly increasing `sequence_number`, every output item is opened and closed
(`output_item.added` ... `output_item.done`), and a stream ends with exactly one
terminal event, `response.completed`, `response.incomplete` or `response.failed`,
whose response carries the whole output and the engine's usage. A non-streaming
request feeds the collected answer through the same builder.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import OrderedDict
from typing import AsyncIterator, Awaitable, Callable, Optional, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from mlxd.server.errors import ContextLengthExceeded
from mlxd.server.events import (
    ContentDelta,
    Failure,
    Finish,
    ReasoningDelta,
    ToolCallArguments,
    ToolCallStart,
    Usage,
)

from ..clients import client_of
from ..engine_stream import KEEPALIVE_SECONDS, Answer, batched, collect, resolve_model, submit
from ..errors import error_body, error_response
from ..validated import replay, validated_answer
from .responses_input import CALL_ID_PREFIX, InputError, Translated, translate
from .responses_protocol import ResponsesRequest

log = logging.getLogger("mlxd.api")
router = APIRouter()

# Responses kept for previous_response_id and GET (store: true), least recently used dropped first.
STORE_MAX_RESPONSES = 128


def usage_dict(usage: Usage) -> dict:
    """The engine's counters in the Responses spelling: input_tokens includes the cached ones."""
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


class ResponseStore:
    """Stored responses and the conversation items that led to them, bounded, in memory."""

    def __init__(self, max_responses: int = STORE_MAX_RESPONSES):
        self.max_responses = max_responses
        self._entries: OrderedDict[str, tuple[dict, list[dict]]] = OrderedDict()

    def put(self, response: dict, items: list[dict]) -> None:
        self._entries[response["id"]] = (response, items)
        self._entries.move_to_end(response["id"])
        while len(self._entries) > self.max_responses:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> Optional[tuple[dict, list[dict]]]:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry


def _store(request: Request) -> ResponseStore:
    state = request.app.state
    if getattr(state, "response_store", None) is None:
        state.response_store = ResponseStore()
    return state.response_store


class ResponseBuilder:
    """One response: engine events in, Responses stream events out, the response object kept."""

    def __init__(self, body: ResponsesRequest, response_id: str, model: str, namespaced: dict):
        self.body = body
        self.id = response_id
        self.model = model
        self.namespaced = namespaced
        self.created_at = int(time.time())
        self.summary = bool(body.reasoning and body.reasoning.summary not in (None, "none"))
        self.sequence = 0
        self.output: list[dict] = []
        self.item: Optional[dict] = None  # the output item being generated
        self.text: list[str] = []  # its text or arguments so far
        self.final: Optional[dict] = None

    # Wire objects ------------------------------------------------------
    def event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def response(self, status: str, usage: Optional[Usage] = None, error: Optional[dict] = None,
                 incomplete: Optional[dict] = None) -> dict:
        body = self.body
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": list(self.output),
            "usage": usage_dict(usage) if usage is not None else None,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": body.previous_response_id,
            "reasoning": body.reasoning.model_dump(include={"effort", "summary"}) if body.reasoning else None,
            "store": body.store,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "text": {"format": _text_format(body)},
            "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [],
            "metadata": body.metadata or {},
            "truncation": "disabled",
        }

    def _place(self) -> dict:
        return {"item_id": self.item["id"], "output_index": len(self.output)}

    # Events ------------------------------------------------------------
    def start(self) -> list[dict]:
        created = self.response("in_progress")
        return [self.event("response.created", response=created),
                self.event("response.in_progress", response=created)]

    def add(self, events: list) -> list[dict]:
        out: list[dict] = []
        for e in events:
            if isinstance(e, ReasoningDelta):
                out += self._ensure_open("reasoning") + self._reasoning_delta(e.text)
            elif isinstance(e, ContentDelta):
                out += self._ensure_open("message")
                self.text.append(e.text)
                out.append(self.event("response.output_text.delta", **self._place(), content_index=0,
                                      delta=e.text, logprobs=[]))
            elif isinstance(e, ToolCallStart):
                out += self._close("completed") + self._open_call(e)
            elif isinstance(e, ToolCallArguments):
                self.text.append(e.fragment)
                out.append(self.event("response.function_call_arguments.delta", **self._place(), delta=e.fragment))
        return out

    def finish(self, last: Union[Finish, Failure]) -> list[dict]:
        """Close the open item and end with the one terminal event."""
        if isinstance(last, Failure):
            out = self._close("incomplete")
            error = {"code": last.code or "server_error", "message": last.message}
            self.final = self.response("failed", last.usage, error=error)
            return out + [self.event("response.failed", response=self.final)]
        if last.reason == "length":
            out = self._close("incomplete")
            self.final = self.response("incomplete", last.usage, incomplete={"reason": "max_output_tokens"})
            return out + [self.event("response.incomplete", response=self.final)]
        out = self._close("completed")
        self.final = self.response("completed", last.usage)
        return out + [self.event("response.completed", response=self.final)]

    def refuse(self, code: str, message: str) -> list[dict]:
        """A stream for a request the engine refused at admission: created, then failed."""
        self.final = self.response("failed", error={"code": code, "message": message})
        return self.start() + [self.event("response.failed", response=self.final)]

    def _ensure_open(self, kind: str) -> list[dict]:
        if self.item is not None and self.item["type"] == kind:
            return []
        out = self._close("completed")
        prefix = "rs" if kind == "reasoning" else "msg"
        self.item = {"id": f"{prefix}_{uuid.uuid4().hex}", "type": kind, "status": "in_progress"}
        if kind == "reasoning":
            self.item.update(summary=[], content=[])
        else:
            self.item.update(role="assistant", content=[])
        out.append(self.event("response.output_item.added", output_index=len(self.output), item=dict(self.item)))
        if kind == "message":
            out.append(self.event("response.content_part.added", **self._place(), content_index=0,
                                  part=_text_part("")))
        elif self.summary:
            out.append(self.event("response.reasoning_summary_part.added", **self._place(), summary_index=0,
                                  part={"type": "summary_text", "text": ""}))
        return out

    def _reasoning_delta(self, text: str) -> list[dict]:
        self.text.append(text)
        out = [self.event("response.reasoning_text.delta", **self._place(), content_index=0, delta=text)]
        if self.summary:  # mlxd has no summarizer: the summary is the reasoning itself
            out.append(self.event("response.reasoning_summary_text.delta", **self._place(), summary_index=0,
                                  delta=text))
        return out

    def _open_call(self, start: ToolCallStart) -> list[dict]:
        namespace, name = self.namespaced.get(start.name, (None, start.name))
        self.item = {"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "status": "in_progress",
                     "call_id": f"{CALL_ID_PREFIX}{start.id}", "name": name, "arguments": ""}
        if namespace:
            self.item["namespace"] = namespace
        return [self.event("response.output_item.added", output_index=len(self.output), item=dict(self.item))]

    def _close(self, status: str) -> list[dict]:
        item = self.item
        if item is None:
            return []
        text, place = "".join(self.text), self._place()
        out = []
        if item["type"] == "message":
            out.append(self.event("response.output_text.done", **place, content_index=0, text=text, logprobs=[]))
            out.append(self.event("response.content_part.done", **place, content_index=0, part=_text_part(text)))
            item["content"] = [_text_part(text)]
        elif item["type"] == "reasoning":
            out.append(self.event("response.reasoning_text.done", **place, content_index=0, text=text))
            item["content"] = [{"type": "reasoning_text", "text": text}]
            if self.summary:
                part = {"type": "summary_text", "text": text}
                out.append(self.event("response.reasoning_summary_text.done", **place, summary_index=0, text=text))
                out.append(self.event("response.reasoning_summary_part.done", **place, summary_index=0, part=part))
                item["summary"] = [part]
        else:
            out.append(self.event("response.function_call_arguments.done", **place, arguments=text,
                                  name=item["name"]))
            item["arguments"] = text
        item["status"] = status
        out.append(self.event("response.output_item.done", output_index=len(self.output), item=item))
        self.output.append(item)
        self.item, self.text = None, []
        return out


def _text_format(body: ResponsesRequest) -> dict:
    fmt = body.text.format if body.text else None
    return fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _answer_events(answer: Answer) -> list:
    """A collected answer as the events that would have streamed it."""
    events: list = []
    if answer.reasoning:
        events.append(ReasoningDelta("".join(answer.reasoning)))
    if answer.content:
        events.append(ContentDelta("".join(answer.content)))
    for index, call in sorted(answer.calls.items()):
        events += [ToolCallStart(index, call.id, call.name), ToolCallArguments(index, "".join(call.arguments))]
    return events


# Router ----------------------------------------------------------------
@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request):
    store = _store(request)
    history: list[dict] = []
    if body.previous_response_id:
        previous = store.get(body.previous_response_id)
        if previous is None:
            return error_response(f"Response with id '{body.previous_response_id}' not found.", 404,
                                  param="previous_response_id", code="previous_response_not_found")
        history = previous[1]
    response_id = f"resp_{uuid.uuid4().hex}"
    ref = await resolve_model(request, body.model)
    try:
        translated = translate(body, ref, history, response_id)
    except InputError as e:
        return error_response(str(e), 400, param=e.param, code="invalid_value")
    builder = ResponseBuilder(body, response_id, ref.name, translated.namespaced)
    translated.generation.client = client_of(request)
    try:
        handle, accepted = await submit(request, translated.generation)
    except ContextLengthExceeded as e:
        if not body.stream:
            return error_response(str(e), 400, param="input", code=e.code)
        # Codex reads a failed stream's context_length_exceeded as "the window is full".
        return _event_stream(_events(builder.refuse(e.code, str(e))))
    if accepted is None:  # client left while queued
        return JSONResponse(error_body("client disconnected", 499), status_code=499)
    builder.model = accepted.model
    keep = _keeper(store, translated) if body.store else None
    generation = translated.generation
    if generation.response_format is not None and generation.response_format.validate:
        # A schema the grammar enforces only in part: the answer is whole and valid before it is sent.
        answer = validated_answer(request, generation, handle)
        if body.stream:
            return _event_stream(_stream(builder, replay(answer), handle.cancel, keep))
        return await _complete(builder, answer, keep)
    if body.stream:
        return _event_stream(_stream(builder, batched(handle), handle.cancel, keep))
    return await _complete(builder, collect(handle, request), keep)


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request):
    entry = _store(request).get(response_id)
    if entry is None:
        return error_response(f"Response with id '{response_id}' not found.", 404, param="response_id",
                              code="response_not_found")
    return JSONResponse(entry[0])


def _keeper(store: ResponseStore, translated: Translated) -> Callable[[dict], None]:
    return lambda response: store.put(response, translated.items + response["output"])


def _event_stream(events: AsyncIterator[dict]) -> EventSourceResponse:
    return EventSourceResponse(events, ping=KEEPALIVE_SECONDS, sep="\n",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(event: dict) -> dict:
    return {"event": event["type"], "data": json.dumps(event, separators=(",", ":"), ensure_ascii=False)}


async def _events(events: list[dict]) -> AsyncIterator[dict]:
    for event in events:
        yield _sse(event)


async def _stream(builder: ResponseBuilder, batches: AsyncIterator, cancel: Callable[[], None],
                  keep) -> AsyncIterator[dict]:
    try:
        for event in builder.start():
            yield _sse(event)
        try:
            async for batch in batches:
                events = builder.add(batch) if isinstance(batch, list) else builder.finish(batch)
                for event in events:
                    yield _sse(event)
        except Exception as e:  # a bug here still ends the stream with its terminal event
            log.exception("response stream %s failed", builder.id)
            yield _sse(builder.event("response.failed", response=builder.response(
                "failed", error={"code": "server_error", "message": f"internal server error: {e}"})))
            return
        if keep is not None and builder.final is not None:
            keep(builder.final)
    finally:
        cancel()  # no-op once finished; stops generation if the client left


async def _complete(builder: ResponseBuilder, answer: Awaitable[Optional[Answer]], keep) -> JSONResponse:
    answer = await answer
    if answer is None:
        return JSONResponse(error_body("client disconnected", 499), status_code=499)
    builder.add(_answer_events(answer))
    builder.finish(answer.last)
    if keep is not None:
        keep(builder.final)
    if isinstance(answer.last, Failure):
        body = error_body(answer.last.message, answer.last.status, code=answer.last.code or "server_error")
        body["response"] = builder.final
        return JSONResponse(body, status_code=answer.last.status)
    return JSONResponse(builder.final)
