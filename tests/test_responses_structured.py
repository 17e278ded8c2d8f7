"""Structured outputs on the Responses door (`text.format`) through a real server and the openai SDK.

The model is a random-weight one decoding greedily (the Responses API has no seed): left
alone it writes noise, so every answer that parses and validates here was forced into
shape by the same grammar and checks that chat completions' `response_format` uses.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from scripts.testmodels import build_random_model, build_scripted_model
from tests.ground_truth import ground_truth_prompt_tokens
from tests.server_process import ServerProcess
from tests.test_responses import raw_events
from tests.test_structured_outputs import CHECKED, SCHEMAS, Item

ASK = "Describe an item as JSON."
MAX_TOKENS = 600


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("responses-structured") / "random-json", context_length=2048)


# Left free, this model writes the object and then prose; json_object must end it after the object.
OBJECT, PROSE = '{"ok": true}', " and then some prose."


@pytest.fixture(scope="module")
def object_writer(tmp_path_factory):
    return build_scripted_model(tmp_path_factory.mktemp("responses-structured") / "object-writer", OBJECT + PROSE)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model, object_writer):
    args = ["--model", str(model), "--model", str(object_writer.path), "--max-loaded-models", "2"]
    server = ServerProcess(tmp_path_factory.mktemp("responses-structured-logs"), args).start()
    yield server
    server.stop()


def schema_format(schema: dict, name: str = "answer") -> dict:
    return {"format": {"type": "json_schema", "name": name, "schema": schema, "strict": True}}


def ask(server, model, **kwargs):
    return server.client().responses.create(model=str(model), input=ASK, max_output_tokens=MAX_TOKENS,
                                            temperature=0, **kwargs)


def test_json_schema_answer_validates_with_exact_usage(server, model):
    schema = SCHEMAS["nested-objects"]
    response = ask(server, model, text=schema_format(schema))
    assert response.status == "completed", response.output_text
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text.format.type == "json_schema" and response.text.format.name == "answer"
    assert response.usage.input_tokens == ground_truth_prompt_tokens(model, [{"role": "user", "content": ASK}])


def test_streamed_json_schema_answer_validates(server, model):
    schema = SCHEMAS["defs-and-ref"]
    events = raw_events(server, {"model": str(model), "input": ASK, "max_output_tokens": MAX_TOKENS,
                                 "temperature": 0, "text": schema_format(schema)})
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert events[-1]["type"] == "response.completed"
    jsonschema.validate(json.loads(text), schema)
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == text
    # The SDK's own stream reads the same answer.
    with server.client().responses.stream(model=str(model), input=ASK, max_output_tokens=MAX_TOKENS,
                                          temperature=0, text=schema_format(schema)) as stream:
        final = stream.get_final_response()
    assert final.output_text == text


@pytest.mark.parametrize("stream", [False, True])
def test_sdk_parse_with_a_pydantic_model(server, model, stream):
    kwargs = dict(model=str(model), input=ASK, max_output_tokens=MAX_TOKENS, temperature=0)
    if stream:
        with server.client().responses.stream(text_format=Item, **kwargs) as events:
            response = events.get_final_response()
    else:
        response = server.client().responses.parse(text_format=Item, **kwargs)
    assert response.status == "completed"
    assert isinstance(response.output_parsed, Item)
    Item.model_validate_json(response.output_text)


@pytest.mark.parametrize("stream", [False, True])
def test_json_object_ends_the_answer_after_the_object(server, stream):
    """A random model never leaves a JSON string by itself; a scripted one shows the constraint."""
    client = server.client()
    free = client.responses.create(model="object-writer", input=ASK)
    assert free.output_text == OBJECT + PROSE
    kwargs = dict(model="object-writer", input=ASK, text={"format": {"type": "json_object"}})
    if stream:
        with client.responses.stream(**kwargs) as events:
            response = events.get_final_response()
    else:
        response = client.responses.create(**kwargs)
    assert response.status == "completed"
    assert response.output_text == OBJECT and json.loads(response.output_text) == {"ok": True}
    assert response.text.format.type == "json_object"


def test_text_format_text_leaves_the_answer_free(server, model):
    response = server.client().responses.create(model=str(model), input=ASK, max_output_tokens=12,
                                                text={"format": {"type": "text"}})
    assert response.status == "incomplete" and response.usage.output_tokens == 12


@pytest.mark.parametrize("stream", [False, True])
def test_keywords_no_grammar_enforces_get_a_validated_answer(server, model, stream):
    schema = CHECKED["uniqueItems"]
    body = {"model": str(model), "input": ASK, "max_output_tokens": MAX_TOKENS, "temperature": 0,
            "text": schema_format(schema)}
    if stream:
        final = raw_events(server, body)[-1]["response"]
    else:
        final = server.post("/v1/responses", json=body).json()
    assert final["status"] == "completed"
    jsonschema.validate(json.loads(final["output"][0]["content"][0]["text"]), schema)
    prompt = ground_truth_prompt_tokens(model, [{"role": "user", "content": ASK}])
    assert final["usage"]["input_tokens"] % prompt == 0  # every attempt counted


@pytest.mark.parametrize("stream", [False, True])
def test_a_schema_no_answer_satisfies_fails_never_answers_invalid(server, model, stream):
    impossible = {"type": "integer", "minimum": 0, "maximum": 9, "not": {"type": "integer"}}
    body = {"model": str(model), "input": ASK, "max_output_tokens": 50, "text": schema_format(impossible)}
    if stream:
        final = raw_events(server, body)[-1]
        assert final["type"] == "response.failed"
        response = final["response"]
    else:
        reply = server.post("/v1/responses", json=body)
        assert reply.status_code == 500
        assert "no answer valid" in reply.json()["error"]["message"]
        response = reply.json()["response"]
    assert response["status"] == "failed" and "no answer valid" in response["error"]["message"]
    assert response["output"] == []
    prompt = ground_truth_prompt_tokens(model, [{"role": "user", "content": ASK}])
    assert response["usage"]["input_tokens"] == 3 * prompt


@pytest.mark.parametrize(
    "text_format, why",
    [
        ({"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}, "invalid JSON Schema"),
        ({"type": "json_schema", "name": "x", "schema": {"$ref": "http://example.com/item.json"}},
         "not present in a registry"),
        ({"type": "json_schema", "name": "x"}, "needs a schema"),
    ],
)
def test_schemas_that_cannot_be_used_get_400_naming_text_format_schema(server, model, text_format, why):
    response = server.post("/v1/responses", json={"model": str(model), "input": ASK, "text": {"format": text_format}})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert why in error["message"]
    assert error["param"] == "text.format.schema" and error["type"] == "invalid_request_error"
    assert server.get("/health").status_code == 200


def test_an_unknown_format_type_is_400(server, model):
    response = server.post("/v1/responses", json={"model": str(model), "input": ASK,
                                                  "text": {"format": {"type": "yaml"}}})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "text.format.type"

