"""`mlxd`: the command line, and the composition root that wires api/, server/ and registry/."""

from __future__ import annotations

import argparse
import logging
import signal
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

from mlxd import registry
from mlxd.registry import starter
from mlxd.registry.home import mlxd_home

from . import access, claude, codex, doctor, launch, opencode, registry_cli, usage_cli
from .blas import describe, load_blas, setup_blas

log = logging.getLogger("mlxd")


def version() -> str:
    return doctor.package_version("mlxd") or "0+checkout"


@dataclass
class _ServedModel:
    name: str
    path: Path
    local: bool
    tool_format: str | None = None
    arg: str = ""  # the --model argument as given


def _served_model(name: str, pull: bool, pull_any: bool = False) -> _ServedModel:
    """A --model argument: a local directory, or a registry name that is (or gets) downloaded."""
    if name == registry.STARTER:
        return _ServedModel(name, starter.obtain_starter(), local=True)
    resolved = registry.resolve(name)
    if resolved.repo is None:
        return _ServedModel(resolved.served_name, resolved.path, local=True, arg=name)
    if resolved.path is None:
        if not (pull or pull_any):
            raise registry.RegistryError(registry.NOT_FOUND, f"{resolved.name} is not downloaded. Run: mlxd pull {name}")
        if resolved.family is None and not pull_any:
            raise registry.RegistryError(
                registry.NOT_FOUND,
                f"{resolved.name} is not downloaded, and --pull downloads only catalog models. "
                f"Run: mlxd pull {name} (or serve with --pull-any)",
            )
        resolved = registry.pull(name)
    tool_format = resolved.family.tool_format if resolved.family else None
    return _ServedModel(resolved.served_name, resolved.path, local=False, tool_format=tool_format, arg=name)


def trusted_models(served: list[_ServedModel], trust_all: bool, trust_for: list[str]) -> frozenset[str]:
    """The served names whose own code may run: every --model with --trust-remote-code, else
    those named by --trust-remote-code-for (by the --model argument or the served name)."""
    wanted = {n.strip() for n in trust_for}
    unknown = sorted(n for n in wanted if not any(n in (m.arg, m.name) for m in served))
    if unknown:
        raise ValueError(f"--trust-remote-code-for names no --model: {', '.join(unknown)}")
    return frozenset(m.name for m in served if trust_all or m.arg in wanted or m.name in wanted)


def _preload_problem(preload: list[_ServedModel], max_loaded: int) -> str | None:
    """Why the --model list cannot be served as given: a name twice, or more models than may be loaded."""
    names = [ref.name for ref in preload]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        return f"--model names {', '.join(twice)} more than once (models are served under their directory or registry name)"
    if len(preload) > max_loaded:
        return (f"{len(preload)} --model given but --max-loaded-models is {max_loaded}; "
                f"raise --max-loaded-models or load fewer models at start")
    return None


def _starter(args: argparse.Namespace) -> tuple[Path | None, bool]:
    """The starter's directory, and whether it is the default: it is (and is fetched once)
    when no --model is given and nothing else is downloaded; otherwise a cached copy is
    still served to requests that name it."""
    if args.no_starter:
        return None, False
    if args.model or starter.other_models_downloaded():
        return starter.cached_starter(), False
    log.info("no models downloaded; serving the starter %s; mlxd pull qwen2.5-coder for a coding model",
             registry.STARTER)
    try:
        return starter.obtain_starter(), True
    except registry.RegistryError as e:
        log.warning("the starter %s is unavailable: %s", registry.STARTER, e)
        return None, False


def _join_group(args: argparse.Namespace, preload: list[_ServedModel], trusted: frozenset[str]):
    """--distributed: join the mlx.launch group and load this rank's shard. Returns (member, exit
    status): rank 0 goes on to serve HTTP with the member; the others follow rank 0 here until it stops."""
    from . import distributed

    if len(preload) != 1:
        print("mlxd: --distributed serves exactly one --model, the same on every rank", file=sys.stderr)
        return None, 2
    try:
        member = distributed.join(preload[0].name, preload[0].path, shard=args.shard,
                                  timeout=args.distributed_timeout, version=version(),
                                  trust_remote_code=preload[0].name in trusted)
    except distributed.GroupError as e:
        print(f"mlxd: {e}", file=sys.stderr)
        return None, 2
    log.info("%s", member.describe())
    if member.rank == 0:
        return member, 0
    return None, distributed.follow(member)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from mlxd.api.app import create_app
    from mlxd.api.security import policy_for

    from .engine import Engine
    from .requests import ModelRef
    from .ledger import Ledger
    from .runtime import Runtime

    try:
        preload = [_served_model(name, args.pull, args.pull_any) for name in args.model or []]
        trusted = trusted_models(preload, args.trust_remote_code, args.trust_remote_code_for or [])
        keys = access.load_keys(args.api_key or [], args.api_key_file or [])
    except (registry.RegistryError, ValueError, OSError) as e:
        print(f"mlxd: {e}", file=sys.stderr)
        return 2
    problem = _preload_problem(preload, args.max_loaded_models)
    if problem:
        print(f"mlxd: {problem}", file=sys.stderr)
        return 2
    policy = policy_for(args.host, keys, args.allowed_host or [], args.cors_origin or [])
    local = {ref.name: ref.path for ref in preload if ref.local}
    starter_path, starter_listed = _starter(args) if not args.distributed else (None, False)
    try:
        aliases = claude.parse_aliases(args.alias or [], {arg: ref.name for arg, ref in zip(args.model or [], preload)})
    except ValueError as e:
        print(f"mlxd: {e}", file=sys.stderr)
        return 2
    log.info("%s", describe(setup_blas()))  # timed before the engine starts loading models beside it
    # distributed: every rank loads its shard of the one --model; only rank 0 goes on to serve HTTP
    member = None
    if args.distributed:
        member, status = _join_group(args, preload, trusted)
        if member is None:
            return status
        # its one model stays loaded; prefix caches stay in RAM (a disk tier's contents
        # depend on its writer's timing, and the ranks' must match)
        args.max_loaded_models, args.keep_alive, args.prompt_cache_disk_gb = 1, -1, 0
    try:
        ledger = Ledger(retention_days=args.usage_retention_days)
    except (OSError, sqlite3.Error) as e:
        print(f"mlxd: cannot open the usage ledger: {e} (MLXD_HOME chooses where it lives)", file=sys.stderr)
        return 2
    log.info("usage ledger: %s", ledger.path)
    engine = Engine(
        max_loaded_models=args.max_loaded_models,
        keep_alive=args.keep_alive,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        prompt_cache_bytes=int(args.prompt_cache_gb * (1 << 30)),
        prompt_cache_dir=args.prompt_cache_dir or mlxd_home() / "kv",
        prompt_cache_disk_bytes=int(args.prompt_cache_disk_gb * (1 << 30)),
        queue_timeout=args.queue_timeout,
        client_timeout=args.client_timeout,
        on_request_end=ledger.record,
        **(member.engine_hooks() if member else {}),
    )
    engine.start()
    if member:
        member.serving(engine.abandon)
    runtime = Runtime(engine, local, pull_on_demand=args.pull, pull_any=args.pull_any, trusted=trusted,
                      starter=starter_path, starter_listed=starter_listed, aliases=aliases)
    for ref in preload:
        engine.preload(ModelRef(ref.name, ref.path, ref.tool_format, trust_remote_code=ref.name in trusted))
    if starter_listed:  # no --model: the starter is what this server serves
        engine.preload(ModelRef(registry.STARTER, starter_path))
    app = create_app(runtime, version=version(), ledger=ledger, policy=policy)
    ledger.start()  # after /metrics read what the ledger held, so its counters miss no row
    log.info("mlxd %s serving on http://%s:%d/v1", version(), args.host, args.port)
    if keys:
        log.info("API keys required (labels: %s); GET /health needs none", ", ".join(k.label for k in keys))
    if warning := access.exposure_warning(args.host, args.port, keys):
        log.warning("%s", warning)
    # uvicorn re-raises the SIGTERM it shut down on; as an exit, so the engine still
    # stops below and writes its prefix caches to disk.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if member:
        member.on_terminate()
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                                          timeout_graceful_shutdown=5))
    if member:
        server.handle_exit = member.held_sigterm(server.handle_exit)
    try:
        server.run()
    finally:
        engine.stop()
        if member:
            member.stop()
        ledger.close()  # after the engine: the last requests' rows are stored too
    return 0


_LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxd", description="Local OpenAI-compatible LLM server on MLX.")
    parser.add_argument("--version", action="version", version=f"mlxd {version()}")
    parser.add_argument("--log-level", default="INFO", choices=_LOG_LEVELS)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the OpenAI-compatible server")
    serve.add_argument("--model", action="append",
                       help="a model to load at start: a registry name (qwen2.5-coder:7b), a repo id or a "
                            "local model directory; repeatable, up to --max-loaded-models")
    serve.add_argument("--pull", action="store_true",
                       help="download models that are not present, for --model and for requests (off by default)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--keep-alive", type=float, default=600.0,
                       help="seconds an idle model stays loaded; -1 keeps it forever (default: 600)")
    serve.add_argument("--max-loaded-models", type=int, default=1)
    serve.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    serve.add_argument("--max-queue", type=int, default=32, help="requests waiting beyond the batch before 429")
    serve.add_argument("--prompt-cache-gb", type=float, default=4.0,
                       help="RAM budget of the saved prefix caches (default: 4); the live batch is bounded "
                            "by --max-batch-size and the context window")
    # prefix cache: disk tier
    serve.add_argument("--prompt-cache-dir", type=Path, default=None,
                       help="where prefix caches evicted from RAM are kept across restarts "
                            "(default: $MLXD_HOME/kv)")
    serve.add_argument("--prompt-cache-disk-gb", type=float, default=32.0,
                       help="disk budget of the prefix cache (default: 32); 0 disables the disk tier")
    serve.add_argument("--trust-remote-code", action="store_true",
                       help="let every --model run its own tokenizer code (never models a request names)")
    # security
    serve.add_argument("--trust-remote-code-for", action="append", metavar="NAME",
                       help="let this --model (its argument or served name) run its own tokenizer code; repeatable")
    serve.add_argument("--pull-any", action="store_true",
                       help="like --pull, for any hub repo (--pull downloads only catalog models)")
    serve.add_argument("--api-key", action="append", metavar="[LABEL:]KEY",
                       help="require this key (Authorization: Bearer KEY or x-api-key: KEY) on every endpoint "
                            f"but GET /health; repeatable; also {access.ENV_VAR} (comma-separated)")
    serve.add_argument("--api-key-file", action="append", metavar="FILE",
                       help="read keys from FILE, one [LABEL:]KEY a line (keeps them out of `ps`)")
    serve.add_argument("--allowed-host", action="append", metavar="NAME",
                       help="answer requests addressed to NAME too (by default only localhost names on a "
                            "loopback bind); repeatable")
    serve.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                       help="allow browser requests from ORIGIN (e.g. http://localhost:3000); repeatable")
    # starter
    serve.add_argument("--no-starter", action="store_true",
                       help=f"do not serve the starter model {registry.STARTER} when nothing is downloaded")
    # model aliases (Claude Code's fixed model names)
    serve.add_argument("--alias", action="append", metavar="NAME=MODEL",
                       help="answer requests for NAME with MODEL (a --model value or a served name), "
                            "e.g. claude-haiku-4-5=qwen2.5-coder:1.5b; repeatable")
    # usage ledger
    serve.add_argument("--usage-retention-days", type=float, default=365,
                       help="days the usage ledger keeps each request's row (default: 365)")
    # reliability
    serve.add_argument("--queue-timeout", type=float, default=600.0,
                       help="seconds a request may wait to start before it gets 503 (default: 600)")
    serve.add_argument("--client-timeout", type=float, default=60.0,
                       help="seconds a streaming client may stop reading before it is dropped (default: 60)")
    serve.add_argument("--log-level", default=argparse.SUPPRESS, choices=_LOG_LEVELS,
                       help="also accepted after the subcommand")
    # distributed (several machines; see server/distributed.py)
    serve.add_argument("--distributed", action="store_true",
                       help="serve the --model as one rank of an mlx.launch group (mlxd launch adds this)")
    serve.add_argument("--shard", choices=["tensor", "pipeline"],
                       help="how the model splits over the ranks (default: tensor parallel where the model "
                            "has it, else a pipeline of layers)")
    serve.add_argument("--distributed-timeout", type=float, default=60.0,
                       help="seconds without an answer from a rank before the group counts as broken: "
                            "requests get 503 and the process exits 1 (default: 60)")
    serve.set_defaults(func=_serve)
    registry_cli.add_parsers(sub)
    doctor.add_parser(sub)
    opencode.add_parser(sub)
    codex.add_parser(sub)
    claude.add_parser(sub)
    usage_cli.add_parser(sub)
    launch.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    load_blas()  # before anything imports mlx.core, or the faster BLAS cannot take over
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
