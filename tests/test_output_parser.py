"""The streaming output parser, fed every script in many splits.

Each script is parsed whole, one character at a time, at random cuts (fixed
seeds) and with every marker cut in two; all splits must give the same events
(neighbouring deltas of one kind merged, ids replaced by "ID"), and every run
is checked for: ids of 9 letters and digits, no markup in content or
reasoning, and argument fragments that never parse as JSON before the call's
last fragment.
"""

from __future__ import annotations

import json
import logging
import random
import re

import pytest

from mlxd.server import tool_formats
from mlxd.server.events import ContentDelta, ReasoningDelta, ToolCallArguments, ToolCallStart
from mlxd.server.output import (
    _coalesce,
    OutputFormat,
    OutputParser,
    forced_prefix,
    output_format,
    output_format_for,
)

C, R, A = ContentDelta, ReasoningDelta, ToolCallArguments


def S(index: int, name: str) -> ToolCallStart:
    return ToolCallStart(index, "ID", name)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "bash",
            "parameters": {"type": "object", "properties": {"command": {"type": "string"}}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            },
        },
    },
]
THINK = output_format("json_tools", "<think>", "</think>")
MARKUP = (
    "<tool_call>",
    "</tool_call>",
    "<think>",
    "</think>",
    "[TOOL_CALLS]",
    "[ARGS]",
    "<|python_tag|>",
    "<|channel|>",
    "<|message|>",
    "<|end|>",
    "<|start|>",
    "<function=",
    "<parameter=",
)
ID = re.compile(r"^[A-Za-z0-9]{9}$")


def splits(text: str) -> list[list[str]]:
    """Ways to cut text into deltas."""
    ways = [[text], list(text)]
    for seed in range(6):
        rng = random.Random(seed)
        cuts = (
            sorted(rng.sample(range(1, len(text)), rng.randint(1, max(1, len(text) // 4))))
            if len(text) > 1
            else []
        )
        ways.append([text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])])
    for marker in MARKUP:
        start = text.find(marker)
        while start >= 0:
            cut = start + len(marker) // 2
            ways.append([text[:cut], text[cut:]])
            start = text.find(marker, start + 1)
    return ways


def run(fmt: OutputFormat, deltas: list[str], reason: str = "stop", **kwargs):
    kwargs.setdefault("tools", TOOLS)
    parser = OutputParser(fmt, **kwargs)
    events = []
    for delta in deltas:
        events += parser.feed(delta)
    tail, finish_reason = parser.finish(reason)
    return events + tail, finish_reason, parser


def check_run(events: list, markup_allowed: bool) -> None:
    ids = [e.id for e in events if isinstance(e, ToolCallStart)]
    assert all(ID.match(i) for i in ids) and len(set(ids)) == len(ids)
    if not markup_allowed:
        for e in events:
            if isinstance(e, (ContentDelta, ReasoningDelta)):
                assert not any(m in e.text for m in MARKUP), e
    fragments = [e for e in events if isinstance(e, ToolCallArguments)]
    for index in {f.index for f in fragments}:
        mine = [f.fragment for f in fragments if f.index == index]
        for n in range(1, len(mine)):  # no prefix short of the whole parses
            with pytest.raises(ValueError):
                json.loads("".join(mine[:n]))


def normalize(events: list) -> list:
    """Events with ids blanked and neighbouring deltas merged, so splits compare equal."""
    return _coalesce([ToolCallStart(e.index, "ID", e.name) if isinstance(e, ToolCallStart) else e for e in events])


def parse(
    fmt: OutputFormat, text: str, reason: str = "stop", markup_allowed: bool = False, **kwargs
):
    """Events and finish reason of text, the same for every split."""
    results = set()
    for deltas in splits(text):
        events, finish_reason, _ = run(fmt, deltas, reason, **kwargs)
        check_run(events, markup_allowed)
        results.add((tuple(normalize(events)), finish_reason))
    assert len(results) == 1, results
    events, finish_reason = results.pop()
    return list(events), finish_reason


def arguments(events: list) -> dict[int, object]:
    """What a client assembles: each call's arguments, parsed."""
    text: dict[int, str] = {}
    for e in events:
        if isinstance(e, ToolCallArguments):
            text[e.index] = text.get(e.index, "") + e.fragment
    return {i: json.loads(t) for i, t in text.items()}


CALL = '<tool_call>\n{"name": "bash", "arguments": {"command": "echo MARKER-1"}}\n</tool_call>'
CALL2 = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
)


# -- content, reasoning, stop strings ------------------------------------------


def test_plain_text_streams_unchanged():
    text = "Hello from mlxd. The quick brown fox jumps over the lazy dog. a < b, <tool and [TOOL"
    assert parse(THINK, text) == ([C(text)], "stop")


def test_text_streams_before_it_is_finished():
    parser = OutputParser(THINK, tools=TOOLS)
    assert parser.feed("Hello wor") == [C("Hello wor")]
    assert parser.feed("ld <tool_") == [
        C("ld")
    ]  # a space waits for more text; "<tool_" may be a marker
    assert parser.feed("box") == [C(" <tool_box")]
    assert parser.finish("stop") == ([], "stop")


def test_reasoning_then_content():
    events, reason = parse(THINK, "<think>\nI should greet.\n</think>\n\nHello!")
    assert (events, reason) == ([R("I should greet."), C("Hello!")], "stop")


def test_prompt_opened_reasoning_and_stray_think_end():
    assert parse(THINK, "Plan: greet.\n</think>\n\nHi.", starts_in_reasoning=True)[0] == [
        R("Plan: greet."),
        C("Hi."),
    ]
    assert parse(THINK, "Hi.</think> There.")[0] == [C("Hi. There.")]


def test_a_tool_marker_inside_reasoning_that_is_no_call_stays_reasoning():
    text = "I should use <tool_call> for that. Then answer.</think>The answer is 4."
    events, reason = parse(THINK, text, markup_allowed=True, starts_in_reasoning=True)
    assert (events, reason) == ([R("I should use <tool_call> for that. Then answer."), C("The answer is 4.")], "stop")


def test_in_reasoning_tracks_the_state():
    parser = OutputParser(THINK, tools=TOOLS)
    states = []
    for delta in ["<think>", "Hmm", "</think>", "Hi"]:
        parser.feed(delta)
        states.append(parser.in_reasoning)
    assert states == [True, True, False, False]
    assert OutputParser(THINK, starts_in_reasoning=True).in_reasoning


def test_stop_string_across_deltas_drops_the_rest():
    events, reason = parse(THINK, "Count: one, two, STOP three", stop=["STOP", "never"])
    assert (events, reason) == ([C("Count: one, two, ")], "stop")
    parser = OutputParser(THINK, stop=["STOP"])
    assert parser.feed("one ST") == [C("one")]
    assert parser.feed("OP two") == [C(" ")] and parser.stopped
    assert parser.feed("more") == []


def test_earliest_stop_string_wins_and_applies_in_reasoning():
    assert parse(THINK, "a xy b yz c", stop=["yz", "xy"])[0] == [C("a ")]
    assert parse(THINK, "<think>plan END more</think>text", stop=["END"])[0] == [R("plan ")]


def test_stop_strings_do_not_cut_tool_calls():
    events, reason = parse(
        THINK,
        'Run:\n\n<tool_call>\n{"name": "bash", "arguments": {"command": "a\\n\\nb"}}\n</tool_call>',
        stop=["\n\n"],
    )
    assert events == [C("Run:")] and reason == "stop"
    text = '<tool_call>\n{"name": "bash", "arguments": {"command": "x```y"}}\n</tool_call>\n\nDone.``` more'
    events, reason = parse(THINK, text, stop=["```"])
    assert (
        events == [S(0, "bash"), A(0, '{"command": "x```y"}'), C("Done.")]
        and reason == "tool_calls"
    )


# -- tool calls: json_tools (Qwen2.5 / Qwen3 / Hermes) ---------------------------


def test_single_call():
    events, reason = parse(THINK, CALL)
    assert events == [S(0, "bash"), A(0, '{"command": "echo MARKER-1"}')]
    assert reason == "tool_calls"


def test_two_parallel_calls():
    events, reason = parse(THINK, CALL + "\n" + CALL2)
    assert events == [
        S(0, "bash"),
        A(0, '{"command": "echo MARKER-1"}'),
        S(1, "get_weather"),
        A(1, '{"city": "Paris", "days": 3}'),
    ]
    assert arguments(events) == {0: {"command": "echo MARKER-1"}, 1: {"city": "Paris", "days": 3}}


def test_text_then_call_and_text_after():
    events, reason = parse(THINK, "Let me check.\n\n" + CALL + "\n\nDone.")
    assert events == [
        C("Let me check."),
        S(0, "bash"),
        A(0, '{"command": "echo MARKER-1"}'),
        C("Done."),
    ]
    assert reason == "tool_calls"


def test_reasoning_then_call():
    events, reason = parse(THINK, "<think>I should call a tool.</think>\n" + CALL)
    assert events == [
        R("I should call a tool."),
        S(0, "bash"),
        A(0, '{"command": "echo MARKER-1"}'),
    ]


def test_call_streams_arguments_and_holds_the_closing_brace():
    parser = OutputParser(THINK, tools=TOOLS)
    assert parser.feed('<tool_call>\n{"name": "ba') == []
    (start,) = parser.feed('sh", "arguments": ')
    assert isinstance(start, ToolCallStart) and start.name == "bash" and start.index == 0
    assert parser.feed('{"command": "l') == [A(0, '{"command": "l')]
    assert parser.feed('s"') == [A(0, 's"')]
    assert parser.feed("}") == [A(0, "}")]  # sent once the object is complete and valid
    assert parser.feed("}\n</tool_call>") == []
    assert parser.finish("stop") == ([], "tool_calls")


def test_nested_and_tricky_arguments():
    args = {
        "code": 'print("}{")\n',
        "list": [1, {"a": None}],
        "s": "</tool_call> inside a string",
        "u": "é\\",
    }
    text = '<tool_call>\n{"name": "bash", "arguments": ' + json.dumps(args) + "}\n</tool_call>"
    events, reason = parse(THINK, text, markup_allowed=True)
    assert arguments(events) == {0: args} and reason == "tool_calls"
    assert not any(isinstance(e, ContentDelta) for e in events)


def test_arguments_given_as_a_json_string_and_key_order():
    text = '<tool_call>\n{"name": "bash", "arguments": "{\\"command\\": \\"ls\\"}"}\n</tool_call>'
    assert parse(THINK, text)[0] == [S(0, "bash"), A(0, '{"command": "ls"}')]
    text = '<tool_call>\n{"arguments": {"command": "ls"}, "name": "bash"}\n</tool_call>'
    assert parse(THINK, text)[0] == [S(0, "bash"), A(0, '{"command": "ls"}')]


def test_call_to_a_function_not_offered_is_a_call():
    text = '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'
    assert parse(THINK, text) == ([S(0, "rm_rf"), A(0, "{}")], "tool_calls")


def test_malformed_call_before_its_name_is_content(caplog):
    text = '<tool_call>\n{"nme": "bash", "arguments": {}}\n</tool_call> ok'
    with caplog.at_level(logging.WARNING, logger="mlxd.output"):
        assert parse(THINK, text, markup_allowed=True) == ([C(text)], "stop")
    assert "not a tool call" in caplog.text
    text = "<tool_call>\nnot json at all\n</tool_call>"
    assert parse(THINK, text, markup_allowed=True) == ([C(text)], "stop")


def test_malformed_arguments_after_the_name_keep_the_call_unparseable(caplog):
    text = '<tool_call>\n{"name": "bash", "arguments": {"command": }}\n</tool_call>'
    with caplog.at_level(logging.WARNING, logger="mlxd.output"):
        events, reason = parse(THINK, text)
    assert events == [S(0, "bash"), A(0, '{"command": ')] and reason == "stop"
    assert "broken" in caplog.text
    # a good call beside it still makes the response a tool call
    events, reason = parse(THINK, text + "\n" + CALL2)
    assert (
        events[2:] == [S(1, "get_weather"), A(1, '{"city": "Paris", "days": 3}')]
        and reason == "tool_calls"
    )


def test_call_cut_by_length(caplog):
    with caplog.at_level(logging.WARNING, logger="mlxd.output"):
        assert parse(THINK, '<tool_call>\n{"name": "ba', "length", markup_allowed=True) == (
            [C('<tool_call>\n{"name": "ba')],
            "length",
        )
        events, reason = parse(
            THINK, 'Ok.\n<tool_call>\n{"name": "bash", "arguments": {"command": "ec', "length"
        )
    assert (events, reason) == ([C("Ok."), S(0, "bash"), A(0, '{"command": "ec')], "length")
    assert "generation ended (length)" in caplog.text
    # arguments complete, end marker cut: the call is complete
    assert parse(THINK, CALL[:-5], "length")[1] == "tool_calls"


def test_lone_start_marker_at_the_end_is_content():
    assert parse(THINK, "Hi <tool_call>\n", markup_allowed=True) == (
        [C("Hi <tool_call>\n")],
        "stop",
    )


def test_parallel_tool_calls_false_keeps_the_first():
    events, reason = parse(THINK, CALL + CALL2, parallel_tool_calls=False)
    assert (events, reason) == ([S(0, "bash"), A(0, '{"command": "echo MARKER-1"}')], "tool_calls")


def test_tool_choice_none_and_no_tools_leave_markup_as_content():
    assert parse(THINK, CALL, tool_choice="none", markup_allowed=True) == ([C(CALL)], "stop")
    assert parse(THINK, CALL, tools=None, markup_allowed=True) == ([C(CALL)], "stop")


@pytest.mark.parametrize(
    "name, tool_choice, prefix, generated, expected",
    [
        (
            "json_tools",
            "required",
            "<tool_call>\n",
            CALL[len("<tool_call>\n") :],
            [S(0, "bash"), A(0, '{"command": "echo MARKER-1"}')],
        ),
        (
            "json_tools",
            {"type": "function", "function": {"name": "get_weather"}},
            '<tool_call>\n{"name": "get_weather", "arguments": ',
            '{"city": "Oslo"}}\n</tool_call>',
            [S(0, "get_weather"), A(0, '{"city": "Oslo"}')],
        ),
        (
            "llama3_json",
            "required",
            '{"name": "',
            'bash", "parameters": {"command": "ls"}}',
            [S(0, "bash"), A(0, '{"command": "ls"}')],
        ),
        (
            "llama3_json",
            {"type": "function", "function": {"name": "bash"}},
            '{"name": "bash", "parameters": ',
            '{"command": "ls"}}',
            [S(0, "bash"), A(0, '{"command": "ls"}')],
        ),
        (
            "mistral",
            {"type": "function", "function": {"name": "bash"}},
            "[TOOL_CALLS]bash[ARGS]",
            '{"command": "ls"}',
            [S(0, "bash"), A(0, '{"command": "ls"}')],
        ),
        (
            "qwen3_coder",
            {"type": "function", "function": {"name": "bash"}},
            "<tool_call>\n<function=bash>\n",
            "<parameter=command>\nls\n</parameter>\n</function>\n</tool_call>",
            [S(0, "bash"), A(0, '{"command": "ls"}')],
        ),
        (
            "harmony",
            {"type": "function", "function": {"name": "bash"}},
            "<|channel|>commentary to=functions.bash <|constrain|>json<|message|>",
            '{"command": "ls"}',
            [S(0, "bash"), A(0, '{"command": "ls"}')],
        ),
    ],
)
def test_forced_prefix_starts_the_parser_inside_the_call(
    name, tool_choice, prefix, generated, expected
):
    fmt = output_format(name)
    assert forced_prefix(fmt, tool_choice, TOOLS) == prefix
    assert parse(fmt, generated, tool_choice=tool_choice, prefix=prefix) == (expected, "tool_calls")


def test_forced_prefix_is_empty_for_auto_and_none():
    for choice in ("auto", "none", None):
        assert forced_prefix(THINK, choice, TOOLS) == ""
    assert forced_prefix(THINK, "required", None) == ""
    assert forced_prefix(output_format(None), "required", TOOLS) == ""


def test_named_tool_choice_keeps_one_call():
    choice = {"type": "function", "function": {"name": "bash"}}
    prefix = forced_prefix(THINK, choice, TOOLS)
    events, _ = parse(THINK, CALL[len(prefix) :] + CALL2, tool_choice=choice, prefix=prefix)
    assert events == [S(0, "bash"), A(0, '{"command": "echo MARKER-1"}')]


# -- other formats ----------------------------------------------------------------

LLAMA = output_format("llama3_json")
MISTRAL = output_format("mistral")


def test_llama3_json_whole_response_call():
    text = '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}'
    assert parse(LLAMA, text) == (
        [S(0, "get_weather"), A(0, '{"city": "Paris", "days": 3}')],
        "tool_calls",
    )


def test_llama3_json_python_tag_type_function_and_several_calls():
    text = '<|python_tag|>{"type": "function", "name": "bash", "parameters": {"command": "ls"}}; {"name": "get_weather", "parameters": {"city": "Oslo"}}'
    events, reason = parse(LLAMA, text)
    assert events == [
        S(0, "bash"),
        A(0, '{"command": "ls"}'),
        S(1, "get_weather"),
        A(1, '{"city": "Oslo"}'),
    ]


def test_llama3_json_text_and_other_json_stay_content():
    assert parse(LLAMA, "The answer is {x}.") == ([C("The answer is {x}.")], "stop")
    assert parse(LLAMA, '{"result": 5} is it', markup_allowed=True) == (
        [C('{"result": 5} is it')],
        "stop",
    )
    assert parse(LLAMA, '{"name": "bash", "parameters": {"command": "ls"}}\n\nDone.')[0][-1] == C(
        "Done."
    )


def test_mistral_name_args_calls():
    text = '[TOOL_CALLS]bash[ARGS]{"command": "ls"}[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}'
    events, reason = parse(MISTRAL, text)
    assert (events, reason) == (
        [S(0, "bash"), A(0, '{"command": "ls"}'), S(1, "get_weather"), A(1, '{"city": "Oslo"}')],
        "tool_calls",
    )


def test_mistral_json_list_calls():
    text = 'Sure. [TOOL_CALLS] [{"name": "bash", "arguments": {"command": "ls"}, "id": "abcDEF123"}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    events, reason = parse(MISTRAL, text)
    assert events == [
        C("Sure."),
        S(0, "bash"),
        A(0, '{"command": "ls"}'),
        S(1, "get_weather"),
        A(1, '{"city": "Oslo"}'),
    ]


def test_mistral_garbage_after_marker_is_content():
    assert parse(MISTRAL, "[TOOL_CALLS] hello there", markup_allowed=True) == (
        [C("[TOOL_CALLS] hello there")],
        "stop",
    )


def test_qwen3_coder_xml_call_comes_whole():
    fmt = output_format("qwen3_coder", "<think>", "</think>")
    text = (
        "I'll look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
    )
    events, reason = parse(fmt, text)
    assert events == [C("I'll look."), S(0, "get_weather"), A(0, '{"city": "Paris", "days": 3}')]
    assert reason == "tool_calls"


def test_qwen3_coder_malformed_and_cut_calls_are_content(caplog):
    fmt = output_format("qwen3_coder")
    text = "<tool_call>\nno function here\n</tool_call>"
    with caplog.at_level(logging.WARNING, logger="mlxd.output"):
        assert parse(fmt, text, markup_allowed=True) == ([C(text)], "stop")
        cut = "<tool_call>\n<function=bash>\n<parameter=command>\nls"
        assert parse(fmt, cut, "length", markup_allowed=True) == ([C(cut)], "length")
    assert "malformed tool call" in caplog.text and "cut by the end of generation" in caplog.text


def test_glm47_and_pythonic_calls():
    glm = (
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n</tool_call>"
    )
    assert parse(output_format("glm47"), glm)[0] == [S(0, "get_weather"), A(0, '{"city": "Oslo"}')]
    lfm = '<|tool_call_start|>[get_weather(city="Oslo"), bash(command="ls")]<|tool_call_end|>'
    events, _ = parse(output_format("pythonic"), lfm)
    assert events == [
        S(0, "get_weather"),
        A(0, '{"city": "Oslo"}'),
        S(1, "bash"),
        A(1, '{"command": "ls"}'),
    ]


def test_any_mlx_lm_parser_module_works_whole():
    fmt = output_format("minimax_m2")
    text = '<minimax:tool_call>\n<invoke name="bash">\n<parameter name="command">ls</parameter>\n</invoke>\n</minimax:tool_call>'
    assert fmt.tool.start == "<minimax:tool_call>"
    assert parse(fmt, text) == ([S(0, "bash"), A(0, '{"command": "ls"}')], "tool_calls")


HARMONY = output_format("harmony")


def test_harmony_reasoning_and_final():
    text = "<|channel|>analysis<|message|>User greets.<|end|><|start|>assistant<|channel|>final<|message|>Hello there.<|return|>"
    assert parse(HARMONY, text) == ([R("User greets."), C("Hello there.")], "stop")


def test_harmony_call_after_reasoning():
    text = (
        "<|channel|>analysis<|message|>Need the weather.<|end|>"
        '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "SF"}<|call|>'
    )
    assert parse(HARMONY, text) == (
        [R("Need the weather."), S(0, "get_weather"), A(0, '{"city": "SF"}')],
        "tool_calls",
    )
    text = (
        '<|start|>assistant to=functions.bash<|channel|>commentary json<|message|>{"command": "ls"}'
    )
    assert parse(HARMONY, text)[0] == [S(0, "bash"), A(0, '{"command": "ls"}')]


def test_harmony_in_reasoning_and_cut_header():
    parser = OutputParser(HARMONY, tools=TOOLS)
    parser.feed("<|channel|>analysis<|message|>Hm")
    assert parser.in_reasoning
    text = "<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant<|channel|>fin"
    assert parse(HARMONY, text, "length", markup_allowed=True) == (
        [R("Hm."), C("<|start|>assistant<|channel|>fin")],
        "length",
    )


# -- format parsers and detection ---------------------------------------------------


def _wrapper(tmp_path, template: str, tokens: list[str]):
    """A real mlx-lm TokenizerWrapper around a tiny word-level tokenizer."""
    from pathlib import Path

    from mlx_lm.tokenizer_utils import load
    from tokenizers import Tokenizer, models, pre_tokenizers

    tmp_path.mkdir()
    vocab = {t: i for i, t in enumerate(["<unk>", "hello", *tokens])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(tokens)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "chat_template": template,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return load(Path(tmp_path))


def test_output_format_for_reads_the_tokenizer_wrapper(tmp_path):
    qwen = "{% for m in messages %}{{ m.content }}{% endfor %}{% for tool_call in m.tool_calls %}<tool_call>{{ tool_call.name }}</tool_call>{% endfor %}"
    fmt = output_format_for(
        _wrapper(tmp_path / "q", qwen, ["<tool_call>", "</tool_call>", "<think>", "</think>"])
    )
    assert (fmt.name, fmt.think_start, fmt.think_end, fmt.tool.start, fmt.tool.end) == (
        "json_tools",
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
    )
    assert fmt.tool is tool_formats.FORMATS["json_tools"]

    llama = '{{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}'
    fmt = output_format_for(_wrapper(tmp_path / "l", llama, ["<|python_tag|>", "<|eot_id|>"]))
    assert (fmt.name, fmt.think_start, fmt.tool.start) == (
        "llama3_json",
        None,
        "<|python_tag|>",
    )

    wrapper = _wrapper(
        tmp_path / "h", "{{ messages }}", ["<|start|>", "<|channel|>", "<|message|>", "<|end|>"]
    )
    assert output_format_for(wrapper).name == "harmony"
    assert output_format_for(wrapper, tool_format="json_tools").name == "json_tools"


def test_content_is_byte_exact_but_for_whitespace_that_belongs_to_markup():
    code = "    return x\n"
    assert parse(THINK, code) == ([C(code)], "stop")
    assert parse(THINK, "\n\n  Hi there\n\n") == ([C("\n\n  Hi there\n\n")], "stop")
    assert parse(THINK, "Hi there\n<think>x</think>")[0] == [C("Hi there"), R("x")]
    # The newlines around think markers and tool-call tags are the markup's own.
    assert parse(THINK, "<think>\nx\n</think>\n\n    return x\n")[0] == [R("x"), C("    return x\n")]
    assert parse(THINK, "Hi\n", stop=["</end>"]) == ([C("Hi\n")], "stop")


def test_harmony_text_that_is_no_header_is_content():
    text = "<|start|>" + "x" * 300 + " and more"
    assert parse(HARMONY, text, markup_allowed=True) == ([C(text)], "stop")


PIECES = [
    "<tool_call>",
    "</tool_call>",
    "<think>",
    "</think>",
    "[TOOL_CALLS]",
    "[ARGS]",
    "<|python_tag|>",
    "<|channel|>",
    "<|message|>",
    "<|end|>",
    "<|start|>",
    "analysis",
    "commentary to=functions.bash",
    "<function=bash>",
    "</function>",
    "<parameter=command>",
    "</parameter>",
    '{"name": "bash", "arguments": ',
    '{"name": "bash", "parameters": ',
    '{"command": "ls"}',
    "\n",
    " ",
    "{",
    "}",
    "[",
    "]",
    '"',
    "\\",
    ":",
    ",",
    ";",
    "bash",
    "hello",
    "STOP",
    "<",
    "</",
]


@pytest.mark.parametrize(
    "name", ["json_tools", "llama3_json", "mistral", "qwen3_coder", "harmony", "pythonic"]
)
def test_random_mixtures_never_raise_and_do_not_depend_on_splits(name):
    fmt = output_format(name, "<think>", "</think>")
    logging.getLogger("mlxd.output").disabled = True
    try:
        for seed in range(25):
            rng = random.Random(seed)
            text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 20)))
            options = rng.choice(
                [
                    {},
                    {"stop": ["STOP"]},
                    {"parallel_tool_calls": False},
                    {"starts_in_reasoning": True},
                ]
            )
            for reason in ("stop", "length"):
                events, finish_reason = parse(fmt, text, reason, markup_allowed=True, **options)
                assert finish_reason in (reason, "tool_calls")
    finally:
        logging.getLogger("mlxd.output").disabled = False
