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
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models
from tokenizers import normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

TEMPLATES = Path(__file__).parent / "chat_templates"


@dataclass(frozen=True)
class Family:
    """A chat format: its real template, the tool-call format that the server
    detects from it (a `server/tool_formats.py` name), and the tokens it needs
    as single tokens.

    ``special`` tokens are control tokens (skipped by ``decode(...,
    skip_special_tokens=True)``); ``added`` ones are plain text markers that a
    model emits as one token, like Qwen's ``<tool_call>``. Generation ends at
    ``eos`` or any of ``ends`` (generation_config's ``eos_token_id`` list).
    ``tool_result`` is the text that opens a tool result in a rendered prompt;
    it is one token, on which a scripted model switches to its second script.
    """

    template: str  # a file in chat_templates/, without ".jinja"
    tool_format: str
    special: tuple[str, ...]
    added: tuple[str, ...]
    eos: str
    pad: str
    bos: str | None = None
    ends: tuple[str, ...] = ()
    tool_result: str = "<tool_response>"

    @property
    def chat_template(self) -> str:
        return (TEMPLATES / f"{self.template}.jinja").read_text()

    @property
    def end_tokens(self) -> tuple[str, ...]:
        return (self.eos, *self.ends)


_QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_QWEN_TOOLS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
_THINK = ("<think>", "</think>")
_MISTRAL_SPECIAL = (
    "<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]",
)  # fmt: skip

# The templates are the families' own (chat_templates/README.md says where each comes from).
FAMILIES: dict[str, Family] = {
    # Qwen2.5-Instruct: Hermes-style JSON calls in <tool_call>.
    "chatml": Family(
        "qwen2.5", "json_tools", _QWEN_SPECIAL, _QWEN_TOOLS, "<|im_end|>", "<|endoftext|>",
        ends=("<|endoftext|>",),
    ),
    # Qwen3: the same calls, <think> blocks and the enable_thinking switch.
    "qwen3": Family(
        "qwen3", "json_tools", _QWEN_SPECIAL, _QWEN_TOOLS + _THINK, "<|im_end|>", "<|endoftext|>",
        ends=("<|endoftext|>",),
    ),
    # Qwen3-Coder: XML calls, <tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE...
    "qwen3_coder": Family(
        "qwen3-coder", "qwen3_coder", _QWEN_SPECIAL, _QWEN_TOOLS, "<|im_end|>", "<|endoftext|>",
        ends=("<|endoftext|>",),
    ),
    # Llama 3.2 Instruct (3.1 and 3.3 call the same way): a bare {"name", "parameters"}
    # JSON call, or one after <|python_tag|> ended by <|eom_id|>. Tool results come in
    # an ipython turn; its header is one token here.
    "llama3": Family(
        "llama3.2", "llama3_json",
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"),
        ("<|start_header_id|>ipython<|end_header_id|>",),
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
        bos="<|begin_of_text|>",
        ends=("<|eom_id|>", "<|end_of_text|>"),
        tool_result="<|start_header_id|>ipython<|end_header_id|>",
    ),
    # Mistral Small 3.2 and Devstral (v11+ tokenizers): [TOOL_CALLS]NAME[ARGS]{...}.
    "mistral": Family(
        "mistral-small-3.2", "mistral",
        _MISTRAL_SPECIAL + ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[ARGS]", "[CALL_ID]",
                            "[TOOL_CONTENT]"),
        (),
        "</s>",
        "<pad>",
        bos="<s>",
        tool_result="[TOOL_RESULTS]",
    ),
    # Mistral 7B v0.3 and NeMo: [TOOL_CALLS][{"name", "arguments"}, ...].
    "mistral_nemo": Family(
        "mistral-nemo", "mistral_json", _MISTRAL_SPECIAL, (), "</s>", "<pad>", bos="<s>",
        tool_result="[TOOL_RESULTS]",
    ),
    # gpt-oss: <|channel|>CHANNEL[ to=functions.NAME]<|message|>BODY; a call ends
    # with <|call|>, a final answer with <|return|>. Tool results come from
    # "functions.NAME to=assistant"; " to=assistant" is one token here.
    "harmony": Family(
        "gpt-oss", "harmony",
        ("<|startoftext|>", "<|endoftext|>", "<|start|>", "<|end|>", "<|message|>",
         "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>"),
        (" to=assistant",),
        "<|return|>",
        "<|endoftext|>",
        bos="<|startoftext|>",
        ends=("<|call|>", "<|endoftext|>"),
        tool_result=" to=assistant",
    ),
    # GLM-4.5 to 4.7: <tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value></tool_call>,
    # thinking in <think>; a turn ends with the next turn's role token.
    "glm47": Family(
        "glm-4.7-flash", "glm47",
        ("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
         "<|observation|>"),
        _QWEN_TOOLS + _THINK + ("<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"),
        "<|endoftext|>",
        "<|endoftext|>",
        ends=("<|user|>", "<|observation|>"),
        tool_result="<|observation|>",
    ),
}  # fmt: skip

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
import math
import re
from collections import Counter, defaultdict
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


_VOCAB_SIZE = 768  # byte-level BPE size before added tokens


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


def _make_tokenizer(family: Family, extra_tokens: tuple[str, ...], vocab_size: int) -> Tokenizer:
    """The base BPE plus the family's markers, then ``extra_tokens`` (script chunks).

    Chunks are "normalized" added tokens, which `tokenizers` matches only in
    the text left between markers: a chunk such as ">\n<" must not swallow
    the "<" of a following "<|im_end|>".
    """
    tokenizer = Tokenizer.from_str(_base_tokenizer_json(vocab_size))
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in family.special]
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.added])
    chunks = [t for t in extra_tokens if tokenizer.token_to_id(t) is None]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=True) for t in chunks])
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
                "normalized": t.normalized,
                "rstrip": False,
                "single_word": False,
                "special": t.special,
            }
            for i, t in sorted(added.items())
        },
        "bos_token": family.bos,
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
    special_map = {"bos_token": family.bos, "eos_token": family.eos, "pad_token": family.pad}
    special_map = {k: v for k, v in special_map.items() if v is not None}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))


def build_tokenizer_files(
    out_dir,
    template: str = "chatml",
    extra_tokens: tuple[str, ...] = (),
    *,
    vocab_size: int = _VOCAB_SIZE,
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


def _ids(tokenizer: Tokenizer, tokens) -> list[int]:
    return [tokenizer.token_to_id(t) for t in tokens]


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
        "bos_token_id": tokenizer.token_to_id(family.bos or family.pad),
        "eos_token_id": tokenizer.token_to_id(family.eos),
    }


def _write_model(
    out_dir: Path, config: dict, weights: dict[str, mx.array], end_ids: list[int]
) -> None:
    dtype = getattr(mx, config["torch_dtype"])
    weights = {k: v.astype(dtype) for k, v in weights.items()}
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    # Like the real checkpoints: any of the family's end tokens stops generation.
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": end_ids}
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
    vocab_size: int = _VOCAB_SIZE,
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
    _write_model(out_dir, config, weights, _ids(tokenizer, family.end_tokens))
    return out_dir


# --- Scripted model ---------------------------------------------------------
#
# One transformer layer of hand-set weights on a one-hot residual stream:
#
#   CUR       one-hot of the current token (over the tokens the script uses,
#             plus OTHER for the rest of the vocabulary)
#   PREV[j]   CUR of the token j places back, copied by attention heads that
#             look a fixed distance back through RoPE (j = 1 .. K-1)
#   CONST     always 1: biases, since qwen2's MLP and lm_head have none
#   NOFLAG/FLAG  set by a head that finds <tool_response> anywhere in the
#             context, at any distance: it picks which script to play
#   NEXT      one slot per token the script emits, written by the MLP
#
# Each MLP unit is an AND over a K-gram context (and the flag) and names the
# next token; lm_head reads NEXT, and when no unit fires (the end of any
# prompt) it falls back to the script's first token. Contexts are as short as
# makes them unambiguous; repeated chunks of text are glued together first so
# that K stays small, while markers such as <tool_call> stay single tokens.

_HEAD_DIM = 64
_ROPE_BASE = float(2**32)  # frequencies 2**-i, i = 0..31: fast ones for offsets,
_OFFSET_PAIRS = 17  # ... these many of them (unambiguous up to 2**17 positions),
_FLAG_PAIR = 31  # ... and this one barely turns: position-free content
_OFFSET_SCORE = 640.0  # query size on the offset pairs: >= 50 logits of margin
_FLAG_SCORE = 40.0  # logit of a <tool_response> key against any other
_GATE = 20.0  # MLP gate gain: silu(+10) ~ 10 fires, silu(-10) ~ 0 does not
_LOGIT = 60.0  # logit of a fired NEXT slot; the fallback gets half
_MAX_CONTEXT = 8
_PIECES = re.compile(r"\n+| ?\w+| ?[^\w\s]+|\s+")


@dataclass
class ScriptedModel:
    """A scripted checkpoint and the exact tokens its greedy decoding emits.

    ``script_token_ids`` follow a prompt without a tool result,
    ``after_tool_token_ids`` one with a tool result in it (None when the
    model has a single script). Neither list includes the end token that ends
    each output, so a server reports ``completion_tokens == len(ids) + 1``.
    """

    path: Path
    script_token_ids: list[int]
    after_tool_token_ids: list[int] | None


@dataclass
class _Segment:
    chunks: list[str]
    marker: bool


def _segments(text: str, markers: tuple[str, ...]) -> list[_Segment]:
    """Markers alone; text cut into words with their space, punctuation, newlines."""
    parts = re.split("(" + "|".join(map(re.escape, markers)) + ")", text)
    return [
        _Segment([p], True) if p in markers else _Segment(_PIECES.findall(p), False)
        for p in parts
        if p
    ]


def _glue_repeats(segments: list[_Segment]) -> None:
    """Glue a repeated chunk to its neighbour until none repeats (but markers and
    lone chunks between them, like the newline between two tool calls)."""
    while True:
        counts = Counter(c for s in segments for c in s.chunks)
        for s in segments:
            if s.marker or len(s.chunks) < 2:
                continue
            i = next((i for i, c in enumerate(s.chunks) if counts[c] > 1), None)
            if i is not None:
                i = min(i, len(s.chunks) - 2)
                s.chunks[i : i + 2] = [s.chunks[i] + s.chunks[i + 1]]
                break
        else:
            return


def _split_end(script: str, family: Family) -> tuple[str, str]:
    """The script without its end token, and that token: eos, or another end token it ends with."""
    if family.eos in script:
        raise ValueError(f"a script must not contain the eos token {family.eos}")
    end = next((t for t in family.ends if script.endswith(t)), family.eos)
    body = script.removesuffix(end)
    if any(t in body for t in family.ends):
        raise ValueError(f"a script may hold an end token {family.ends} only at its end")
    return body, end


def _chunk_texts(script: str, markers: tuple[str, ...]) -> list[str]:
    if not script.isascii():
        raise ValueError("a script must be ASCII")
    segments = _segments(script, markers)
    _glue_repeats(segments)
    return [c for s in segments for c in s.chunks]


def _context_units(
    script: list[int], endings: list[list[int]], end: int
) -> dict[tuple[int, ...], int]:
    """Map the shortest unambiguous context before each script step to its next token.

    A context is the current token and the ones before it (into the prompt
    ending for the first steps). Each prompt ending (the last tokens of a
    rendered generation prompt) is a state too: one whose next token is the
    script's first, which no unit may contradict.
    """
    streams = [(ending + script + [end], len(ending)) for ending in endings]
    steps = [(s, p) for s, start in streams for p in range(start - 1, len(s) - 1)]
    pending = [(s, p) for s, start in streams for p in range(start, len(s) - 1)]
    units = {}
    for k in range(1, _MAX_CONTEXT + 1):
        nexts = defaultdict(set)
        for s, p in steps:
            nexts[tuple(s[p - k + 1 : p + 1])].add(s[p + 1])
        undecided = []
        for s, p in pending:
            context = tuple(s[p - k + 1 : p + 1])
            if len(nexts[context]) == 1:
                units[context] = s[p + 1]
            else:
                undecided.append((s, p))
        pending = undecided
        if not pending:
            return units
    raise ValueError(f"script too repetitive: {_MAX_CONTEXT} tokens of context do not decide it")


def _prompt_endings(out_dir: Path, tokenizer: Tokenizer, suffix: str) -> list[list[int]]:
    """The last tokens of the generation prompts the chat template renders,
    without and with ``suffix`` appended."""
    chat = AutoTokenizer.from_pretrained(out_dir)
    question = [{"role": "user", "content": "What is in this directory? Please look."}]
    # Mistral's templates insist on 9-character call ids.
    call = {"id": "call12345", "type": "function", "function": {"name": "ls", "arguments": {}}}
    tool_turn = [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call12345", "content": "a.txt"},
    ]
    tool = {
        "type": "function",
        "function": {"name": "ls", "description": "List files.", "parameters": {}},
    }
    endings = []
    for messages in (question, question + tool_turn):
        for tools in (None, [tool]):
            for thinking in (True, False):
                text = chat.apply_chat_template(
                    messages,
                    tools=tools,
                    add_generation_prompt=True,
                    enable_thinking=thinking,
                    tokenize=False,
                )
                for prompt in dict.fromkeys((text, text + suffix)):
                    ids = tokenizer.encode(prompt, add_special_tokens=False).ids[-_MAX_CONTEXT:]
                    if ids not in endings:
                        endings.append(ids)
    return endings


@dataclass
class _Layout:
    """Where each part of the one-hot residual stream lives (see above)."""

    slots: dict[int, int]  # token -> its place in a CUR or PREV block
    context: int  # K: CUR and K-1 PREV blocks
    outputs: list[int]  # tokens with a NEXT slot
    flagged: bool

    @property
    def width(self) -> int:
        return len(self.slots) + 1  # ... + OTHER

    def block(self, back: int) -> int:
        """Start of CUR (back=0) or PREV[back]."""
        return back * self.width

    @property
    def const(self) -> int:
        return self.context * self.width

    @property
    def noflag(self) -> int:
        return self.const + 1

    @property
    def flag(self) -> int:
        return self.const + 2

    def next(self, token: int) -> int:
        return self.const + 1 + 2 * self.flagged + self.outputs.index(token)

    @property
    def copy_heads(self) -> int:
        """Heads per PREV block: a head moves at most _HEAD_DIM values."""
        return -(-self.width // _HEAD_DIM)

    @property
    def heads(self) -> int:
        used = self.next(self.outputs[-1]) + 1
        needed = (self.context - 1) * self.copy_heads + self.flagged
        return max(needed, -(-used // _HEAD_DIM))

    def ones(self, *, after_attention: bool = False, fired: bool = False) -> int:
        """How many 1s the stream holds, which sets RMSNorm's scale."""
        n = 1 + 1 + self.flagged  # CUR, CONST, NOFLAG or FLAG
        return n + after_attention * (self.context - 1) + fired


def _rms_scale(layout: _Layout, **stage) -> float:
    """What RMSNorm (weight 1) multiplies a 0/1 stream by."""
    return math.sqrt(layout.heads * _HEAD_DIM / layout.ones(**stage))


def _embedding(layout: _Layout, vocab_size: int) -> np.ndarray:
    embed = np.zeros((vocab_size, layout.heads * _HEAD_DIM), np.float32)
    embed[:, layout.block(0) + len(layout.slots)] = 1.0  # OTHER
    for token, i in layout.slots.items():
        embed[token, layout.block(0) + len(layout.slots)] = 0.0
        embed[token, layout.block(0) + i] = 1.0
    embed[:, layout.const] = 1.0
    if layout.flagged:
        embed[:, layout.noflag] = 1.0
    return embed


def _attention(layout: _Layout, flag_token: int | None) -> dict[str, np.ndarray]:
    """Heads that copy CUR from j tokens back into PREV[j], and the flag head."""
    hidden = layout.heads * _HEAD_DIM
    q_bias, k_bias = np.zeros(hidden, np.float32), np.zeros(hidden, np.float32)
    k_w, v_w, o_w = (np.zeros((hidden, hidden), np.float32) for _ in range(3))
    unnorm = 1.0 / _rms_scale(layout)
    half = _HEAD_DIM // 2
    theta = _ROPE_BASE ** (-np.arange(_OFFSET_PAIRS) / half)
    heads = iter(range(0, hidden, _HEAD_DIM))
    for back in range(1, layout.context):
        for part in range(layout.copy_heads):
            h = next(heads)
            # After RoPE, q.k = sum_i |q_i| cos(phase_i + (n - m) theta_i) for
            # k = (1, 0): a phase of -back * theta_i peaks at n - m = back.
            q_bias[h : h + _OFFSET_PAIRS] = _OFFSET_SCORE * np.cos(back * theta)
            q_bias[h + half : h + half + _OFFSET_PAIRS] = -_OFFSET_SCORE * np.sin(back * theta)
            k_bias[h : h + _OFFSET_PAIRS] = 1.0
            first = part * _HEAD_DIM
            for d in range(min(_HEAD_DIM, layout.width - first)):
                v_w[h + d, layout.block(0) + first + d] = unnorm
                o_w[layout.block(back) + first + d, h + d] = 1.0
    if flag_token is not None:
        h = next(heads)
        src = layout.block(0) + layout.slots[flag_token]
        q_bias[h + _FLAG_PAIR] = _FLAG_SCORE * math.sqrt(_HEAD_DIM)
        k_w[h + _FLAG_PAIR, src] = unnorm
        v_w[h, src] = unnorm
        o_w[layout.flag, h] = 1.0
        o_w[layout.noflag, h] = -1.0
    p = "model.layers.0.self_attn."
    return {
        p + "q_proj.weight": np.zeros((hidden, hidden), np.float32),
        p + "q_proj.bias": q_bias,
        p + "k_proj.weight": k_w,
        p + "k_proj.bias": k_bias,
        p + "v_proj.weight": v_w,
        p + "v_proj.bias": np.zeros(hidden, np.float32),
        p + "o_proj.weight": o_w,
    }


def _mlp(layout: _Layout, units: list[dict[tuple[int, ...], int]]) -> dict[str, np.ndarray]:
    """One unit per context: silu(gain * (matches - (conditions - 1/2))) -> NEXT."""
    hidden = layout.heads * _HEAD_DIM
    rows = [(variant, c, t) for variant, table in enumerate(units) for c, t in table.items()]
    gate = np.zeros((max(len(rows), 1), hidden), np.float32)
    up, down = np.zeros_like(gate), np.zeros_like(gate.T)
    for row, (variant, context, token) in enumerate(rows):
        dims = [layout.block(back) + layout.slots[t] for back, t in enumerate(reversed(context))]
        if layout.flagged:
            dims.append(layout.flag if variant else layout.noflag)
        gate[row, dims] = _GATE
        gate[row, layout.const] = -_GATE * (len(dims) - 0.5)
        up[row, layout.const] = 1.0
        down[layout.next(token), row] = 1.0 / (0.5 * _GATE)
    p = "model.layers.0.mlp."
    return {p + "gate_proj.weight": gate, p + "up_proj.weight": up, p + "down_proj.weight": down}


def _lm_head(layout: _Layout, firsts: list[int], vocab_size: int) -> np.ndarray:
    """NEXT slots give _LOGIT; with none set, the script's first token gets half."""
    lm_head = np.zeros((vocab_size, layout.heads * _HEAD_DIM), np.float32)
    scale = _rms_scale(layout, after_attention=True, fired=True)
    for token in layout.outputs:
        lm_head[token, layout.next(token)] = _LOGIT / scale
    starts = [layout.noflag, layout.flag] if layout.flagged else [layout.const]
    for dim, first in zip(starts, firsts):
        lm_head[first, dim] = 0.5 * _LOGIT / scale
    return lm_head


def _scripted_weights(
    vocab_size: int,
    firsts: list[int],
    units: list[dict[tuple[int, ...], int]],
    flag_token: int | None,
) -> tuple[dict[str, np.ndarray], _Layout]:
    relevant = {t for table in units for context in table for t in context}
    relevant |= {flag_token} - {None}
    layout = _Layout(
        slots={t: i for i, t in enumerate(sorted(relevant))},
        context=max((len(c) for table in units for c in table), default=1),
        outputs=sorted({t for table in units for t in table.values()} | set(firsts)),
        flagged=flag_token is not None,
    )
    ones = np.ones(layout.heads * _HEAD_DIM, np.float32)
    weights = {
        "model.embed_tokens.weight": _embedding(layout, vocab_size),
        "model.layers.0.input_layernorm.weight": ones,
        "model.layers.0.post_attention_layernorm.weight": ones
        / _rms_scale(layout, after_attention=True),
        **_attention(layout, flag_token),
        **_mlp(layout, units),
        "model.norm.weight": ones,
        "lm_head.weight": _lm_head(layout, firsts, vocab_size),
    }
    return weights, layout


def build_scripted_model(
    out_dir,
    script: str,
    *,
    after_tool_result: str | None = None,
    template: str = "chatml",
    context_length: int = 32768,
    prompt_suffix: str = "",
) -> ScriptedModel:
    """Write a qwen2 checkpoint whose greedy output after any chat prompt is
    exactly ``script`` and then eos, or ``after_tool_result`` and eos when the
    prompt holds a tool result (the family's ``tool_result`` token anywhere).
    ``prompt_suffix`` is text a server may append to the prompt, such as a
    forced tool-call prefix, that the script then continues.

    A script may end with another of the family's end tokens instead, such as
    harmony's ``<|call|>``; that token then ends it in place of eos. Scripts
    are ASCII; mlxd passes their leading whitespace on. The scripted token leads
    every other by ~30 logits, so sampling at ordinary temperatures gives the
    same tokens.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    family = FAMILIES[template]
    texts = [script] if after_tool_result is None else [script, after_tool_result]
    texts, ends = zip(*(_split_end(t, family) for t in texts))
    # Chunks that are one token already keep it; the others become added tokens.
    base = _make_tokenizer(family, (), _VOCAB_SIZE)
    markers = tuple(t.content for t in base.get_added_tokens_decoder().values())
    chunks = [_chunk_texts(t, markers) for t in texts]
    known = {c: base.encode(c, add_special_tokens=False).ids for cs in chunks for c in cs}
    new = tuple(sorted(c for c, ids in known.items() if len(ids) != 1))
    tokenizer = build_tokenizer_files(out_dir, template, new, model_max_length=context_length)
    ids = [[tokenizer.token_to_id(c) if c in new else known[c][0] for c in cs] for cs in chunks]

    end_ids = _ids(tokenizer, ends)
    endings = _prompt_endings(out_dir, tokenizer, prompt_suffix)
    units = [_context_units(seq, endings, end) for seq, end in zip(ids, end_ids)]
    flag_token = None if after_tool_result is None else tokenizer.token_to_id(family.tool_result)
    firsts = [(seq + [end])[0] for seq, end in zip(ids, end_ids)]
    weights, layout = _scripted_weights(tokenizer.get_vocab_size(), firsts, units, flag_token)
    config = _qwen2_config(
        tokenizer,
        family,
        hidden_size=layout.heads * _HEAD_DIM,
        num_layers=1,
        intermediate_size=sum(len(table) for table in units) or 1,
        num_heads=layout.heads,
        num_kv_heads=layout.heads,
        context_length=context_length,
        rope_theta=_ROPE_BASE,
        tie_word_embeddings=False,
        dtype="float32",
    )
    weights = {k: mx.array(v) for k, v in weights.items()}
    _write_model(out_dir, config, weights, _ids(tokenizer, family.end_tokens))
    return ScriptedModel(out_dir, ids[0], ids[1] if after_tool_result is not None else None)


def add_identity_layers(model_dir, count: int) -> Path:
    """Append ``count`` layers that pass the residual stream through unchanged
    (their output projections are zero), so that a one-layer scripted model
    splits into a pipeline of layers over several ranks with the same output."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    weights = dict(mx.load(str(model_dir / "model.safetensors")))
    hidden, n = config["hidden_size"], config["num_hidden_layers"]
    head_dim = hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    inter = config["intermediate_size"]
    dtype = getattr(mx, config["torch_dtype"])
    for i in range(n, n + count):
        p = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj.weight": (q, hidden), "self_attn.q_proj.bias": (q,),
            "self_attn.k_proj.weight": (kv, hidden), "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.weight": (kv, hidden), "self_attn.v_proj.bias": (kv,),
            "self_attn.o_proj.weight": (hidden, q),
            "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
            "mlp.down_proj.weight": (hidden, inter),
        }  # fmt: skip
        weights |= {p + k: mx.zeros(shape, dtype=dtype) for k, shape in shapes.items()}
        weights[p + "input_layernorm.weight"] = mx.ones((hidden,), dtype=dtype)
        weights[p + "post_attention_layernorm.weight"] = mx.ones((hidden,), dtype=dtype)
    mx.save_safetensors(str(model_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    config["num_hidden_layers"] = config["max_window_layers"] = n + count
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    return model_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.testmodels", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    random_cmd = commands.add_parser(
        "random", help="random weights (~30M: --hidden-size 512 --layers 8 --heads 8)"
    )
    random_cmd.add_argument("out_dir")
    random_cmd.add_argument("--hidden-size", type=int, default=64)
    random_cmd.add_argument("--layers", type=int, default=2)
    random_cmd.add_argument("--heads", type=int, default=4)
    random_cmd.add_argument("--kv-heads", type=int)
    random_cmd.add_argument("--intermediate-size", type=int)
    random_cmd.add_argument("--context-length", type=int, default=4096)
    random_cmd.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    random_cmd.add_argument("--seed", type=int, default=0)
    scripted_cmd = commands.add_parser("scripted", help="greedy output is exactly --text")
    scripted_cmd.add_argument("out_dir")
    scripted_cmd.add_argument("--text", required=True)
    scripted_cmd.add_argument("--after-tool-result", help="the output after a tool result")
    scripted_cmd.add_argument("--context-length", type=int, default=32768)
    for cmd in (random_cmd, scripted_cmd):
        cmd.add_argument("--template", default="chatml", choices=sorted(FAMILIES))
    args = parser.parse_args(argv)
    if args.command == "random":
        path = build_random_model(
            args.out_dir,
            hidden_size=args.hidden_size,
            num_layers=args.layers,
            intermediate_size=args.intermediate_size,
            num_heads=args.heads,
            num_kv_heads=args.kv_heads,
            context_length=args.context_length,
            template=args.template,
            dtype=args.dtype,
            seed=args.seed,
        )
        print(path)
    else:
        built = build_scripted_model(
            args.out_dir,
            args.text,
            after_tool_result=args.after_tool_result,
            template=args.template,
            context_length=args.context_length,
        )
        print(json.dumps({**vars(built), "path": str(built.path)}))


if __name__ == "__main__":
    main()
