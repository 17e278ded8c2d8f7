"""`mlxd codex`: the config that points OpenAI's Codex CLI at mlxd, printed or merged into its config.toml.

Codex speaks the Responses API (`wire_api = "responses"`) to a provider from its
`[model_providers.<id>]` table and asks the key from the environment variable named
by `env_key`. It knows context windows only for OpenAI's models, so the served
model's window is written as `model_context_window`: without it Codex never compacts
a long session before mlxd answers context_length_exceeded.

Python reads TOML (tomllib) but does not write it; the edit here is textual and
narrow: three top-level keys and the `[model_providers.mlxd]` table are replaced,
every other line of the user's file is kept as it was, and the result is parsed
again before it replaces the file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
import tomllib
from pathlib import Path

from mlxd import registry

from .opencode import OpencodeModel, served_models

PROVIDER_ID = "mlxd"
ENV_KEY = "MLXD_API_KEY"
KEY_HINT = f"Codex sends the key in ${ENV_KEY}: export {ENV_KEY}=mlxd (any value unless the server requires a key)"
_HEADER = re.compile(r"^\s*\[")
_OUR_TABLE = re.compile(rf"^\s*\[\s*model_providers\s*\.\s*{PROVIDER_ID}\s*\]\s*(#.*)?$")


def config_path() -> Path:
    return Path(os.environ.get("CODEX_HOME") or Path.home() / ".codex") / "config.toml"


def settings(model: OpencodeModel, base_url: str) -> tuple[dict, dict]:
    """The top-level keys, and the provider table, that make Codex use `model` on mlxd."""
    top = {"model": model.id, "model_provider": PROVIDER_ID, "model_context_window": model.context_length}
    provider = {"name": "mlxd", "base_url": base_url, "wire_api": "responses", "env_key": ENV_KEY}
    return top, provider


def _value(value) -> str:
    return str(value) if isinstance(value, int) else json.dumps(value)  # JSON strings are TOML basic strings


def _lines(table: dict) -> list[str]:
    return [f"{key} = {_value(value)}" for key, value in table.items()]


def merged_toml(text: str, top: dict, provider: dict) -> str:
    """`text` with the top-level keys set and `[model_providers.mlxd]` replaced; the rest untouched."""
    lines = text.splitlines()
    first_table = next((i for i, line in enumerate(lines) if _HEADER.match(line)), len(lines))
    head, tables = lines[:first_table], lines[first_table:]
    while head and not head[-1].strip():
        head.pop()
    for key, value in top.items():
        line = f"{key} = {_value(value)}"
        at = next((i for i, old in enumerate(head) if re.match(rf"^\s*{key}\s*=", old)), None)
        if at is None:
            head.append(line)
        else:
            head[at] = line
    kept, skipping = [], False
    for line in tables:
        if _HEADER.match(line):
            skipping = bool(_OUR_TABLE.match(line))
        if not skipping:
            kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    block = [f"[model_providers.{PROVIDER_ID}]", *_lines(provider)]
    body = head + ([""] if head else []) + kept + ([""] if kept else []) + block
    merged = "\n".join(body) + "\n"
    parsed = tomllib.loads(merged)  # a file this edit cannot handle is refused, never written
    if any(parsed.get(k) != v for k, v in top.items()) or parsed["model_providers"][PROVIDER_ID] != provider:
        raise ValueError("the file defines these settings in a way this edit cannot replace")
    return merged


def write_config(path: Path, top: dict, provider: dict) -> Path | None:
    """Merge into the config at `path`; returns where the old file was backed up, if any."""
    text, backup = "", None
    if path.exists():
        text = path.read_text()
        tomllib.loads(text)  # not TOML: leave it to the user
    merged = merged_toml(text, top, provider)
    if path.exists():
        backup = path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}.bak")
        shutil.copy2(path, backup)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(merged)
    os.replace(staged, path)
    return backup


def chosen_model(name: str | None) -> OpencodeModel | None:
    """`name` (a registry name or a local directory); else the first downloaded model that
    calls tools, as Codex works through tools; else the first downloaded one."""
    models = served_models([name] if name else [])
    if name:
        served = registry.resolve(name).served_name
        return next(m for m in models if m.id == served)
    return next((m for m in models if m.tool_call), models[0] if models else None)


def run(args: argparse.Namespace) -> int:
    try:
        model = chosen_model(args.model)
    except registry.RegistryError as e:
        print(f"mlxd: {e}", file=sys.stderr)
        return 1
    if model is None:
        print("mlxd: no models downloaded yet; try `mlxd pull qwen2.5-coder`", file=sys.stderr)
        return 1
    top, provider = settings(model, f"http://{args.host}:{args.port}/v1")
    if not args.write:
        print(f"# {config_path()}: what --write merges in. {KEY_HINT}")
        print(merged_toml("", top, provider), end="")
        return 0
    path = config_path()
    try:
        backup = write_config(path, top, provider)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        print(f"mlxd: cannot merge into {path} ({e}); run `mlxd codex` and paste the settings", file=sys.stderr)
        return 1
    print(f"wrote provider '{PROVIDER_ID}' with model {model.id} ({model.context_length} tokens) to {path}")
    if backup:
        print(f"the previous config is in {backup}")
    print(KEY_HINT)
    return 0


def add_parser(subparsers) -> None:
    """Register `codex [--write] [--model M] [--host] [--port]` on the CLI's subparsers."""
    parser = subparsers.add_parser("codex", help="print (or --write) the Codex CLI config that uses mlxd")
    parser.add_argument("--write", action="store_true",
                        help="merge it into $CODEX_HOME/config.toml (default ~/.codex; the old file is backed up)")
    parser.add_argument("--model", metavar="M",
                        help="the model Codex uses: a registry name or a local model directory, as `mlxd serve "
                             "--model` serves it (default: the first downloaded model that calls tools)")
    parser.add_argument("--host", default="127.0.0.1", help="where mlxd serve listens (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080)
    parser.set_defaults(func=run)
