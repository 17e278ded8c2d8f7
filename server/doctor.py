"""`mlxd doctor`: what mlxd runs on, in one screen.

Everything a bug report needs and a user asks first: versions, the MLX
device, the BLAS really in effect, where models are cached, which are there,
and whether the hub answers.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from mlxd.server import access
from mlxd.server.blas import describe, setup_blas
from mlxd.server.registry_cli import human_bytes

HUB_TIMEOUT_S = 3.0


def package_version(name: str) -> Optional[str]:
    """Installed version, or None (mlxd itself runs from a checkout without being installed)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def mlx_device() -> str:
    """The default MLX device in words: Metal GPU, CUDA GPU or CPU, with its name."""
    import mlx.core as mx

    name = mx.device_info().get("device_name", "")
    if mx.default_device().type == mx.gpu:
        kind = "Metal GPU" if mx.metal.is_available() else "CUDA GPU"
    else:
        kind = "CPU"
    return f"{kind} ({name})" if name else kind


def free_bytes(path: str) -> int:
    """Free disk space where `path` is or would be created."""
    existing = Path(path)
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free


def _looks_like_mlx(repo: Any) -> bool:
    """An MLX repo by name (mlx-community/..., ...-MLX-4bit) or by mlx-lm's quantization key."""
    if "mlx" in repo.repo_id.lower():
        return True
    for revision in repo.revisions:
        for file in revision.files:
            if file.file_name == "config.json":
                try:
                    return "quantization" in json.loads(file.file_path.read_text())
                except (OSError, ValueError):
                    return False
    return False


def cached_models(cache_dir: str) -> list[dict[str, Any]]:
    """MLX models present in the Hugging Face cache, largest first."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        repos = scan_cache_dir(cache_dir).repos
    except CacheNotFound:
        return []
    models = [r for r in repos if r.repo_type == "model" and _looks_like_mlx(r)]
    models.sort(key=lambda r: (-r.size_on_disk, r.repo_id))
    return [{"repo_id": r.repo_id, "size_bytes": r.size_on_disk} for r in models]


def hub_status(endpoint: str, timeout: float = HUB_TIMEOUT_S) -> dict[str, Any]:
    """One HEAD request to the hub through huggingface_hub's own HTTP session.

    Using its session means proxies and certificates are the ones downloads use.
    """
    from huggingface_hub import get_session

    try:
        status = get_session().head(endpoint, timeout=timeout).status_code
    except Exception as e:  # any failure to get an answer means "not reachable"
        return {"endpoint": endpoint, "reachable": False, "status": None, "error": str(e) or type(e).__name__}
    return {"endpoint": endpoint, "reachable": status < 500, "status": status, "error": None}


def access_status(host: str) -> dict[str, Any]:
    """Who a `serve --host HOST` reaches, and the keys MLXD_API_KEY sets (labels only)."""
    try:
        keys, error = access.env_keys(), None
    except ValueError as e:
        keys, error = [], str(e)
    return {"bind": host, "reach": access.describe_bind(host), "env_key_labels": [k.label for k in keys],
            "env_key_error": error, "warning": access.exposure_warning(host, None, keys)}


def collect(host: str = "127.0.0.1") -> dict[str, Any]:
    """Everything doctor reports, as JSON-ready data."""
    blas = setup_blas()  # first: it must run before mlx.core is imported
    from huggingface_hub import constants

    cache_dir = constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE:
        hub = {"endpoint": constants.ENDPOINT, "reachable": False, "status": None, "error": "HF_HUB_OFFLINE is set"}
    else:
        hub = hub_status(constants.ENDPOINT)
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: package_version(name) for name in ("mlx", "mlx-lm", "mlxd")},
        "device": mlx_device(),
        "blas": {**asdict(blas), "summary": describe(blas)},
        "hf_cache": {"path": cache_dir, "free_bytes": free_bytes(cache_dir)},
        "models": cached_models(cache_dir),
        "hub": hub,
        "access": access_status(host),
    }


def format_table(data: dict[str, Any]) -> str:
    """The short human-readable form of `collect()`."""
    versions = data["versions"]
    hub = data["hub"]
    if hub["reachable"]:
        hub_line = f"reachable ({hub['endpoint']}, HTTP {hub['status']})"
    else:
        hub_line = f"NOT reachable ({hub['endpoint']}: {hub['error'] or 'HTTP ' + str(hub['status'])})"
    rows = [
        ("platform", data["platform"]),
        ("python", data["python"]),
        ("mlx", versions["mlx"] or "not installed"),
        ("mlx-lm", versions["mlx-lm"] or "not installed"),
        ("mlxd", versions["mlxd"] or "not installed (running from a checkout)"),
        ("device", data["device"]),
        ("blas", data["blas"]["summary"].removeprefix("BLAS: ")),
        ("hf cache", f"{data['hf_cache']['path']} ({human_bytes(data['hf_cache']['free_bytes'])} free)"),
        ("models", f"{len(data['models'])} MLX model(s) in the cache"),
        *(("", f"{m['repo_id']}  {human_bytes(m['size_bytes'])}") for m in data["models"]),
        ("hub", hub_line),
        ("bind", data["access"]["reach"]),
        ("api keys", _keys_line(data["access"])),
        *_group_rows(data.get("distributed")),
    ]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def _keys_line(status: dict[str, Any]) -> str:
    if status["env_key_error"]:
        return f"{access.ENV_VAR} is invalid: {status['env_key_error']}"
    labels = status["env_key_labels"]
    said = f"{len(labels)} in {access.ENV_VAR} ({', '.join(labels)})" if labels else f"none in {access.ENV_VAR}"
    warning = f"\nWARNING: unless serve gets --api-key: {status['warning']}" if status["warning"] else ""
    return f"{said}; serve --api-key / --api-key-file add more{warning}"


def _group_rows(group: Optional[dict]) -> list[tuple[str, str]]:
    """The distributed group, when doctor runs under mlx.launch (`mlxd launch -- doctor`)."""
    if group is None:
        return []
    if "error" in group:
        return [("group", group["error"])]
    rows = [("group", f"{group['size']} ranks over {group['backend']}")]
    for r in group["ranks"]:
        rows.append(("", f"rank {r['rank']}  {r['host']}  {human_bytes(r['available_bytes'])} free of "
                         f"{human_bytes(r['memory_bytes'])}"))
    return rows


def run(args: argparse.Namespace) -> int:
    from .group import doctor_group

    data = collect(args.host)
    # distributed: every rank gathers the group's memory; rank 0 alone reports it
    data["distributed"] = doctor_group()
    if (data["distributed"] or {}).get("rank", 0) != 0:
        return 0
    print(json.dumps(data, indent=2) if args.json else format_table(data))
    return 0


def add_parser(subparsers: Any) -> None:
    """Register `doctor [--json]` on the CLI's subparsers."""
    parser = subparsers.add_parser("doctor", help="show what mlxd runs on (versions, device, BLAS, cache, hub)")
    parser.add_argument("--json", action="store_true", help="print the same data as JSON")
    parser.add_argument("--host", default="127.0.0.1", help="the address `serve --host` would bind (default: 127.0.0.1)")
    parser.set_defaults(func=run)


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="mlxd")
    add_parser(cli.add_subparsers())
    parsed = cli.parse_args(["doctor", *sys.argv[1:]])
    sys.exit(parsed.func(parsed))
