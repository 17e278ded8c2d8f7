"""`mlxd opencode`: the provider block that points opencode at mlxd, printed or merged into its config.

opencode never asks a server for its models (it does not call /v1/models), so each
model is listed here with its context window: without `limit.context` opencode never
compacts a conversation, and a long session ends in mlxd's context_length_exceeded.
opencode asks for `limit.output` tokens per answer (its `max_tokens`) and compacts once
less than that is left free, so the output limit is a quarter of the window, at most
opencode's own cap of 32,000.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mlxd import registry

from .models import DEFAULT_CONTEXT_LENGTH

PROVIDER_ID = "mlxd"
SCHEMA = "https://opencode.ai/config.json"
MAX_OUTPUT_TOKENS = 32000  # opencode's OUTPUT_TOKEN_MAX: it never asks for more


@dataclass(frozen=True)
class OpencodeModel:
    """A model as opencode sees it: the id requests carry, its window, whether it calls tools."""

    id: str
    context_length: int
    tool_call: bool


def output_limit(context_length: int) -> int:
    return min(context_length // 4, MAX_OUTPUT_TOKENS)


def provider_block(models: list[OpencodeModel], base_url: str) -> dict:
    """opencode's `provider.mlxd` entry: the AI SDK's OpenAI-compatible client aimed at mlxd."""
    return {
        "npm": "@ai-sdk/openai-compatible",
        "name": "mlxd",
        "options": {"baseURL": base_url},
        "models": {
            m.id: {
                "name": m.id,
                "tool_call": m.tool_call,
                "limit": {"context": m.context_length, "output": output_limit(m.context_length)},
            }
            for m in models
        },
    }


def merged_config(config: dict, block: dict) -> dict:
    """The user's config with `provider.mlxd` replaced; everything else is kept.

    The default `model` is set only when the user has none, to the first model that calls tools.
    """
    merged = {**config, "provider": {**config.get("provider", {}), PROVIDER_ID: block}}
    merged.setdefault("$schema", SCHEMA)
    agentic = [model_id for model_id, entry in block["models"].items() if entry["tool_call"]]
    if "model" not in merged and agentic:
        merged["model"] = f"{PROVIDER_ID}/{agentic[0]}"
    return merged


def config_path() -> Path:
    """opencode's global config file; it uses the XDG layout on macOS too."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "opencode" / "opencode.json"


def _calls_tools(path: Path, family: registry.Family | None) -> bool:
    """The catalog's word for its families; otherwise what the server itself detects from the tokenizer."""
    if family is not None:
        return family.calls_tools
    from mlx_lm.utils import load_tokenizer

    from .output import output_format_for

    return output_format_for(load_tokenizer(path)).name is not None


def _model(resolved: registry.ResolvedModel) -> OpencodeModel:
    """A registry model by its name, a local directory by the name `serve --model DIR` gives it."""
    if resolved.path is None:
        raise registry.RegistryError(
            registry.NOT_FOUND, f"{resolved.name} is not downloaded. Run: mlxd pull {resolved.name}"
        )
    return OpencodeModel(
        id=resolved.served_name,
        context_length=resolved.context_length or DEFAULT_CONTEXT_LENGTH,
        tool_call=_calls_tools(resolved.path, resolved.family),
    )


def served_models(names: list[str]) -> list[OpencodeModel]:
    """The downloaded models, then `names` (local directories or registry names), each id once."""
    resolved = [registry.resolve(m.name) for m in registry.list_models()]
    resolved += [registry.resolve(name) for name in names]
    models: dict[str, OpencodeModel] = {}
    for r in resolved:
        model = _model(r)
        models.setdefault(model.id, model)
    return list(models.values())


def write_config(path: Path, block: dict) -> Path | None:
    """Merge `block` into the config at `path`; returns where the old file was backed up, if any."""
    config, backup = {}, None
    if path.exists():
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        backup = path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}.bak")
        shutil.copy2(path, backup)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(json.dumps(merged_config(config, block), indent=2) + "\n")
    os.replace(staged, path)
    return backup


def run(args: argparse.Namespace) -> int:
    try:
        models = served_models(args.model or [])
    except registry.RegistryError as e:
        print(f"mlxd: {e}", file=sys.stderr)
        return 1
    if not models:
        print("mlxd: no models downloaded yet; try `mlxd pull qwen2.5-coder`", file=sys.stderr)
        return 1
    block = provider_block(models, f"http://{args.host}:{args.port}/v1")
    if not args.write:
        print(json.dumps(merged_config({}, block), indent=2))  # what --write gives a new user
        return 0
    path = config_path()
    try:
        backup = write_config(path, block)
    except ValueError as e:  # JSON with comments, or not JSON at all: leave it to the user
        print(f"mlxd: cannot merge into {path} ({e}); run `mlxd opencode` and paste the block", file=sys.stderr)
        return 1
    print(f"wrote provider '{PROVIDER_ID}' with {len(models)} models to {path}")
    if backup:
        print(f"the previous config is in {backup}")
    return 0


def add_parser(subparsers) -> None:
    """Register `opencode [--write] [--model DIR] [--host] [--port]` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "opencode", help="print (or --write) opencode's provider config for the downloaded models"
    )
    parser.add_argument(
        "--write", action="store_true",
        help="merge it into ~/.config/opencode/opencode.json (the old file is backed up)",
    )
    parser.add_argument(
        "--model", action="append", metavar="DIR",
        help="also list a local model directory (or a registry name), as `mlxd serve --model` serves it; repeatable",
    )
    parser.add_argument("--host", default="127.0.0.1", help="where mlxd serve listens (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080)
    parser.set_defaults(func=run)
