"""The prefix cache's disk tier through real servers and the real openai client:
hits after RAM eviction, restarts, damaged files, changed weights, a stuck
writer and the disk budget. Expected cached-token counts come from the prompts
tokenized outside the server (tests/ground_truth.py)."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import pytest

from mlxd.server.disk_cache import read_header
from scripts.testmodels import build_random_model
from tests.ground_truth import prompt_ids
from tests.server_process import ServerProcess
from tests.test_runtime import _after, _conversation_turns, ask, cached, common_prefix, stream_text

WAIT_S = 60  # a bound on waiting for the server, never a speed assertion
FILLER = "The quick brown fox jumps over the lazy dog. " * 12
RAM_OFF = ["--prompt-cache-gb", "0"]  # every saved cache goes straight to the disk tier


@pytest.fixture(scope="module")
def disk_model(models_dir):
    return build_random_model(models_dir / "random-disk", context_length=4096)


def messages(tag: str, question: str = "Go on.") -> list[dict]:
    return [{"role": "system", "content": f"{tag}. {FILLER}"}, {"role": "user", "content": question}]


def cache_stats(server) -> dict:
    return server.get("/health").json()["memory"]["prompt_cache"]


def wait_until(server, condition, what: str) -> dict:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        stats = cache_stats(server)
        if condition(stats):
            return stats
        time.sleep(0.05)
    raise AssertionError(f"{what}: {cache_stats(server)}")


def entry_files(log_dir, kv_dir=None) -> list:
    """Entry files in `kv_dir`, by default in the server's $MLXD_HOME/kv (tests/server_process.py)."""
    return sorted((kv_dir or log_dir / "mlxd-home" / "kv").glob("*/*.safetensors"))


def test_a_disk_hit_after_ram_eviction_gives_the_cold_output(tmp_path, disk_model):
    first, second = messages("Alpha"), messages("Alpha", "Write a poem.")
    ids1, ids2 = prompt_ids(disk_model, first), prompt_ids(disk_model, second)
    server = ServerProcess(tmp_path, ["--model", str(disk_model), *RAM_OFF]).start()
    try:
        assert cached(ask(server, "random-disk", first, max_tokens=8)) == 0
        stats = wait_until(server, lambda s: s["disk"]["files_written"] >= 1 and not s["disk"]["pending_entries"],
                           "the first turn's cache was not written to disk")
        assert stats["ram"]["entries"] == 0 and stats["disk"]["bytes_written"] > 0
        warm = ask(server, "random-disk", second, max_tokens=12)
        assert cached(warm) == common_prefix(ids1, ids2) > len(ids2) // 2
        stats = cache_stats(server)
        assert stats["hits"]["disk"] == 1 and stats["cached_tokens"]["disk"] == cached(warm)
        assert "prompt tokens from disk" in server.log()
    finally:
        server.stop()
    cold_server = ServerProcess(tmp_path / "cold", ["--model", str(disk_model), *RAM_OFF,
                                                    "--prompt-cache-disk-gb", "0"])
    (tmp_path / "cold").mkdir()
    cold_server.start()
    try:
        cold = ask(cold_server, "random-disk", second, max_tokens=12)
        assert cached(cold) == 0 and cache_stats(cold_server)["disk"] is None
        assert warm.choices[0].message.content == cold.choices[0].message.content
        assert warm.usage.completion_tokens == cold.usage.completion_tokens == 12
    finally:
        cold_server.stop()


def test_a_restart_keeps_entries_and_deletes_a_damaged_one(tmp_path, greeting_model):
    a1, a2, _ = _conversation_turns(greeting_model)
    b1 = [{"role": "system", "content": "You are a careful reviewer."}, {"role": "user", "content": "Say hello."}]
    b2 = b1 + [{"role": "assistant", "content": a2[2]["content"]}, {"role": "user", "content": "Again."}]
    args = ["--model", str(greeting_model.path)]
    server = ServerProcess(tmp_path, args).start()
    try:
        assert cached(ask(server, "greeter", a1)) == 0
        assert cached(ask(server, "greeter", b1)) == common_prefix(_after(greeting_model, a1),
                                                                   prompt_ids(greeting_model.path, b1))
    finally:
        server.stop()  # the RAM tier is written to disk at exit
    files = entry_files(tmp_path)
    by_start = {tuple(read_header(f)[1].tolist()[:len(prompt_ids(greeting_model.path, b1))]): f for f in files}
    b_file = by_start[tuple(prompt_ids(greeting_model.path, b1))]
    b_file.write_bytes(b_file.read_bytes()[: b_file.stat().st_size // 2])  # a crash mid-copy, say

    server = ServerProcess(tmp_path, args).start()
    try:
        stats = cache_stats(server)
        assert stats["disk"]["corrupt_files"] == 1 and not b_file.exists()
        assert stats["disk"]["entries"] == len(files) - 1
        # The next turn of the conversation reads its whole history from disk.
        r = ask(server, "greeter", a2)
        assert cached(r) == len(_after(greeting_model, a1)) and r.choices[0].message.content
        assert cache_stats(server)["hits"]["disk"] == 1
        # The damaged conversation starts over: only the template's opening is shared.
        ids_b2 = prompt_ids(greeting_model.path, b2)
        expected = max(common_prefix(_after(greeting_model, m), ids_b2) for m in (a1, a2))
        assert cached(ask(server, "greeter", b2)) == expected < len(prompt_ids(greeting_model.path, b1)) // 2
    finally:
        server.stop()


def test_a_model_whose_weights_changed_never_reuses_an_old_entry(tmp_path, disk_model):
    model = tmp_path / "model"
    shutil.copytree(disk_model, model)
    chat = messages("Beta")
    ids = prompt_ids(model, chat)
    args = ["--model", str(model)]

    def turn() -> tuple[int, dict]:
        server = ServerProcess(tmp_path, args).start()
        try:
            return cached(ask(server, "model", chat, max_tokens=4)), cache_stats(server)
        finally:
            server.stop()

    assert turn()[0] == 0
    n, stats = turn()  # the same weights after a restart: a disk hit
    assert n == len(ids) - 1 and stats["hits"]["disk"] == 1
    weights = model / "model.safetensors"
    arrays = mx.load(str(weights))
    mx.save_safetensors(str(weights), {k: v * 0.5 for k, v in arrays.items()})
    n, stats = turn()
    assert n == 0 and stats["hits"] == {"ram": 0, "disk": 0, "miss": 1}
    assert stats["disk"]["entries"] >= 1 and stats["disk"]["corrupt_files"] == 0  # still there, never used


def test_a_stuck_disk_writer_never_blocks_decoding(tmp_path, disk_model):
    gate = tmp_path / "let-the-writer-go"
    server = ServerProcess(tmp_path, ["--model", str(disk_model), *RAM_OFF],
                           module="tests.slow_disk_server", env={"MLXD_TEST_WRITER_GATE": str(gate)}).start()
    try:
        chats = [messages(f"Gamma {i}") for i in range(3)]
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda m: stream_text(server, "random-disk", m, max_tokens=16), chats))
        for (text, usage, finish), chat in zip(results, chats):
            assert finish == "length" and usage.completion_tokens == 16 and text
            assert usage.prompt_tokens == len(prompt_ids(disk_model, chat))
        text, usage, finish = stream_text(server, "random-disk", messages("Gamma 3"), max_tokens=16)
        assert finish == "length" and usage.completion_tokens == 16
        stats = cache_stats(server)
        assert stats["disk"]["files_written"] == 0 and stats["disk"]["pending_entries"] >= 4
        # A queued entry already serves hits, from memory.
        again = ask(server, "random-disk", chats[0], max_tokens=2)
        assert cached(again) == len(prompt_ids(disk_model, chats[0])) - 1
        gate.touch()
        wait_until(server, lambda s: s["disk"]["files_written"] >= 4 and not s["disk"]["pending_entries"],
                   "the writer did not catch up once let go")
        assert len(entry_files(tmp_path)) == cache_stats(server)["disk"]["entries"] >= 4
    finally:
        server.stop()


def test_the_disk_budget_is_respected(tmp_path, disk_model):
    chats = [messages(f"Delta {i}") for i in range(4)]
    per_token = 2 * 2 * 4 * 16 * 4  # layers x (keys, values) x kv heads x head dim x float32
    entry_bytes = (len(prompt_ids(disk_model, chats[0])) + 4) * per_token
    budget_gb = 2.5 * entry_bytes / (1 << 30)
    kv_dir = tmp_path / "kv-elsewhere"
    server = ServerProcess(tmp_path, ["--model", str(disk_model), *RAM_OFF, "--prompt-cache-dir", str(kv_dir),
                                      "--prompt-cache-disk-gb", f"{budget_gb:.9f}"]).start()
    try:
        for chat in chats:
            ask(server, "random-disk", chat, max_tokens=4)
            wait_until(server, lambda s: not s["disk"]["pending_entries"], "the writer did not finish")
        stats = cache_stats(server)["disk"]
        files = entry_files(tmp_path, kv_dir)
        assert stats["dir"] == str(kv_dir) and not entry_files(tmp_path)
        assert stats["files_written"] >= 4 and stats["entries"] == len(files) == 2
        assert stats["bytes"] == sum(f.stat().st_size for f in files) <= stats["budget_bytes"]
        # The two most recent conversations are the ones kept.
        starts = {tuple(read_header(f)[1].tolist()[:len(prompt_ids(disk_model, chats[0]))]) for f in files}
        assert starts == {tuple(prompt_ids(disk_model, c)) for c in chats[2:]}
    finally:
        server.stop()


def test_a_stop_during_an_answer_keeps_what_it_read_and_generated(tmp_path, disk_model):
    """The engine stopping under a request saves that request's cache (prompt and the
    tokens generated so far) like a cancelled one's, and the disk tier keeps it."""
    import asyncio

    from mlxd.server.engine import Engine
    from mlxd.server.requests import GenerationRequest, ModelRef, SamplingParams
    from tests.ground_truth import tokenizer_of

    chat = messages("Omega", "Write a long story.")
    n_prompt = len(prompt_ids(disk_model, chat))
    no_end = {t: -100.0 for t in tokenizer_of(disk_model).all_special_ids}  # an answer that goes on

    def engine() -> Engine:
        e = Engine(prompt_cache_dir=tmp_path / "kv", prompt_cache_disk_bytes=1 << 30)
        e.start()
        return e

    def request(max_tokens: int) -> GenerationRequest:
        return GenerationRequest(model=ModelRef("random-disk", disk_model), messages=chat, max_tokens=max_tokens,
                                 sampling=SamplingParams(temperature=0.0, logit_bias=no_end))

    async def stop_while_answering() -> int:
        first = engine()
        handle = first.submit(request(4000), asyncio.get_running_loop())
        accepted = await handle.accepted
        for _ in range(3):  # some tokens are out: the answer is under way
            await handle.next_events()
        await asyncio.get_running_loop().run_in_executor(None, first.stop)
        return accepted.cached_tokens

    async def ask_again() -> int:
        second = engine()
        try:
            handle = second.submit(request(1), asyncio.get_running_loop())
            return (await handle.accepted).cached_tokens
        finally:
            await asyncio.get_running_loop().run_in_executor(None, second.stop)

    assert asyncio.run(stop_while_answering()) == 0
    assert entry_files(tmp_path, tmp_path / "kv")
    assert asyncio.run(ask_again()) == n_prompt - 1  # all of it but the token the model must read


def test_a_turn_removed_before_reading_gives_the_cache_it_took_back(disk_model):
    """A conversation's next turn takes the previous turn's cache out of the prefix
    cache; removed from the batch before its first step (cancelled at once), it hands
    the same cache back, so the conversation loses nothing."""
    from mlxd.server.lockstep import Steps
    from mlxd.server.models import load_model
    from mlxd.server.prefix_cache import PrefixCache

    lm = load_model("random-disk", disk_model)
    cache = PrefixCache(ram_bytes=1 << 30, ram_entries=16, disk_dir=None, disk_bytes=0)
    steps = Steps(stream=mx.new_stream(mx.default_device()), prefix_cache=cache, max_batch_size=4,
                  prefill_step_size=512)
    steps.open(lm)
    greedy = {"temperature": 0.0, "top_p": 1.0, "min_p": 0.0, "top_k": 0}
    free = dict(response_format=None, tool_format=None, tools=None, tool_choice="auto", forced=False, think=None,
                starts_in_reasoning=False)  # no grammar
    turn1 = prompt_ids(disk_model, messages("Sigma"))
    uid, _ = steps.admit(turn1, {}, 1, greedy, free, [])
    while uid not in steps._held:  # the answer's one token
        steps.next()
    steps.save(uid)
    assert cache.stats()["ram"]["entries"] == 1

    turn2 = turn1 + [7, 8, 9]  # shares the prompt, not the answer
    held = len(turn1)
    uid, n_cached = steps.admit(turn2, {}, 1, greedy, free, [])
    assert n_cached == held and cache.stats()["ram"]["entries"] == 0  # taken
    assert steps.remove([uid]) == {uid: held}
    steps.save(uid)
    assert cache.stats()["ram"]["entries"] == 1
    uid, n_cached = steps.admit(turn2, {}, 1, greedy, free, [])
    assert n_cached == held
    steps.close()
