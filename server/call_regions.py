"""The tool-call regions of a model's output, for `output.OutputParser`.

A region starts at a call's opening marker and ends after its last call. In
JSON-argument formats (`JsonCalls`) each call is announced once its name is
parsed and its arguments stream as they are generated; other formats
(`WholeCalls`) are parsed whole when their end marker arrives. What a region
finds goes out through the parser that opened it (`out`): calls, their argument
fragments, and text that turned out not to be a call (the parser's `_raw`).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Callable, Optional

from mlxd.server.tool_formats import ToolFormat, call_from_json

if TYPE_CHECKING:
    from mlxd.server.output import OutputParser

log = logging.getLogger("mlxd.output")


class _Depth:
    """Bracket depth of JSON text, outside strings."""

    def __init__(self, depth: int = 0):
        self.depth, self.in_string, self._escape = depth, False, False

    def feed(self, ch: str) -> None:
        if self.in_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self.in_string = False
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1


# Phases of a JSON call region.
_BETWEEN, _HEAD, _ARGS_WAIT, _ARGS, _TAIL, _WHOLE, _OBJECT = (
    "between",
    "head",
    "args_wait",
    "args",
    "tail",
    "whole",
    "object",
)


class JsonCalls:
    """A call region of a JSON-argument format; streams each call's arguments.

    `text` holds the region's text from `opener` (the marker that opened it)
    or from the end of the last finished call; `i` is how far it was read.
    `feed` returns None while the region goes on, else the text after it."""

    def __init__(self, out: OutputParser, tf: ToolFormat, opener: str, name: Optional[str] = None):
        self.out, self.tf, self.opener = out, tf, opener
        self.text, self.i = opener, len(opener)
        self.opener_pending = (
            True  # nothing of this region was a call yet: on failure the opener is content
        )
        self.rest: Optional[str] = None
        if tf.end:
            self.closers = ((tf.end, True),)
        else:
            markers = (tf.start,) + (tf.channels.opens + tf.channels.ends if tf.channels else ())
            self.closers = tuple((m, False) for m in markers if m)
        self.phase = _BETWEEN
        if name is not None:  # harmony: the header named the call
            self._commit(name, wrapped=False)
            self.phase = _ARGS_WAIT

    def feed(self, text: str) -> Optional[str]:
        self.text += text
        while self.rest is None and getattr(self, "_" + self.phase)():
            pass
        return self.rest

    def finish(self, reason: str) -> str:
        """The region's text to treat as content when generation ended inside it."""
        if self.phase == _ARGS:
            self._emit_args(len(self.text))
        if self.phase in (_ARGS_WAIT, _ARGS, _WHOLE):
            self._broken(f"generation ended ({reason}) inside its arguments")
            return ""
        if self.opener_pending or self.phase in (_HEAD, _OBJECT):
            self._fail(f"generation ended ({reason}) before a call was complete")
            return self.rest
        return ""  # between calls (at most a cut end marker) or in the rest of a finished call's object

    # -- phases: each returns True to go on, False to wait for more text --

    def _between(self) -> bool:
        t = self.text
        while self.i < len(t):
            closer = self._closer_at(self.i)
            if closer == "partial":
                return False
            if closer is not None:
                return self._close(closer)
            if t[self.i].isspace() or t[self.i] in ",;[]":
                self.i += 1
                continue
            self.head, self.phase = self.i, _HEAD
            return True
        return False

    def _head(self) -> bool:
        text, partial = self.text[self.head :], False
        for pattern in self.tf.headers:
            match = pattern.match(text, partial=True)
            if match is None:
                continue
            if match.partial:
                partial = True
                continue
            wrapped = text.startswith("{")
            name = match.group("name")
            if wrapped:
                try:
                    name = json.loads(f'"{name}"')
                except ValueError:
                    return self._fail("the call's name is not a valid JSON string")
            self._commit(name, wrapped)
            self.i, self.phase = self.head + match.end(), _ARGS_WAIT
            return True
        if partial:
            return False
        if text.startswith("{"):  # a JSON object of another shape: parse it whole
            self.i, self.phase, self.depth = self.head, _OBJECT, _Depth()
            return True
        return self._fail("text that is not a tool call")

    def _args_wait(self) -> bool:
        t = self.text
        while self.i < len(t) and t[self.i].isspace():
            self.i += 1
        if self.i == len(t):
            return False
        if t[self.i] == "{":
            self.args_start = self.emitted = self.i
            self.phase, self.depth = _ARGS, _Depth()
            return True
        if (
            self.wrapped
        ):  # another JSON value (a string holding the object?): parse when the call's object closes
            self.phase, self.depth = _WHOLE, _Depth(1)
            return True
        self._broken("its arguments are not a JSON object")
        self._to_between()
        return True

    def _args(self) -> bool:
        t, depth = self.text, self.depth
        while self.i < len(t):
            if not depth.in_string:
                closer = self._closer_at(self.i)
                if closer == "partial":
                    break
                if closer is not None:
                    self._emit_args(self.i)
                    self._broken("the region ended inside its arguments")
                    return self._close(closer)
            depth.feed(t[self.i])
            if depth.depth == 0:
                self._emit_args(self.i)  # all but the closing brace
                arguments = t[self.args_start : self.i + 1]
                self.i += 1
                if _is_json_object(arguments):
                    self.out._arguments(self.index, t[self.i - 1])
                    self.out._call_done(self.index)
                else:
                    self._broken("its arguments are not valid JSON")
                if self.wrapped:
                    self.phase, self.depth = _TAIL, _Depth(1)
                else:
                    self._to_between()
                return True
            self.i += 1
        self._emit_args(self.i)
        return False

    def _tail(self) -> bool:
        """The rest of the call's object after its arguments."""

        def done() -> bool:
            self._to_between()
            return True

        return self._read_object(done, self._close)

    def _whole(self) -> bool:
        """A call whose arguments are not an object: parsed when its object closes."""

        def done() -> bool:
            try:
                call = call_from_json(json.loads(self.text[self.head : self.i]))
            except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than json can read
                self._broken(f"its arguments are not valid: {e}")
            else:
                self.out._whole_call(self.index, call["arguments"])
            self._to_between()
            return True

        def closed(closer: str) -> bool:
            self._broken("the region ended inside the call")
            return self._close(closer)

        return self._read_object(done, closed)

    def _object(self) -> bool:
        """A JSON object whose header did not match: it is a call only if it parses as one."""

        def done() -> bool:
            try:
                call = call_from_json(json.loads(self.text[self.head : self.i]))
            except (ValueError, RecursionError) as e:
                return self._fail(f"a JSON object that is not a tool call ({e})")
            self._commit(call["name"], wrapped=True)
            self.out._whole_call(self.index, call["arguments"])
            self._to_between()
            return True

        return self._read_object(done, lambda closer: self._fail("an unclosed JSON object"))

    # -- helpers --

    def _read_object(self, done: Callable[[], bool], closed: Callable[[str], bool]) -> bool:
        """Read to the end of the JSON object at hand, then `done()`; a region
        closer inside the object gives `closed(closer)` instead. False: more text needed."""
        t, depth = self.text, self.depth
        while self.i < len(t):
            if not depth.in_string:
                closer = self._closer_at(self.i)
                if closer == "partial":
                    return False
                if closer is not None:
                    return closed(closer)
            depth.feed(t[self.i])
            self.i += 1
            if depth.depth == 0:
                return done()
        return False

    def _closer_at(self, i: int):
        """The closing marker at i, "partial" if the text ends inside one, else None."""
        if i >= len(self.text):
            return None
        for marker, consume in self.closers:
            if self.text[i] != marker[0]:
                continue
            piece = self.text[i : i + len(marker)]
            if piece == marker:
                return marker, consume
            if len(piece) < len(marker) and marker.startswith(piece):
                return "partial"
        return None

    def _close(self, closer) -> bool:
        marker, consume = closer
        self.rest = self.text[self.i + len(marker) if consume else self.i :]
        return False

    def _commit(self, name: str, wrapped: bool) -> None:
        self.index, self.name, self.wrapped = self.out._start_call(name), name, wrapped
        self.opener_pending = False

    def _emit_args(self, end: int) -> None:
        if end > self.emitted:
            self.out._arguments(self.index, self.text[self.emitted : end])
            self.emitted = end

    def _to_between(self) -> None:
        self.text, self.i, self.phase = self.text[self.i :], 0, _BETWEEN

    def _broken(self, why: str) -> None:
        log.warning(
            "tool call %r is broken: %s; its arguments will not parse: %r",
            self.name,
            why,
            self.text[:2000],
        )

    def _fail(self, why: str) -> bool:
        """The region holds no (further) call: its text goes back to the content state."""
        if self.opener_pending:
            log.warning("not a tool call (%s); returned as content: %r", why, self.text[:2000])
            self.out._raw(self.opener)
            self.rest = self.text[len(self.opener) :]
            return False
        if self.tf.end:  # a marker-less region simply ends: text after its calls is content
            log.warning(
                "text in a tool call region after its calls (%s); returned as content: %r",
                why,
                self.text[:2000],
            )
        self.rest = self.text[self.head :]
        return False


class WholeCalls:
    """A call region of a format parsed whole, when its end marker arrives."""

    def __init__(self, out: OutputParser, tf: ToolFormat, opener: str):
        self.out, self.tf, self.opener = out, tf, opener
        self.body = ""

    def feed(self, text: str) -> Optional[str]:
        searched = max(0, len(self.body) - len(self.tf.end or "") + 1)
        self.body += text
        if not self.tf.end:
            return None
        end = self.body.find(self.tf.end, searched)
        if end < 0:
            return None
        body, rest = self.body[:end], self.body[end + len(self.tf.end) :]
        if self._emit(body):
            return rest
        self.out._raw(self.opener)
        return body + self.tf.end + rest

    def finish(self, reason: str) -> str:
        if reason == "stop" and self._emit(self.body):  # the model ended without the end marker
            return ""
        if reason != "stop":
            log.warning(
                "tool call cut by the end of generation (%s); returned as content: %r",
                reason,
                self.opener + self.body,
            )
        self.out._raw(self.opener)
        return self.body

    def _emit(self, body: str) -> bool:
        try:
            parsed = self.tf.parse(body, self.out.tools)
            calls = [call_from_json(c) for c in (parsed if isinstance(parsed, list) else [parsed])]
            if not calls:
                raise ValueError("no tool call found")
        except Exception as e:  # third-party parsers raise many kinds of errors
            log.warning(
                "malformed tool call (%s: %s); returned as content: %r",
                type(e).__name__,
                e,
                self.opener + body,
            )
            return False
        for call in calls:
            self.out._whole_call(self.out._start_call(call["name"]), call["arguments"])
        return True


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):  # a model can nest deeper than json.loads reads
        return False
