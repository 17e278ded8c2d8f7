"""`mlxd pull | ls | rm | ps | catalog`: the registry's commands, printed as plain tables.

`add_parsers` registers them on the main CLI's subparsers; each sets `func(args) -> int`.
A RegistryError becomes its message on stderr and exit status 1, never a traceback.
"""

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable

from mlxd import registry

from . import access


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    pull = subparsers.add_parser(
        "pull", help="download a model (e.g. qwen2.5-coder:7b) into the HF cache"
    )
    pull.add_argument("name", help="registry name, org/repo id, or local directory")
    pull.set_defaults(func=_reporting(_pull))

    ls = subparsers.add_parser("ls", help="list downloaded models")
    ls.set_defaults(func=_reporting(_ls))

    rm = subparsers.add_parser("rm", help="delete a downloaded model")
    rm.add_argument("name")
    rm.set_defaults(func=_reporting(_rm))

    catalog = subparsers.add_parser(
        "catalog", help="list the model families that can be pulled by name"
    )
    catalog.add_argument(
        "family", nargs="?", help="show one family's sizes, quantizations and repos"
    )
    catalog.set_defaults(func=_reporting(_catalog))

    ps = subparsers.add_parser("ps", help="list the models a running server has loaded")
    ps.add_argument("--host", default="127.0.0.1")
    ps.add_argument("--port", type=int, default=8080)
    ps.set_defaults(func=_reporting(_ps))


def _reporting(
    command: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except registry.RegistryError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return run


def _pull(args: argparse.Namespace) -> int:
    model = registry.pull(args.name, progress=True)
    print(f"{model.name} is ready: {model.path}")
    return 0


def _ls(args: argparse.Namespace) -> int:
    models = registry.list_models()
    if not models:
        print(
            "no models downloaded yet; try `mlxd pull qwen2.5-coder`"
            " (`mlxd catalog` lists more)"
        )
        return 0
    rows = [
        [m.name, m.repo, human_bytes(m.size_bytes), _tokens(m.context_length)]
        for m in models
    ]
    _table(["NAME", "REPO", "SIZE", "CONTEXT"], rows)
    return 0


def _rm(args: argparse.Namespace) -> int:
    freed = registry.remove(args.name)
    print(f"removed {args.name} ({human_bytes(freed)} freed)")
    return 0


def _catalog(args: argparse.Namespace) -> int:
    if args.family is None:
        rows = [
            [
                f.name,
                ", ".join(dict.fromkeys(v.size for v in f.variants)),
                f.tag(f.default),
                _tokens(f.context_length),
                f.tool_format or "-",
                f.reasoning or "-",
                f.description,
            ]
            for f in registry.families()
        ]
        _table(
            [
                "FAMILY",
                "SIZES",
                "DEFAULT",
                "CONTEXT",
                "TOOLS",
                "REASONING",
                "DESCRIPTION",
            ],
            rows,
        )
        return 0
    family = registry.CATALOG.get(args.family.lower())
    if family is None:
        raise registry.RegistryError(
            registry.NOT_FOUND, f"no family '{args.family}' (see `mlxd catalog`)"
        )
    _table(["NAME", "REPO"], [[family.tag(v), v.repo] for v in family.variants])
    return 0


def _ps(args: argparse.Namespace) -> int:
    url = f"http://{args.host}:{args.port}/v1/models"
    keys = access.env_keys()  # a server with keys needs one; the first of MLXD_API_KEY
    headers = {"Authorization": f"Bearer {keys[0].secret.decode()}"} if keys else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as response:
            entries = json.load(response)["data"]
    except urllib.error.HTTPError as exc:
        hint = f"; set {access.ENV_VAR} to one of its keys" if exc.code == 401 else ""
        print(f"error: the server at {url} answered HTTP {exc.code}{hint}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError) as exc:
        print(
            f"error: no mlxd server answered at {url} ({exc}); is `mlxd serve` running?",
            file=sys.stderr,
        )
        return 1
    loaded = [e for e in entries if e.get("loaded")]
    if not loaded:
        print("no models loaded")
        return 0
    rows = [
        [e["id"], human_bytes(e.get("memory_bytes")), _seconds(e.get("idle_seconds"))]
        for e in loaded
    ]
    _table(["NAME", "MEMORY", "IDLE"], rows)
    return 0


def _table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    for row in [headers, *rows]:
        print(
            "  ".join(
                str(cell).ljust(width) for cell, width in zip(row, widths)
            ).rstrip()
        )


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _tokens(n: int | None) -> str:
    return "-" if n is None else f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return (
        f"{s}s"
        if s < 60
        else f"{s // 60}m{s % 60:02d}s"
        if s < 3600
        else f"{s // 3600}h{s % 3600 // 60:02d}m"
    )
