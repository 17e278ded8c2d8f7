"""`mlxd`: the command line, and the composition root that wires api/, server/ and registry/."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import metadata
from pathlib import Path

from . import doctor
from .blas import describe, setup_blas

log = logging.getLogger("mlxd")


def version() -> str:
    try:
        return metadata.version("mlxd")
    except metadata.PackageNotFoundError:
        return "0+checkout"


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app

    from .engine import Engine
    from .runtime import Runtime

    local = {}
    for model in args.model or []:
        path = Path(model).expanduser()
        if not (path / "config.json").is_file():
            print(f"mlxd: {model} is not a model directory (no config.json)", file=sys.stderr)
            return 2
        local[path.resolve().name] = path
    engine = Engine(
        max_loaded_models=args.max_loaded_models,
        keep_alive=args.keep_alive,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        prompt_cache_bytes=int(args.prompt_cache_gb * (1 << 30)),
        trust_remote_code=args.trust_remote_code,
    )
    engine.start()
    runtime = Runtime(engine, local)
    for name in list(local)[: args.max_loaded_models]:
        engine.preload(runtime.resolve(name))
    app = create_app(runtime, version=version())
    log.info("%s", describe(setup_blas()))
    log.info("mlxd %s serving on http://%s:%d/v1", version(), args.host, args.port)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(), timeout_graceful_shutdown=5)
    finally:
        engine.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxd", description="Local OpenAI-compatible LLM server on MLX.")
    parser.add_argument("--version", action="version", version=f"mlxd {version()}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the OpenAI-compatible server")
    serve.add_argument("--model", action="append",
                       help="a model to serve and load at start (a local model directory); repeatable")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--keep-alive", type=float, default=600.0,
                       help="seconds an idle model stays loaded; -1 keeps it forever (default: 600)")
    serve.add_argument("--max-loaded-models", type=int, default=1)
    serve.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    serve.add_argument("--max-queue", type=int, default=32, help="requests waiting beyond the batch before 429")
    serve.add_argument("--prompt-cache-gb", type=float, default=4.0, help="memory budget of the prefix cache")
    serve.add_argument("--trust-remote-code", action="store_true", help="allow custom tokenizer code from models")
    serve.set_defaults(func=_serve)
    doctor.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_blas()  # before anything imports mlx.core, or the faster BLAS cannot take over
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
