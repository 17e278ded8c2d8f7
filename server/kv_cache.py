"""KV caches that pass between the prefix cache and the batch without copies.

mlx-lm's batch copies a sequence's KV several times: into a new batch buffer when
it is admitted, again when it moves from prefill to decode, by concatenation each
time it grows by 256 tokens, and out again when it ends. At agent lengths (16k
tokens are hundreds of MB) each copy costs more than the new turn's prefill: a
fresh buffer is page-faulted in and filled.

MLX arrays are values: writing into one updates its buffer in place when nothing
else holds that buffer, and copies it first when something does. So a buffer that
one owner hands to the next is never copied, and a shared one is copied once, at
its first write, with no way to corrupt the other holder. The classes here only
hand buffers over: `HandoffKVCache` is one sequence's cache as the prefix cache
gives it to the batch (the buffer of the conversation it continues, or its own
copy of the part it shares with another), and `HandoffBatchKVCache` is mlx-lm's `BatchKVCache` that,
for a batch of one sequence, adopts that buffer as it is, keeps it when the
sequence moves to decoding, and gives it back whole when the sequence leaves.
It also grows in proportion to its length, making room at once for the whole
prompt still to read (`reserve`), so a long sequence is rarely re-allocated and
its saved cache has room for the next turn.
"""

from __future__ import annotations

from mlx_lm.models.cache import BatchKVCache, KVCache

# Room added when a cache grows, as a share of what it holds (at least mlx-lm's 256 tokens).
GROWTH = 1 / 8


def _round_up(n: int, step: int = KVCache.step) -> int:
    return -(-n // step) * step


class HandoffKVCache(KVCache):
    """One sequence's KV cache, its buffer possibly larger than `offset`; the batch
    adopts the buffer rather than copying it. `reserve`: the tokens the sequence
    will hold once its prompt is read, so the batch allocates for them at once."""

    reserve = 0

    @classmethod
    def merge(cls, caches):
        return HandoffBatchKVCache.merge(caches)

    @classmethod
    def adopt(cls, cache: KVCache) -> "HandoffKVCache":
        """The same arrays under this class (the caller gives up `cache`)."""
        handoff = cls()
        handoff.keys, handoff.values, handoff.offset = cache.keys, cache.values, cache.offset
        return handoff

    @classmethod
    def copy_of(cls, cache: KVCache, n: int, room: int) -> "HandoffKVCache":
        """Its own copy of the first `n` tokens of `cache` (which stays as it is), in a
        buffer with room for `room` tokens: a request sharing a few hundred tokens of
        a long conversation copies those, not the conversation."""
        import mlx.core as mx

        handoff = cls()
        if cache.keys is not None and n > 0:
            batch, heads, _, _ = cache.keys.shape
            size = _round_up(max(n, room) + int(max(n, room) * GROWTH))
            handoff.keys, handoff.values = (
                mx.concatenate([a[..., :n, :], mx.zeros((batch, heads, size - n, a.shape[3]), a.dtype)], axis=2)
                for a in (cache.keys, cache.values)
            )
            handoff.offset = n
        return handoff


class HandoffBatchKVCache(BatchKVCache):
    """mlx-lm's BatchKVCache, without its copies for a batch of one sequence."""

    _reserve = 0

    @property
    def step(self) -> int:  # read by BatchKVCache.update_and_fetch when it grows
        return max(KVCache.step, _round_up(max(0, self._reserve - self._idx) + int(self._idx * GROWTH)))

    @classmethod
    def merge(cls, caches):
        if len(caches) == 1:  # its buffer becomes the batch's as it is
            (cache,) = caches
            batch = cls([0])
            if cache.keys is not None:
                batch.keys, batch.values = cache.keys, cache.values
                batch.offset = batch.offset + cache.offset
                batch._idx = cache.offset
        elif all(c.size() == 0 for c in caches):
            batch = cls([0] * len(caches))
        else:
            batch = super().merge(caches)
        batch._reserve = max(getattr(c, "reserve", 0) for c in caches)
        return batch

    def filter(self, batch_indices):
        if list(batch_indices) == list(range(self.offset.shape[0])):
            return  # everyone stays: a gather would only copy the buffer
        super().filter(batch_indices)

    def extract(self, idx):
        """A batch of one gives its whole buffer, as a new array object: it costs
        nothing once the batch lets go of the sequence, and if the sequence goes on
        (a checkpoint), the batch's next write copies the buffer first."""
        if self.keys is None or self.keys.shape[0] > 1 or self.left_padding.tolist() != [0]:
            return super().extract(idx)
        cache = HandoffKVCache()
        cache.keys, cache.values, cache.offset = self.keys[...], self.values[...], self._idx
        return cache
