"""Typed events that flow from the runtime to the API layer.

The engine and the output parser speak only these; `api/` turns them into
wire chunks. Keeping them plain dataclasses keeps HTTP out of the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A tool call begins: its position among this response's calls, its id and name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArguments:
    """A fragment of the JSON argument string of call `index`."""

    index: int
    fragment: str


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]] = field(default_factory=list)


@dataclass
class Usage:
    """Token counts taken from the engine's own counters, never re-tokenized."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Finish:
    """The end of a response: reason is one of stop, length, tool_calls; `stop_sequence`
    is the request's stop string that ended it, if one did."""

    reason: str
    usage: Usage
    stop_sequence: Optional[str] = None


@dataclass(frozen=True)
class Failure:
    """Generation broke off; usage holds what was counted so far. `code` and `status`
    are the error to answer with (a lost distributed group: 503 engine_unavailable);
    code None: the door's own for a failed generation."""

    message: str
    usage: Usage
    code: Optional[str] = None
    status: int = 500


ParsedEvent = Union[ContentDelta, ReasoningDelta, ToolCallStart, ToolCallArguments]