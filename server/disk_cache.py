"""The prefix cache's disk tier: KV caches evicted from RAM, kept across restarts.

Each entry is one file, `<dir>/<model key>/<hash of the tokens>.safetensors`, in
mlx-lm's prompt-cache format (`load_prompt_cache` reads it); its header also holds
the entry's token ids, so the index is rebuilt at start by reading headers only.

The engine thread hands over arrays it has already evaluated and made contiguous,
as zero-copy byte views; a writer thread puts them on disk (temporary name, fsync,
rename), so decoding never waits on the disk. Until then the entry is served from
those arrays. A file that cannot be read back is a miss: it is deleted and counted.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np

log = logging.getLogger("mlxd.prefix_cache")

SUFFIX = ".safetensors"
_TMP = ".tmp"
# Bumped when the files' meaning changes: older files then belong to no model and age out.
FORMAT = "1"


@dataclass
class DiskEntry:
    model: str
    tokens: np.ndarray  # int32
    path: Path
    nbytes: int
    used: float  # LRU clock: wall time of the last write or hit
    # Not yet on disk: (flattened state arrays, their byte views, metadata).
    pending: Optional[tuple[dict, dict, dict]] = None


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def usable_prefix(entry_tokens: np.ndarray, prompt: np.ndarray, trimmable: bool) -> int:
    """How many prompt tokens an entry can serve, leaving at least one to feed the model.

    A trimmable cache serves any common prefix (it is cut back to it); one that
    cannot be trimmed serves only when it is a strict prefix of the prompt."""
    n = common_prefix(entry_tokens, prompt)
    if trimmable:
        return min(n, len(prompt) - 1)
    return n if n == len(entry_tokens) < len(prompt) else 0


def longest_serving(entries: Iterable, prompt: np.ndarray, trimmable: Callable[[Any], bool]) -> tuple[Any, int]:
    """Of entries (with `.tokens`), the one serving the most prompt tokens (the shortest
    of equals, least to cut back) and how many; (None, 0) when none serves any."""
    best, best_n = None, 0
    for entry in entries:
        n = usable_prefix(entry.tokens, prompt, trimmable(entry))
        if n > best_n or (n == best_n and best is not None and len(entry.tokens) < len(best.tokens)):
            best, best_n = entry, n
    return best, best_n


def extends(longer: np.ndarray, shorter: np.ndarray) -> bool:
    """Whether `shorter` is a strict prefix of `longer` (a trimmable entry of `longer`
    serves everything one of `shorter` does)."""
    return len(shorter) < len(longer) and common_prefix(shorter, longer) == len(shorter)


def _state_arrays(cache: list) -> tuple[dict, list, dict]:
    """The cache's state as mlx-lm's `save_prompt_cache` lays it out: flat arrays,
    scalars as arrays; a plain KVCache only up to its offset. Also, for the arrays
    cut to an offset, their whole buffer and the rows kept: (buffer, rows)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import KVCache

    scalars: list = [""]  # non-empty, as in mlx-lm, or tree_flatten drops it

    def as_array(key: str, value: Any):
        if isinstance(value, mx.array):
            return value
        for kind, types in (("scalar", (int, float, bool)), ("string", str), ("none", type(None))):
            if isinstance(value, types):
                scalars.append((key, kind))
                if kind == "string":
                    return mx.array([ord(c) for c in value])
                return mx.array([]) if kind == "none" else mx.array(value)
        raise ValueError(f"model state is not serializable: {type(value).__name__}")

    states, windows = [], {}
    for i, c in enumerate(cache):
        state = c.state
        if isinstance(c, KVCache) and c.keys is not None and c.offset < c.keys.shape[2]:
            state = (c.keys[..., : c.offset, :], c.values[..., : c.offset, :], c.offset)
            windows[f"{i}.0"], windows[f"{i}.1"] = (c.keys, c.offset), (c.values, c.offset)  # tree_flatten's names
        states.append(state)
    arrays = {k: as_array(k, v) for k, v in tree_flatten(states)}
    return arrays, [[_mlx_lm_class(c) for c in cache], scalars], windows


def _mlx_lm_class(cache) -> str:
    """The name `load_prompt_cache` rebuilds a cache by: mlx-lm's class, or the one ours extends."""
    return next(k.__name__ for k in type(cache).__mro__ if k.__module__ == "mlx_lm.models.cache")


_DTYPES = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
    "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64",
    "uint8": "U8", "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL",
}


def snapshot(cache: list, model: str, tokens: list[int]) -> tuple[dict, dict, dict]:
    """Engine thread: the cache's arrays, zero-copy byte views of them for the writer,
    and the file's metadata. No MLX work is left for the writer. A KV buffer with
    room beyond its offset is not copied: the writer takes the rows in use, head by
    head, straight from it (the C order of the array cut to its offset)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    arrays, (classes, scalars), windows = _state_arrays(cache)
    whole = {k: mx.contiguous(windows[k][0] if k in windows else v) for k, v in arrays.items()}
    raw = {k: v.reshape(-1).view(mx.uint8) for k, v in whole.items()}
    mx.eval(list(whole.values()), list(raw.values()))
    views = {}
    for k, v in arrays.items():
        chunks = [memoryview(raw[k])]
        if k in windows:
            buffer, rows = windows[k]
            row_bytes = buffer.shape[-1] * buffer.itemsize
            blocks = np.frombuffer(chunks[0], np.uint8).reshape(-1, buffer.shape[-2] * row_bytes)
            chunks = [memoryview(block) for block in blocks[:, : rows * row_bytes]]
        views[k] = (_DTYPES[str(v.dtype).split(".")[-1]], list(v.shape), chunks)
    ours = {"model": model, "format": FORMAT, "tokens": base64.b64encode(np.asarray(tokens, "<i4").tobytes()).decode()}
    metadata = dict(tree_flatten([ours, classes, scalars]))
    return arrays, views, metadata


def _nbytes(chunks: list) -> int:
    return sum(c.nbytes for c in chunks)


def write_file(path: Path, views: dict, metadata: dict) -> int:
    """Write a safetensors file atomically: a temporary name, fsync, rename. Returns its size."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, (dtype, shape, chunks) in views.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + _nbytes(chunks)]}
        offset += _nbytes(chunks)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = path.with_name(path.name + _TMP)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for _, _, chunks in views.values():
            for chunk in chunks:
                f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return 8 + len(head) + offset


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_header(path: Path) -> tuple[str, np.ndarray]:
    """The model key and tokens of an entry file, from its header alone; ValueError if unreadable."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 1 << 30:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
        meta = header["__metadata__"]
        if meta.get("0.format") != FORMAT:
            raise ValueError(f"format {meta.get('0.format')!r}")
        tokens = np.frombuffer(base64.b64decode(meta["0.tokens"]), dtype="<i4").astype(np.int32)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, KeyError, TypeError, struct.error, json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"unreadable prompt-cache file: {e}") from e
    if path.stat().st_size < 8 + n + end:
        raise ValueError("truncated prompt-cache file")
    return meta["0.model"], tokens


class DiskTier:
    """Files under one directory, LRU under a byte budget, written by a background thread."""

    def __init__(self, root: Path, budget_bytes: int, max_pending_bytes: int):
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self.max_pending_bytes = max_pending_bytes
        self._entries: dict[Path, DiskEntry] = {}
        self._lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue()
        self.bytes_written = 0
        self.files_written = 0
        self.corrupt = 0  # files found unreadable (deleted)
        self.dropped = 0  # evictions not written: the writer was too far behind, or too big
        self.root.mkdir(parents=True, exist_ok=True)
        self._scan()
        self._writer = threading.Thread(target=self._write_loop, name="mlxd-kv-writer", daemon=True)
        self._writer.start()

    # Engine thread -------------------------------------------------------
    def put(self, model: str, tokens: list[int], cache: list, trimmable: bool) -> None:
        """Queue an entry evicted from RAM; never waits for the disk."""
        path = self.root / model / (_token_hash(model, tokens) + SUFFIX)
        with self._lock:
            if path in self._entries:  # already there: it was only used again
                self._entries[path].used = time.time()
                self._jobs.put(("touch", path))
                return
        arrays, views, metadata = snapshot(cache, model, tokens)
        nbytes = sum(_nbytes(chunks) for _, _, chunks in views.values())
        with self._lock:
            pending = sum(e.nbytes for e in self._entries.values() if e.pending is not None)
            if nbytes > self.budget_bytes or pending + nbytes > self.max_pending_bytes:
                self.dropped += 1
                log.warning("prefix cache: a %d-token entry (%.1f MB) is not written to disk (%s)",
                            len(tokens), nbytes / 1e6,
                            "larger than the disk budget" if nbytes > self.budget_bytes else "the writer is behind")
                return
            entry = DiskEntry(model, np.asarray(tokens, np.int32), path, nbytes, time.time(),
                              pending=(arrays, views, metadata))
            if trimmable:  # a longer trimmable entry serves every prefix of it
                for other in list(self._entries.values()):
                    if other.model == model and extends(entry.tokens, other.tokens):
                        self._remove(other)
            self._entries[path] = entry
            self._enforce_budget(keep=entry)
        self._jobs.put(("write", entry))

    def find(self, model: str, prompt: np.ndarray, trimmable: bool) -> tuple[Optional[DiskEntry], int]:
        """The entry serving the most prompt tokens, and how many."""
        with self._lock:
            return longest_serving((e for e in self._entries.values() if e.model == model), prompt,
                                   lambda _: trimmable)

    def load(self, entry: DiskEntry) -> Optional[list]:
        """The entry's cache, evaluated; None (and the file deleted) when it cannot be read."""
        import mlx.core as mx
        from mlx_lm.models.cache import load_prompt_cache

        with self._lock:
            pending = entry.pending
        try:
            if pending is not None:  # still in memory: fresh array objects, so the
                # batch's in-place updates never reach the arrays being written
                arrays = {k: mx.array(v) for k, v in pending[0].items()}
                cache = _from_arrays(arrays, pending[2])
            else:
                cache, meta = load_prompt_cache(str(entry.path), return_metadata=True)
                if meta.get("model") != entry.model:
                    raise ValueError("belongs to another model")
            mx.eval([c.state for c in cache])
            if cache and hasattr(cache[0], "offset") and cache[0].offset != len(entry.tokens):
                raise ValueError(f"holds {cache[0].offset} tokens, its header says {len(entry.tokens)}")
        except Exception as e:  # any unreadable file is a miss, never a crash
            log.warning("prefix cache: deleting unreadable %s: %s", entry.path.name, e)
            with self._lock:
                self.corrupt += 1
                self._remove(entry)
            return None
        with self._lock:
            entry.used = time.time()
        self._jobs.put(("touch", entry.path))
        return cache

    def stats(self) -> dict:
        with self._lock:
            entries = list(self._entries.values())
        return {
            "dir": str(self.root),
            "bytes": sum(e.nbytes for e in entries),
            "entries": len(entries),
            "pending_entries": sum(e.pending is not None for e in entries),
            "budget_bytes": self.budget_bytes,
            "bytes_written": self.bytes_written,
            "files_written": self.files_written,
            "corrupt_files": self.corrupt,
            "dropped_entries": self.dropped,
        }

    def close(self, timeout: float) -> bool:
        """Let the writer finish what is queued, for at most `timeout` seconds."""
        self._jobs.put(None)
        self._writer.join(timeout)
        return not self._writer.is_alive()

    # Any thread, under the lock ----------------------------------------------
    def _remove(self, entry: DiskEntry) -> None:
        if self._entries.get(entry.path) is entry:
            del self._entries[entry.path]
            self._jobs.put(("unlink", entry.path))

    def _enforce_budget(self, keep: Optional[DiskEntry] = None) -> None:
        total = sum(e.nbytes for e in self._entries.values())
        for entry in sorted(self._entries.values(), key=lambda e: e.used):
            if total <= self.budget_bytes:
                break
            if entry is not keep:
                total -= entry.nbytes
                self._remove(entry)

    # Start and writer thread -------------------------------------------------
    def _scan(self) -> None:
        """Rebuild the index from the directory; leftovers of interrupted writes and
        unreadable files are deleted."""
        for path in self.root.glob("*/*"):
            if path.name.endswith(_TMP):
                _discard(path)
                continue
            if not path.name.endswith(SUFFIX):
                continue
            try:
                model, tokens = read_header(path)
                if model != path.parent.name:
                    raise ValueError("in another model's directory")
                st = path.stat()
            except (OSError, ValueError) as e:
                log.warning("prefix cache: deleting %s: %s", path, e)
                self.corrupt += 1
                _discard(path)
                continue
            self._entries[path] = DiskEntry(model, tokens, path, st.st_size, st.st_mtime)
        with self._lock:
            self._enforce_budget()  # a smaller budget than last time: the writer deletes the oldest

    def _write_loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                kind, target = job
                if kind == "unlink":
                    target.unlink(missing_ok=True)
                elif kind == "touch" and target.exists():  # a pending entry has no file yet
                    os.utime(target)
                elif kind == "write":
                    self._write(target)
            except OSError as e:
                log.warning("prefix cache: %s %s failed: %s", kind, getattr(target, "path", target), e)
            finally:
                self._jobs.task_done()

    def _write(self, entry: DiskEntry) -> None:
        with self._lock:
            if self._entries.get(entry.path) is not entry:
                return  # evicted or replaced while queued
            _, views, metadata = entry.pending
        entry.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            size = write_file(entry.path, views, metadata)
        except OSError:
            entry.path.with_name(entry.path.name + _TMP).unlink(missing_ok=True)
            with self._lock:
                self._entries.pop(entry.path, None)
            raise
        with self._lock:
            self.bytes_written += size
            self.files_written += 1
            if self._entries.get(entry.path) is entry:
                entry.pending = None
                entry.nbytes = size
                self._enforce_budget(keep=entry)
            else:  # evicted while being written
                entry.path.unlink(missing_ok=True)


def _from_arrays(arrays: dict, metadata: dict) -> list:
    """Cache objects from flattened state arrays, as mlx-lm's `load_prompt_cache` builds them."""
    from mlx.utils import tree_unflatten
    from mlx_lm.models import cache as mlx_cache

    _, classes, scalars = tree_unflatten(list(metadata.items()))
    arrays = dict(arrays)
    for pos, kind in scalars[1:]:
        arrays[pos] = {"scalar": lambda a: a.item(), "string": lambda a: "".join(map(chr, a.tolist())),
                       "none": lambda a: None}[kind](arrays[pos])
    states = tree_unflatten(list(arrays.items()))
    return [getattr(mlx_cache, c).from_state(s) for c, s in zip(classes, states)]


def _discard(path: Path) -> None:
    """Delete a file if possible: one that cannot be deleted is only left behind."""
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        log.warning("prefix cache: cannot delete %s: %s", path, e)


def _token_hash(model: str, tokens: list[int]) -> str:
    return hashlib.sha256(model.encode() + np.asarray(tokens, "<i4").tobytes()).hexdigest()[:32]
