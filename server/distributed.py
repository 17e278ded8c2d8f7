"""One model across several machines with MLX's own distributed backend.

Every rank of an `mlx.launch` group loads its shard of the model (`group.load_shard`:
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
from .group import GroupInfo, check_same, init_group, load_shard

log = logging.getLogger("mlxd.distributed")

# Rank 0 broadcasts at least this often while idle, so a lost rank shows between requests too.
HEARTBEAT_S = 1.0
# After failing the requests, how long rank 0 lets the server write the errors out before exiting.
EXIT_GRACE_S = 5.0
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

    def held_sigterm(self, handle_exit: Callable) -> Callable:
        """uvicorn's exit handler, with SIGTERM held back for the group's own exit (which
        fails the requests in flight with a clear error and ends the process). mlx.launch
        sends SIGTERM as soon as another rank dies, often before rank 0's next collective
        notices; shutting down at once would cut those streams. The hold lasts until the
        watchdog would have caught a hung peer; `mlxd launch` stops groups with SIGINT,
        which is never held."""

        def handler(sig, frame):
            if sig != signal.SIGTERM:
                return handle_exit(sig, frame)

            def later():
                deadline = time.monotonic() + self.link.timeout + 2 * EXIT_GRACE_S
                while time.monotonic() < deadline and not self.exit.started:
                    time.sleep(0.05)
                if not self.exit.started:
                    handle_exit(sig, None)

            threading.Thread(target=later, name="mlxd-sigterm", daemon=True).start()

        return handler

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
