"""Every tool-call format the catalog's families use, end to end.

Scripted models built on each family's real chat template and special tokens
(scripts/testmodels.py) write calls in that family's own syntax; one real
server serves them all, and the real openai client reads them back. For each
format: a single call, two parallel calls where the format has them, text or
reasoning before a call, the exact chunk shapes and usage, and a round trip
of the calls and their results through the template. The Qwen/Hermes
`<tool_call>` JSON format is covered in depth by tests/test_tool_calls.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Optional

import pytest

from scripts.testmodels import FAMILIES, build_scripted_model
from mlxd.server import output, tool_formats
from tests.ground_truth import ground_truth_prompt_tokens, tokenizer_of
from tests.server_process import ServerProcess
from tests.chat_helpers import (
    BASH_TOOL,
    assembled_calls,
    assert_arguments_never_complete_early,
    assert_first_deltas_announce_calls,
    content_of,
    finish_reasons,
)

TOOLS = [
    BASH_TOOL,
    {
        "type": "function",
        "function": {
            "name": "read",
            "description": "Read lines of a file.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "limit": {"type": "integer"}},
                "required": ["path"],
            },
        },
    },
]
ASK = [{"role": "user", "content": "What is in my notes? Print the marker too."}]
BASH = ("bash", {"command": "echo MARKER-1"})
READ = ("read", {"path": "/tmp/notes.txt", "limit": 100})
RESULTS = {"bash": "MARKER-1", "read": "buy milk"}
ANSWER = "The command printed MARKER-1."
THOUGHT = "I should call a tool."
AFTER_THOUGHT = "It worked."
PREAMBLE = "Let me check."

# Each format's calls, as the family's models write them.
BASH_JSON = json.dumps(BASH[1])
READ_JSON = json.dumps(READ[1])
LLAMA_BASH = f'{{"name": "bash", "parameters": {BASH_JSON}}}'
LLAMA_READ = f'{{"name": "read", "parameters": {READ_JSON}}}'
MISTRAL_BASH = f"[TOOL_CALLS]bash[ARGS]{BASH_JSON}"
MISTRAL_READ = f"[TOOL_CALLS]read[ARGS]{READ_JSON}"
NEMO_BASH = f'{{"name": "bash", "arguments": {BASH_JSON}, "id": "a1B2c3D4e"}}'
NEMO_READ = f'{{"name": "read", "arguments": {READ_JSON}, "id": "f5G6h7J8k"}}'
CODER_BASH = (
    "<tool_call>\n<function=bash>\n<parameter=command>\necho MARKER-1\n</parameter>\n"
    "</function>\n</tool_call>"
)
CODER_READ = (
    "<tool_call>\n<function=read>\n<parameter=path>\n/tmp/notes.txt\n</parameter>\n"
    "<parameter=limit>\n100\n</parameter>\n</function>\n</tool_call>"
)
# Harmony names the recipient after the channel, or before it (as the template renders calls).
HARMONY_CALL = "<|channel|>commentary to=functions."
HARMONY_BASH = f"{HARMONY_CALL}bash <|constrain|>json<|message|>{BASH_JSON}<|call|>"
HARMONY_READ = f"{HARMONY_CALL}read <|constrain|>json<|message|>{READ_JSON}<|call|>"
HARMONY_TO_BASH = f"to=functions.bash<|channel|>commentary json<|message|>{BASH_JSON}<|call|>"
HARMONY_TO_READ = f"to=functions.read<|channel|>commentary json<|message|>{READ_JSON}<|call|>"
HARMONY_NEXT = "<|end|><|start|>assistant"
HARMONY_FINAL = f"<|channel|>final<|message|>{ANSWER}"
GLM_BASH = (
    "<tool_call>bash<arg_key>command</arg_key><arg_value>echo MARKER-1</arg_value></tool_call>"
)
GLM_AFTER = f"{AFTER_THOUGHT}</think>{ANSWER}<|user|>"
GLM_READ = (
    "<tool_call>read<arg_key>path</arg_key><arg_value>/tmp/notes.txt</arg_value>"
    "<arg_key>limit</arg_key><arg_value>100</arg_value></tool_call>"
)


@dataclass(frozen=True)
class Case:
    """A scripted model of one family, and what the client must get from it."""

    name: str
    family: str
    script: str
    calls: tuple[tuple[str, dict], ...]
    after_tool_result: str  # says ANSWER, as content
    content: str = ""  # the text before the calls
    reasoning: str = ""
    # The script's reasoning tokens: from the first of these tokens (None: the
    # first token, when the prompt opened the thinking block) to the second.
    # Harmony's "<|channel|>analysis" header before <|message|> counts as none.
    reasoning_span: Optional[tuple[Optional[str], str]] = None


CASES = [
    # Llama 3.x: one call per turn (the template renders no more); a call that
    # follows text comes after <|python_tag|> and ends with <|eom_id|>.
    Case("llama3-call", "llama3", LLAMA_BASH, (BASH,), ANSWER),
    Case("llama3-text-call", "llama3", f"{PREAMBLE}<|python_tag|>{LLAMA_READ}<|eom_id|>", (READ,),
         ANSWER, content=PREAMBLE),
    # Mistral Small 3.2 / Devstral.
    Case("mistral-call", "mistral", MISTRAL_BASH, (BASH,), ANSWER),
    Case("mistral-parallel", "mistral", MISTRAL_BASH + MISTRAL_READ, (BASH, READ), ANSWER),
    Case("mistral-text-call", "mistral", f"{PREAMBLE}\n\n{MISTRAL_READ}", (READ,), ANSWER,
         content=PREAMBLE),
    # Mistral 7B v0.3 / NeMo: a JSON list, with the ids their template renders.
    Case("nemo-call", "mistral_nemo", f"[TOOL_CALLS][{NEMO_BASH}]", (BASH,), ANSWER),
    Case("nemo-parallel", "mistral_nemo", f"[TOOL_CALLS][{NEMO_BASH}, {NEMO_READ}]", (BASH, READ),
         ANSWER),
    Case("nemo-text-call", "mistral_nemo", f"{PREAMBLE}[TOOL_CALLS][{NEMO_READ}]", (READ,), ANSWER,
         content=PREAMBLE),
    # Qwen3-Coder: parameter values are typed by the tool's schema ("100" -> 100).
    Case("coder-call", "qwen3_coder", CODER_BASH, (BASH,), ANSWER),
    Case("coder-parallel", "qwen3_coder", f"{CODER_BASH}\n{CODER_READ}", (BASH, READ), ANSWER),
    Case("coder-text-call", "qwen3_coder", f"{PREAMBLE}\n{CODER_READ}", (READ,), ANSWER,
         content=PREAMBLE),
    # gpt-oss harmony: one call per turn, ended by <|call|> (an end token);
    # analysis is reasoning, a commentary preamble and the final channel are content.
    Case("harmony-call", "harmony", HARMONY_BASH, (BASH,), HARMONY_FINAL),
    # The generation prompt ends with "<|start|>assistant": a response may go on with " to=...".
    Case("harmony-recipient-call", "harmony", HARMONY_TO_BASH, (BASH,), HARMONY_FINAL),
    Case("harmony-reasoning-call", "harmony",
         f"<|channel|>analysis<|message|>{THOUGHT}{HARMONY_NEXT} {HARMONY_TO_READ}", (READ,),
         f"<|channel|>analysis<|message|>{AFTER_THOUGHT}{HARMONY_NEXT}{HARMONY_FINAL}",
         reasoning=THOUGHT, reasoning_span=("<|message|>", "<|end|>")),
    Case("harmony-text-call", "harmony",
         f"<|channel|>commentary<|message|>{PREAMBLE}{HARMONY_NEXT}{HARMONY_READ}", (READ,),
         HARMONY_FINAL, content=PREAMBLE),
    # Reasoning, a preamble and a call: in history the template takes the preamble as the
    # turn's analysis and refuses the reasoning beside it.
    Case("harmony-reasoning-text-call", "harmony",
         f"<|channel|>analysis<|message|>{THOUGHT}{HARMONY_NEXT}<|channel|>commentary<|message|>"
         f"{PREAMBLE}{HARMONY_NEXT}{HARMONY_READ}", (READ,), HARMONY_FINAL,
         content=PREAMBLE, reasoning=THOUGHT, reasoning_span=("<|message|>", "<|end|>")),
    # GLM-4.5 to 4.7: the prompt opens <think>; a call turn ends with <|observation|>,
    # an answer with <|user|>.
    Case("glm-call", "glm47", f"{THOUGHT}</think>{GLM_BASH}<|observation|>", (BASH,),
         GLM_AFTER, reasoning=THOUGHT, reasoning_span=(None, "</think>")),
    Case("glm-parallel", "glm47", f"{THOUGHT}</think>{GLM_BASH}{GLM_READ}<|observation|>",
         (BASH, READ), GLM_AFTER, reasoning=THOUGHT, reasoning_span=(None, "</think>")),
    Case("glm-text-call", "glm47", f"{THOUGHT}</think>{PREAMBLE}{GLM_READ}<|observation|>", (READ,),
         GLM_AFTER, content=PREAMBLE, reasoning=THOUGHT, reasoning_span=(None, "</think>")),
]  # fmt: skip
# Where a family's template reads an assistant turn's reasoning in history; such a
# template refuses it beside content on a tool-call turn.
REASONING_KEY = {"harmony": "thinking"}
# tool_choice "required" and a named function: the server appends the start of a
# call to the prompt; these models write the rest (family, the whole call).
FORCED = {
    "llama3": LLAMA_BASH,
    "mistral": MISTRAL_BASH,
    "mistral_nemo": f"[TOOL_CALLS][{NEMO_BASH}]",
    "qwen3_coder": CODER_BASH,
    "harmony": HARMONY_BASH,
    "glm47": GLM_BASH + "<|observation|>",
}
CHOICES = {"required": "required", "named": {"type": "function", "function": {"name": "bash"}}}
# Text that must never reach content or reasoning: the families' markers and call syntax.
MARKUP = ("<|", "|>", "[TOOL_CALLS]", "[ARGS]", "<tool_call>", "<function=", "<parameter=",
          "<arg_", "<think>", "</think>", "{", "}", "to=functions")  # fmt: skip


def forced_prefix(family: str, choice: str) -> str:
    """What the server appends to the prompt to force the call."""
    fmt = output.output_format(FAMILIES[family].tool_format)
    return output.forced_prefix(fmt, CHOICES[choice], TOOLS)


@pytest.fixture(scope="session")
def format_models(models_dir):
    models = {
        case.name: build_scripted_model(
            models_dir / case.name,
            case.script,
            after_tool_result=case.after_tool_result,
            template=case.family,
        )
        for case in CASES
    }
    for family, call in FORCED.items():
        for choice in CHOICES:
            name = f"{family}-{choice}"
            prefix = forced_prefix(family, choice)
            assert call.startswith(prefix)
            models[name] = build_scripted_model(
                models_dir / name, call[len(prefix) :], template=family, prompt_suffix=prefix
            )
    return models


@pytest.fixture(scope="session")
def format_server(tmp_path_factory, format_models):
    args = [a for model in format_models.values() for a in ("--model", str(model.path))]
    server = ServerProcess(
        tmp_path_factory.mktemp("format-logs"),
        args + ["--max-loaded-models", str(len(format_models))],
    ).start()
    yield server
    server.stop()


def reasoning_of(chunks) -> str:
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    return "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)


def assert_no_markup(chunks):
    for c in chunks:
        if c.choices:
            delta = c.choices[0].delta
            for text in (delta.content, getattr(delta, "reasoning_content", None)):
                assert not any(marker in (text or "") for marker in MARKUP), delta


def prompt_tokens(model, messages) -> int:
    """Ground truth: the model's own tokenizer renders and tokenizes the chat."""
    return ground_truth_prompt_tokens(model.path, messages, TOOLS)


def forced_prompt_tokens(model, messages, prefix: str) -> int:
    """Ground truth of a prompt that ends with a forced call prefix."""
    tokenizer = tokenizer_of(model.path)
    text = tokenizer.apply_chat_template(
        messages, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    return len(tokenizer.encode(text + prefix, add_special_tokens=False))


def reasoning_tokens(case: Case, model) -> int:
    if case.reasoning_span is None:
        return 0
    tokenizer = tokenizer_of(model.path)
    ids = model.script_token_ids
    first, last = case.reasoning_span
    start = 0 if first is None else ids.index(tokenizer.convert_tokens_to_ids(first))
    return ids.index(tokenizer.convert_tokens_to_ids(last)) - start + 1


def history(case: Case, calls: list[tuple[str, str, str]], wire: bool) -> list[dict]:
    """The first turn, the assistant's reasoning and calls (id, name, arguments) and
    their results: as a client sends them (`wire`), or as the template expects them."""
    tool_calls = [
        {
            "id": id_,
            "type": "function",
            "function": {
                "name": name,
                "arguments": arguments if wire else json.loads(arguments),
            },
        }
        for id_, name, arguments in calls
    ]
    results = [
        {"role": "tool", "tool_call_id": id_, "content": RESULTS[name]} for id_, name, _ in calls
    ]
    assistant = {"role": "assistant", "content": case.content, "tool_calls": tool_calls}
    if wire and case.reasoning:  # sent back as opencode does
        assistant["reasoning_content"] = case.reasoning
    elif case.reasoning and not (case.family in REASONING_KEY and case.content):
        assistant[REASONING_KEY.get(case.family, "reasoning_content")] = case.reasoning
    return ASK + [assistant] + results


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_streamed_calls_are_assembled_exactly(format_server, format_models, case):
    model = format_models[case.name]
    with format_server.client().chat.completions.stream(
        model=case.name,
        messages=ASK,
        tools=TOOLS,
        temperature=0,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = [event.chunk for event in stream if event.type == "chunk"]
        final = stream.get_final_completion()

    # The SDK's own assembly of the stream.
    message = final.choices[0].message
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == (
        list(case.calls)
    )
    assert (message.content or "") == case.content
    assert final.choices[0].finish_reason == "tool_calls"
    # The chunks themselves.
    calls = assembled_calls(chunks)
    assert sorted(calls) == list(range(len(case.calls)))
    assert len({c["id"] for c in calls.values()}) == len(calls)
    assert_first_deltas_announce_calls(chunks)
    for index in calls:
        assert_arguments_never_complete_early(chunks, index)
    assert_no_markup(chunks)
    assert reasoning_of(chunks) == case.reasoning
    assert finish_reasons(chunks) == ["tool_calls"]
    # Exact usage, on the last chunk only.
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage.prompt_tokens == prompt_tokens(model, ASK)
    assert usage.completion_tokens == len(model.script_token_ids) + 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens_details.reasoning_tokens == reasoning_tokens(case, model)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_non_streaming_message_carries_the_calls(format_server, format_models, case):
    model = format_models[case.name]
    response = format_server.client().chat.completions.create(
        model=case.name, messages=ASK, tools=TOOLS, temperature=0
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == (case.content or None)
    assert (getattr(choice.message, "reasoning_content", None) or "") == case.reasoning
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == list(case.calls)
    assert all(c.type == "function" and len(c.id) == 9 and c.id.isalnum() for c in calls)
    assert response.usage.prompt_tokens == prompt_tokens(model, ASK)
    assert response.usage.completion_tokens == len(model.script_token_ids) + 1


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_calls_and_results_round_trip_through_the_template(format_server, format_models, case):
    """The calls as the server returned them (arguments as JSON strings) and
    their results render through the family's template; the model sees the
    tool result and answers."""
    model = format_models[case.name]
    client = format_server.client()
    first = client.chat.completions.create(
        model=case.name, messages=ASK, tools=TOOLS, temperature=0
    ).choices[0].message
    calls = [(c.id, c.function.name, c.function.arguments) for c in first.tool_calls]

    chunks = list(
        client.chat.completions.create(
            model=case.name,
            messages=history(case, calls, wire=True),
            tools=TOOLS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert content_of(chunks) == ANSWER
    assert_no_markup(chunks)
    thought = AFTER_THOUGHT if AFTER_THOUGHT in case.after_tool_result else ""
    assert reasoning_of(chunks) == thought
    assert finish_reasons(chunks) == ["stop"]
    usage = chunks[-1].usage
    # The template saw the arguments as objects, as the model's own tokenizer renders them.
    rendered = history(case, calls, wire=False)
    assert usage.prompt_tokens == prompt_tokens(model, rendered)
    assert usage.completion_tokens == len(model.after_tool_token_ids) + 1


def test_the_cases_cover_every_tool_format_of_the_catalog(format_models):
    """The server detects each family here as a format; with json_tools
    (tests/test_tool_calls.py) they are all the formats the catalog uses."""
    import mlx_lm

    from mlxd.registry import catalog
    from mlxd.server.output import output_format_for

    detected = {
        output_format_for(mlx_lm.tokenizer_utils.load(format_models[case.name].path)).name
        for case in CASES
    }
    used = {f.tool_format for f in catalog.families() if f.tool_format}
    assert used == detected | {"json_tools"}


@pytest.mark.parametrize("case", [c for c in CASES if len(c.calls) == 1], ids=lambda c: c.name)
def test_a_call_cut_by_max_tokens_never_vanishes(format_server, format_models, case):
    """Cut inside the arguments: formats that stream arguments keep the announced
    call (its arguments do not parse); the others give its text back as content."""
    model = format_models[case.name]
    tokenizer = tokenizer_of(model.path)
    ids = model.script_token_ids
    # Just into the first argument's value ("echo MARKER-1" or "/tmp/notes.txt").
    cut = next(n for n in range(len(ids)) if re.search("echo|/tmp", tokenizer.decode(ids[:n])))
    chunks = list(
        format_server.client().chat.completions.create(
            model=case.name,
            messages=ASK,
            tools=TOOLS,
            temperature=0,
            max_tokens=cut,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert finish_reasons(chunks) == ["length"]
    assert chunks[-1].usage.completion_tokens == cut
    calls = assembled_calls(chunks)
    if tool_formats.FORMATS[FAMILIES[case.family].tool_format].streams_arguments:
        assert [c["name"] for c in calls.values()] == [case.calls[0][0]]
        with pytest.raises(json.JSONDecodeError):
            json.loads(calls[0]["arguments"])
        assert content_of(chunks) == case.content
    else:
        assert calls == {}
        assert content_of(chunks) == tokenizer.decode(ids[:cut]).split("</think>")[-1]


@pytest.mark.parametrize("choice", CHOICES)
@pytest.mark.parametrize("family", FORCED)
def test_required_and_named_tool_choice_force_the_call(
    format_server, format_models, family, choice
):
    """The prompt ends inside a call; the model's text completes it."""
    name = f"{family}-{choice}"
    model = format_models[name]
    chunks = list(
        format_server.client().chat.completions.create(
            model=name,
            messages=ASK,
            tools=TOOLS,
            tool_choice=CHOICES[choice],
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    calls = assembled_calls(chunks)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [BASH]
    assert_first_deltas_announce_calls(chunks)
    assert content_of(chunks) == ""
    assert_no_markup(chunks)
    assert finish_reasons(chunks) == ["tool_calls"]
    usage = chunks[-1].usage
    assert usage.prompt_tokens == forced_prompt_tokens(model, ASK, forced_prefix(family, choice))
    assert usage.completion_tokens == len(model.script_token_ids) + 1


def test_messages_a_template_refuses_are_a_client_error(format_server):
    """Llama 3.x templates render one call per turn: two are the client's error (400), with why."""
    call = {"type": "function", "function": {"name": "bash", "arguments": '{"command": "ls"}'}}
    messages = ASK + [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "a1B2c3D4e", **call}, {"id": "f5G6h7J8k", **call}],
        },
        {"role": "tool", "tool_call_id": "a1B2c3D4e", "content": "a.txt"},
        {"role": "tool", "tool_call_id": "f5G6h7J8k", "content": "a.txt"},
    ]
    response = format_server.post(
        "/v1/chat/completions", json={"model": "llama3-call", "messages": messages, "tools": TOOLS}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "only supports single tool-calls" in error["message"]
    assert format_server.get("/health").status_code == 200
