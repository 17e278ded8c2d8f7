"""One model across several machines with MLX's own distributed backend.

Every rank of an `mlx.launch` group loads its shard of the model (`load_shard`:
tensor parallel or a pipeline of layers, as mlx-lm's models offer). Rank 0 runs
the HTTP server and the engine; the engine's batch and prefix-cache operations go
through `lockstep.Steps`, which records them as plain data and, before each batch
step, sends them to the other ranks with an `all_sum` of a byte buffer (as
mlx_lm.server does). The other ranks run `follow`: no HTTP, only replaying the
operations, so every rank runs the same MLX calls in the same order.

`all_sum` blocks without a timeout. A rank that dies closes its sockets and the
others' next collective raises; a rank that hangs (frozen machine, cable pulled)
is caught by a watchdog thread: on rank 0, no completed broadcast for `timeout`
seconds fails every request with 503 `engine_unavailable`, and the process exits
with status 1 a moment later, so a supervisor restarts the group.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import EngineError, EngineUnavailable

log = logging.getLogger("mlxd.distributed")

# Rank 0 broadcasts at least this often while idle, so a lost rank shows between requests too.
HEARTBEAT_S = 1.0
# After failing the requests, how long rank 0 lets the server write the errors out before exiting.
EXIT_GRACE_S = 2.0
# A step's operations travel in one all_sum of this many bytes (a second one carries the rest
# of a bigger step, such as one that admits a long prompt).
FRAME_BYTES = 2048
# Exit status of a rank whose group broke (another rank lost, or its replay diverged).
EXIT_GROUP_LOST = 1


class GroupLost(EngineUnavailable):
    """A rank of the distributed group died or stopped answering; this server exits."""

    def __init__(self, reason: str):
        EngineError.__init__(self, f"The distributed group lost a rank ({reason}); the server is exiting for its "
                                   f"supervisor to restart the group. Retry shortly.")
        self.retry_after = 5


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
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache
    from mlx_lm.utils import load_model, load_tokenizer

    from mlxd.registry import config_context_length

    from .models import DEFAULT_CONTEXT_LENGTH, LoadedModel, _keep_first_space, sampling_defaults_of

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
    _keep_first_space(tokenizer)  # as models.load_model: the same text as one process
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))  # every rank has its shard
    nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    lm = LoadedModel(
        name=name,
        path=path,
        model=model,
        tokenizer=tokenizer,
        context_length=config_context_length(path) or DEFAULT_CONTEXT_LENGTH,
        sampling_defaults=sampling_defaults_of(path),
        nbytes=nbytes,
        cache_trimmable=all(type(c) in (KVCache, QuantizedKVCache) for c in make_prompt_cache(model)),
    )
    log.info("rank %d: loaded its %s shard of %s in %.2f s (%.1f MB here)", group.rank(), kind, name,
             time.perf_counter() - start, nbytes / 1e6)
    return lm, kind


# --- the link between rank 0 and the others ------------------------------------

class Link:
    """Rank 0's operations to the other ranks, an `all_sum` of a byte frame per batch step.

    Rank 0 calls `send` (and `heartbeat` when idle); the others call `recv`.
    Every rank first waits for its generation stream: the model's own collectives
    run there, and both must reach the backend in the same order on every rank."""

    def __init__(self, group, *, timeout: float, on_lost: Callable[[str], None]):
        self.group = group
        self.timeout = timeout
        self.on_lost = on_lost
        self.last_done = time.monotonic()  # the last broadcast that completed
        self.closed = False  # rank 0 stopped the group: silence is expected now
        self._watchdog: Optional[threading.Thread] = None

    def start_watchdog(self, what: str) -> None:
        """Call `on_lost` when no broadcast completes for `timeout` seconds (a peer that hangs)."""

        def watch() -> None:
            while True:
                time.sleep(min(1.0, self.timeout / 4))
                quiet = time.monotonic() - self.last_done
                if quiet > self.timeout and not self.closed:
                    self.on_lost(f"{what} for {quiet:.0f} s (--distributed-timeout {self.timeout:g})")
                    return

        self._watchdog = threading.Thread(target=watch, name="mlxd-group-watchdog", daemon=True)
        self._watchdog.start()

    def send(self, ops: list, stream) -> None:
        try:
            self.broadcast(ops, stream)
        except Exception as e:
            self.lost(e)
            raise GroupLost(str(e)) from e

    def lost(self, error: Exception) -> None:
        """An MLX collective failed (a peer closed its sockets): the group is broken."""
        self.on_lost(f"{type(error).__name__}: {error}")

    def heartbeat(self, ops: list, stream) -> None:
        if ops or time.monotonic() - self.last_done >= HEARTBEAT_S:
            self.send(ops, stream)

    def broadcast(self, ops: list, stream) -> None:
        import mlx.core as mx
        import numpy as np

        payload = pickle.dumps(ops, protocol=pickle.HIGHEST_PROTOCOL)
        framed = len(payload).to_bytes(4, "little") + payload
        head, rest = framed[:FRAME_BYTES].ljust(FRAME_BYTES, b"\0"), framed[FRAME_BYTES:]
        mx.synchronize(stream)
        mx.eval(mx.distributed.all_sum(mx.array(np.frombuffer(head, dtype=np.uint8)), group=self.group,
                                       stream=mx.cpu))
        if rest:
            mx.eval(mx.distributed.all_sum(mx.array(np.frombuffer(rest, dtype=np.uint8)), group=self.group,
                                           stream=mx.cpu))
        self.last_done = time.monotonic()

    def recv(self, stream) -> list:
        import mlx.core as mx
        import numpy as np

        mx.synchronize(stream)
        head = mx.distributed.all_sum(mx.zeros(FRAME_BYTES, dtype=mx.uint8), group=self.group, stream=mx.cpu)
        framed = bytes(np.array(head, dtype=np.uint8))
        size = int.from_bytes(framed[:4], "little")
        if size + 4 > FRAME_BYTES:
            rest = mx.distributed.all_sum(mx.zeros(size + 4 - FRAME_BYTES, dtype=mx.uint8), group=self.group,
                                          stream=mx.cpu)
            framed += bytes(np.array(rest, dtype=np.uint8))
        ops = pickle.loads(framed[4:4 + size])
        self.last_done = time.monotonic()
        return ops


class Exit:
    """Fails what is in flight and ends the process, once, whichever thread sees the loss first."""

    def __init__(self, info: GroupInfo, abandon: Optional[Callable[[Exception], None]] = None):
        self.info = info
        self.abandon = abandon  # rank 0: the engine's, which fails every request
        self._lock = threading.Lock()
        self._done = False

    @property
    def started(self) -> bool:
        return self._done

    def __call__(self, reason: str) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        peers = ", ".join(f"rank {r} on {self.info.host_of(r)}" for r in range(self.info.size) if r != self.info.rank)
        log.error("rank %d: the distributed group is broken (%s; peers: %s); exiting with status %d",
                  self.info.rank, reason, peers, EXIT_GROUP_LOST)
        if self.abandon is not None:
            try:
                self.abandon(GroupLost(reason))
            except Exception:
                log.exception("failing the requests in flight raised")
            time.sleep(EXIT_GRACE_S)  # the event loop writes the errors out meanwhile
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(EXIT_GROUP_LOST)


STOP = ("stop",)


def follow(member: "Member") -> int:
    """A follower rank: replay rank 0's operations until it says stop; no HTTP here.
    Its batch and prefix cache are built with rank 0's settings (the "setup" operation)."""
    import mlx.core as mx

    info, lm, link, on_lost = member.info, member.lm, member.link, member.exit
    # Ctrl-C reaches every rank; a follower stops when rank 0 says so (or is gone).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stream = mx.new_stream(mx.default_device())
    steps = None
    link.start_watchdog("no word from rank 0")
    log.info("rank %d of %d (pid %d) following rank 0 on %s", info.rank, info.size, os.getpid(), info.host_of(0))
    while True:
        try:
            ops = link.recv(stream)
        except Exception as e:
            on_lost(f"{type(e).__name__}: {e}")
            return EXIT_GROUP_LOST
        if ops and ops[-1] == STOP:
            if steps is not None:
                steps.close()
            link.closed = True
            log.info("rank %d: rank 0 stopped the group", info.rank)
            return 0
        removed = [uid for op, *args in ops if op == "remove" for uid in args[0]]
        if removed:
            log.info("rank %d: removed sequences %s from the batch, as rank 0 did", info.rank, removed)
        try:
            for op in ops:
                if op[0] == "setup":
                    steps = _follower_steps(stream, **op[1])
                else:
                    steps.replay([op], lm)
        except Exception as e:
            log.exception("rank %d: replaying rank 0's step failed", info.rank)
            on_lost(f"replay failed: {type(e).__name__}: {e}")
            return EXIT_GROUP_LOST


def _follower_steps(stream, *, ram_bytes: int, ram_entries: int, **batch):
    from .lockstep import Steps
    from .prefix_cache import PrefixCache

    cache = PrefixCache(ram_bytes=ram_bytes, ram_entries=ram_entries, disk_dir=None, disk_bytes=0)
    return Steps(stream=stream, prefix_cache=cache, **batch)


class GroupError(Exception):
    """The group cannot start: what is wrong and on which host."""


@dataclass
class Member:
    """This process's place in a serving group, once every rank has its shard."""

    group: object
    info: GroupInfo
    lm: object  # LoadedModel: this rank's shard
    shard: str
    timeout: float
    exit: Exit
    link: Link

    @property
    def rank(self) -> int:
        return self.info.rank

    def describe(self) -> str:
        hosts = ", ".join(f"rank {r} on {self.info.host_of(r)}" for r in range(self.info.size))
        return f"distributed group of {self.info.size} over {self.info.backend} ({hosts}), {self.shard} sharding"

    def loader(self, name: str, path: Path, trust_remote_code: bool = False):
        """The engine's model loader on rank 0: the group's model is loaded already; no other can be."""
        if name != self.lm.name:
            raise ValueError(f"this distributed group serves only {self.lm.name}")
        return self.lm

    def engine_hooks(self) -> dict:
        """Rank 0's engine: its steps go to the other ranks; its model is this rank's shard."""
        return dict(link=self.link, loader=self.loader)

    def serving(self, abandon: Callable[[Exception], None]) -> None:
        """Rank 0's engine runs: a lost group fails its requests; the watchdog starts."""
        self.exit.abandon = abandon
        self.link.start_watchdog("no broadcast completed")

    def on_terminate(self) -> None:
        """Rank 0, main thread, before the server starts. uvicorn shuts down on SIGINT and
        SIGTERM and raises the signal again; then an exit under way (the group broke, as
        when mlx.launch sends SIGTERM after a rank failed) sets the status, 1; else the
        status is 0 for SIGINT (Ctrl-C, `mlxd launch` stopping) and 143 for SIGTERM."""

        def stopped(signum, frame):
            if self.exit.started:
                time.sleep(10 * EXIT_GRACE_S)  # the exit under way ends the process first
            raise SystemExit(0 if signum == signal.SIGINT else 128 + signum)

        signal.signal(signal.SIGTERM, stopped)
        signal.signal(signal.SIGINT, stopped)

    def stop(self) -> None:
        """Rank 0 is stopping (the engine thread has ended): the followers stop too,
        unless the whole group is being stopped and they are gone already."""
        import mlx.core as mx

        self.link.closed = True
        try:
            self.link.broadcast([STOP], mx.default_stream(mx.default_device()))
        except Exception as e:
            log.info("rank 0: the other ranks stopped already (%s)", e)


def join(model_name: str, model_path: Path, *, shard: Optional[str], timeout: float, version: str,
         trust_remote_code: bool = False) -> Member:
    """Every rank: find the group, check that all run the same mlxd and model, load this rank's shard."""
    try:
        group, info = init_group()
    except (RuntimeError, ValueError) as e:
        raise GroupError(str(e)) from e
    log.info("rank %d of %d (pid %d) on %s, %s backend", info.rank, info.size, os.getpid(), socket.gethostname(),
             info.backend)
    problem = check_same(group, version, model_path)
    if problem:
        raise GroupError(f"the ranks differ: {problem}")
    try:
        lm, kind = load_shard(model_name, model_path, group, shard, trust_remote_code)
    except ValueError as e:
        raise GroupError(str(e)) from e
    exit_ = Exit(info)
    return Member(group, info, lm, kind, timeout, exit_, Link(group, timeout=timeout, on_lost=exit_))


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
