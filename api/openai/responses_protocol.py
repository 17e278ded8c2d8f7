"""Pydantic schemas of OpenAI's Responses API (`POST /v1/responses`).

Input items and tools stay loose here (their `type` decides their shape, and clients
such as Codex send kinds mlxd cannot run); `responses_input.py` reads them and
answers a bad one with a 400 that names it. Unknown fields are accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(_Open):
    """input_text / output_text / summary_text / reasoning_text, or a kind mlxd cannot read."""

    type: str
    text: Optional[str] = None


class InputItem(_Open):
    """One item of `input`: a message, a function call or its output, a reasoning item..."""

    type: Optional[str] = None  # a bare {"role", "content"} is a message
    role: Optional[Literal["system", "developer", "user", "assistant"]] = None
    content: Union[str, list[ContentPart], None] = None
    # function_call / function_call_output
    call_id: Optional[str] = None
    name: Optional[str] = None
    namespace: Optional[str] = None
    arguments: Optional[str] = None
    output: Union[str, list[ContentPart], None] = None
    # reasoning
    summary: Optional[list[ContentPart]] = None
    encrypted_content: Optional[str] = None


class ReasoningConfig(_Open):
    effort: Optional[str] = None
    summary: Optional[str] = None


class TextFormat(_Open):
    """`text`, `json_object` (any JSON object) or `json_schema` (JSON valid against `schema`)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Union[dict[str, Any], bool, None] = Field(None, alias="schema")
    strict: Optional[bool] = None


class TextConfig(_Open):
    format: Optional[TextFormat] = None


class ResponsesRequest(_Open):
    model: str = Field(min_length=1)
    input: Union[str, list[InputItem]] = ""
    instructions: Optional[str] = None
    stream: bool = False
    max_output_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: bool = True
    reasoning: Optional[ReasoningConfig] = None
    text: Optional[TextConfig] = None
    store: bool = True
    previous_response_id: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    include: Optional[list[str]] = None
    prompt_cache_key: Optional[str] = None
