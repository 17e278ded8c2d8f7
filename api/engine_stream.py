"""What every door does with the engine: submit, wait for the prompt, read events, collect.

The doors (chat completions, responses, messages) differ only in how they spell events
on the wire; waiting for admission, noticing a client that left, grouping events and
assembling a whole answer are the same for all of them and live here.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Union

from fastapi import Request

from mlxd.server.events import (
    ContentDelta,
    Failure,
    Finish,
    ReasoningDelta,
    TokenLogprob,
    ToolCallArguments,
    ToolCallStart,
)
from mlxd.server.requests import Accepted, GenerationRequest, RequestHandle
from mlxd.server.runtime import Runtime

# How often the client is sent an SSE comment while it waits (long prefill);
# MLXD_KEEPALIVE_SECONDS overrides it (tests use a short interval).
KEEPALIVE_SECONDS = float(os.environ.get("MLXD_KEEPALIVE_SECONDS", "5"))
# How often a non-streaming request checks that its client is still there.
DISCONNECT_POLL_SECONDS = 0.25


def request_id(request: Request) -> str:
    """This HTTP request's id (`req_...` unless a door named it); the response sends
    it back as `x-request-id` (see `RequestIds`), errors included."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = request.state.request_id = f"req_{uuid.uuid4().hex[:24]}"
    return rid


class RequestIds:
    """ASGI middleware: every response carries its request's id as `x-request-id`:
    the id a door gave the generation (the response's own id), else a new one."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                rid = state.get("request_id") or f"req_{uuid.uuid4().hex[:24]}"
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)


async def submit(request: Request, generation: GenerationRequest) -> tuple[RequestHandle, Optional[Accepted]]:
    """Queue a request (named by `request_id` if the door did not name it; the
    response's `x-request-id` is its name); `accepted` is None when the client left
    while it waited."""
    runtime: Runtime = request.app.state.runtime
    if generation.request_id:
        request.state.request_id = generation.request_id
    else:
        generation.request_id = request_id(request)
    handle = runtime.engine.submit(generation, asyncio.get_running_loop())
    return handle, await wait_accepted(handle, request)


async def resolve_model(request: Request, name: str):
    runtime: Runtime = request.app.state.runtime
    return await asyncio.to_thread(runtime.resolve, name)


async def wait_accepted(handle: RequestHandle, request: Request) -> Optional[Accepted]:
    """Wait until the engine built the prompt (errors raise here, before any byte is sent)."""
    while True:
        try:
            return await asyncio.wait_for(asyncio.shield(handle.accepted), DISCONNECT_POLL_SECONDS)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                handle.cancel()
                return None
        except asyncio.CancelledError:
            handle.cancel()
            raise


async def batched(handle: RequestHandle) -> AsyncIterator[Union[list, Finish, Failure]]:
    """Group consecutive parsed events into lists (one wire chunk each), passing Finish/Failure alone."""
    while True:
        events = await handle.next_events()
        parsed = [e for e in events if not isinstance(e, (Finish, Failure))]
        if parsed:
            yield parsed
        for e in events:
            if isinstance(e, (Finish, Failure)):
                yield e
                return


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: list[str] = field(default_factory=list)


@dataclass
class Answer:
    """A whole answer, assembled from the events of a non-streaming request."""

    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: dict[int, ToolCall] = field(default_factory=dict)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    last: Union[Finish, Failure, None] = None

    def add(self, event) -> None:
        if isinstance(event, ContentDelta):
            self.content.append(event.text)
        elif isinstance(event, ReasoningDelta):
            self.reasoning.append(event.text)
        elif isinstance(event, ToolCallStart):
            self.calls[event.index] = ToolCall(event.id, event.name)
        elif isinstance(event, ToolCallArguments):
            self.calls[event.index].arguments.append(event.fragment)
        elif isinstance(event, TokenLogprob):
            self.logprobs.append(event)

    def ordered_calls(self) -> list[ToolCall]:
        return [call for _, call in sorted(self.calls.items())]


async def collect(handle: RequestHandle, request: Request) -> Optional[Answer]:
    """Assemble the whole answer; stop generating (and return None) if the client goes away."""
    answer = Answer()

    async def read() -> None:
        async for batch in batched(handle):
            if isinstance(batch, (Finish, Failure)):
                answer.last = batch
                return
            for event in batch:
                answer.add(event)

    reader = asyncio.ensure_future(read())
    try:
        while not reader.done():
            await asyncio.wait({reader}, timeout=DISCONNECT_POLL_SECONDS)
            if not reader.done() and await request.is_disconnected():
                reader.cancel()
                return None
        reader.result()
        return answer
    finally:
        handle.cancel()  # no-op once finished; stops generation if the client left
