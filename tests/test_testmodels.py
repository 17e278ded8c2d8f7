"""The test-model builders, checked through mlx-lm itself."""

from pathlib import Path

import json

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer
from transformers import AutoTokenizer

from scripts.testmodels import (
    FAMILIES,
    build_random_model,
    build_scripted_model,
    build_tokenizer_files,
    main,
)
from tests.chat_helpers import BASH_TOOL

TOOL_ROUND_TRIP = [
    {"role": "user", "content": "List the files."},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call12345",  # Mistral's templates want 9 characters
                "type": "function",
                "function": {"name": "bash", "arguments": {"command": "ls"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call12345", "content": "a.txt"},
]


@pytest.fixture(scope="session")
def random_model(tmp_path_factory) -> Path:
    return build_random_model(tmp_path_factory.mktemp("random"), seed=1)


@pytest.fixture(scope="session", params=["chatml", "qwen3"])
def tokenizer_dir(request, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(f"tok-{request.param}")
    build_tokenizer_files(out, request.param)
    return out


def test_random_model_generates_the_requested_number_of_tokens(random_model):
    model, tokenizer = mlx_lm.load(str(random_model))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say something."}], add_generation_prompt=True
    )
    responses = list(mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=24))
    assert len(responses) == 24
    assert responses[-1].finish_reason == "length"
    assert responses[-1].prompt_tokens == len(prompt)


def test_random_model_size_scales_with_its_parameters(tmp_path):
    path = build_random_model(tmp_path, hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2)
    model, _ = mlx_lm.load(str(path))
    assert len(model.layers) == 3
    assert model.layers[0].self_attn.k_proj.weight.shape == (2 * 32, 128)


def test_mlx_lm_loads_the_tokenizer_with_tool_calling(tokenizer_dir):
    tokenizer = mlx_lm.tokenizer_utils.load(tokenizer_dir)
    assert isinstance(tokenizer.detokenizer, BPEStreamingDetokenizer)
    assert tokenizer.has_tool_calling
    assert tokenizer.tool_parser.__module__ == "mlx_lm.tool_parsers.json_tools"
    assert tokenizer.tool_call_start_tokens == (tokenizer.convert_tokens_to_ids("<tool_call>"),)
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_thinking_tokens_only_in_the_qwen3_family(tmp_path):
    build_tokenizer_files(tmp_path / "a", "chatml")
    build_tokenizer_files(tmp_path / "b", "qwen3")
    chatml = mlx_lm.tokenizer_utils.load(tmp_path / "a")
    qwen3 = mlx_lm.tokenizer_utils.load(tmp_path / "b")
    assert not chatml.has_thinking
    assert qwen3.has_thinking and qwen3.think_start == "<think>"


def test_transformers_round_trips_text(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = 'Hi <tool_call>\n{"name": "bash"}\n</tool_call> caf\u00e9 \u2713<|im_end|>'
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_ids("<tool_call>") in ids
    assert ids[-1] == tokenizer.eos_token_id


def test_chat_template_renders_tools_calls_and_results(tokenizer_dir):
    tokenizer = mlx_lm.tokenizer_utils.load(tokenizer_dir)
    prompt = tokenizer.apply_chat_template(
        TOOL_ROUND_TRIP, tools=[BASH_TOOL], add_generation_prompt=True, tokenize=False
    )
    assert "# Tools" in prompt
    assert '"name": "bash", "description": "Run a shell command."' in prompt
    assert '<tool_call>\n{"name": "bash", "arguments": {"command": "ls"}}\n</tool_call>' in prompt
    assert "<|im_start|>user\n<tool_response>\na.txt\n</tool_response><|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_qwen3_template_renders_reasoning_and_the_thinking_switch(tmp_path):
    build_tokenizer_files(tmp_path, "qwen3")
    tokenizer = mlx_lm.tokenizer_utils.load(tmp_path)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."},
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert prompt.endswith("assistant\n<think>\nGreet back.\n</think>\n\nHello!<|im_end|>\n")
    prompt = tokenizer.apply_chat_template(
        messages[:1], add_generation_prompt=True, enable_thinking=False, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


PLAIN = "Hello from mlxd. The quick brown fox jumps over the lazy dog."
CALL = '<tool_call>\n{"name": "bash", "arguments": {"command": "echo MARKER-1"}}\n</tool_call>'
TWO_CALLS = CALL + "\n" + CALL.replace("MARKER-1", "MARKER-2")
THINK_CALL = "<think>I should call a tool.</think>\n\n" + CALL
MALFORMED = '<tool_call>\n{"name": "bash", "arguments": {"command": \n</tool_call>'

# name -> (script, after_tool_result, template)
SCRIPTS = {
    "plain": (PLAIN, None, "chatml"),
    "call": ("Let me check.\n" + CALL, "The command printed MARKER-1.", "chatml"),
    "parallel": (TWO_CALLS, "Both commands ran.", "qwen3"),
    "think": (THINK_CALL, "<think>It worked.</think>\n\nIt printed MARKER-1.", "qwen3"),
    "malformed": (MALFORMED, None, "chatml"),
    "empty": ("", "Only after a tool.", "chatml"),
}


@pytest.fixture(scope="session")
def scripted(tmp_path_factory):
    """Build each scripted model once; load it once."""
    root = tmp_path_factory.mktemp("scripted")
    built = {}

    def get(name):
        if name not in built:
            script, after_tool, template = SCRIPTS[name]
            model = build_scripted_model(
                root / name, script, after_tool_result=after_tool, template=template
            )
            built[name] = model, *mlx_lm.load(str(model.path))
        return built[name]

    return get


def _generate(model, tokenizer, messages, tools=None, temperature=0.0):
    prompt = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    return list(
        mlx_lm.stream_generate(
            model, tokenizer, prompt, max_tokens=200, sampler=make_sampler(temperature)
        )
    )


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("tools", [None, [BASH_TOOL]], ids=["no-tools", "tools"])
@pytest.mark.parametrize("after_tool", [False, True], ids=["question", "tool-result"])
def test_scripted_model_says_its_script_exactly(scripted, name, tools, after_tool):
    built, model, tokenizer = scripted(name)
    script, after_tool_result, _ = SCRIPTS[name]
    expected_text, expected_ids = script, built.script_token_ids
    if after_tool and after_tool_result is not None:
        expected_text, expected_ids = after_tool_result, built.after_tool_token_ids
    messages = TOOL_ROUND_TRIP if after_tool else TOOL_ROUND_TRIP[:1]

    responses = _generate(model, tokenizer, messages, tools)

    assert "".join(r.text for r in responses) == expected_text
    assert [r.token for r in responses] == expected_ids + [tokenizer.eos_token_id]
    assert responses[-1].finish_reason == "stop"


def test_scripted_model_holds_at_temperature_one(scripted):
    built, model, tokenizer = scripted("call")
    mx.random.seed(3)
    responses = _generate(model, tokenizer, TOOL_ROUND_TRIP[:1], temperature=1.0)
    assert [r.token for r in responses][:-1] == built.script_token_ids


def test_tool_result_far_back_in_a_long_prompt_still_switches(scripted):
    built, model, tokenizer = scripted("call")
    messages = TOOL_ROUND_TRIP + [
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": "and again " * 1500},
    ]
    responses = _generate(model, tokenizer, messages)
    assert responses[-1].prompt_tokens > 3000
    assert [r.token for r in responses][:-1] == built.after_tool_token_ids


@pytest.mark.parametrize("name", ["parallel", "think"])
def test_markers_are_emitted_as_their_own_tokens(scripted, name):
    built, _, tokenizer = scripted(name)
    script = SCRIPTS[name][0]
    for marker in ("<tool_call>", "</tool_call>", "<think>", "</think>"):
        marker_id = tokenizer.convert_tokens_to_ids(marker)
        assert built.script_token_ids.count(marker_id) == script.count(marker)


def test_transformers_decodes_the_script_ids(scripted):
    built, _, _ = scripted("parallel")
    tokenizer = AutoTokenizer.from_pretrained(built.path)
    assert tokenizer.decode(built.script_token_ids) == TWO_CALLS
    assert tokenizer.decode(built.after_tool_token_ids) == "Both commands ran."


@pytest.mark.parametrize(
    "script, error",
    [
        ("caf\u00e9", "ASCII"),
        ("stop<|im_end|>", "eos"),
        ("stop<|endoftext|> and go on", "only at its end"),
        ("<tool_call></tool_call>" * 6, "repetitive"),
    ],
)
def test_unbuildable_scripts_are_rejected(tmp_path, script, error):
    with pytest.raises(ValueError, match=error):
        build_scripted_model(tmp_path, script)


def test_cli_builds_both_kinds(tmp_path, capsys):
    main(["random", str(tmp_path / "r"), "--hidden-size", "32", "--heads", "2", "--layers", "1"])
    assert json.loads((tmp_path / "r" / "config.json").read_text())["hidden_size"] == 32
    capsys.readouterr()
    main(["scripted", str(tmp_path / "s"), "--text", "Hi there.", "--template", "qwen3"])
    built = json.loads(capsys.readouterr().out)
    model, tokenizer = mlx_lm.load(built["path"])
    prompt = tokenizer.apply_chat_template(TOOL_ROUND_TRIP[:1], add_generation_prompt=True)
    assert mlx_lm.generate(model, tokenizer, prompt, max_tokens=20) == "Hi there."
    assert built["after_tool_token_ids"] is None


# --- Every family ------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_tokenizer_has_its_markers_and_is_detected_as_its_format(tmp_path, family):
    from mlxd.server.output import output_format_for

    build_tokenizer_files(tmp_path, family)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    fam = FAMILIES[family]
    for marker in (*fam.special, *fam.added):
        assert tokenizer.encode(marker, add_special_tokens=False) == [
            tokenizer.convert_tokens_to_ids(marker)
        ]
    assert output_format_for(mlx_lm.tokenizer_utils.load(tmp_path)).name == fam.tool_format


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_template_marks_tool_results_with_one_token(tmp_path, family):
    build_tokenizer_files(tmp_path, family)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    marker = tokenizer.convert_tokens_to_ids(FAMILIES[family].tool_result)

    def ids(messages):
        return tokenizer.apply_chat_template(
            messages, tools=[BASH_TOOL], add_generation_prompt=True, return_dict=False
        )

    assert marker not in ids(TOOL_ROUND_TRIP[:1])
    assert ids(TOOL_ROUND_TRIP).count(marker) == 1


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scripted_model_of_every_family_switches_on_a_tool_result(tmp_path, family):
    built = build_scripted_model(tmp_path, "Hi there.", after_tool_result="Done.", template=family)
    model, tokenizer = mlx_lm.load(str(built.path))
    end_ids = {tokenizer.convert_tokens_to_ids(t) for t in FAMILIES[family].end_tokens}
    assert tokenizer.eos_token_ids == end_ids
    for messages, text in ((TOOL_ROUND_TRIP[:1], "Hi there."), (TOOL_ROUND_TRIP, "Done.")):
        responses = _generate(model, tokenizer, messages, [BASH_TOOL])
        assert "".join(r.text for r in responses) == text
        assert responses[-1].token == tokenizer.convert_tokens_to_ids(FAMILIES[family].eos)


def test_a_script_may_end_with_another_end_token(tmp_path):
    call = '<|channel|>commentary to=functions.bash <|constrain|>json<|message|>{"command": "ls"}'
    built = build_scripted_model(
        tmp_path,
        call + "<|call|>",
        after_tool_result="<|channel|>final<|message|>Done.",
        template="harmony",
    )
    model, tokenizer = mlx_lm.load(str(built.path))
    for messages, ids, end in (
        (TOOL_ROUND_TRIP[:1], built.script_token_ids, "<|call|>"),
        (TOOL_ROUND_TRIP, built.after_tool_token_ids, "<|return|>"),
    ):
        responses = _generate(model, tokenizer, messages, [BASH_TOOL])
        assert [r.token for r in responses] == ids + [tokenizer.convert_tokens_to_ids(end)]
    assert tokenizer.decode(built.script_token_ids) == call


def test_script_chunks_never_swallow_a_marker(tmp_path):
    """A chunk such as ">\n<" must leave the "<" of "<|im_end|>" to the marker."""
    script = "<tool_call>\n<function=bash>\n<parameter=command>\nls\n</parameter>\n</function>\n"
    script += "</tool_call>"
    build_scripted_model(tmp_path, script, template="qwen3_coder")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer.encode("</parameter>\n<|im_end|>\n<|im_start|>user", add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids


def test_scripted_model_continues_a_prompt_suffix(tmp_path):
    """A forced call prefix ends the prompt; the script must not jump ahead on its last token."""
    prefix, rest = '{"name": "', 'bash", "parameters": {"command": "echo MARKER-1"}}'
    built = build_scripted_model(tmp_path, rest, template="llama3", prompt_suffix=prefix)
    model, tokenizer = mlx_lm.load(str(built.path))
    text = tokenizer.apply_chat_template(
        TOOL_ROUND_TRIP[:1], tools=[BASH_TOOL], add_generation_prompt=True, tokenize=False
    )
    prompt = tokenizer.encode(text + prefix, add_special_tokens=False)
    responses = list(mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=60))
    assert "".join(r.text for r in responses) == rest
