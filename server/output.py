"""Streaming output parser: text deltas in, content / reasoning / tool-call events out.

One `OutputParser` per request. The engine feeds it each detokenized text delta
and calls `finish` at the end; it returns `server.events` objects. Pure Python:
no HTTP, no MLX.

Content and reasoning
    Text streams as soon as it cannot be the start of a marker or stop string;
    only the shortest such suffix is held back, so no partial marker ever
    reaches a client. Text between `think_start` and `think_end` (or from the
    start, when the prompt already opened the block: `starts_in_reasoning`)
    is reasoning. A stray `think_end` in content is dropped. Text is passed on
    byte for byte; only whitespace that belongs to the markup mlxd removes is
    trimmed: right after a think marker, a harmony header or a tool call (and at
    the start of reasoning the prompt opened), and right before a think marker or
    a tool call (trailing whitespace is held until more text follows; at the end
    of the response and before a stop string it is kept).

Stop strings
    Checked in content and reasoning, not inside tool calls (a stop string
    such as "\\n\\n" or "```" inside a call's arguments must not cut the call).
    At the first complete match the text before it is emitted, the match and
    everything after it are dropped, and `stopped` becomes True.

Tool calls (only when tools are offered and tool_choice is not "none";
otherwise call markup is ordinary content)
    JSON-argument formats (json_tools, llama3_json, mistral, harmony): a call
    is announced (`ToolCallStart`) as soon as its name is parsed, then the raw
    text of its arguments object streams as `ToolCallArguments` fragments. The
    closing `}` of the arguments object is held back until the object is
    complete and `json.loads` accepts it, so the concatenated fragments never
    parse as JSON before the call is complete; the call is complete then,
    whatever follows. Other formats are parsed whole with the format's parser
    when the call's end marker arrives, and come out as a start plus one
    fragment holding `json.dumps(arguments)`. Harmony (gpt-oss) messages are
    routed by their header: analysis is reasoning, final and commentary are
    content, a message to `functions.NAME` is a call. The prompt ends inside
    a header (`<|start|>assistant`), so a response starts in one too, and may
    name the recipient before the channel. Format knowledge lives in
    `server/tool_formats.py`.

    Ids are 9 random letters and digits. Calls are indexed 0, 1, ... A call to
    a function that was not offered is still a call. With
    `parallel_tool_calls=False` or a named tool_choice only the first call is
    kept; later ones are dropped (logged).

Broken calls never raise; each is logged on logging.getLogger("mlxd.output").
    - Before a call is announced (its name could not be parsed: not a call in
      this format, malformed, or cut by the end of generation), the raw text,
      markers included, comes back as content, so nothing vanishes.
    - After a call was announced, clients already hold it, so it stays a call:
      if its arguments turn out malformed or generation ends inside them, the
      held-back `}` is never sent and the call keeps arguments that do not
      parse (agents such as opencode report that back to the model as an
      invalid call). This is also what OpenAI sends for a call cut by
      max_tokens.
    The finish reason is "tool_calls" when at least one call completed with
    valid arguments, otherwise the given "stop" or "length".

Reasoning tokens: the engine counts a token as reasoning when `in_reasoning`
was True before or after feeding that token's text (so both think markers
count with the thinking between them).
"""

from __future__ import annotations

import json
import logging
import secrets
import string
from dataclasses import dataclass
from typing import Any, Optional, Union

from mlxd.server import tool_formats
from mlxd.server.events import (
    ContentDelta,
    ParsedEvent,
    ReasoningDelta,
    ToolCallArguments,
    ToolCallStart,
)
from mlxd.server.call_regions import JsonCalls, WholeCalls
from mlxd.server.tool_formats import ToolFormat

log = logging.getLogger("mlxd.output")

ToolChoice = Union[str, dict]

CONTENT, REASONING, HEADER, TOOL = "content", "reasoning", "header", "tool"
_MAX_HEADER = 256  # a harmony message header longer than this is not one
_ID_CHARS = string.ascii_letters + string.digits


@dataclass(frozen=True)
class OutputFormat:
    """What the model's text looks like: its think tags and its tool-call format, if known."""

    think_start: Optional[str]
    think_end: Optional[str]
    tool: Optional[ToolFormat]

    @property
    def name(self) -> Optional[str]:
        return self.tool.name if self.tool else None


def output_format(
    name: Optional[str], think_start: Optional[str] = None, think_end: Optional[str] = None
) -> OutputFormat:
    """The OutputFormat of tool format `name` (a catalog family's `tool_format`)."""
    tf = tool_formats.lookup(name)
    if tf is not None and tf.channels is not None:  # harmony reasons in its analysis channel
        think_start = think_end = None
    return OutputFormat(think_start, think_end, tf)


def output_format_for(tokenizer: Any, tool_format: Optional[str] = None) -> OutputFormat:
    """The OutputFormat of an mlx-lm TokenizerWrapper; `tool_format` overrides the detected one."""
    name = tool_formats.resolve(
        tool_format or tokenizer.init_kwargs.get("tool_parser_type"),
        tokenizer.chat_template,
        tokenizer.get_vocab(),
    )
    return output_format(name, getattr(tokenizer, "think_start", None), getattr(tokenizer, "think_end", None))


def forced_prefix(
    fmt: OutputFormat, tool_choice: Optional[ToolChoice], tools: Optional[list]
) -> str:
    """Text to append to the prompt so the model must call a tool ("required")
    or the named one; "" for auto / none. Formats whose calls cannot be forced
    by a prefix get their start marker only."""
    tf = fmt.tool
    if not tools or tf is None or tool_choice in (None, "auto", "none"):
        return ""
    if tool_choice == "required":
        return tf.required_prefix
    return tf.named_prefix.replace("{name}", tool_choice["function"]["name"])


class OutputParser:
    """Turns one response's text deltas into content, reasoning and tool-call events."""

    def __init__(
        self,
        fmt: OutputFormat,
        *,
        tools: Optional[list] = None,
        tool_choice: Optional[ToolChoice] = "auto",
        parallel_tool_calls: bool = True,
        stop: Any = (),
        starts_in_reasoning: bool = False,
        prefix: str = "",
    ):
        self.format = fmt
        self.tools = tools
        self.stopped = False
        self.stop_sequence: Optional[str] = None  # the stop string that matched
        self._tf = fmt.tool
        self._tools_on = bool(tools) and tool_choice != "none" and self._tf is not None
        self._single = not parallel_tool_calls or isinstance(tool_choice, dict)
        self._patterns = {
            CONTENT: self._state_patterns(CONTENT, stop),
            REASONING: self._state_patterns(REASONING, stop),
        }
        self._state = REASONING if starts_in_reasoning else CONTENT
        if self._tf is not None and self._tf.channels and self._tf.channels.prompt_opens_header:
            self._state = HEADER
        self._buf = ""  # text not yet handled
        self._ws = ""  # trailing whitespace of the current text run, held until more text follows
        self._dropped_ws = ""
        self._resume = CONTENT  # the text state a call region returns to
        self._lstrip = starts_in_reasoning  # trim leading whitespace of the next text run (after markup)
        self._lead = ""  # that whitespace, held until the run's text begins
        self._said_content = False
        self._implicit_tried = False
        self._header = ""
        self._region: Optional[JsonCalls | WholeCalls] = None
        self._calls = 0  # calls announced (indexes handed out)
        self._completed = 0  # calls completed with valid arguments
        self._out: list[ParsedEvent] = []
        self._run(
            prefix
        )  # the forced prefix is part of the prompt; its events come with the first feed

    @property
    def in_reasoning(self) -> bool:
        """Whether the parser is inside reasoning after the last feed."""
        return self._state == REASONING

    def feed(self, text: str) -> list[ParsedEvent]:
        """Events for one text delta from the detokenizer."""
        if not self.stopped:
            self._run(text)
        return self._take()

    def finish(self, reason: str) -> tuple[list[ParsedEvent], str]:
        """Flush held text at the end of generation ("stop" or "length"); the events and the final finish reason."""
        while not self.stopped and self._state in (TOOL, HEADER):
            if self._state == TOOL:
                rest = self._region.finish(reason)
                self._region = None
            else:
                log.warning(
                    "harmony header cut off by the end of generation; returned as content: %r",
                    self._header + self._buf,
                )
                self._raw(self._header)
                rest = ""
            self._state = CONTENT
            self._run(rest)
        if not self.stopped:
            self._text(self._buf)
            self._flush_ws()
        self._buf = ""
        return self._take(), "tool_calls" if self._completed else reason

    # -- text states --------------------------------------------------------

    def _state_patterns(self, state: str, stop: Any) -> dict[str, str]:
        """Marker or stop string -> action, for the content or reasoning state."""
        fmt, tf, patterns = self.format, self._tf, {}
        if state == CONTENT and fmt.think_start:
            patterns[fmt.think_start] = "think"
        if fmt.think_end:
            patterns[fmt.think_end] = "drop" if state == CONTENT else "end_think"
        if tf is not None and tf.channels is not None:
            for marker in tf.channels.opens:
                patterns[marker] = "header"
            for marker in tf.channels.ends:
                patterns[marker] = "drop" if state == CONTENT else "end_think"
        if self._tools_on and tf.start:
            patterns[tf.start] = "tool"
        for s in stop:
            if s:
                patterns[s] = "stop"
        return patterns

    def _run(self, text: str) -> None:
        self._buf += text
        while self._buf and not self.stopped:
            if self._state == TOOL:
                rest = self._region.feed(self._buf)
                self._buf = ""
                if rest is None:
                    return
                self._region, self._buf = None, rest
                if self._state == TOOL:  # the region closed (a broken one has resumed already)
                    self._state = self._resume
                    self._end_run()
                continue
            if self._state == HEADER:
                if not self._read_header():
                    return
                continue
            if self._implicit_call():
                continue
            pos, pattern = _scan(self._buf, self._patterns[self._state])
            self._text(self._buf[:pos])
            if pattern is None:
                self._buf = self._buf[pos:]
                return
            self._buf = self._buf[pos + len(pattern) :]
            self._act(self._patterns[self._state][pattern], pattern)

    def _act(self, action: str, marker: str) -> None:
        if action == "stop":
            self._flush_ws()
            self.stopped, self.stop_sequence, self._buf = True, marker, ""
            return
        if action == "drop":
            return
        self._end_run()
        if action == "think":
            self._state = REASONING
        elif action == "end_think":
            self._state = CONTENT
        elif action == "header":
            self._state, self._header = HEADER, marker
        else:
            self._open_region(marker)

    def _implicit_call(self) -> bool:
        """Llama 3.x: a response whose content begins with "{" is a call."""
        if (
            self._implicit_tried
            or self._state != CONTENT
            or not self._tools_on
            or not self._tf.implicit_start
        ):
            return False
        if self._said_content:
            self._implicit_tried = True
            return False
        stripped = self._buf.lstrip()
        if not stripped:
            return False
        self._implicit_tried = True
        if not stripped.startswith("{"):
            return False
        self._buf = stripped  # whitespace before the call is the call's
        self._end_run()
        self._open_region("")
        return True

    def _read_header(self) -> bool:
        """Harmony: route a message by its header once `<|message|>` arrives."""
        channels = self._tf.channels
        end = self._buf.find(channels.body)
        if end < 0 or len(self._header) + end > _MAX_HEADER:
            if len(self._header) + len(self._buf) > _MAX_HEADER + len(channels.body):
                log.warning(
                    "not a harmony message header; returned as content: %r",
                    self._header + self._buf,
                )
                self._raw(self._header)
                return True
            return False
        header = self._header + self._buf[:end]
        self._buf = self._buf[end + len(channels.body) :]
        kind, name = channels.route(header)
        if kind == "tool" and self._tools_on:
            self._state, self._resume = TOOL, CONTENT
            self._region = JsonCalls(self, self._tf, header + channels.body, name=name)
        else:
            self._state = REASONING if kind == "reasoning" else CONTENT
        return True

    def _open_region(self, opener: str) -> None:
        self._state, self._resume = TOOL, self._state
        region = JsonCalls if self._tf.streams_arguments else WholeCalls
        self._region = region(self, self._tf, opener)

    def _text(self, text: str) -> None:
        """Emit text of the current state, trimming whitespace next to markup.

        After markup, the whitespace up to the last line break is the markup's
        (`</think>\n\n`); the indentation of the first line after it is text."""
        if self._lstrip:
            body = text.lstrip()
            self._lead += text[: len(text) - len(body)]
            if not body:
                return
            newline = self._lead.rfind("\n")
            text = (self._lead[newline + 1 :] if newline >= 0 else "") + body
            self._lstrip, self._lead = False, ""
        if not text:
            return
        text = self._ws + text
        body = text.rstrip()
        self._ws = text[len(body) :]
        if body:
            self._emit_text(body)

    def _emit_text(self, text: str) -> None:
        if self._state == REASONING:
            self._out.append(ReasoningDelta(text))
        else:
            self._out.append(ContentDelta(text))
            self._said_content = True

    def _flush_ws(self) -> None:
        if self._ws:
            self._emit_text(self._ws)
        self._ws = ""

    def _end_run(self) -> None:
        """Markup ends the current run of text: its trailing whitespace is dropped
        (kept aside in case the markup turns out to be content)."""
        self._dropped_ws = self._ws
        self._ws, self._lstrip, self._lead = "", True, ""

    def _take(self) -> list[ParsedEvent]:
        events, self._out = _coalesce(self._out), []
        return events

    # -- called by call regions ----------------------------------------------

    def _raw(self, text: str) -> None:
        """Text of a broken call region, returned as written to the text it interrupted."""
        self._state = self._resume
        self._ws, self._lstrip, self._lead = self._dropped_ws, False, ""
        self._text(text)

    def _start_call(self, name: str) -> Optional[int]:
        """Announce a call; its index, or None when the call is dropped."""
        index, self._calls = self._calls, self._calls + 1
        if self._single and index > 0:
            log.info("dropped tool call %d (%s): only one call was asked for", index, name)
            return None
        self._out.append(ToolCallStart(index, _new_id(), name))
        return index

    def _arguments(self, index: Optional[int], fragment: str) -> None:
        if index is not None and fragment:
            self._out.append(ToolCallArguments(index, fragment))

    def _whole_call(self, index: Optional[int], arguments: dict) -> None:
        """A call's arguments known all at once."""
        self._arguments(index, json.dumps(arguments, ensure_ascii=False))
        self._call_done(index)

    def _call_done(self, index: Optional[int]) -> None:
        if index is not None:
            self._completed += 1


def _scan(text: str, patterns: dict[str, str]) -> tuple[int, Optional[str]]:
    """The first pattern in text: (position, pattern); (position, None) when
    text from there may still become a pattern; (len(text), None) when none."""
    firsts = {pattern[0] for pattern in patterns}
    for pos in range(len(text)):
        if text[pos] not in firsts:
            continue
        tail, best = text[pos:], None
        for pattern in patterns:
            if tail.startswith(pattern):
                if best is None or len(pattern) > len(best):
                    best = pattern
            elif pattern.startswith(tail):
                return pos, None  # a longer pattern may still match here
        if best is not None:
            return pos, best
    return len(text), None


def _new_id() -> str:
    return "".join(secrets.choice(_ID_CHARS) for _ in range(9))


def _coalesce(events: list[ParsedEvent]) -> list[ParsedEvent]:
    """Merge neighbouring deltas of the same kind."""
    merged: list[ParsedEvent] = []
    for event in events:
        last = merged[-1] if merged else None
        if isinstance(event, (ContentDelta, ReasoningDelta)) and type(last) is type(event):
            merged[-1] = type(event)(last.text + event.text)
        elif (
            isinstance(event, ToolCallArguments)
            and isinstance(last, ToolCallArguments)
            and last.index == event.index
        ):
            merged[-1] = ToolCallArguments(event.index, last.fragment + event.fragment)
        else:
            merged.append(event)
    return merged
