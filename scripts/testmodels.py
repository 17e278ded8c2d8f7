"""Tiny local models that ``mlx_lm.load`` loads like a Hub checkpoint.

Nothing can come from the Hugging Face hub in tests, so these builders write
real checkpoints of mlx-lm's ``qwen2`` architecture with a real byte-level BPE
tokenizer and a real chat template:

- ``build_random_model``: random weights, any size (tests: tiny; benchmark: ~30M).
- ``build_scripted_model``: hand-set weights whose greedy output is a fixed text.

Run ``python -m scripts.testmodels --help`` to build them from the shell.
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models
from tokenizers import normalizers, pre_tokenizers, processors, trainers

# Qwen2.5-Instruct's chat template, verbatim.
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen3's chat template, verbatim: Qwen2.5's tool format plus <think> blocks,
# `reasoning_content` on assistant messages and the `enable_thinking` switch.
QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""


@dataclass(frozen=True)
class Family:
    """A chat format: its template and the tokens it needs as single tokens.

    ``special`` tokens are control tokens (skipped by ``decode(...,
    skip_special_tokens=True)``); ``added`` ones are plain text markers that a
    model emits as one token, like Qwen's ``<tool_call>``.
    """

    chat_template: str
    special: tuple[str, ...]
    added: tuple[str, ...]
    eos: str
    pad: str


_QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_QWEN_TOOLS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")

FAMILIES: dict[str, Family] = {
    "chatml": Family(QWEN25_TEMPLATE, _QWEN_SPECIAL, _QWEN_TOOLS, "<|im_end|>", "<|endoftext|>"),
    "qwen3": Family(
        QWEN3_TEMPLATE,
        _QWEN_SPECIAL,
        _QWEN_TOOLS + ("<think>", "</think>"),
        "<|im_end|>",
        "<|endoftext|>",
    ),
}

# Qwen2's pre-tokenizer split: words with one leading non-letter, single
# digits, punctuation runs with their newlines, newline runs, spaces.
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# English, code, JSON and chat text: enough for a few hundred useful merges.
_CORPUS = r"""
You are a helpful assistant. The user asks a question and the assistant answers it.
Hello from mlxd. The quick brown fox jumps over the lazy dog. Hello, world!
The weather in Paris is sunny today, with a light wind from the west.
Please read the file, then run the tests and tell me what changed.
I should call a tool. Let me check the current directory first.
The answer is 42. There are 3 files in this directory and 2 of them are empty.
A local server runs the model on your own machine and streams tokens back to the client.
system user assistant tool function arguments name content role message messages
user: What is the capital of France? assistant: The capital of France is Paris.
user: Fix the bug in main.py. assistant: Done, the user can run it again.
system
user
assistant
def add(a, b):
    return a + b

class Counter:
    def __init__(self):
        self.count = 0

    def increment(self) -> int:
        self.count += 1
        return self.count

for i in range(10):
    print(f"value {i}: {i * i}")

import json
from pathlib import Path

if __name__ == "__main__":
    data = json.loads(Path("config.json").read_text())
    print(data["name"], data.get("version", "0.1.0"))

function greet(name) {
  const message = `Hello, ${name}!`;
  console.log(message);
  return message;
}

{"name": "bash", "arguments": {"command": "echo MARKER-1"}}
{"name": "read", "arguments": {"path": "/tmp/notes.txt", "limit": 100}}
{"type": "function", "function": {"name": "get_weather", "description": "Get the weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
{"id": "call_1", "type": "function", "function": {"name": "write", "arguments": "{\"path\": \"a.txt\", \"text\": \"hi\"}"}}
[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What time is it?"}]
$ ls -la /tmp && cat README.md | grep -n "install"
$ git status && git diff --stat
$ python -m pytest tests -q
ERROR: file not found. Warning: the value must be a number, not a string.
Thank you! You're welcome. It's done; I've updated the code and the tests pass.
"""


@functools.lru_cache(maxsize=None)
def _base_tokenizer_json(vocab_size: int) -> str:
    """Train the byte-level BPE once per process; builders copy it."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True) * 4, trainer)
    return tokenizer.to_str()


def _make_tokenizer(family: Family, extra_tokens, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer.from_str(_base_tokenizer_json(vocab_size))
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in family.special]
    )
    added = [t for t in (*family.added, *extra_tokens) if tokenizer.token_to_id(t) is None]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    return tokenizer


def _write_tokenizer(
    out_dir: Path, tokenizer: Tokenizer, family: Family, model_max_length: int
) -> None:
    tokenizer.save(str(out_dir / "tokenizer.json"))
    added = tokenizer.get_added_tokens_decoder()
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {
                "content": t.content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": t.special,
            }
            for i, t in sorted(added.items())
        },
        "bos_token": None,
        "chat_template": family.chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": family.eos,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": family.pad,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special_map = {"eos_token": family.eos, "pad_token": family.pad}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))


def build_tokenizer_files(
    out_dir,
    template: str = "chatml",
    extra_tokens: tuple[str, ...] = (),
    *,
    vocab_size: int = 768,
    model_max_length: int = 32768,
) -> Tokenizer:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    ``template`` names a chat format in ``FAMILIES``; ``extra_tokens`` become
    added (non-special) tokens after the family's own. Returns the tokenizer
    so model builders can size the vocabulary from it.
    """
    family = FAMILIES[template]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _make_tokenizer(family, extra_tokens, vocab_size)
    _write_tokenizer(out_dir, tokenizer, family, model_max_length)
    return tokenizer


def _qwen2_config(
    tokenizer: Tokenizer,
    family: Family,
    *,
    hidden_size: int,
    num_layers: int,
    intermediate_size: int,
    num_heads: int,
    num_kv_heads: int,
    context_length: int,
    rope_theta: float,
    tie_word_embeddings: bool,
    dtype: str,
) -> dict:
    """A Hugging Face style config.json for mlx-lm's qwen2 model."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": context_length,
        "max_window_layers": num_layers,
        "sliding_window": context_length,
        "use_sliding_window": False,
        "rope_theta": rope_theta,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "vocab_size": tokenizer.get_vocab_size(),
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": dtype,
        "bos_token_id": tokenizer.token_to_id(family.pad),
        "eos_token_id": tokenizer.token_to_id(family.eos),
    }


def _write_model(out_dir: Path, config: dict, weights: dict[str, mx.array]) -> None:
    dtype = getattr(mx, config["torch_dtype"])
    weights = {k: v.astype(dtype) for k, v in weights.items()}
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    # Like Qwen2.5-Instruct: either end token stops generation.
    generation = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": [config["eos_token_id"], config["bos_token_id"]],
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))


def build_random_model(
    out_dir,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    intermediate_size: int | None = None,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    context_length: int = 4096,
    template: str = "chatml",
    vocab_size: int = 768,
    dtype: str = "float32",
    seed: int = 0,
) -> Path:
    """Write a random-weight qwen2 checkpoint (config, safetensors, tokenizer).

    It generates text-like byte-level tokens and never samples a special or
    added token (their logits are zero while the others spread around them),
    so it runs until ``max_tokens``. About 30M parameters:
    ``hidden_size=512, num_layers=8, num_heads=8``.
    """
    out_dir = Path(out_dir)
    family = FAMILIES[template]
    tokenizer = build_tokenizer_files(
        out_dir, template, vocab_size=vocab_size, model_max_length=context_length
    )
    intermediate_size = intermediate_size or 3 * hidden_size
    num_kv_heads = num_kv_heads or num_heads
    config = _qwen2_config(
        tokenizer,
        family,
        hidden_size=hidden_size,
        num_layers=num_layers,
        intermediate_size=intermediate_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        context_length=context_length,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        dtype=dtype,
    )
    head_dim = hidden_size // num_heads
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden_size)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (num_heads * head_dim, hidden_size),
            p + "self_attn.q_proj.bias": (num_heads * head_dim,),
            p + "self_attn.k_proj.weight": (num_kv_heads * head_dim, hidden_size),
            p + "self_attn.k_proj.bias": (num_kv_heads * head_dim,),
            p + "self_attn.v_proj.weight": (num_kv_heads * head_dim, hidden_size),
            p + "self_attn.v_proj.bias": (num_kv_heads * head_dim,),
            p + "self_attn.o_proj.weight": (hidden_size, num_heads * head_dim),
            p + "mlp.gate_proj.weight": (intermediate_size, hidden_size),
            p + "mlp.up_proj.weight": (intermediate_size, hidden_size),
            p + "mlp.down_proj.weight": (hidden_size, intermediate_size),
        }
    keys = mx.random.split(mx.random.key(seed), len(shapes) + 1)
    weights = {
        name: 0.02 * mx.random.normal(shape, key=key)
        for (name, shape), key in zip(shapes.items(), keys)
    }
    for i in range(num_layers):
        weights[f"model.layers.{i}.input_layernorm.weight"] = mx.ones((hidden_size,))
        weights[f"model.layers.{i}.post_attention_layernorm.weight"] = mx.ones((hidden_size,))
    weights["model.norm.weight"] = mx.ones((hidden_size,))
    # Logits with a spread of ~4 over the byte-level vocabulary, zero for the
    # special and added tokens, which therefore never win.
    lm_head = (4.0 / hidden_size**0.5) * mx.random.normal(
        (config["vocab_size"], hidden_size), key=keys[-1]
    )
    n_plain = min(tokenizer.get_added_tokens_decoder())
    weights["lm_head.weight"] = mx.concatenate(
        [lm_head[:n_plain], mx.zeros_like(lm_head[n_plain:])]
    )
    _write_model(out_dir, config, weights)
    return out_dir
