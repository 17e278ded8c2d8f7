"""A request in the engine's neutral shape, whatever door it came through, and the
asyncio side of it: what the doors build, submit and read events from."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import constrained

# Event batches (about one per token) a request may have waiting for its client;
# a client this far behind is dropped even before --client-timeout.
MAX_EVENT_BACKLOG = 4096


@dataclass
class SamplingParams:
    """Sampling as the client asked for it; None means "the model's default"."""

    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    logit_bias: Optional[dict[int, float]] = None


@dataclass
class ModelRef:
    """A model the registry resolved: the name it is served under, its directory,
    its tool-call format when the catalog knows it better than the template, and
    whether its own tokenizer code may run (only for `--trust-remote-code-for` models)."""

    name: str
    path: Path
    tool_format: Optional[str] = None
    trust_remote_code: bool = False


@dataclass
class GenerationRequest:
    """One request in the engine's neutral shape, whatever door it came through.

    `request_id` names it in logs, the `x-request-id` header and the usage ledger; `door`
    is the endpoint family ("chat", "messages", "responses"); `client` is who sent it (an
    API-key label, or the client's family from its User-Agent)."""

    model: ModelRef
    messages: list[dict]
    tools: Optional[list[dict]] = None
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    max_tokens: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    logprobs: bool = False
    top_logprobs: int = 0
    request_id: str = ""
    door: str = "chat"
    client: str = "other"
    # The chat template's `enable_thinking` switch (Qwen3 and kin); None: its default.
    thinking: Optional[bool] = None
    # Content constrained to JSON; None: free text.
    response_format: Optional[constrained.ResponseFormat] = None


@dataclass(frozen=True)
class Accepted:
    """The prompt is built and queued for prefill: the served model's name, and the
    prompt's token count and how many of those tokens the prefix cache already holds
    (doors that announce usage before generating, like Anthropic's, need both)."""

    model: str
    prompt_tokens: int = 0
    cached_tokens: int = 0


class RequestHandle:
    """The asyncio side of one request: an acceptance future and an event queue.

    The queue is bounded by the engine: it counts what was pushed and what the
    reader took, and drops a request whose client falls too far behind."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.loop = loop
        self.accepted: asyncio.Future = loop.create_future()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.submitted_at = time.perf_counter()  # for the queue timeout, the usage ledger's queue time and TTFT
        self.submitted_wall = time.time()
        self.prepared = None  # prompt_builder.Prepared, once built
        self.dropped: Optional[str] = None  # why the engine dropped it, if it did
        self.released = False
        self._pushed = 0  # event batches pushed (engine thread)
        self._taken = 0  # event batches read (event loop)
        self.last_read = time.monotonic()

    def cancel(self) -> None:
        """Called from asyncio when the client goes away; the engine drops it at the next step."""
        self.cancelled = True

    async def next_events(self) -> list:
        """The next batch of events (readers call this rather than reading the queue)."""
        events = await self.events.get()
        self._taken += 1
        self.last_read = time.monotonic()
        return events

    def backlog(self) -> int:
        return self._pushed - self._taken

    # Engine-thread side -------------------------------------------------
    def _accept(self, accepted: Accepted) -> None:
        self.last_read = time.monotonic()
        self.loop.call_soon_threadsafe(_resolve, self.accepted, accepted, None)

    def _reject(self, error: Exception) -> None:
        self.loop.call_soon_threadsafe(_resolve, self.accepted, None, error)

    def _push(self, events: list) -> None:
        if events:
            self._pushed += 1
            self.loop.call_soon_threadsafe(self.events.put_nowait, events)

    def _stalled(self, client_timeout: float) -> Optional[str]:
        """Why the client counts as gone although connected: it read nothing for too long, or is too far behind."""
        backlog = self.backlog()
        if backlog >= MAX_EVENT_BACKLOG:
            return f"the client is {backlog} events behind"
        idle = time.monotonic() - self.last_read
        if backlog > 0 and idle > client_timeout:
            return f"the client read nothing for {idle:.0f} s"
        return None


def _resolve(future: asyncio.Future, value, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
