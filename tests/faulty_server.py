"""`mlxd serve` with faults injected into the engine: stand-ins for errors the tests
cannot cause for real (a Metal out-of-memory error, a bug in a rarely taken path).
Everything else is the real server.

- MLXD_TEST_FAIL_AFTER=N: the batch generator raises each time it has delivered N
  more tokens, MLXD_TEST_FAILURES times (default 1).
- A request whose last message starts with `inject:PHASE[,PHASE...]` injects a
  RuntimeError into those engine phases. `admission` (starting the request) and
  `output` (processing its tokens) fail for that request itself; `step` (the
  batch step), `inbox` (taking requests in), `unload` (unloading a model) and
  `recovery` (restarting after an engine error) fail the next time the engine
  runs them, once.
- MLXD_TEST_HOLD_RECOVERY=PATH: while PATH exists, the engine's restart waits, so
  tests can watch the degraded state.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from mlxd.server.blas import setup_blas

setup_blas()  # before mlx.core, as server.cli does

from mlx_lm.generate import BatchGenerator  # noqa: E402

from mlxd.server.cli import main  # noqa: E402
from mlxd.server.engine import Engine  # noqa: E402
from mlxd.server.model_slots import ModelSlots  # noqa: E402

_armed: set[str] = set()
_lock = threading.Lock()


def _phases(request) -> set[str]:
    content = request.messages[-1].get("content") if request.messages else None
    if not isinstance(content, str) or not content.startswith("inject:"):
        return set()
    return set(content.split()[0].removeprefix("inject:").split(","))


def _fire(phase: str) -> None:
    with _lock:
        if phase not in _armed:
            return
        _armed.discard(phase)
    raise RuntimeError(f"{phase} fault injected by tests/faulty_server.py")


def _patch(cls, name: str, before) -> None:
    real = getattr(cls, name)

    def patched(self, *args, **kwargs):
        before(self, *args, **kwargs)
        return real(self, *args, **kwargs)

    setattr(cls, name, patched)


def _arm(engine, request, loop) -> None:
    with _lock:
        _armed.update(_phases(request) - {"admission", "output"})


def _admission(engine, handle, lm) -> None:
    if "admission" in _phases(handle.request):
        raise RuntimeError("admission fault injected by tests/faulty_server.py")


def _output(engine, r, active) -> None:
    if "output" in _phases(active.handle.request) and active.usage.completion_tokens >= 2:
        raise RuntimeError("output fault injected by tests/faulty_server.py")


def _recovery(engine) -> None:
    hold = os.environ.get("MLXD_TEST_HOLD_RECOVERY")
    while hold and os.path.exists(hold):
        time.sleep(0.05)
    _fire("recovery")


_patch(Engine, "submit", _arm)
_patch(Engine, "_admit", _admission)
_patch(Engine, "_on_token", _output)
_patch(Engine, "_step", lambda engine: _fire("step"))
_patch(Engine, "_take_inbox", lambda engine, block: _fire("inbox"))
_patch(Engine, "_restart", _recovery)
_patch(ModelSlots, "unload", lambda slots, name, why: _fire("unload"))

if "MLXD_TEST_FAIL_AFTER" in os.environ:
    FAIL_AFTER = int(os.environ["MLXD_TEST_FAIL_AFTER"])
    _real_next = BatchGenerator.next
    _delivered = 0
    _failures_left = int(os.environ.get("MLXD_TEST_FAILURES", "1"))

    def _next_that_fails(self, *args, **kwargs):
        global _delivered, _failures_left
        if _delivered >= FAIL_AFTER and _failures_left > 0:
            _delivered = 0
            _failures_left -= 1
            raise RuntimeError("[metal::malloc] Resource limit exceeded (injected by tests/faulty_server.py)")
        prompt_responses, gen_responses = _real_next(self, *args, **kwargs)
        _delivered += len(gen_responses)
        return prompt_responses, gen_responses

    BatchGenerator.next = _next_that_fails

if __name__ == "__main__":
    sys.exit(main())
