"""Which models are loaded: loading, the least-recently-used limit, keep-alive, failed loads.

A new model loads before the least recently used one is unloaded, so a load
that fails leaves the working model (and its prefix caches) in place; only when
memory cannot hold both is the old one unloaded first, and the log says so. A
failed load is remembered for a while and answered with the same error.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

from .errors import ModelLoadFailed
from .models import LoadedModel, load_model
from .output import output_format_for

log = logging.getLogger("mlxd.engine")

# How long a failed load is answered from memory: the SDKs retry a 500 at once,
# and each retry would otherwise evict and reload the working model.
FAILED_LOAD_SECONDS = 30.0


class FailedLoads:
    """Models that failed to load recently, with the error to answer again."""

    def __init__(self, seconds: float = FAILED_LOAD_SECONDS):
        self.seconds = seconds
        self._failed: dict[str, tuple[float, Exception]] = {}

    def add(self, name: str, error: Exception) -> None:
        self._failed[name] = (time.monotonic(), error)

    def recent(self, name: str):
        """The error of a load of `name` that failed less than `seconds` ago, else None."""
        failed = self._failed.get(name)
        if failed is None:
            return None
        at, error = failed
        if time.monotonic() - at > self.seconds:
            del self._failed[name]
            return None
        return error


def weights_bytes(path: Path) -> int:
    """Size of a model's weight files, what loading it will take at least."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def memory_available() -> int:
    """Bytes a new model may still take: the GPU working set left on Metal, free RAM elsewhere."""
    import os

    import mlx.core as mx

    info = mx.device_info()
    if "max_recommended_working_set_size" in info:
        return int(info["max_recommended_working_set_size"]) - mx.get_active_memory()
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _without_paths(error: Exception) -> str:
    """The cause of a failed load for the client: its kind and message, with file paths
    cut to their last part (the log has them whole; clients see no directories)."""
    return f"{type(error).__name__}: " + re.sub(r"(?:/[^/\s'\"]+)+/([^/\s'\"]+)", r"\1", str(error))


class ModelSlots:
    """The loaded models, most recently used last. Engine-thread only.

    `on_unload(lm)` lets the engine drop its own references (batch, prefix caches)
    before the model's memory is given back."""

    def __init__(self, *, max_loaded: int, keep_alive: float, on_unload: Callable[[LoadedModel], None],
                 loader: Optional[Callable[..., LoadedModel]] = None):
        self.loader = loader or load_model  # a distributed rank's: its shard of the group's model
        self.max_loaded = max(1, max_loaded)
        self.keep_alive = keep_alive
        self.on_unload = on_unload
        self.loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self.failed = FailedLoads()

    def get(self, name: str) -> Optional[LoadedModel]:
        return self.loaded.get(name)

    def ensure(self, ref) -> LoadedModel:
        """The model `ref` (a ModelRef), loaded and marked most recently used; raises ModelLoadFailed."""
        lm = self.loaded.get(ref.name)
        if lm is None:
            failed = self.failed.recent(ref.name)
            if failed is not None:
                raise failed
            self._make_room_for(ref)
            try:
                lm = self.loader(ref.name, ref.path, trust_remote_code=ref.trust_remote_code)
                lm.output_format = output_format_for(lm.tokenizer, tool_format=ref.tool_format)
            except Exception as e:
                log.exception("loading %s failed", ref.name)
                error = ModelLoadFailed(f"model {ref.name!r} could not be loaded: {_without_paths(e)}")
                self.failed.add(ref.name, error)
                raise error from e
            log.info("model %s: tool-call format %s", ref.name, lm.output_format.name or "none")
            self.loaded[ref.name] = lm
            while len(self.loaded) > self.max_loaded:
                self.unload(next(iter(self.loaded)), f"to make room for {ref.name}")
        self.loaded.move_to_end(ref.name)
        return lm

    def _make_room_for(self, ref) -> None:
        """Unload first only when the new model would not fit beside the loaded ones."""
        if len(self.loaded) < self.max_loaded:
            return
        need, free = weights_bytes(ref.path), memory_available()
        if need <= free:
            return
        while self.loaded:
            self.unload(next(iter(self.loaded)),
                        f"before loading {ref.name}: it needs {need / 1e9:.1f} GB and {free / 1e9:.1f} GB are free")

    def unload(self, name: str, why: str) -> None:
        """Drop a model and every reference to it, then give its memory back."""
        import gc

        import mlx.core as mx

        self.on_unload(self.loaded.pop(name))
        log.info("unloaded model %s (%s)", name, why)
        gc.collect()
        mx.clear_cache()

    def unload_idle(self) -> None:
        if self.keep_alive < 0:
            return
        now = time.monotonic()
        for name in [name for name, lm in self.loaded.items() if now - lm.last_used > self.keep_alive]:
            self.unload(name, f"idle for {self.keep_alive:.0f} s")

    def clear(self) -> None:
        """Forget every model without unloading one by one (the engine restarts)."""
        self.loaded.clear()
