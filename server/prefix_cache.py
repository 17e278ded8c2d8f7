"""The prefix cache: KV caches of earlier prompts, so that a request sharing a
prefix with one of them reads only the rest.

Two tiers. RAM (`RamTier`): whole turns, and checkpoints at message ends. Disk
(`disk_cache.DiskTier`): what RAM evicts goes there instead of away, and it
survives restarts; at exit the RAM tier is written out too. A lookup takes
whichever tier serves more of the prompt.

A turn that continues a conversation takes the previous turn's cache out of RAM
and hands its buffer to the batch, which appends to it in place (`kv_cache`): the
turn saves it back, longer, when it ends. A request that shares only part of an
entry (another conversation with the same system prompt) leaves the entry in
place and gets its own copy of the shared tokens.

`ram_bytes` bounds the saved caches only: the live batch's KV is bounded by the
batch size and the context window. The entry just saved is never evicted in the
same step unless it alone exceeds the budget.

Entries are keyed by a fingerprint of the model's files (`model_key`), so changed
weights or a changed tokenizer never reuse old KV.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .disk_cache import DiskTier, extends, longest_serving

log = logging.getLogger("mlxd.prefix_cache")

# A disk entry is read only when it serves this many more tokens than RAM: reading a
# file to skip the prefill of a few tokens (a shared template opening) costs more.
MIN_DISK_GAIN = 32
# Files up to this size are fingerprinted by content, larger ones (weights) by name, size and mtime.
_HASHED_FILE_BYTES = 16 << 20


def model_key(path: Path) -> str:
    """A fingerprint of a model directory: what decides the KV of a token sequence."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).iterdir() if p.is_file()):
        st = f.stat()
        h.update(f.name.encode() + b"\0")
        if st.st_size <= _HASHED_FILE_BYTES:
            h.update(f.read_bytes())
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


@dataclass
class RamEntry:
    model: str
    tokens: np.ndarray  # int32
    cache: list
    nbytes: int
    kind: str  # "assistant" (a whole turn), or a checkpoint's "user" or "system"
    # How many of `tokens` the request was asked with (the rest it generated).
    prompt_len: int
    trimmable: bool


class RamTier:
    """Caches in RAM, least recently used first. Engine thread only, but for sizes."""

    def __init__(self):
        self._entries: OrderedDict[tuple[str, bytes], RamEntry] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, model: str, prompt: np.ndarray) -> tuple[Optional[RamEntry], int]:
        """The entry serving the most prompt tokens (the shortest of equals), and how many."""
        return longest_serving((e for e in self._entries.values() if e.model == model), prompt,
                               lambda e: e.trimmable)

    def touch(self, entry: RamEntry) -> None:
        self._entries.move_to_end(_ram_key(entry))

    def pop(self, entry: RamEntry) -> None:
        del self._entries[_ram_key(entry)]
        self.nbytes -= entry.nbytes

    def insert(self, entry: RamEntry) -> None:
        """Add or replace an entry; a trimmable one replaces the entries it extends."""
        same = self._entries.get(_ram_key(entry))
        if same is not None:
            self.pop(same)
        if entry.trimmable:
            for other in list(self._entries.values()):
                if other.model == entry.model and extends(entry.tokens, other.tokens):
                    self.pop(other)
        self._entries[_ram_key(entry)] = entry
        self.nbytes += entry.nbytes

    def evict(self, max_bytes: int, max_entries: int, keep: Optional[RamEntry] = None) -> list[RamEntry]:
        """Take out entries until the tier fits, least recently used first and the
        system prompt's checkpoints last; `keep` stays unless it alone is too big."""
        if keep is not None and keep.nbytes > max_bytes:
            self.pop(keep)
            return [keep]
        order = sorted(self._entries.values(), key=lambda e: e.kind == "system")  # stable: LRU within
        evicted = []
        for entry in order:
            if self.nbytes <= max_bytes and len(self._entries) <= max_entries:
                break
            if entry is not keep:
                self.pop(entry)
                evicted.append(entry)
        return evicted


def _ram_key(entry: RamEntry) -> tuple[str, bytes]:
    return entry.model, entry.tokens.tobytes()


class PrefixCache:
    """Both tiers behind one API. Engine thread only, but for `stats`."""

    def __init__(self, *, ram_bytes: int, ram_entries: int, disk_dir: Optional[Path], disk_bytes: int):
        self.ram_bytes = ram_bytes
        self.ram_entries = ram_entries
        self.ram = RamTier()
        self.disk: Optional[DiskTier] = None
        if disk_dir is not None and disk_bytes > 0:
            try:
                self.disk = DiskTier(Path(disk_dir), disk_bytes, max_pending_bytes=max(ram_bytes, 1 << 30))
            except OSError as e:
                log.error("prefix cache: no disk tier, %s cannot be used: %s", disk_dir, e)
        self.hits = {"ram": 0, "disk": 0, "miss": 0}
        self.cached_tokens = {"ram": 0, "disk": 0}
        self._keys: dict[str, tuple[Any, str]] = {}
        disk = self.disk.stats() if self.disk else None
        log.info(
            "prefix cache: RAM up to %.2f GB; %s",
            ram_bytes / (1 << 30),
            f"disk {disk['dir']}: {disk['entries']} entries, {disk['bytes'] / (1 << 30):.2f} of "
            f"{disk_bytes / (1 << 30):.2f} GB" if disk else "no disk tier",
        )

    @property
    def nbytes(self) -> int:
        return self.ram.nbytes

    def fetch(self, lm, tokens: list[int]) -> tuple[Optional[list], list[int]]:
        """The cache of the longest known prefix and the tokens still to read
        (at least one: the model needs it to produce logits). The cache is the
        caller's: to write into, and to `save` back when done."""
        key = self._key(lm)
        prompt = np.asarray(tokens, np.int32)
        entry, n = self.ram.find(key, prompt)
        cache, tier = None, "miss"
        if self.disk is not None and len(tokens) > 1:
            disk_entry, n_disk = self.disk.find(key, prompt, lm.cache_trimmable)
            if disk_entry is not None and n_disk >= n + MIN_DISK_GAIN:
                start = time.perf_counter()
                cache = self.disk.load(disk_entry)
                if cache is not None:
                    cache, n, tier = [_adopted(c) for c in cache], n_disk, "disk"
                    _trim(cache, len(disk_entry.tokens) - n)
                    log.info("prefix cache: %d of %d prompt tokens from disk (%.1f MB in %.2f s)",
                             n, len(tokens), disk_entry.nbytes / 1e6, time.perf_counter() - start)
        if cache is None and entry is not None:
            cache, tier = self._take(entry, n, len(tokens)), "ram"
        if cache is None:
            self.hits["miss"] += 1
            return None, tokens
        self.hits[tier] += 1
        self.cached_tokens[tier] += n
        return cache, tokens[n:]

    def _take(self, entry: RamEntry, n: int, n_prompt: int) -> list:
        """An entry's cache, cut to the `n` tokens it serves of an `n_prompt`-token prompt.

        A request that reads all the entry was asked with continues that conversation:
        it takes the entry, buffers and all, and saves it back longer (what it drops is
        the tail of a generation that the next turn rendered otherwise). Anyone else
        gets a copy of those `n` tokens, in a buffer sized for its own prompt."""
        from mlx_lm.models.cache import KVCache

        from .kv_cache import HandoffKVCache

        if not all(type(c) in (KVCache, HandoffKVCache) for c in entry.cache):
            self.ram.touch(entry)
            cache = copy.deepcopy(entry.cache)  # caches of other kinds are copied as mlx-lm does
        elif n >= entry.prompt_len - 1:
            self.ram.pop(entry)
            cache = [_adopted(c) for c in entry.cache]
        else:
            self.ram.touch(entry)
            return [HandoffKVCache.copy_of(c, n, n_prompt) for c in entry.cache]
        _trim(cache, len(entry.tokens) - n)
        return cache

    def save(self, lm, tokens: list[int], cache: list, kind: str = "assistant",
             prompt_len: Optional[int] = None) -> None:
        """Keep a sequence's cache for later prefix hits; `prompt_len` of its tokens
        were the request's prompt (default: all). It is evaluated now: a cache taken
        from a batch of several is a lazy copy that would otherwise hold the batch's
        whole buffers alive, outside the byte budget, until first used."""
        import mlx.core as mx
        from mlx_lm.models.cache import can_trim_prompt_cache

        mx.eval([c.state for c in cache])
        tokens = np.asarray(tokens, np.int32)
        entry = RamEntry(self._key(lm), tokens, cache, sum(c.nbytes for c in cache), kind,
                         len(tokens) if prompt_len is None else min(prompt_len, len(tokens)),
                         can_trim_prompt_cache(cache))
        self.ram.insert(entry)
        self._spill(self.ram.evict(self.ram_bytes, self.ram_entries, keep=entry))

    def spill(self) -> None:
        """Move every RAM entry to disk (or drop it, without a disk tier): models unload."""
        self._spill(self.ram.evict(0, 0))

    def close(self, timeout: float = 20.0) -> None:
        """At exit: RAM to disk, and the writer given `timeout` seconds to finish."""
        n = len(self.ram)
        self.spill()
        if self.disk is not None:
            if n:
                log.info("prefix cache: writing %d entries to disk before exit", n)
            if not self.disk.close(timeout):
                log.warning("prefix cache: the disk writer did not finish within %.0f s", timeout)

    def stats(self) -> dict:
        """Tier sizes, hits by tier and what the disk tier wrote (any thread)."""
        return {
            "ram": {"bytes": self.ram.nbytes, "entries": len(self.ram), "budget_bytes": self.ram_bytes},
            "disk": self.disk.stats() if self.disk is not None else None,
            "hits": dict(self.hits),
            "cached_tokens": dict(self.cached_tokens),
        }

    def _spill(self, evicted: list[RamEntry]) -> None:
        if self.disk is None:
            return
        for entry in evicted:
            self.disk.put(entry.model, entry.tokens.tolist(), entry.cache, trimmable=entry.trimmable)

    def _key(self, lm) -> str:
        """The model's fingerprint, computed once per load (a reload may see new files)."""
        known = self._keys.get(lm.name)
        if known is None or known[0]() is not lm:
            known = (weakref.ref(lm), model_key(lm.path))
            self._keys[lm.name] = known
        return known[1]


def _adopted(cache):
    """A plain KV cache as one the batch adopts without a copy (the caller gives it up)."""
    from mlx_lm.models.cache import KVCache

    from .kv_cache import HandoffKVCache

    return HandoffKVCache.adopt(cache) if type(cache) is KVCache else cache


def _trim(cache: list, n: int) -> None:
    """Cut `n` tokens off the end of a cache (only trimmable caches serve less than they hold)."""
    from mlx_lm.models.cache import trim_prompt_cache

    if n > 0:
        trim_prompt_cache(cache, n)
