"""The test-model builders, checked through mlx-lm itself."""

from pathlib import Path

import mlx_lm
import pytest
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer
from transformers import AutoTokenizer

from scripts.testmodels import build_random_model, build_tokenizer_files

BASH_TOOL = {
    "type": "function",
    "function": {
        "name": "bash",
        "description": "Run a shell command.",
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "string"}},
            "required": ["command"],
        },
    },
}

TOOL_ROUND_TRIP = [
    {"role": "user", "content": "List the files."},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "bash", "arguments": {"command": "ls"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "a.txt"},
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
    assert prompt.endswith("<|im_start|>assistant\n<think>\nGreet back.\n</think>\n\nHello!<|im_end|>\n")
    prompt = tokenizer.apply_chat_template(
        messages[:1], add_generation_prompt=True, enable_thinking=False, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
