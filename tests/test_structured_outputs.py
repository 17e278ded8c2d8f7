"""Structured outputs through a real server: `response_format` and forced tool calls.

The models are random-weight ones: left alone they write noise (and never end by
themselves), so every answer that parses and validates here was forced into shape by
the grammar, token by token. String schemas are bounded (maxLength, enum, pattern):
a random model inside an unbounded string rambles until max_tokens.
"""

from __future__ import annotations

import json
import threading
from typing import Literal, Optional

import jsonschema
import pytest
from pydantic import BaseModel, Field

from mlxd.server import constrained
from scripts.testmodels import FAMILIES, build_random_model, build_scripted_model
from tests.ground_truth import ground_truth_prompt_tokens, tokenizer_of
from tests.server_process import ServerProcess

ASK = [{"role": "user", "content": "Describe an item as JSON."}]
MAX_TOKENS = 600


def _obj(properties: dict, required=None, **extra) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
        **extra,
    }


NAME = {"type": "string", "maxLength": 8}
SCHEMAS = {
    "nested-objects": _obj({"item": _obj({"name": NAME, "size": _obj({"w": {"type": "integer", "minimum": 0, "maximum": 99}})})}),
    "array-min-max-items": _obj({"tags": {"type": "array", "items": NAME, "minItems": 2, "maxItems": 4}}),
    "enum-and-const": _obj({"color": {"enum": ["red", "green", "blue"]}, "kind": {"const": "item"}}),
    "bounded-numbers": _obj({
        "count": {"type": "integer", "minimum": 3, "maximum": 7},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1},
        "temp": {"type": "integer", "exclusiveMinimum": -10, "exclusiveMaximum": 10},
    }),
    "string-length-and-pattern": _obj({
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        "word": {"type": "string", "minLength": 2, "maxLength": 5},
    }),
    "any-of": _obj({"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["none", "all"]}]}}),
    "optional-and-required": _obj({"id": {"type": "integer", "minimum": 1, "maximum": 9}, "note": NAME, "flag": {"type": "boolean"}},
                                  required=["id"]),
    "defs-and-ref": {
        "$defs": {"point": _obj({"x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 9}})},
        **_obj({"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}}),
    },
    # JSON Schema counts 1.0 as an integer; llguidance alone refuses it.
    "integer-valued-floats": _obj({"tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1.0, "maxItems": 2.0}}),
}  # fmt: skip


@pytest.fixture(scope="module")
def structured_models(tmp_path_factory):
    """A random model for every catalog tool-call format (chatml is Qwen2.5: json_tools)."""
    root = tmp_path_factory.mktemp("structured-models")
    return {family: build_random_model(root / family, template=family, context_length=2048) for family in FAMILIES}


# A model that writes text, then a call whose arguments break the tool's schema.
STRICT_SCRIPT = 'Let me run it.\n<tool_call>\n{"name": "bash", "arguments": {"command": 42}}\n</tool_call>'


@pytest.fixture(scope="module")
def strict_model(tmp_path_factory):
    return build_scripted_model(tmp_path_factory.mktemp("strict") / "strict-chatml", STRICT_SCRIPT).path


@pytest.fixture(scope="module")
def server(tmp_path_factory, structured_models, strict_model):
    paths = [*structured_models.values(), strict_model]
    args = [a for path in paths for a in ("--model", str(path))]
    server = ServerProcess(
        tmp_path_factory.mktemp("structured-logs"), args + ["--max-loaded-models", str(len(paths))]
    ).start()
    yield server
    server.stop()


def json_schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def token_id(model, text: str) -> int:
    return tokenizer_of(model).convert_tokens_to_ids(text)


@pytest.mark.parametrize("name", SCHEMAS)
def test_random_model_answers_valid_json_for_each_schema(server, structured_models, name):
    model = structured_models["chatml"]
    response = server.client().chat.completions.create(
        model=str(model), messages=ASK, max_tokens=MAX_TOKENS, seed=7,
        response_format=json_schema_format(SCHEMAS[name]),
    )  # fmt: skip
    choice = response.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])
    assert response.usage.prompt_tokens == ground_truth_prompt_tokens(model, ASK)


def test_streamed_answer_validates_and_usage_is_exact(server, structured_models):
    """Every completion token has its logprob entry: the engine's count is exact."""
    model = structured_models["chatml"]
    schema = SCHEMAS["nested-objects"]
    stream = server.client().chat.completions.create(
        model=str(model), messages=ASK, max_tokens=MAX_TOKENS, seed=3, stream=True, logprobs=True,
        stream_options={"include_usage": True}, response_format=json_schema_format(schema),
    )  # fmt: skip
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    jsonschema.validate(json.loads(content), schema)
    usage = chunks[-1].usage
    assert usage.completion_tokens == len(tokens)  # the end token included
    assert usage.prompt_tokens == ground_truth_prompt_tokens(model, ASK)


class Size(BaseModel):
    width: int = Field(ge=1, le=20)
    unit: Literal["cm", "in"]


class Item(BaseModel):
    name: str = Field(max_length=8)
    quantity: int = Field(ge=1, le=9)
    tags: list[Literal["new", "used", "rare"]] = Field(min_length=1, max_length=3)
    size: Size
    note: Optional[str] = Field(max_length=6)


def test_sdk_parse_with_a_pydantic_model(server, structured_models):
    model = structured_models["chatml"]
    completion = server.client().chat.completions.parse(
        model=str(model), messages=ASK, max_tokens=MAX_TOKENS, seed=11, response_format=Item
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Item)
    Item.model_validate_json(choice.message.content)


def test_json_object_mode_returns_an_object(server, structured_models):
    model = structured_models["chatml"]
    # Left free, a random model's strings never end; a bias on the quote ends them.
    bias = {str(token_id(model, '"')): 20}
    response = server.client().chat.completions.create(
        model=str(model), messages=ASK, max_tokens=MAX_TOKENS, seed=5, logit_bias=bias,
        response_format={"type": "json_object"},
    )  # fmt: skip
    assert response.choices[0].finish_reason == "stop", response.choices[0].message.content
    assert isinstance(json.loads(response.choices[0].message.content), dict)


def test_text_format_leaves_the_answer_free(server, structured_models):
    model = structured_models["chatml"]
    response = server.client().chat.completions.create(
        model=str(model), messages=ASK, max_tokens=12, response_format={"type": "text"}
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 12


INT = {"type": "integer", "minimum": 0, "maximum": 9}
# Keywords no grammar enforces token by token: the grammar leaves them out, and each
# finished answer is validated (and regenerated when it breaks them).
CHECKED = {
    "not": {"type": "integer", "minimum": 0, "maximum": 99, "not": {"multipleOf": 7}},
    "if-then-else": {"type": "integer", "minimum": 0, "maximum": 50, "if": {"minimum": 40}, "then": {"maximum": 48}, "else": {"maximum": 30}},
    "uniqueItems": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 2, "maxItems": 3, "uniqueItems": True},
    "contains": {"type": "array", "items": INT, "minItems": 2, "maxItems": 4, "contains": {"minimum": 1}},
    "propertyNames": _obj({"ab": INT}, propertyNames={"maxLength": 3}),
    "dependentRequired": _obj({"a": INT, "b": INT}, required=[], dependentRequired={"a": ["b"]}),
    "oneOf-overlapping": {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "integer", "minimum": 8, "maximum": 40}]},
}  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("name", CHECKED)
def test_keywords_no_grammar_enforces_get_a_validated_answer(server, structured_models, name, stream):
    model = structured_models["chatml"]
    body = {"model": str(model), "messages": ASK, "max_tokens": MAX_TOKENS, "seed": 9, "stream": stream,
            "response_format": json_schema_format(CHECKED[name])}  # fmt: skip
    if stream:
        body["stream_options"] = {"include_usage": True}
        chunks = [json.loads(line[6:]) for line in server.post("/v1/chat/completions", json=body).text.splitlines()
                  if line.startswith("data: {")]  # fmt: skip
        content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        usage = chunks[-1]["usage"]
    else:
        response = server.post("/v1/chat/completions", json=body).json()
        content, finish, usage = response["choices"][0]["message"]["content"], [response["choices"][0]["finish_reason"]], response["usage"]
    assert finish == ["stop"]
    jsonschema.validate(json.loads(content), CHECKED[name])
    # Usage counts every attempt: a whole prompt each time.
    assert usage["prompt_tokens"] % ground_truth_prompt_tokens(model, ASK) == 0


def test_an_answer_that_breaks_the_schema_is_regenerated(server, structured_models):
    """The same seeded request answers `v` under a number schema; forbid `v` with `not`,
    which the grammar leaves out: the first attempt writes `v` again and is refused,
    and a later attempt (seeded on) answers validly. Usage counts every attempt."""
    model = structured_models["chatml"]
    number = {"type": "integer", "minimum": 0, "maximum": 99}

    def ask(schema):
        return server.client().chat.completions.create(
            model=str(model), messages=ASK, max_tokens=20, seed=21, temperature=2,
            response_format=json_schema_format(schema),
        )  # fmt: skip

    ask(number)  # the prompt is in the prefix cache from here on, as for the requests below
    first = json.loads(ask(number).choices[0].message.content)
    schema = {**number, "not": {"const": first}}
    response = ask(schema)
    value = json.loads(response.choices[0].message.content)
    assert response.choices[0].finish_reason == "stop"
    assert value != first
    jsonschema.validate(value, schema)
    attempts = response.usage.prompt_tokens // ground_truth_prompt_tokens(model, ASK)
    assert attempts >= 2 and response.usage.prompt_tokens == attempts * ground_truth_prompt_tokens(model, ASK)
    assert f"answer 1 of 3 breaks the response_format schema: {first} should not be valid" in server.log()


def test_a_schema_no_answer_satisfies_is_an_error_never_an_invalid_answer(server, structured_models):
    model = structured_models["chatml"]
    impossible = {"type": "integer", "minimum": 0, "maximum": 9, "not": {"type": "integer"}}
    response = server.post("/v1/chat/completions", json={
        "model": str(model), "messages": ASK, "max_tokens": 50, "response_format": json_schema_format(impossible),
    })  # fmt: skip
    assert response.status_code == 500
    body = response.json()
    assert "no answer valid against the response_format schema in 3 attempts" in body["error"]["message"]
    assert body["usage"]["prompt_tokens"] == 3 * ground_truth_prompt_tokens(model, ASK)
    assert server.get("/health").status_code == 200


@pytest.mark.parametrize(
    "schema, why",
    [
        ({"type": "nonsense"}, "invalid JSON Schema"),
        ({"type": "string", "minLength": -1}, "invalid JSON Schema"),
        ({"$ref": "http://example.com/item.json"}, "not present in a registry"),
        ({"type": "string", "pattern": "^\\p{Letter}+$"}, "invalid JSON Schema"),
    ],
)
def test_schemas_that_cannot_be_used_get_400_naming_why(server, structured_models, schema, why):
    model = structured_models["chatml"]
    response = server.post("/v1/chat/completions", json={
        "model": str(model), "messages": ASK, "max_tokens": 8, "response_format": json_schema_format(schema),
    })  # fmt: skip
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert why in error["message"]
    assert error["param"] == "response_format.json_schema.schema"
    assert error["type"] == "invalid_request_error"


def test_json_schema_without_a_schema_is_400(server, structured_models):
    response = server.post("/v1/chat/completions", json={
        "model": str(structured_models["chatml"]), "messages": ASK,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x"}},
    })  # fmt: skip
    assert response.status_code == 400
    assert "response_format" in response.json()["error"]["param"]


def test_constrained_and_free_requests_share_a_batch(server, structured_models):
    """Both run at once in one batch; each finishes its own way with exact usage."""
    model = structured_models["chatml"]
    schema = SCHEMAS["defs-and-ref"]
    results = {}

    def run(key, **kwargs):
        results[key] = server.client().chat.completions.create(
            model=str(model), messages=ASK, logprobs=True, seed=1, **kwargs
        )

    threads = [
        threading.Thread(target=run, args=("free",), kwargs={"max_tokens": 150}),
        threading.Thread(target=run, args=("json",), kwargs={"max_tokens": MAX_TOKENS, "response_format": json_schema_format(schema)}),
    ]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    free, constrained_ = results["free"], results["json"]
    assert free.choices[0].finish_reason == "length"
    assert free.usage.completion_tokens == 150 == len(free.choices[0].logprobs.content)
    choice = constrained_.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), schema)
    assert constrained_.usage.completion_tokens == len(choice.logprobs.content)
    for response in (free, constrained_):
        assert response.usage.prompt_tokens == ground_truth_prompt_tokens(model, ASK)


@pytest.mark.parametrize("family", ["glm47", "harmony"])
def test_reasoning_stays_free_and_the_json_follows(server, structured_models, family):
    """GLM's prompt opens <think>; gpt-oss reasons in its analysis channel. The grammar
    starts where reasoning ends, so the reasoning is the random model's noise."""
    model = structured_models[family]
    closer = {"glm47": "</think>", "harmony": "<|end|>"}[family]
    bias = {str(token_id(model, closer)): 10}
    if family == "harmony":
        bias[str(token_id(model, "<|channel|>"))] = 20
    schema = SCHEMAS["enum-and-const"]
    response = server.client().chat.completions.create(
        model=str(model), messages=ASK, max_tokens=MAX_TOKENS, seed=2, logit_bias=bias,
        response_format=json_schema_format(schema),
    )  # fmt: skip
    choice = response.choices[0]
    assert choice.finish_reason == "stop", choice.message
    jsonschema.validate(json.loads(choice.message.content), schema)
    reasoning = choice.message.model_extra.get("reasoning_content") or ""
    assert reasoning.strip()
    with pytest.raises(ValueError):
        json.loads(reasoning)
    assert response.usage.completion_tokens_details.reasoning_tokens >= 1


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "bash",
            "description": "Run a shell command.",
            "parameters": {
                "type": "object",
                "properties": {
                    "command": {"type": "string", "minLength": 1, "maxLength": 16},
                    "timeout": {"type": "integer", "minimum": 1, "maximum": 60},
                },
                "required": ["command"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "read",
            "description": "Read a file.",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "minLength": 1, "maxLength": 12},
                    "mode": {"enum": ["text", "bytes"]},
                    "lines": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 2},
                },
                "required": ["path", "mode"],
                "additionalProperties": False,
            },
        },
    },
]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.mark.parametrize("choice", ["required", "read"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_forced_tool_calls_validate_in_every_format(server, structured_models, family, choice):
    model = structured_models[family]
    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    response = server.client().chat.completions.create(
        model=str(model), messages=ASK, tools=TOOLS, tool_choice=tool_choice, max_tokens=MAX_TOKENS, seed=4,
    )  # fmt: skip
    choice_ = response.choices[0]
    assert choice_.finish_reason == "tool_calls", choice_.message
    calls = choice_.message.tool_calls
    assert len(calls) == 1
    name = calls[0].function.name
    assert name in PARAMETERS and (choice == "required" or name == choice)
    jsonschema.validate(json.loads(calls[0].function.arguments), PARAMETERS[name])


@pytest.mark.parametrize("strict", [False, True])
def test_strict_tools_hold_calls_under_auto(server, strict_model, strict):
    """tool_choice auto: the text before the call is the model's own; with `strict` the
    call it opens gets arguments valid against the tool's parameters."""
    tool = {"type": "function", "function": {**TOOLS[0]["function"], "strict": strict}}
    response = server.client().chat.completions.create(
        model=str(strict_model), messages=ASK, tools=[tool], max_tokens=200, temperature=0
    )
    message = response.choices[0].message
    assert message.content == "Let me run it."
    assert [c.function.name for c in message.tool_calls] == ["bash"]
    arguments = json.loads(message.tool_calls[0].function.arguments)
    if strict:
        jsonschema.validate(arguments, PARAMETERS["bash"])
        assert response.choices[0].finish_reason == "tool_calls"
    else:
        assert arguments == {"command": 42}  # what the model wrote, which the schema refuses
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(arguments, PARAMETERS["bash"])


# --- in process --------------------------------------------------------------


@pytest.mark.parametrize("family", ["glm47", "harmony", "llama3"])
def test_every_end_token_of_the_model_may_end_a_grammar(structured_models, family):
    """The tokenizer's end token and generation_config.json's list."""
    from mlx_lm import load

    path = structured_models[family]
    _, tokenizer = load(str(path))
    ends = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    expected = set(ends) | {tokenizer_of(path).eos_token_id}
    bridge = constrained._compiled(tokenizer)
    assert set(bridge.eos) == expected == set(bridge.llg.eos_tokens)
    assert len(expected) > 1


def test_normalize_schema_makes_integer_valued_floats_integers():
    schema = {"type": "array", "minItems": 1.0, "items": {"type": "string", "maxLength": 2.0, "const": 1.0},
              "properties": {"minItems": {"maxLength": 3.0}}, "enum": [1.0]}  # fmt: skip
    out = constrained.normalize_schema(schema)
    assert out["minItems"] == 1 and isinstance(out["minItems"], int)
    assert isinstance(out["items"]["maxLength"], int)
    assert isinstance(out["items"]["const"], float)  # data stays as written
    assert isinstance(out["properties"]["minItems"]["maxLength"], int)
    assert isinstance(out["enum"][0], float)
    assert constrained.normalize_schema({"maxLength": 2.5}) == {"maxLength": 2.5}


def test_check_schema_relaxes_what_a_grammar_cannot_enforce():
    assert constrained.check_schema({"type": "array", "maxItems": 3.0}) == ({"type": "array", "maxItems": 3}, False)
    schema, relaxed = constrained.check_schema({"type": "array", "uniqueItems": True})
    assert relaxed and schema["uniqueItems"] is True
    assert constrained.validate(schema, "[1, 2]") is None
    assert "non-unique" in constrained.validate(schema, "[1, 1]")
    assert constrained.validate(schema, "[1,") .startswith("not JSON")
    with pytest.raises(constrained.InvalidSchema, match="invalid JSON Schema"):
        constrained.check_schema({"type": 5})
    assert constrained.check_schema(True) == ({}, False)
    with pytest.raises(constrained.InvalidSchema, match="JSON object"):
        constrained.check_schema(False)
