"""Pydantic schemas of Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`).

Unknown fields (`cache_control`, `context_management`, `output_config`, `metadata`, ...)
are accepted and ignored, as Claude Code sends many that a local server has no use for.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextBlock(_Open):
    type: Literal["text"]
    text: str


class ImageBlock(_Open):
    type: Literal["image"]


class DocumentBlock(_Open):
    type: Literal["document"]


class ToolUseBlock(_Open):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(_Open):
    type: Literal["tool_result"]
    tool_use_id: str
    content: Union[str, list[Annotated[Union[TextBlock, ImageBlock, DocumentBlock], Field(discriminator="type")]], None] = None
    is_error: bool = False


class ThinkingBlock(_Open):
    type: Literal["thinking"]
    thinking: str
    signature: Optional[str] = None


class RedactedThinkingBlock(_Open):
    type: Literal["redacted_thinking"]


ContentBlock = Annotated[
    Union[TextBlock, ImageBlock, DocumentBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock, RedactedThinkingBlock],
    Field(discriminator="type"),
]


class Message(_Open):
    # Claude Code sends `system` messages mid-conversation too.
    role: Literal["user", "assistant", "system"]
    content: Union[str, list[ContentBlock]]


class Tool(_Open):
    """A client tool; Anthropic's server tools (web search, ...) carry a `type` and no schema."""

    name: str = Field(min_length=1)
    type: Optional[str] = None
    description: Optional[str] = None
    input_schema: Optional[dict[str, Any]] = None


class ToolChoice(_Open):
    type: Literal["auto", "any", "tool", "none"]
    name: Optional[str] = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named(self):
        if self.type == "tool" and not self.name:
            raise ValueError("tool_choice of type 'tool' needs a name")
        return self


class Thinking(_Open):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Optional[int] = Field(None, ge=0)


class CountTokensRequest(_Open):
    """What decides the prompt: the body of count_tokens, and the base of a messages request."""

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    system: Union[str, list[TextBlock], None] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[ToolChoice] = None
    thinking: Optional[Thinking] = None

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_needs_tools(cls, choice: Optional[ToolChoice], info: ValidationInfo):
        if choice is None or choice.type in ("auto", "none"):
            return choice
        names = {t.name for t in info.data.get("tools") or []}
        if not names:
            raise ValueError(f"tool_choice of type '{choice.type}' requires tools")
        if choice.type == "tool" and choice.name not in names:
            raise ValueError(f"tool_choice names tool {choice.name!r}, which is not in tools")
        return choice


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stream: bool = False
    stop_sequences: Optional[list[str]] = None
    temperature: Optional[float] = Field(None, ge=0, le=1)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, value):
        if value and any(not s for s in value):
            raise ValueError("stop sequences must be non-empty strings")
        return value
