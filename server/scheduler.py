"""Requests on their way into the batch: the inbox other threads put them in, prompt
building, and the line of built requests waiting for a slot.

One count bounds them all (`--max-batch-size` + `--max-queue`, beyond which
`submit` refuses with 429), and no request waits without bound: one that has not
started after `--queue-timeout` seconds is answered 503. Only the engine thread
calls the methods below `submit`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

from .errors import InternalError, QueueFull, QueueTimeout
from .prompt_builder import PromptBuilders

log = logging.getLogger("mlxd.engine")


class Scheduler:
    """`on_release(handle, error, outcome, reason, active)` hears of every request
    that leaves, however it leaves (the engine's usage-ledger hook)."""

    def __init__(self, *, max_in_flight: int, queue_timeout: float, on_release: Callable[..., None]):
        self.max_in_flight = max_in_flight
        self.queue_timeout = queue_timeout
        self.on_release = on_release
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: deque = deque()  # RequestHandles, built or waiting for their model to load
        self.building: set = set()
        self._in_flight = 0
        self._count_lock = threading.Lock()
        self._builders = PromptBuilders(lambda handle, result: self.inbox.put(("built", handle, result)))

    # Any thread ----------------------------------------------------------
    def submit(self, handle) -> None:
        """Count the request in and queue it; raises QueueFull when every place is taken."""
        with self._count_lock:
            if self._in_flight >= self.max_in_flight:
                raise QueueFull(retry_after=2)
            self._in_flight += 1
        self.inbox.put(handle)

    @property
    def in_flight(self) -> int:
        """Requests counted in and not yet released."""
        return self._in_flight

    def close(self) -> None:
        self._builders.close()

    # Engine thread -------------------------------------------------------
    def take(self, block: bool, loaded: Callable[[str], Any]) -> list:
        """Move what arrived on the inbox along: a new request goes to a prompt
        builder at once when `loaded(model name)` has its model, else into the line
        (its model loads when it comes first); a built one joins the line. Returns
        the other items (("load", ref), or None to stop) for the engine."""
        others = []
        timeout = 1.0 if block else None
        while True:
            try:
                item = self.inbox.get(block=block, timeout=timeout) if block else self.inbox.get_nowait()
            except queue.Empty:
                return others
            block = False
            if isinstance(item, tuple) and item[0] == "built":
                self._built(item[1], item[2])
            elif item is None or isinstance(item, tuple):
                others.append(item)
            else:
                lm = loaded(item.request.model.name)
                if lm is None:
                    self.waiting.append(item)
                else:
                    self.build(item, lm)

    def build(self, handle, lm) -> None:
        self.building.add(handle)
        self._builders.build(handle, lm)

    def _built(self, handle, result) -> None:
        self.building.discard(handle)
        if handle.released:  # failed while it was being built
            return
        if isinstance(result, Exception):
            failed = isinstance(result, InternalError)
            self.release(handle, result, outcome="failed" if failed else "rejected", reason=result.code)
        else:
            handle.prepared = result
            self.waiting.append(handle)

    def expire(self) -> None:
        """Waiting requests whose client left give their place up; those that waited
        --queue-timeout seconds get 503."""
        now = time.perf_counter()
        for handle in list(self.waiting):
            if handle.cancelled:
                self.waiting.remove(handle)
                self.release(handle, None, outcome="cancelled", reason="queued")
                log.info("[%s] request cancelled by the client while queued", handle.request.request_id)
            elif now - handle.submitted_at > self.queue_timeout:
                self.waiting.remove(handle)
                self.release(handle, QueueTimeout(now - handle.submitted_at), outcome="rejected",
                             reason=QueueTimeout.code)

    def release(self, handle, error: Optional[Exception], *, outcome: str, reason: str, active=None) -> None:
        """The request leaves (once): its place is free; `error` answers it if it was not accepted."""
        if handle.released:
            return
        handle.released = True
        with self._count_lock:
            self._in_flight -= 1
        if error is not None:
            log.warning("[%s] request refused (%s): %s", handle.request.request_id,
                        getattr(error, "code", type(error).__name__), error)
            handle._reject(error)
        self.on_release(handle, error, outcome, reason, active)

    def fail_all(self, error: Exception) -> bool:
        """Answer every request not yet in the batch with `error`; False if a stop was among the items."""
        pending = list(self.waiting) + list(self.building)
        self.waiting.clear()
        self.building.clear()
        go_on = True
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if item is None:
                go_on = False
            elif isinstance(item, tuple):
                if item[0] == "built":
                    pending.append(item[1])
            else:
                pending.append(item)
        for handle in pending:
            self.release(handle, error, outcome="failed", reason=error.code)
        return go_on
