"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API on the shared engine path.

A request is translated into the engine's neutral `GenerationRequest` (OpenAI-shaped
messages and tools) and its typed events are spelled as Anthropic's stream events or
one `message` object. Usage is the engine's counts split Anthropic's way:
`input_tokens = prompt - cached`, `cache_read_input_tokens = cached`,
`cache_creation_input_tokens = 0`, so the three add up to the prompt's token count.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from dataclasses import replace
from typing import AsyncIterator, Optional, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException

from mlxd.server.errors import ContextLengthExceeded, QueueFull
from mlxd.server.events import ContentDelta, Failure, Finish, ReasoningDelta, ToolCallArguments, ToolCallStart, Usage
from mlxd.server.requests import Accepted, GenerationRequest, ModelRef, RequestHandle, SamplingParams

from ..clients import client_of
from ..engine_stream import KEEPALIVE_SECONDS, Answer, batched, collect, resolve_model, submit
from ..errors import error_body, error_response
from .protocol import CountTokensRequest, Message, MessagesRequest, TextBlock

router = APIRouter()
log = logging.getLogger("mlxd.api")

# Claude Code's first system block: its version (and a hash) change between sessions,
# so left in the prompt it would keep every session from reusing the cached prefix.
BILLING_HEADER = "x-anthropic-billing-header:"
TOOL_ID_PREFIX = "toolu_"
_ANTHROPIC = "anthropic"


@router.post("/v1/messages")
async def create_message(body: MessagesRequest, request: Request):
    ref = await resolve_model(request, body.model)
    message_id = f"msg_{uuid.uuid4().hex[:24]}"
    generation = replace(
        to_generation_request(body, ref),
        request_id=message_id,
        client=client_of(request),
        max_tokens=body.max_tokens,
        stop=body.stop_sequences or [],
        sampling=SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k),
    )
    try:
        handle, accepted = await submit(request, generation)
    except (ContextLengthExceeded, QueueFull) as e:
        return engine_error_response(e)
    if accepted is None:  # client left while queued
        return JSONResponse(error_body("client disconnected", 499, door=_ANTHROPIC), status_code=499)
    writer = MessageWriter(message_id, body.model, accepted)
    if body.stream:
        return EventSourceResponse(
            _stream(writer, handle),
            ping=KEEPALIVE_SECONDS,
            ping_message_factory=lambda: _event({"type": "ping"}),
            sep="\n",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await _complete(writer, handle, request)


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request):
    """The exact length of the prompt /v1/messages would feed the model for this body."""
    ref = await resolve_model(request, body.model)
    generation = to_generation_request(body, ref)
    runtime = request.app.state.runtime
    try:
        n = await asyncio.to_thread(runtime.count_prompt_tokens, generation)
    except ValueError as e:  # the chat template refuses these messages
        raise HTTPException(400, str(e)) from e
    return {"input_tokens": n}


def engine_error_response(error: Union[ContextLengthExceeded, QueueFull]) -> JSONResponse:
    """Anthropic's words where its clients act on them: Claude Code recovers from a long
    prompt by matching "prompt is too long", and waits out 529 (overloaded) on a full queue.
    Other engine errors take the shared handler (api/errors.py), in this door's envelope."""
    if isinstance(error, ContextLengthExceeded):
        message = f"prompt is too long: {error.prompt_tokens} tokens > {error.context_length} maximum"
        return error_response(message, 400, door=_ANTHROPIC)
    return error_response(str(error), 529, headers={"Retry-After": str(error.retry_after)}, door=_ANTHROPIC)


# -- request -> engine -------------------------------------------------------


def to_generation_request(body: CountTokensRequest, ref: ModelRef) -> GenerationRequest:
    """What decides the prompt (system, messages, tools, tool_choice, thinking) in the engine's shape."""
    messages = system_messages(body.system)
    for i, message in enumerate(body.messages):
        messages.extend(_neutral(message, f"messages[{i}]", ref.name))
    tools = [
        {"type": "function", "function": {"name": t.name, "description": t.description or "",
                                          "parameters": t.input_schema}}
        for t in body.tools or []
        if t.input_schema is not None  # server tools (web search, ...) run at Anthropic, not here
    ]
    choice = body.tool_choice
    tool_choice = "auto" if choice is None else {
        "auto": "auto",
        "any": "required",
        "none": "none",
        "tool": {"type": "function", "function": {"name": choice.name}},
    }[choice.type]
    thinking = None if body.thinking is None else body.thinking.type != "disabled"
    return GenerationRequest(
        model=ref,
        messages=messages,
        tools=tools or None,
        tool_choice=tool_choice if tools else "none",
        parallel_tool_calls=not (choice and choice.disable_parallel_tool_use),
        door="messages",
        thinking=thinking,
    )


def system_messages(system) -> list[dict]:
    """The system prompt as one leading message, without Claude Code's billing header."""
    if system is None:
        return []
    blocks = [system] if isinstance(system, str) else [b.text for b in system]
    if blocks and blocks[0].startswith(BILLING_HEADER):
        first = blocks[0].split("\n", 1)
        blocks[0] = first[1].lstrip("\n") if len(first) > 1 else ""
    text = "\n\n".join(b for b in blocks if b)
    return [{"role": "system", "content": text}] if text else []


def _engine_id(tool_use_id: str) -> str:
    """Our `toolu_` ids back to the engine's own (Mistral's templates insist on 9 characters)."""
    return tool_use_id.removeprefix(TOOL_ID_PREFIX)


def _text_only(block, where: str, model: str) -> None:
    if block.type in ("image", "document"):
        raise HTTPException(
            400, f"{where}: the model '{model}' reads text only, so {block.type} content cannot be sent to it"
        )


def _neutral(message: Message, where: str, model: str) -> list[dict]:
    """One Anthropic message -> OpenAI-shaped messages: tool results become `tool` messages,
    tool_use blocks the assistant's `tool_calls`, thinking its `reasoning_content`."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    if message.role == "assistant":
        text, reasoning, calls = [], [], []
        for j, block in enumerate(message.content):
            _text_only(block, f"{where}.content[{j}]", model)
            if block.type == "text":
                text.append(block.text)
            elif block.type == "thinking":
                reasoning.append(block.thinking)
            elif block.type == "tool_use":
                arguments = json.dumps(block.input, ensure_ascii=False)
                calls.append({"id": _engine_id(block.id), "type": "function",
                              "function": {"name": block.name, "arguments": arguments}})
        out = {"role": "assistant", "content": "".join(text)}
        if reasoning:
            out["reasoning_content"] = "".join(reasoning)
        if calls:
            out["tool_calls"] = calls
        return [out]
    out, text = [], []
    for j, block in enumerate(message.content):
        _text_only(block, f"{where}.content[{j}]", model)
        if block.type == "text":
            text.append(block.text)
        elif block.type == "tool_result":
            if text:
                out.append({"role": message.role, "content": "".join(text)})
                text = []
            out.append({"role": "tool", "tool_call_id": _engine_id(block.tool_use_id),
                        "content": _tool_result_text(block, f"{where}.content[{j}]", model)})
        # thinking blocks in a user turn carry nothing for the model
    if text or not out:
        out.append({"role": message.role, "content": "".join(text)})
    return out


def _tool_result_text(block, where: str, model: str) -> str:
    content = block.content
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        for k, part in enumerate(content):
            _text_only(part, f"{where}.content[{k}]", model)
        text = "\n".join(part.text for part in content if isinstance(part, TextBlock))
    return f"Error: {text}" if block.is_error else text


# -- engine events -> Anthropic ----------------------------------------------


def usage_dict(prompt_tokens: int, cached_tokens: int, output_tokens: int, thinking_tokens: Optional[int] = None) -> dict:
    usage = {
        "input_tokens": prompt_tokens - cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached_tokens,
        "output_tokens": output_tokens,
    }
    if thinking_tokens is not None:  # the final usage: how many output tokens were reasoning
        usage["output_tokens_details"] = {"thinking_tokens": thinking_tokens}
    return usage


def final_usage(usage: Usage) -> dict:
    return usage_dict(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens, usage.reasoning_tokens)


def stop_reason(finish: Finish) -> str:
    if finish.reason == "tool_calls":
        return "tool_use"
    if finish.reason == "length":
        return "max_tokens"
    return "stop_sequence" if finish.stop_sequence is not None else "end_turn"


def signature(thinking: str) -> str:
    """A thinking block's `signature`: a digest of its text (mlxd does not verify it)."""
    return hashlib.sha256(thinking.encode()).hexdigest()


class MessageWriter:
    """Turns one request's engine events into Anthropic's stream events, block by block."""

    def __init__(self, message_id: str, model: str, accepted: Accepted):
        self.id = message_id
        self.model = model
        self.accepted = accepted
        self.index = -1  # of the open content block
        self.open: Optional[str] = None  # its type
        self.thinking: list[str] = []  # the open thinking block's text, for its signature

    def message(self, content: list, usage: dict, stop: Optional[str] = None, stop_sequence=None) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop, "stop_sequence": stop_sequence, "usage": usage}

    def start(self) -> dict:
        usage = usage_dict(self.accepted.prompt_tokens, self.accepted.cached_tokens, 0)
        return {"type": "message_start", "message": self.message([], usage)}

    def events(self, batch: list) -> list[dict]:
        out = []
        for event in batch:
            if isinstance(event, ContentDelta):
                out += self._open("text", {"type": "text", "text": ""})
                out.append(self._delta({"type": "text_delta", "text": event.text}))
            elif isinstance(event, ReasoningDelta):
                out += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                self.thinking.append(event.text)
                out.append(self._delta({"type": "thinking_delta", "thinking": event.text}))
            elif isinstance(event, ToolCallStart):
                out += self._close()
                block = {"type": "tool_use", "id": TOOL_ID_PREFIX + event.id, "name": event.name, "input": {}}
                out += self._open("tool_use", block)
            elif isinstance(event, ToolCallArguments):
                out.append(self._delta({"type": "input_json_delta", "partial_json": event.fragment}))
        return out

    def finish(self, finish: Finish) -> list[dict]:
        delta = {"stop_reason": stop_reason(finish), "stop_sequence": finish.stop_sequence}
        return [
            *self._close(),
            {"type": "message_delta", "delta": delta, "usage": final_usage(finish.usage)},
            {"type": "message_stop"},
        ]

    def _open(self, kind: str, block: dict) -> list[dict]:
        if self.open == kind and kind != "tool_use":
            return []
        out = self._close()
        self.index += 1
        self.open = kind
        return out + [{"type": "content_block_start", "index": self.index, "content_block": block}]

    def _close(self) -> list[dict]:
        if self.open is None:
            return []
        out = []
        if self.open == "thinking":
            out.append(self._delta({"type": "signature_delta", "signature": signature("".join(self.thinking))}))
            self.thinking = []
        self.open = None
        return out + [{"type": "content_block_stop", "index": self.index}]

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": self.index, "delta": delta}


def _event(obj: dict) -> ServerSentEvent:
    return ServerSentEvent(event=obj["type"], data=json.dumps(obj, separators=(",", ":"), ensure_ascii=False))


async def _stream(writer: MessageWriter, handle: RequestHandle) -> AsyncIterator[ServerSentEvent]:
    try:
        yield _event(writer.start())
        async for batch in batched(handle):
            if isinstance(batch, list):
                for event in writer.events(batch):
                    yield _event(event)
            elif isinstance(batch, Finish):
                for event in writer.finish(batch):
                    yield _event(event)
            elif isinstance(batch, Failure):
                yield _event({"type": "error", "error": {"type": "api_error", "message": batch.message}})
    finally:
        handle.cancel()  # no-op once finished; stops generation if the client left


async def _complete(writer: MessageWriter, handle: RequestHandle, request: Request) -> JSONResponse:
    """The whole answer as one `message`; 499 if the client went away."""
    answer = await collect(handle, request)
    if answer is None:
        return JSONResponse(error_body("client disconnected", 499, door=_ANTHROPIC), status_code=499)
    last = answer.last
    if isinstance(last, Failure):
        return JSONResponse(error_body(last.message, last.status, door=_ANTHROPIC), status_code=last.status)
    message = writer.message(content_blocks(answer), final_usage(last.usage), stop_reason(last), last.stop_sequence)
    return JSONResponse(message)


def content_blocks(answer: Answer) -> list[dict]:
    """Thinking, then text, then tool calls: the order models produce them in."""
    blocks = []
    if answer.reasoning:
        thinking = "".join(answer.reasoning)
        blocks.append({"type": "thinking", "thinking": thinking, "signature": signature(thinking)})
    if answer.content:
        blocks.append({"type": "text", "text": "".join(answer.content)})
    for call in answer.ordered_calls():
        arguments = "".join(call.arguments)
        try:
            tool_input = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:  # cut off by max_tokens: the call keeps no input
            log.warning("tool call %s cut off; its arguments do not parse: %r", call.name, arguments)
            tool_input = {}
        blocks.append({"type": "tool_use", "id": TOOL_ID_PREFIX + call.id, "name": call.name, "input": tool_input})
    return blocks
