"""Constrained decoding: a grammar per request, a token mask per decode step.

A request that asks for JSON (`response_format`) or forces a tool call gets a
Lark grammar (llguidance's dialect, with `%json {schema}` for JSON Schema) that
describes everything the model may write after its prompt: a free reasoning block
where the model has one, then the JSON; after a forced call's opening, the rest of
the call in the family's own syntax; or, for `strict` tools under tool_choice
"auto", free text in which every call the model opens is held to the tools'
schemas. Keywords no grammar enforces token by token relax the grammar, and the
finished answer is then checked (`validate`; api/validated.py regenerates). The grammar is compiled once per
tokenizer and cached; each request copies the compiled matcher, and a logits
processor in mlx-lm's batch masks every token the grammar does not allow, so the
request decodes in the same batch step as unconstrained ones. End-of-turn tokens
(the tokenizer's and generation_config's) are allowed exactly when the grammar
accepts the end.

The mask is applied with plain MLX ops (llguidance's own MLX path is a Metal
kernel), so it is one code path on every MLX backend.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

from . import tool_formats
from .errors import EngineError

log = logging.getLogger("mlxd.constrained")

# JSON as models write it ({"a": 1, "b": 2}), with no free-running whitespace:
# a model that may emit whitespace anywhere can emit it forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# The model picks its own tokens for text the grammar forces (llguidance would allow
# only the canonical tokenization of it): a model's own spelling of `"}\n</tool_call>`
# is as valid as any, and it is what the model means.
GRAMMAR_OPTIONS = '%llguidance {"no_forcing": true}\n'
# Keywords whose values JSON Schema counts as integers: 1.0 is as good as 1.
_INTEGER_KEYWORDS = {
    "minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties",
    "minContains", "maxContains",
}  # fmt: skip
# Keywords whose values are data, not schemas: left as written.
_DATA_KEYWORDS = {"const", "enum", "default", "examples"}
_GRAMMAR_CACHE_SIZE = 64
# llguidance's options for a relaxed grammar: unenforceable keywords left out, oneOf as anyOf.
RELAXED = {"lenient": True, "coerce_one_of": True}
NL = "\n"
# Formats whose calls open with one token (which plain text cannot spell, so free text
# and a call are told apart by it).
_OPENED_BY_TOKEN = ("json_tools", "mistral", "mistral_json", "qwen3_coder", "glm47")
# Formats whose calls carry their arguments as one JSON object.
_JSON_ARGUMENTS = ("json_tools", "llama3_json", "mistral_json", "mistral", "harmony")


class InvalidSchema(EngineError):
    """A response_format or tool schema that cannot be enforced (HTTP 400)."""

    code = "invalid_schema"
    param = "response_format"


@dataclass(frozen=True)
class ResponseFormat:
    """What the content must be: any JSON object, or JSON valid against `schema`.
    `validate`: the grammar is relaxed (see `check_schema`); check finished answers."""

    type: str  # "json_object" or "json_schema"
    schema: Optional[dict] = None
    name: str = ""
    validate: bool = False


# --- schemas ------------------------------------------------------------------


def normalize_schema(schema: Any) -> Any:
    """The schema with integer-valued floats made integers where JSON Schema
    wants an integer (`"minItems": 1.0`), which llguidance would refuse."""
    if isinstance(schema, list):
        return [normalize_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _DATA_KEYWORDS:
            out[key] = value
        elif key in _INTEGER_KEYWORDS and isinstance(value, float) and value.is_integer():
            out[key] = int(value)
        elif key == "properties" or key == "$defs" or key == "definitions" or key == "patternProperties":
            out[key] = {k: normalize_schema(v) for k, v in value.items()} if isinstance(value, dict) else value
        else:
            out[key] = normalize_schema(value)
    return out


def check_schema(schema: Any, param: str = "response_format") -> tuple[dict, bool]:
    """`_check_schema`, remembered: agents send the same schemas with every request."""
    try:
        key = json.dumps(schema)  # key order kept: properties are written in schema order
    except (TypeError, ValueError):
        return _check_schema(schema, param)
    checked, relaxed = _checked(key, param)
    return json.loads(checked), relaxed


@functools.lru_cache(maxsize=256)
def _checked(key: str, param: str) -> tuple[str, bool]:
    schema, relaxed = _check_schema(json.loads(key), param)
    return json.dumps(schema), relaxed


def _check_schema(schema: Any, param: str) -> tuple[dict, bool]:
    """The normalized schema ready to compile, and whether its grammar is relaxed.

    A keyword no grammar can enforce token by token (`not`, `if`/`then`/`else`,
    `uniqueItems`, `contains`, overlapping `oneOf`, ...) relaxes the grammar: it
    leaves that keyword out (oneOf becomes anyOf), and the finished answer must be
    checked with `validate` (the schema carries llguidance's options for that).
    InvalidSchema names why a schema cannot be used at all: not valid JSON Schema,
    a remote `$ref`, an unsatisfiable schema. Pure: no model needed."""
    import jsonschema
    from llguidance import LLMatcher

    if schema is True:  # JSON Schema's "anything"
        schema = {}
    if not isinstance(schema, dict):
        raise InvalidSchema("the schema must be a JSON object (or true)", param=param)
    schema = normalize_schema(schema)
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise InvalidSchema(f"invalid JSON Schema: {e.message}", param=param) from None
    error = _grammar_error(LLMatcher.grammar_from_lark(_json_rule("start", schema)))
    if not error:
        return schema, False
    relaxed = {**schema, "x-guidance": {**(schema.get("x-guidance") or {}), **RELAXED}}
    if _grammar_error(LLMatcher.grammar_from_lark(_json_rule("start", relaxed)), relaxed=True):
        raise InvalidSchema(f"schema not supported for constrained decoding: {error}", param=param)
    return relaxed, True


def validate(schema: dict, text: str) -> Optional[str]:
    """Why `text` is not JSON valid against `schema`; None when it is."""
    import jsonschema

    try:
        value = json.loads(text)
    except ValueError as e:
        return f"not JSON: {e}"
    error = jsonschema.exceptions.best_match(
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)(schema).iter_errors(value)
    )
    return None if error is None else f"{error.message} (at {error.json_path})"


def _grammar_error(grammar: str, relaxed: bool = False) -> str:
    from llguidance import LLMatcher

    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    # An unimplemented keyword is only a warning when llguidance would ignore it.
    message = messages[0] if is_error else "" if relaxed else next((m for m in messages if "Unimplemented" in m), "")
    # "at 1(8): failed to compile JSON schema: WHY\n<the grammar>" -> "WHY"
    message = message.split("\n")[0]
    message = re.sub(r"^at \d+\(\d+\): (failed to compile JSON schema: )?", "", message)
    if message.startswith("oneOf constraints are not supported"):  # llguidance takes disjoint ones only
        message = "oneOf whose branches may overlap is not supported (use anyOf)"
    return message


def _json_rule(name: str, schema: dict) -> str:
    """A Lark rule that is JSON valid against `schema`, written the way models write JSON."""
    body = dict(schema)
    body["x-guidance"] = {**JSON_OPTIONS, **(schema.get("x-guidance") or {})}
    return f"{name}: %json {json.dumps(body, ensure_ascii=False)}\n"


def response_schema(fmt: ResponseFormat) -> dict:
    return fmt.schema if fmt.type == "json_schema" else {"type": "object"}


# --- grammars -----------------------------------------------------------------


def _lit(vocab: dict, text: str) -> str:
    """A Lark element for marker `text`: its token when it is one (special tokens
    match only that way), else the string."""
    token = vocab.get(text)
    if token is not None:
        return f"<[{token}]>"
    return json.dumps(text, ensure_ascii=False)


def _reasoning(lit, think: Optional[tuple[str, str]], starts_in_reasoning: bool) -> str:
    """The free reasoning block a response may begin with, as a Lark expression ("" if none)."""
    if think is None:
        return ""
    if starts_in_reasoning:
        return f"REASONING {lit(think[1])} GAP"
    return f"({lit(think[0])} REASONING {lit(think[1])} GAP)?"


_FREE = 'REASONING: /(.|\\n)*/\nGAP: /[ \\n]{0,2}/\n'


def response_grammar(
    fmt: ResponseFormat, vocab: dict, format_name: Optional[str], think: Optional[tuple[str, str]],
    starts_in_reasoning: bool,
) -> str:
    """The grammar of a whole response: free reasoning where the model has a
    think block or an analysis channel (the JSON starts after it ends), then JSON."""
    rules = _json_rule("body", response_schema(fmt)) + _FREE
    lit = functools.partial(_lit, vocab)
    if format_name == "harmony":  # the prompt ends with "<|start|>assistant"
        analysis = f'{lit("<|channel|>")} "analysis" {lit("<|message|>")} REASONING {lit("<|end|>")} {lit("<|start|>")} "assistant"'
        return f'start: ({analysis})? {lit("<|channel|>")} "final" {lit("<|message|>")} body\n' + rules
    return f"start: {_reasoning(lit, think, starts_in_reasoning)} body\n" + rules


def strict_tools_grammar(
    format_name: str, vocab: dict, tools: list[dict], think: Optional[tuple[str, str]], starts_in_reasoning: bool
) -> Optional[str]:
    """tool_choice "auto" with a `strict` function: text and reasoning run free, and a
    call, once the model opens one, is held to the offered tools' schemas. Only for
    formats whose calls open with a token that plain text cannot spell."""
    tf = tool_formats.lookup(format_name)
    if format_name not in _OPENED_BY_TOKEN or tf is None or tf.start not in vocab:
        return None
    calls = tool_grammar(format_name, vocab, tools, "required")
    if calls is None:
        return None
    lit = functools.partial(_lit, vocab)
    opening = " ".join([lit(tf.start)] + ([_s(tf.required_prefix[len(tf.start):])] if tf.required_prefix != tf.start else []))
    head = _reasoning(lit, think, starts_in_reasoning)
    return (f"start: {head} TEXT ({opening} call TEXT)*\nTEXT: /(.|\\n)*/\n" + _FREE
            + calls.replace("start:", "call:", 1))


def _tool_schemas(tools: list[dict], tool_choice: Any) -> list[tuple[str, dict]]:
    """(name, parameters schema) of the tools a forced call may use."""
    out = []
    for tool in tools:
        function = tool.get("function") or {}
        name = function.get("name")
        if not name or (isinstance(tool_choice, dict) and name != tool_choice["function"]["name"]):
            continue
        params = function.get("parameters") or {"type": "object", "properties": {}}
        # A relaxed grammar still gets the call's shape and most of its arguments right.
        out.append((name, check_schema(params, param="tools")[0]))
    return out


def _is_string(schema: dict) -> bool:
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    return schema.get("type") == "string" or (
        "type" not in schema and values is not None and all(isinstance(v, str) for v in values)
    )


def _raw_value(rule: str, schema: dict) -> str:
    """A parameter value of the XML-like formats: strings are written raw, anything else as JSON."""
    if not _is_string(schema):
        return _json_rule(rule, schema)
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if values is not None:
        return f"{rule}: " + " | ".join(json.dumps(v, ensure_ascii=False) for v in values) + "\n"
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    return f"{rule.upper()}: /[^<\\n]{{{low},{'' if high is None else high}}}/\n{rule}: {rule.upper()}\n"


def _xml_params(prefix: str, params: dict, write_param) -> tuple[str, str]:
    """A sequence of parameters in `properties` order (optional ones may be left out):
    the sequence's Lark expression, and the rules it needs."""
    required = set(params.get("required") or [])
    parts, rules = [], ""
    for i, (key, schema) in enumerate((params.get("properties") or {}).items()):
        rule = f"{prefix}_v{i}"
        rules += _raw_value(rule, schema if isinstance(schema, dict) else {})
        part = write_param(key, rule)
        parts.append(part if key in required else f"({part})?")
    return " ".join(parts) or '""', rules


def tool_grammar(format_name: str, vocab: dict, tools: list[dict], tool_choice: Any) -> Optional[str]:
    """The grammar of the rest of a forced call, after the text `forced_prefix`
    appended to the prompt (for a named call, up to its arguments); None for
    formats this module does not know."""
    named = isinstance(tool_choice, dict)
    lit = functools.partial(_lit, vocab)
    alts, rules = [], ""
    for i, (name, params) in enumerate(_tool_schemas(tools, tool_choice)):
        args = f"args{i}"
        if format_name in _JSON_ARGUMENTS:
            rules += _json_rule(args, params)
        if format_name == "json_tools":
            head = _s(f'{{"name": {json.dumps(name)}, "arguments": ')
            call = f'{args} {_s("}" + NL)} {lit("</tool_call>")}'
        elif format_name == "llama3_json":
            head, call = _s(f'{json.dumps(name)[1:-1]}", "parameters": '), f'{args} "}}"'
        elif format_name == "mistral_json":
            # Mistral's template gives each call a 9-character id; models write it too.
            head, call = _s(f'{json.dumps(name)[1:-1]}", "arguments": '), f'{args} CALL_ID? "}}]"'
        elif format_name == "mistral":
            head, call = f"{_s(name)} {lit('[ARGS]')}", args
        elif format_name == "harmony":
            head, call = f'{_s(name + " ")} {lit("<|constrain|>")} "json" {lit("<|message|>")}', args
        elif format_name == "qwen3_coder":
            seq, more = _xml_params(
                args, params, lambda k, r: f"{_s(f'<parameter={k}>' + NL)} {r} {_s(NL + '</parameter>' + NL)}"
            )
            rules += more
            head, call = _s(name + ">" + NL), f'{seq} {_s("</function>" + NL)} {lit("</tool_call>")}'
        elif format_name == "glm47":
            seq, more = _xml_params(
                args, params,
                lambda k, r: f'{lit("<arg_key>")} {_s(k)} {lit("</arg_key>")} {lit("<arg_value>")} {r} {lit("</arg_value>")}',
            )
            rules += more
            head, call = _s(name), f'{seq} {lit("</tool_call>")}'
        else:
            return None
        alts.append(call if named else f"{head} {call}")
    if not alts:
        return None
    if format_name == "mistral_json":
        rules += 'CALL_ID: /, "id": "[A-Za-z0-9]{9}"/\n'
    return "start: " + " | ".join(f"({a})" for a in alts) + "\n" + rules


def _s(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


# --- compiled grammars and the per-step mask ----------------------------------


class _Compiled:
    """One tokenizer's llguidance bridge and its compiled grammars (LRU)."""

    def __init__(self, tokenizer):
        from llguidance import LLTokenizer

        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise InvalidSchema("constrained decoding needs a model with a fast (tokenizer.json) tokenizer")
        from copy import copy

        backend = copy(backend)
        backend.no_padding()
        backend.no_truncation()
        # mlx-lm's eos_token_ids: the tokenizer's and generation_config.json's end tokens.
        self.eos = sorted(set(tokenizer.eos_token_ids) | {tokenizer.eos_token_id} - {None})
        self.llg = LLTokenizer(backend.to_str(), eos_token=self.eos)
        self.vocab = hf.get_vocab()
        self.grammars: OrderedDict[str, Any] = OrderedDict()


_bridges: "weakref.WeakKeyDictionary[Any, _Compiled]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _compiled(tokenizer) -> _Compiled:
    with _lock:
        bridge = _bridges.get(tokenizer)
        if bridge is None:
            bridge = _bridges[tokenizer] = _Compiled(tokenizer)
        return bridge


def matcher(tokenizer, grammar: str, param: str = "response_format"):
    """A fresh LLMatcher for `grammar`, compiled once per tokenizer and copied per request."""
    from llguidance import LLMatcher

    bridge = _compiled(tokenizer)
    with _lock:
        template = bridge.grammars.get(grammar)
        if template is not None:
            bridge.grammars.move_to_end(grammar)
            return template.deep_copy()
    template = LLMatcher(bridge.llg, GRAMMAR_OPTIONS + grammar, log_level=0)
    if template.is_error():
        raise InvalidSchema(f"the grammar could not be compiled: {template.get_error()}", param=param)
    with _lock:
        bridge.grammars[grammar] = template
        while len(bridge.grammars) > _GRAMMAR_CACHE_SIZE:
            bridge.grammars.popitem(last=False)
    return template.deep_copy()


class GrammarProcessor:
    """An mlx-lm logits processor: advances the matcher with the token sampled
    last step, then masks every token the grammar does not allow next.

    mlx-lm calls it once per decode step with the sequence's tokens, the first
    time with the prompt's last token (which the grammar does not see)."""

    def __init__(self, matcher, eos: list[int]):
        self.matcher = matcher
        self.eos = eos
        self.started = False
        self.failed = False

    def __call__(self, tokens, logits):
        import mlx.core as mx
        import numpy as np

        m = self.matcher
        if self.started and not m.is_stopped():
            m.consume_token(int(tokens[-1].item()))
        self.started = True
        width = logits.shape[-1]
        if m.is_error():
            if not self.failed:
                log.error("grammar matcher failed (%s); ending the answer", m.get_error())
                self.failed = True
            allowed = np.zeros(width, dtype=bool)
            allowed[self.eos] = True
        else:
            bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")
            if bits.size < width:  # logits past the tokenizer's vocabulary (padding rows)
                bits = np.concatenate([bits, np.zeros(width - bits.size, dtype=np.uint8)])
            allowed = bits[:width].view(np.bool_)
        return mx.where(mx.array(allowed), logits, mx.array(-float("inf"), dtype=logits.dtype))


def processor_for(
    tokenizer,
    *,
    response_format: Optional[ResponseFormat],
    tool_format: Optional[str],
    tools: Optional[list],
    tool_choice: Any,
    forced: bool,
    think: Optional[tuple[str, str]],
    starts_in_reasoning: bool,
) -> Optional[GrammarProcessor]:
    """The request's grammar processor, or None when nothing constrains it.

    A forced tool call (the prompt ends with its opening) is constrained to the
    tools' schemas; under tool_choice "auto", a `strict` function holds every call
    the model opens to the tools' schemas; otherwise `response_format` constrains
    the content."""
    if forced and tools and tool_format:
        bridge = _compiled(tokenizer)
        try:
            grammar = tool_grammar(tool_format, bridge.vocab, tools, tool_choice)
            if grammar is None:
                return None
            return GrammarProcessor(matcher(tokenizer, grammar, param="tools"), bridge.eos)
        except InvalidSchema as e:  # the call is still forced, as before: only its arguments run free
            log.warning("forced tool call left unconstrained: %s", e)
            return None
    strict = any((t.get("function") or {}).get("strict") for t in tools or ())
    if strict and tool_choice == "auto" and tool_format and response_format is None:
        bridge = _compiled(tokenizer)
        grammar = strict_tools_grammar(tool_format, bridge.vocab, tools, think, starts_in_reasoning)
        if grammar is None:
            log.warning("strict tools are not enforced for tool-call format %s", tool_format)
            return None
        return GrammarProcessor(matcher(tokenizer, grammar, param="tools"), bridge.eos)
    if response_format is None:
        return None
    bridge = _compiled(tokenizer)
    grammar = response_grammar(response_format, bridge.vocab, tool_format, think, starts_in_reasoning)
    return GrammarProcessor(matcher(tokenizer, grammar), bridge.eos)
