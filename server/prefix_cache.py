"""The prefix cache: KV caches of earlier prompts, so that a request sharing a
prefix with one of them reads only the rest.

Two tiers. RAM: mlx-lm's `LRUPromptCache` (whole turns, and checkpoints at message
ends). Disk (`disk_cache.DiskTier`): what RAM evicts goes there instead of away,
and it survives restarts; at exit the RAM tier is written out too. A lookup takes
whichever tier serves more of the prompt.

`ram_bytes` bounds the saved caches only: the live batch's KV is bounded by the
batch size and the context window. The entry just saved is never evicted in the
same step unless it alone exceeds the budget.

Entries are keyed by a fingerprint of the model's files (`model_key`), so changed
weights or a changed tokenizer never reuse old KV.
"""

from __future__ import annotations

import hashlib
import logging
import time
import weakref
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .disk_cache import DiskTier

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


class PrefixCache:
    """Both tiers behind one API. Engine thread only, but for `stats`."""

    def __init__(self, *, ram_bytes: int, ram_entries: int, disk_dir: Optional[Path], disk_bytes: int):
        from mlx_lm.models.cache import LRUPromptCache

        self.ram_bytes = ram_bytes
        self.ram_entries = ram_entries
        self.ram = LRUPromptCache(max_size=1 << 62, max_bytes=1 << 62)  # limits applied by _evict
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
        (at least one: the model needs it to produce logits)."""
        key = self._key(lm)
        cache, rest = _fetch_ram(self.ram, key, tokens)
        tier = "ram" if cache is not None else "miss"
        if self.disk is not None and len(tokens) > 1:
            entry, n_disk = self.disk.find(key, np.asarray(tokens, np.int32), lm.cache_trimmable)
            if entry is not None and n_disk >= len(tokens) - len(rest) + MIN_DISK_GAIN:
                start = time.perf_counter()
                loaded = self.disk.load(entry)
                if loaded is not None:
                    from mlx_lm.models.cache import trim_prompt_cache

                    if len(entry.tokens) > n_disk:
                        trim_prompt_cache(loaded, len(entry.tokens) - n_disk)
                    cache, rest, tier = loaded, tokens[n_disk:], "disk"
                    log.info("prefix cache: %d of %d prompt tokens from disk (%.1f MB in %.2f s)",
                             n_disk, len(tokens), entry.nbytes / 1e6, time.perf_counter() - start)
        self.hits[tier] += 1
        if cache is not None:
            self.cached_tokens[tier] += len(tokens) - len(rest)
        return cache, rest

    def save(self, lm, tokens: list[int], cache: list, kind: str = "assistant") -> None:
        """Keep a sequence's cache for later prefix hits. It is evaluated now: a
        cache taken from the batch is a lazy copy that would otherwise hold the
        batch's whole buffers alive, outside the byte budget, until first used."""
        import mlx.core as mx

        mx.eval([c.state for c in cache])
        key, tokens = self._key(lm), list(tokens)
        self.ram.insert_cache(key, tokens, cache, cache_type=kind)
        self._spill(_evict(self.ram, self.ram_bytes, self.ram_entries, keep=(key, tokens)))

    def spill(self) -> None:
        """Move every RAM entry to disk (or drop it, without a disk tier): models unload."""
        self._spill(_evict(self.ram, 0, 0))

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

    def _spill(self, evicted: list[tuple[str, list[int], list]]) -> None:
        if self.disk is None:
            return
        from mlx_lm.models.cache import can_trim_prompt_cache

        for key, tokens, cache in evicted:
            self.disk.put(key, tokens, cache, trimmable=can_trim_prompt_cache(cache))

    def _key(self, lm) -> str:
        """The model's fingerprint, computed once per load (a reload may see new files)."""
        known = self._keys.get(lm.name)
        if known is None or known[0]() is not lm:
            known = (weakref.ref(lm), model_key(lm.path))
            self._keys[lm.name] = known
        return known[1]


def _fetch_ram(ram, key: str, tokens: list[int]):
    """The longest prefix in RAM, always leaving at least one token to feed the model.

    A cache that cannot be trimmed (rotating, recurrent) cannot give back its
    last token, so a prompt it covers whole resumes from a shorter checkpoint.
    """
    from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

    cache, rest = ram.fetch_nearest_cache(key, tokens)
    if cache is not None and not rest:
        if can_trim_prompt_cache(cache):
            trim_prompt_cache(cache, 1)
            return cache, tokens[-1:]
        cache, rest = ram.fetch_nearest_cache(key, tokens[:-1])
        rest = rest + tokens[-1:]
    return cache, rest


def _evict(ram, max_bytes: int, max_entries: int, keep: Optional[tuple] = None) -> list[tuple]:
    """Evict least recently used entries from mlx-lm's LRUPromptCache until it fits,
    returning them (model, tokens, cache). `keep` stays unless it alone is too big.

    LRUPromptCache drops what it evicts; this is its `trim_to` with the entries handed back."""
    evicted, held = [], None

    def over() -> bool:
        return ram.nbytes > max_bytes or len(ram) + (held is not None) > max_entries

    def pop(model, tokens) -> None:
        entry = ram._trie.pop(model, tokens)
        ram._n_bytes -= entry.nbytes
        ram._n_bytes_by_type[entry.cache_type] -= entry.nbytes
        evicted.append((model, tokens, entry.prompt_cache))

    if keep is not None and ram._trie.get(*keep).nbytes > max_bytes:  # it alone is too big: it goes, alone
        ram._lru.remove(*keep)
        pop(*keep)
        keep = None
    while over() and len(ram):
        model, tokens = ram._lru.pop()
        if held is None and keep is not None and model == keep[0] and tokens == keep[1]:
            held = (model, tokens)
            continue
        pop(model, tokens)
    if held is not None:
        ram._lru.push(*held, ram._trie.get(*held).cache_type)
    return evicted
