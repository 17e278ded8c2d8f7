"""The prefix cache's tiers in-process, with real MLX KV caches: files, index,
budgets, corruption and model fingerprints. The server-level behaviour is in
tests/test_prefix_cache_disk.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache, RotatingKVCache

from mlxd.server.disk_cache import DiskTier, read_header
from mlxd.server.prefix_cache import MIN_DISK_GAIN, PrefixCache, model_key

LAYERS, HEADS, DIM = 2, 2, 8
ENTRY_BYTES = LAYERS * 2 * HEADS * DIM * 4  # per token, float32


def kv_cache(n_tokens: int, seed: int) -> list:
    mx.random.seed(seed)
    cache = []
    for _ in range(LAYERS):
        c = KVCache()
        c.update_and_fetch(mx.random.normal((1, HEADS, n_tokens, DIM)), mx.random.normal((1, HEADS, n_tokens, DIM)))
        cache.append(c)
    return cache


def same_kv(a: list, b: list, n: int) -> bool:
    return all(
        x.offset == y.offset == n
        and mx.array_equal(x.keys[..., :n, :], y.keys[..., :n, :]).item()
        and mx.array_equal(x.values[..., :n, :], y.values[..., :n, :]).item()
        for x, y in zip(a, b)
    )


def written(tier: DiskTier) -> None:
    """Wait until the writer has done everything queued."""
    tier._jobs.join()


def files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.safetensors"))


def prompt(*parts) -> np.ndarray:
    return np.concatenate([np.asarray(p, np.int32) for p in parts])


def test_an_entry_survives_a_restart_and_loads_the_same_kv(tmp_path):
    cache = kv_cache(40, seed=1)
    tokens = list(range(40))
    tier = DiskTier(tmp_path, 1 << 20, 1 << 30)
    tier.put("m", tokens, cache, trimmable=True)
    # Served from memory while (or before) it is written.
    entry, n = tier.find("m", prompt(range(40), [7, 7]), trimmable=True)
    assert n == 40 and same_kv(tier.load(entry), cache, 40)
    assert tier.close(30)
    stats = tier.stats()
    assert stats["files_written"] == 1 and stats["bytes_written"] == files(tmp_path)[0].stat().st_size
    assert read_header(files(tmp_path)[0])[1].tolist() == tokens

    again = DiskTier(tmp_path, 1 << 20, 1 << 30)  # the index comes back from the directory
    assert again.stats()["entries"] == 1
    entry, n = again.find("m", prompt(range(30), [9, 9]), trimmable=True)
    assert n == 30  # a trimmable cache serves the common prefix
    assert same_kv(again.load(entry), cache, 40)
    assert again.find("other-model", prompt(range(40), [1]), trimmable=True) == (None, 0)
    again.close(30)


def test_a_cache_that_cannot_be_trimmed_serves_only_as_a_strict_prefix(tmp_path):
    tier = DiskTier(tmp_path, 1 << 20, 1 << 30)
    tier.put("m", list(range(20)), kv_cache(20, seed=2), trimmable=False)
    assert tier.find("m", prompt(range(20), [5]), trimmable=False)[1] == 20
    assert tier.find("m", prompt(range(20)), trimmable=False)[1] == 0  # nothing left to feed
    assert tier.find("m", prompt(range(10), [99] * 20), trimmable=False)[1] == 0
    tier.close(30)


def test_a_truncated_file_is_a_miss_and_is_deleted(tmp_path):
    tier = DiskTier(tmp_path, 1 << 20, 1 << 30)
    tier.put("m", list(range(30)), kv_cache(30, seed=3), trimmable=True)
    tier.put("m", [5] * 30, kv_cache(30, seed=4), trimmable=True)
    tier.close(30)
    first, second = sorted(files(tmp_path), key=lambda p: read_header(p)[1][0])
    # Found unreadable at start: deleted while the index is rebuilt.
    first.write_bytes(first.read_bytes()[:-100])
    tier = DiskTier(tmp_path, 1 << 20, 1 << 30)
    assert not first.exists() and tier.stats()["corrupt_files"] == 1 and tier.stats()["entries"] == 1
    # Damaged after the index was built: the load fails, the file goes, the lookup is a miss.
    entry, n = tier.find("m", prompt([5] * 30, [1]), trimmable=True)
    assert n == 30
    data = bytearray(second.read_bytes())
    second.write_bytes(bytes(data[:-200]))
    assert tier.load(entry) is None
    assert tier.stats()["corrupt_files"] == 2 and tier.find("m", prompt([5] * 30, [1]), trimmable=True) == (None, 0)
    written(tier)
    assert not second.exists()
    tier.close(30)
    # A file that is not a prompt cache at all, and a write interrupted before its rename.
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "junk.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "m" / "x.safetensors.tmp").write_bytes(b"half")
    tier = DiskTier(tmp_path, 1 << 20, 1 << 30)
    assert tier.stats()["entries"] == 0 and not list((tmp_path / "m").iterdir())
    tier.close(30)


def test_the_disk_budget_evicts_least_recently_used_entries(tmp_path):
    one = 20 * ENTRY_BYTES
    tier = DiskTier(tmp_path, int(2.5 * one), 1 << 30)
    for i in range(3):
        tier.put("m", [i] * 20, kv_cache(20, seed=i), trimmable=True)
        written(tier)
        if i == 1:  # entry 0 is used again, so entry 1 is now the least recently used
            entry, _ = tier.find("m", prompt([0] * 20, [1]), trimmable=True)
            assert tier.load(entry) is not None
    written(tier)
    stats = tier.stats()
    on_disk = files(tmp_path)
    assert stats["entries"] == len(on_disk) == 2
    assert stats["bytes"] == sum(p.stat().st_size for p in on_disk) <= stats["budget_bytes"]
    assert sorted(read_header(p)[1][0] for p in on_disk) == [0, 2]
    # An entry larger than the whole budget is not written at all.
    tier.put("m", [9] * 60, kv_cache(60, seed=9), trimmable=True)
    assert tier.stats()["dropped_entries"] == 1 and tier.stats()["entries"] == 2
    tier.close(30)


def test_a_longer_trimmable_entry_replaces_its_prefixes(tmp_path):
    tier = DiskTier(tmp_path, 1 << 20, 1 << 30)
    tier.put("m", list(range(10)), kv_cache(10, seed=5), trimmable=True)
    tier.put("m", list(range(25)), kv_cache(25, seed=6), trimmable=True)
    written(tier)
    assert [len(read_header(p)[1]) for p in files(tmp_path)] == [25]
    tier.close(30)


def test_the_model_fingerprint_follows_weights_and_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')
    (tmp_path / "tokenizer.json").write_text('{"v": 1}')
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {"w": mx.ones((4, 4))})
    key = model_key(tmp_path)
    assert model_key(tmp_path) == key
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {"w": mx.zeros((4, 4))})
    changed_weights = model_key(tmp_path)
    assert changed_weights != key
    (tmp_path / "tokenizer.json").write_text('{"v": 2}')
    assert model_key(tmp_path) not in (key, changed_weights)


@dataclass(eq=False)
class _Model:
    """What the prefix cache reads of a loaded model."""

    name: str
    path: Path
    cache_trimmable: bool = True


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


def test_the_ram_budget_keeps_the_entry_just_saved_and_spills_to_disk(tmp_path, model_dir):
    lm = _Model("m", model_dir)
    first, second = kv_cache(40, seed=7), kv_cache(40, seed=8)
    one = sum(c.nbytes for c in first)
    cache = PrefixCache(ram_bytes=int(1.5 * one), ram_entries=16, disk_dir=tmp_path / "kv", disk_bytes=1 << 20)
    cache.save(lm, [1] * 40, first)
    cache.save(lm, [2] * 40, second)
    # The second turn's own cache stays in RAM; the older one went to disk.
    stats = cache.stats()
    assert stats["ram"]["entries"] == 1 and stats["ram"]["bytes"] == one <= stats["ram"]["budget_bytes"]
    assert stats["disk"]["entries"] == 1
    hit, rest = cache.fetch(lm, [2] * 40 + [3])
    assert rest == [3] and same_kv(hit, second, 40)
    cache.save(lm, [2] * 40, hit)  # the next turn took it and gives it back
    hit, rest = cache.fetch(lm, [1] * 40 + [3])
    assert rest == [3] and same_kv(hit, first, 40)
    assert cache.stats()["hits"] == {"ram": 1, "disk": 1, "miss": 0}
    assert cache.stats()["cached_tokens"] == {"ram": 40, "disk": 40}
    # An entry that alone exceeds the budget does not stay, and evicts nothing else.
    big = kv_cache(300, seed=9)
    assert sum(c.nbytes for c in big) > 1.5 * one
    cache.save(lm, [4] * 300, big)
    assert cache.stats()["ram"]["entries"] == 1 and cache.nbytes == one
    assert cache.stats()["disk"]["entries"] == 2
    cache.close()
    assert cache.stats()["disk"]["files_written"] == 3  # at exit RAM goes to disk too


def test_a_disk_entry_is_used_only_when_it_serves_more_than_ram(tmp_path, model_dir):
    lm = _Model("m", model_dir)
    cache = PrefixCache(ram_bytes=1 << 20, ram_entries=1, disk_dir=tmp_path / "kv", disk_bytes=1 << 20)
    cache.save(lm, list(range(60)), kv_cache(60, seed=10))
    cache.save(lm, list(range(10)) + [99] * 5, kv_cache(15, seed=11))  # one entry in RAM: the first spills
    hit, rest = cache.fetch(lm, list(range(55)) + [7])
    assert len(rest) == 1 and hit[0].offset == 55 and cache.stats()["hits"]["disk"] == 1
    hit, rest = cache.fetch(lm, list(range(10)) + [99] * 5 + [7])
    assert rest == [7] and cache.stats()["hits"]["ram"] == 1
    cache.save(lm, list(range(10)) + [99] * 5, hit)  # given back by the turn that took it
    # Reading a file to skip a few more tokens than RAM has is not worth it.
    hit, rest = cache.fetch(lm, list(range(10 + MIN_DISK_GAIN - 1)) + [7])
    assert hit[0].offset == 10 and cache.stats()["hits"] == {"ram": 2, "disk": 1, "miss": 0}
    cache.close()


def test_without_a_disk_tier_evictions_are_dropped(model_dir):
    lm = _Model("m", model_dir)
    cache = PrefixCache(ram_bytes=0, ram_entries=16, disk_dir=None, disk_bytes=0)
    cache.save(lm, [1] * 10, kv_cache(10, seed=12))
    assert cache.stats()["ram"]["entries"] == 0 and cache.stats()["disk"] is None
    assert cache.fetch(lm, [1] * 11) == (None, [1] * 11)
    cache.close()


def test_a_rotating_cache_round_trips(tmp_path):
    mx.random.seed(13)
    rotating = RotatingKVCache(max_size=16)
    rotating.update_and_fetch(mx.random.normal((1, HEADS, 24, DIM)), mx.random.normal((1, HEADS, 24, DIM)))
    tier = DiskTier(tmp_path, 1 << 20, 1 << 30)
    tier.put("m", list(range(24)), [rotating], trimmable=False)
    tier.close(30)
    tier = DiskTier(tmp_path, 1 << 20, 1 << 30)
    entry, n = tier.find("m", prompt(range(24), [1]), trimmable=False)
    (loaded,) = tier.load(entry)
    assert n == 24 and type(loaded) is RotatingKVCache and loaded.offset == rotating.offset
    assert mx.array_equal(loaded.keys, rotating.keys).item()
    tier.close(30)


def test_a_continuation_takes_the_entry_and_a_partial_match_gets_a_copy(model_dir):
    lm = _Model("m", model_dir)
    cache = PrefixCache(ram_bytes=1 << 30, ram_entries=16, disk_dir=None, disk_bytes=0)
    tokens = list(range(600))
    turn = kv_cache(600, seed=14)
    before = [np.array(c.keys[..., :600, :]) for c in turn]
    cache.save(lm, tokens, turn, prompt_len=590)  # asked with 590 tokens, 10 generated

    # Another conversation sharing 20 tokens: the entry stays, and this request gets
    # its own copy of those 20, in a buffer sized for its prompt rather than the entry's;
    # writing into it leaves the entry's KV as it was.
    shared, rest = cache.fetch(lm, tokens[:20] + [99] * 5)
    assert rest == [99] * 5 and shared[0].offset == 20 and len(cache.ram) == 1
    assert shared[0].keys.shape[2] < turn[0].keys.shape[2]
    for c in shared:
        c.update_and_fetch(mx.ones((1, HEADS, 5, DIM)), mx.ones((1, HEADS, 5, DIM)))
    mx.eval([c.state for c in shared])
    assert all(np.array_equal(np.array(c.keys[..., :20, :]), k[..., :20, :]) for c, k in zip(shared, before))

    # The next turn of the conversation reads all it was asked with: it takes the
    # entry out of RAM, its buffer included, and gets the entry's KV.
    taken, rest = cache.fetch(lm, tokens[:590] + [7, 7])
    assert rest == [7, 7] and len(cache.ram) == 0 and cache.nbytes == 0
    assert all(c.offset == 590 and np.array_equal(np.array(c.keys[..., :590, :]), k[..., :590, :])
               for c, k in zip(taken, before))
    assert all(c.keys.shape == t.keys.shape for c, t in zip(taken, turn))  # its room to grow came along
    assert cache.stats()["hits"] == {"ram": 2, "disk": 0, "miss": 0}
    cache.close()


def test_a_batch_of_one_adopts_the_buffer_and_gives_it_back_whole():
    from mlxd.server.kv_cache import HandoffBatchKVCache, HandoffKVCache

    (layer,) = kv_cache(40, seed=15)[:1]
    own = HandoffKVCache.adopt(layer)
    own.reserve = 1000
    batch = HandoffBatchKVCache.merge([own])
    assert batch.keys is layer.keys and batch.size() == 40
    batch.filter([0])  # the move from prefill to decode keeps it
    assert batch.keys is layer.keys
    # Growing makes room for the whole prompt at once, and an eighth more.
    batch.update_and_fetch(mx.ones((1, HEADS, 300, DIM)), mx.ones((1, HEADS, 300, DIM)))
    assert batch.keys.shape[2] >= 1000 + 340 // 8 and batch.size() == 340
    back = batch.extract(0)
    assert type(back) is HandoffKVCache and back.offset == 340 and back.keys.shape == batch.keys.shape
    assert np.array_equal(np.array(back.keys[..., 40:340, :]), np.ones((1, HEADS, 300, DIM), np.float32))

    # Several sequences are merged, filtered and extracted as mlx-lm does.
    other = HandoffKVCache.adopt(kv_cache(10, seed=16)[0])
    pair = HandoffBatchKVCache.merge([HandoffKVCache.adopt(kv_cache(40, seed=15)[0]), other])
    assert pair.keys.shape[0] == 2 and pair.size() == 40
    alone = pair.extract(1)
    assert alone.offset == 10 and same_kv([alone], [other], 10)
