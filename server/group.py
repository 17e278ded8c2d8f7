"""The group of an `mlx.launch` run, and what each rank brings to it.

Finding the group (rank, size, backend, hosts), checking at start that every rank
runs the same mlxd and the same model revision, loading this rank's shard of the
model, and what `mlxd doctor` shows of the group. Serving over the group is
`distributed.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger("mlxd.distributed")


@dataclass(frozen=True)
class GroupInfo:
    """Where this process stands in the group, for logs, /health and `mlxd doctor`."""

    rank: int
    size: int
    backend: str
    hosts: list[str]

    def host_of(self, rank: int) -> str:
        return self.hosts[rank] if rank < len(self.hosts) else f"rank {rank}"


def launched() -> bool:
    """Whether this process was started by `mlx.launch` (or set up like it)."""
    return any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "MLX_JACCL_COORDINATOR"))


def backend_name() -> str:
    if "MLX_JACCL_COORDINATOR" in os.environ or "MLX_IBV_DEVICES" in os.environ:
        return "jaccl"
    if "OMPI_COMM_WORLD_RANK" in os.environ:
        return "mpi"
    return "ring"


def hosts_of_hostfile() -> list[str]:
    """The hosts of the ring hostfile mlx.launch hands each rank (by rank), if any."""
    path = os.environ.get("MLX_HOSTFILE")
    try:
        entries = json.loads(Path(path).read_text()) if path else []
    except (OSError, ValueError):
        return []
    return [(e[0] if isinstance(e, list) and e else str(e)).rsplit(":", 1)[0] for e in entries]


def init_group():
    """The MLX group of this launch: (group, GroupInfo). Raises RuntimeError when
    this process is not part of a group of two or more."""
    import mlx.core as mx

    if not launched():
        raise RuntimeError("--distributed needs the ranks started by mlx.launch: "
                           "mlxd launch --hosts h1,h2 -- serve --distributed --model ...")
    backend = backend_name()
    group = mx.distributed.init(strict=True, backend=backend)
    if group.size() < 2:
        raise RuntimeError("the distributed group has one rank; give mlx.launch two hosts or more")
    info = GroupInfo(group.rank(), group.size(), backend, hosts_of_hostfile())
    return group, info


# --- start-up check -----------------------------------------------------------

_HOST_BYTES, _VERSION_BYTES, _DIGEST_BYTES = 64, 32, 16


def model_digest(path: Path) -> str:
    """A fingerprint of the model revision: its config and the names and sizes of its weight files."""
    path = Path(path)
    h = hashlib.sha256()
    try:
        h.update((path / "config.json").read_bytes())
    except OSError:
        pass
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[: 2 * _DIGEST_BYTES]


def _fixed(text: str, n: int) -> bytes:
    return text.encode()[:n].ljust(n, b"\0")


def check_same(group, version: str, model_path: Path) -> Optional[str]:
    """Every rank runs the same mlxd and model revision: None, or what differs and on which host.
    A collective: every rank calls it, and each learns the same answer."""
    import mlx.core as mx
    import numpy as np

    mine = _fixed(socket.gethostname(), _HOST_BYTES) + _fixed(version, _VERSION_BYTES) + bytes.fromhex(
        model_digest(model_path))
    gathered = mx.distributed.all_gather(mx.array(np.frombuffer(mine, dtype=np.uint8)), group=group, stream=mx.cpu)
    raw = bytes(np.array(gathered, dtype=np.uint8))
    width = len(mine)
    ranks = [raw[i * width:(i + 1) * width] for i in range(group.size())]

    def field(row: bytes, a: int, b: int) -> str:
        return row[a:b].rstrip(b"\0").decode(errors="replace")

    host0, version0 = field(ranks[0], 0, _HOST_BYTES), field(ranks[0], _HOST_BYTES, _HOST_BYTES + _VERSION_BYTES)
    digest0 = ranks[0][_HOST_BYTES + _VERSION_BYTES:].hex()
    problems = []
    for r, row in enumerate(ranks[1:], start=1):
        host, ver = field(row, 0, _HOST_BYTES), field(row, _HOST_BYTES, _HOST_BYTES + _VERSION_BYTES)
        digest = row[_HOST_BYTES + _VERSION_BYTES:].hex()
        if ver != version0:
            problems.append(f"rank {r} on {host} runs mlxd {ver}, rank 0 on {host0} runs mlxd {version0}")
        if digest != digest0:
            problems.append(f"rank {r} on {host} has another revision of the model than rank 0 on {host0} "
                            f"(config or weight files differ: {digest[:12]} vs {digest0[:12]})")
    return "; ".join(problems) or None


# --- loading a shard ----------------------------------------------------------

def shard_kinds(model, config: dict, size: int) -> list[str]:
    """The ways this model splits over `size` ranks, preferred first (as mlx-lm: tensor parallel)."""
    kinds = []
    divisible = all(int(config.get(k) or 0) % size == 0
                    for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size") if k in config)
    if hasattr(model, "shard") and divisible:
        kinds.append("tensor")
    inner = getattr(model, "model", None)
    if hasattr(inner, "pipeline") and len(getattr(inner, "layers", [])) >= size:
        kinds.append("pipeline")
    return kinds


def load_shard(name: str, path: Path, group, shard: Optional[str], trust_remote_code: bool = False):
    """This rank's shard of the model as a `LoadedModel` (weights outside the shard are never read),
    and the kind of sharding used."""
    import mlx.core as mx
    from mlx_lm.utils import load_model, load_tokenizer

    from .models import loaded_model

    path = Path(path)
    start = time.perf_counter()
    model, config = load_model(path, lazy=True, strict=False, trust_remote_code=trust_remote_code)
    kinds = shard_kinds(model, config, group.size())
    if not kinds:
        raise ValueError(f"model {name} ({config.get('model_type')}) cannot be split over {group.size()} ranks: "
                         f"mlx-lm offers neither tensor parallelism nor a pipeline for it at this size")
    kind = shard or kinds[0]
    if kind not in kinds:
        raise ValueError(f"model {name} ({config.get('model_type')}) cannot be split by {kind} over "
                         f"{group.size()} ranks; it can by: {', '.join(kinds)}")
    if kind == "tensor":
        model.shard(group)
    else:
        model.model.pipeline(group)
    mx.eval(model.parameters())
    tokenizer = load_tokenizer(path, {"trust_remote_code": trust_remote_code},
                               eos_token_ids=config.get("eos_token_id"))
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))  # every rank has its shard
    lm = loaded_model(name, path, model, tokenizer)  # as one process loads it: the same text and sizes
    log.info("rank %d: loaded its %s shard of %s in %.2f s (%.1f MB here)", group.rank(), kind, name,
             time.perf_counter() - start, lm.nbytes / 1e6)
    return lm, kind


# --- mlxd doctor under the launcher --------------------------------------------

def memory_of_this_machine() -> tuple[int, int]:
    """(total, available) bytes for models here: the GPU working set on Metal, RAM elsewhere."""
    import mlx.core as mx

    info = mx.device_info()
    if "max_recommended_working_set_size" in info:
        total = int(info["max_recommended_working_set_size"])
        return total, total - mx.get_active_memory()
    page = os.sysconf("SC_PAGE_SIZE")
    return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page


def doctor_group() -> Optional[dict]:
    """The group this `mlxd doctor` runs in (every rank calls it), or None outside a launch:
    size, backend, and each rank's host and memory, gathered to every rank."""
    import mlx.core as mx
    import numpy as np

    if not launched():
        return None
    try:
        group, info = init_group()
    except (RuntimeError, ValueError) as e:
        return {"error": str(e)}
    total, available = memory_of_this_machine()
    mine = _fixed(socket.gethostname(), _HOST_BYTES) + total.to_bytes(8, "little") + available.to_bytes(8, "little")
    gathered = mx.distributed.all_gather(mx.array(np.frombuffer(mine, dtype=np.uint8)), group=group, stream=mx.cpu)
    raw = bytes(np.array(gathered, dtype=np.uint8))
    width = len(mine)
    ranks = []
    for r in range(info.size):
        row = raw[r * width:(r + 1) * width]
        ranks.append({
            "rank": r,
            "host": row[:_HOST_BYTES].rstrip(b"\0").decode(errors="replace"),
            "memory_bytes": int.from_bytes(row[_HOST_BYTES:_HOST_BYTES + 8], "little"),
            "available_bytes": int.from_bytes(row[_HOST_BYTES + 8:], "little"),
        })
    return {"rank": info.rank, "size": info.size, "backend": info.backend, "ranks": ranks}
