"""GGUF -> MLX model directory, for llama-architecture files (SmolLM2, the starter model).

MLX reads GGUF itself (`mx.load(path, return_metadata=True)`): Q4_0, Q4_1 and Q8_0 tensors
arrive as MLX's own affine quantization (`weight`, `scales`, `biases`, group size 32), other
types dequantized. So the conversion is renaming tensors to mlx-lm's llama names, writing
config.json from the metadata (`rope_traditional: true`, since llama.cpp's converter
permutes the Q/K rows into the interleaved RoPE layout), and rebuilding the byte-level BPE
tokenizer and chat template that the GGUF carries as metadata.

MLX is imported inside the functions: the registry is used by commands that never load a
model, and MLX here is only a file-format reader and writer, never a runtime.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TENSOR = re.compile(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|scales|biases)")
_GROUP_SIZE = 32  # every GGUF block type MLX keeps quantized (Q4_0, Q4_1, Q8_0)

# llama.cpp's pre-tokenizer names -> the same splitting as a `tokenizers` pre_tokenizer.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_PRE_TOKENIZERS = {
    "gpt2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str | None = None) -> Path:
    """Write an mlx-lm model directory for a llama GGUF file; returns `out_dir`.

    `dtype` None keeps the file's layout (quantized stays quantized); "float32",
    "float16" or "bfloat16" dequantizes every tensor to that type (float32 is the fast
    path on a Linux CPU with OpenBLAS). The directory appears whole or not at all.
    """
    import mlx.core as mx

    weights, meta = mx.load(str(gguf_path), return_metadata=True)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: architecture {arch!r} is not supported (only llama)")
    weights = {_mlx_name(name): w for name, w in weights.items()}
    if dtype is not None:
        weights = _dequantized(weights, getattr(mx, dtype))
    config = _config(meta, weights)

    out_dir = Path(out_dir)
    partial = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    mx.save_safetensors(str(partial / "model.safetensors"), weights, metadata={"format": "mlx"})
    _write_json(partial / "config.json", config)
    _write_json(partial / "generation_config.json", {k: config[k] for k in ("bos_token_id", "eos_token_id")})
    _write_json(partial / "tokenizer.json", _tokenizer(meta))
    _write_json(partial / "tokenizer_config.json", _tokenizer_config(meta, config))
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return out_dir


def _mlx_name(name: str) -> str:
    match = _TENSOR.fullmatch(name)
    layer, base, suffix = match.groups() if match else (None, None, None)
    names = _GLOBAL_NAMES if layer is None else _LAYER_NAMES
    if base not in names:
        raise ValueError(f"unsupported GGUF tensor {name!r}")
    prefix = "" if layer is None else f"model.layers.{layer}."
    return f"{prefix}{names[base]}.{suffix}"


def _dequantized(weights: dict, dtype) -> dict:
    import mlx.core as mx

    out = {}
    for name, w in weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        stem = name.removesuffix(".weight")
        if f"{stem}.scales" in weights:
            bits = _bits(w, weights[f"{stem}.scales"])
            w = mx.dequantize(w, weights[f"{stem}.scales"], weights[f"{stem}.biases"], _GROUP_SIZE, bits)
        out[name] = w.astype(dtype)
    return out


def _bits(weight, scales) -> int:
    """Bits per value of a packed uint32 weight, from its width against its scales'."""
    return weight.shape[-1] * 32 // (scales.shape[-1] * _GROUP_SIZE)


def _quantization(weights: dict) -> dict | None:
    """mlx-lm's `quantization` entry: the common bits, and per-layer entries for the others."""
    bits = {
        name.removesuffix(".scales"): _bits(weights[name.replace(".scales", ".weight")], s)
        for name, s in weights.items()
        if name.endswith(".scales")
    }
    if not bits:
        return None
    common = Counter(bits.values()).most_common(1)[0][0]
    quantization = {"group_size": _GROUP_SIZE, "bits": common}
    quantization.update({path: {"group_size": _GROUP_SIZE, "bits": b} for path, b in bits.items() if b != common})
    return quantization


def _config(meta: dict, weights: dict) -> dict:
    def value(key: str, default=None):
        v = meta.get(f"llama.{key}")
        return default if v is None else v.item()

    heads = value("attention.head_count")
    hidden = value("embedding_length")
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": value("block_count"),
        "intermediate_size": value("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": value("attention.head_count_kv", heads),
        "head_dim": value("attention.key_length", hidden // heads),
        "rms_norm_eps": float(f"{value('attention.layer_norm_rms_epsilon'):g}"),
        "rope_theta": float(f"{value('rope.freq_base', 10000.0):g}"),
        "rope_traditional": True,
        "max_position_embeddings": value("context_length"),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"].item(),
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"].item(),
    }
    if quantization := _quantization(weights):
        config["quantization"] = quantization
    return config


def _tokenizer(meta: dict) -> dict:
    """A `tokenizers` tokenizer.json for a GGUF byte-level BPE vocabulary ("gpt2" model)."""
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt2")
    if kind != "gpt2" or pre not in _PRE_TOKENIZERS:
        raise ValueError(f"unsupported GGUF tokenizer {kind!r} (pre-tokenizer {pre!r})")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta["tokenizer.ggml.token_type"].tolist()
    added = [
        {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": types[i] == _CONTROL}
        for i in range(len(tokens))
        if types[i] in (_CONTROL, _USER_DEFINED)
    ]
    post = None
    if _flag(meta, "tokenizer.ggml.add_bos_token"):
        bos_id = meta["tokenizer.ggml.bos_token_id"].item()
        bos = tokens[bos_id]
        post = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": _PRE_TOKENIZERS[pre],
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {token: i for i, token in enumerate(tokens)},
            "merges": list(meta["tokenizer.ggml.merges"]),
        },
    }


def _tokenizer_config(meta: dict, config: dict) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        v = meta.get(f"tokenizer.ggml.{key}")
        return None if v is None else tokens[v.item()]

    special = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
               "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": meta.get("tokenizer.chat_template"),
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        **{k: v for k, v in special.items() if v is not None},
    }


def _flag(meta: dict, key: str) -> bool:
    v = meta.get(key)
    return bool(v.item()) if v is not None else False


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
