"""The engine's MLX work on its batch and prefix cache, as a few plain-data operations.

`Steps` is the one place where the engine touches mlx-lm's `BatchGenerator` and
the prefix cache (`prefix_cache.PrefixCache`): open a batch for a model, admit a
prompt, step, remove, extract and save caches. Every argument is plain data
(token lists, numbers), so in a distributed group rank 0's `Steps` records each
operation and sends the list to the other ranks before each batch step (`Link`,
in `distributed.py`); their `Steps` replay it. Every rank then runs the same MLX
calls in the same order, so the model's collectives pair up, and holds the same
batch and prefix cache. On one machine nothing is recorded.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Any, Optional

log = logging.getLogger("mlxd.engine")


class Diverged(RuntimeError):
    """A follower's replay did not give what rank 0 got: its state is not rank 0's."""


class Steps:
    """The batch and prefix cache of the engine thread (engine-thread only)."""

    def __init__(self, *, stream, prefix_cache, max_batch_size: int, prefill_step_size: int, link=None):
        self.stream = stream
        self.prefix_cache = prefix_cache
        self.max_batch_size = max_batch_size
        self.prefill_step_size = prefill_step_size
        self.link = link  # rank 0 of a group: where the operations go
        self.batch = None
        self.lm = None  # the LoadedModel the batch runs
        self.layers = 0  # its layer count when all keep plain KV caches (see _plain_kv_layers)
        # A group's prefix caches stay in RAM: what a disk tier holds depends on its writer's timing.
        self.settings = dict(max_batch_size=max_batch_size, prefill_step_size=prefill_step_size,
                             ram_bytes=prefix_cache.ram_bytes, ram_entries=prefix_cache.ram_entries)
        # The followers build their Steps from rank 0's settings.
        self._pending: list[tuple] = [("setup", self.settings)] if link is not None else []
        # Caches taken out of the batch (removed, extracted, finished) until saved or the
        # next step: (cache, its tokens, how many of them were the prompt).
        self._held: dict[int, tuple[list, list[int], int]] = {}
        self._prompt_lens: dict[int, int] = {}  # of the sequences in the batch

    @contextlib.contextmanager
    def _collective(self):
        """MLX work that may wait on other ranks: in a group, its failure is the group's."""
        try:
            yield
        except Exception as e:
            if self.link is not None:
                self.link.lost(e)
            raise

    def _record(self, op: str, *args) -> None:
        if self.link is not None:
            self._pending.append((op, *args))

    # Operations -------------------------------------------------------
    def open(self, lm, seed: Optional[int] = None) -> None:
        """A fresh batch for `lm` (a LoadedModel). In a group rank 0 draws the seed that
        every rank starts sampling from, so sampled tokens are the same on every rank."""
        import mlx.core as mx
        from mlx_lm.generate import BatchGenerator

        self.close()
        if self.link is not None and seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        if seed is not None:
            mx.random.seed(seed)
        self._record("open", lm.name, seed)
        self.lm = lm
        self.layers = _plain_kv_layers(lm.model)
        self.batch = BatchGenerator(
            lm.model,
            completion_batch_size=self.max_batch_size,
            prefill_batch_size=self.max_batch_size,
            prefill_step_size=self.prefill_step_size,
            stream=self.stream,
        )

    def close(self) -> None:
        if self.batch is not None:
            self._record("close")
            batch, self.batch, self.lm = self.batch, None, None
            self._held.clear()
            self._prompt_lens.clear()
            batch.close()

    def spill(self) -> None:
        """Move every saved prefix out of RAM (to disk, if there is a disk tier): a model unloads."""
        self._record("spill")
        self.prefix_cache.spill()

    def admit(self, tokens: list[int], checkpoints: dict[int, str], max_tokens: int, sampling: dict,
              grammar: dict, stop: list[tuple[int, ...]],
              expect: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        """Insert a prompt into the batch, resuming from its longest cached prefix.

        `sampling` holds temperature, top_p, min_p, top_k and optionally seed,
        logit_bias, repetition_penalty, presence_penalty and frequency_penalty;
        `grammar` the arguments of `constrained.processor_for` but the tokenizer;
        `stop` the end-token sequences. Returns (uid, cached prompt tokens)."""
        import mlx.core as mx
        from mlx_lm.generate import StopSequences
        from mlx_lm.sample_utils import make_logits_processors

        from . import constrained
        from .kv_cache import HandoffKVCache

        sampler = _sampler(sampling["temperature"], sampling["top_p"], sampling["min_p"], sampling["top_k"])
        processors = make_logits_processors(
            sampling.get("logit_bias"),
            sampling.get("repetition_penalty"),
            presence_penalty=sampling.get("presence_penalty"),
            frequency_penalty=sampling.get("frequency_penalty"),
        )
        # first: it may refuse the request, which must leave no trace in the prefix cache
        masker = constrained.processor_for(self.lm.tokenizer, **grammar)
        if masker is not None:  # last, so that no bias can bring back a token it masked
            processors = [*processors, masker]
        cache, rest = self.prefix_cache.fetch(self.lm, tokens)
        if cache is None and self.layers:  # an empty cache whose buffer the batch will adopt
            cache = [HandoffKVCache() for _ in range(self.layers)]
        for c in cache or ():  # the batch allocates for the whole prompt at once, not 256 tokens at a time
            if isinstance(c, HandoffKVCache):
                c.reserve = len(tokens)
        n_cached = len(tokens) - len(rest)
        cuts = {n: kind for n, kind in checkpoints.items() if n > n_cached}
        if sampling.get("seed") is not None:
            mx.random.seed(sampling["seed"] & 0xFFFF_FFFF_FFFF_FFFF)  # int64 in, MLX takes uint64
        (uid,) = self.batch.insert_segments(
            segments=[_segments(tokens, n_cached, cuts)],
            max_tokens=[max_tokens],
            caches=[cache],
            all_tokens=[tokens[:n_cached]],
            samplers=[sampler],
            logits_processors=[processors],
            stop_sequences=[StopSequences([tuple(s) for s in stop])],
        )
        if expect is not None and expect != (uid, n_cached):
            raise Diverged(f"admitted as (uid, cached tokens) {(uid, n_cached)}, rank 0 got {expect}")
        self._prompt_lens[uid] = len(tokens)
        self._record("admit", tokens, checkpoints, max_tokens, sampling, grammar, stop, (uid, n_cached))
        return uid, n_cached

    def next(self):
        """One batch step: (prompt responses, generation responses). The caches of
        sequences that finish are held for `save`."""
        if self.link is not None:
            self._pending.append(("next",))
            self.link.send(self._pending, self.stream)
            self._pending = []
        self._held.clear()
        with self._collective():
            prompt_responses, gen_responses = self.batch.next()
        for r in gen_responses:
            if r.finish_reason is not None:
                self._held[r.uid] = (r.prompt_cache, r.all_tokens, self._prompt_lens.pop(r.uid, len(r.all_tokens)))
        return prompt_responses, gen_responses

    def remove(self, uids: list[int]) -> dict[int, int]:
        """Take sequences out of the batch; their caches are held for `save`.
        Returns each one's token count."""
        self._record("remove", list(uids))
        caches = self.batch.remove(list(uids), return_prompt_caches=True)
        for uid, (cache, tokens) in caches.items():
            self._held[uid] = (cache, tokens, self._prompt_lens.pop(uid, len(tokens)))
        return {uid: len(tokens) for uid, (_, tokens) in caches.items()}

    def extract(self, uids: list[int]) -> dict[int, int]:
        """Copy sequences' caches so far (at a prompt checkpoint) for `save`; returns their token counts."""
        self._record("extract", list(uids))
        caches = self.batch.extract_cache(list(uids))
        for uid, (cache, tokens) in caches.items():
            self._held[uid] = (cache, list(tokens), len(tokens))
        return {uid: len(tokens) for uid, (_, tokens) in caches.items()}

    def save(self, uid: int, kind: str = "assistant") -> None:
        """Keep a held cache for later prefix hits."""
        self._record("save", uid, kind)
        cache, tokens, prompt_len = self._held.pop(uid)
        with self._collective():  # evaluating it may wait on a step still running across the group
            self.prefix_cache.save(self.lm, tokens, cache, kind, prompt_len)

    def idle(self) -> None:
        """Nothing to step: a group's rank 0 still sends what it recorded (a heartbeat
        when nothing), so followers stay current and a lost rank shows."""
        if self.link is not None:
            self.link.heartbeat(self._pending, self.stream)
            self._pending = []

    # Follower side ----------------------------------------------------
    def replay(self, ops: list[tuple], lm) -> None:
        """Run rank 0's operations here, with this rank's shard of the model (`lm`)."""
        for op, *args in ops:
            if op == "open":
                name, seed = args
                if name != lm.name:
                    raise Diverged(f"rank 0 opened a batch for {name}; this rank holds {lm.name}")
                self.open(lm, seed)
            elif op == "admit":
                *call, expect = args
                self.admit(*call, expect=expect)
            else:
                getattr(self, op)(*args)


def _plain_kv_layers(model) -> int:
    """The model's layer count when every layer keeps a plain KV cache (then the batch
    adopts buffers the prefix cache hands over, `kv_cache`); 0 for other kinds
    (rotating, recurrent), whose caches mlx-lm makes and copies as it does."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    cache = make_prompt_cache(model)
    return len(cache) if all(type(c) is KVCache for c in cache) else 0


def _segments(tokens: list[int], n_cached: int, checkpoints: dict[int, Any]) -> list[list[int]]:
    """The uncached part of the prompt, cut at the checkpoints: the batch
    generator pauses at each cut, where the engine saves the cache."""
    cuts = sorted(checkpoints) + [len(tokens)]
    starts = [n_cached] + cuts[:-1]
    return [tokens[a:b] for a, b in zip(starts, cuts)]


@functools.lru_cache(maxsize=64)
def _sampler(temperature: float, top_p: float, min_p: float, top_k: int):
    """One sampler object per setting: mlx-lm samples a whole batch in one call
    when its requests share the sampler object (greedy ones always do)."""
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(temperature, top_p=top_p, min_p=min_p, top_k=top_k)
