"""`mlxd claude`: the environment that points Claude Code at mlxd, and serve's `--alias` parsing.

Claude Code talks only Anthropic's Messages API, at `ANTHROPIC_BASE_URL`. It sends the
model named by `ANTHROPIC_MODEL` for the conversation, and a small model's name for side
requests (titles, summaries): `ANTHROPIC_DEFAULT_HAIKU_MODEL` (and the older
`ANTHROPIC_SMALL_FAST_MODEL`). Its `sonnet` / `opus` shortcuts read their own variables, so
those point at the main model too: every name Claude Code sends is one mlxd serves.
`CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1` keeps it from calling Anthropic's other services.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from mlxd import registry

from .models import DEFAULT_CONTEXT_LENGTH
from .opencode import served_models

AUTH_TOKEN = "mlxd"  # Claude Code needs one; mlxd checks it only when started with API keys


def parse_aliases(items: list[str], served: dict[str, str]) -> dict[str, str]:
    """`NAME=MODEL` flags -> {NAME: served name}; a MODEL given as a `--model` value
    (a directory, a registry name) becomes the name that model is served under."""
    aliases = {}
    for item in items:
        name, sep, model = item.partition("=")
        if not sep or not name.strip() or not model.strip():
            raise ValueError(f"--alias wants NAME=MODEL, got {item!r}")
        aliases[name.strip()] = served.get(model.strip(), model.strip())
    return aliases


def environment(base_url: str, model: str, small_model: str, context_length: int) -> dict[str, str]:
    return {
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_AUTH_TOKEN": AUTH_TOKEN,
        "ANTHROPIC_MODEL": model,
        "ANTHROPIC_DEFAULT_OPUS_MODEL": model,
        "ANTHROPIC_DEFAULT_SONNET_MODEL": model,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": small_model,
        "ANTHROPIC_SMALL_FAST_MODEL": small_model,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        # Claude Code assumes a window far larger than a local model's; it compacts near this size.
        "CLAUDE_CODE_AUTO_COMPACT_WINDOW": str(context_length),
    }


def serve_command(model: str, small_model: str, host: str, port: int) -> list[str]:
    """The `mlxd serve` that serves both models, both kept loaded."""
    command = ["mlxd", "serve", "--model", model]
    if small_model != model:
        command += ["--model", small_model, "--max-loaded-models", "2"]
    if host != "127.0.0.1":
        command += ["--host", host]
    if port != 8080:
        command += ["--port", str(port)]
    return command


def script(env: dict[str, str], serve: list[str]) -> str:
    """Shell lines for `eval "$(mlxd claude ...)"`; the serve command rides along as a comment."""
    lines = [
        "# Start the server (in another terminal):",
        f"#   {shlex.join(serve)}",
        "# Then run `claude` where these are set:",
    ]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    return "\n".join(lines)


def _default_model(names: list[str]) -> str:
    """The first downloaded (or named) model that calls tools: Claude Code is an agent."""
    models = served_models(names)
    agentic = [m.id for m in models if m.tool_call]
    if not agentic:
        raise registry.RegistryError(
            registry.NOT_FOUND, "no downloaded model calls tools; try `mlxd pull qwen2.5-coder:7b`"
        )
    return agentic[0]


def run(args: argparse.Namespace) -> int:
    try:
        model = args.model or _default_model([])
        small_model = args.small_model or model
        main, small = registry.resolve(model), registry.resolve(small_model)
    except registry.RegistryError as e:
        print(f"mlxd: {e}", file=sys.stderr)
        return 1
    base_url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    # Requests name a model as mlxd serves it: a local directory by its folder name.
    env = environment(base_url, main.served_name, small.served_name, main.context_length or DEFAULT_CONTEXT_LENGTH)
    print(script(env, serve_command(model, small_model, args.host, args.port)))
    return 0


def add_parser(subparsers) -> None:
    """Register `claude [--model M] [--small-model M] [--host] [--port]` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "claude", help="print the environment that starts Claude Code against mlxd (eval \"$(mlxd claude)\")"
    )
    parser.add_argument("--model", help="the model Claude Code works with (default: the first downloaded "
                                        "model that calls tools); a registry name or a local directory")
    parser.add_argument("--small-model", help="the model for Claude Code's side requests: titles, summaries "
                                              "(default: the same model)")
    parser.add_argument("--host", default="127.0.0.1", help="where mlxd serve listens (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080)
    parser.set_defaults(func=run)
