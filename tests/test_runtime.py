"""The agent-speed runtime through real servers and the real openai client:
prefix cache across turns, continuous batching, cancellation, the queue limit
and keep-alive comments.

Cached-token counts are checked against ground truth computed outside the
server: the prompts tokenized with the model's own tokenizer, and for the
scripted model its known output tokens.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import httpx
import pytest

from scripts.testmodels import build_random_model, build_tokenizer_files
from tests.ground_truth import GREETING, prompt_ids, tokenizer_of
from tests.server_process import ServerProcess

LONG_CONTEXT = 16384
# Long prompts: about 3,000 tokens, six of the engine's 512-token prefill chunks.
FILLER = "The quick brown fox jumps over the lazy dog. " * 230
WAIT_S = 60  # generous bound on waits for the server; never a speed assertion


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def cached(response) -> int:
    return response.usage.prompt_tokens_details.cached_tokens


def ask(server, model: str, messages: list[dict], **kwargs):
    return server.client().chat.completions.create(
        model=model, messages=messages, temperature=0, **kwargs
    )


def stream_text(server, model: str, messages: list[dict], **kwargs) -> tuple[str, object, str]:
    """Content, usage and finish reason of one streamed completion."""
    chunks = server.client().chat.completions.create(
        model=model,
        messages=messages,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        **kwargs,
    )
    text, usage, finish = [], None, None
    for chunk in chunks:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    return "".join(text), usage, finish


def wait_for_log(server, pattern: str, start: int) -> re.Match:
    """The first match of `pattern` in the server log written after offset `start`."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        match = regex.search(server.log()[start:])
        if match:
            return match
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} in the server log:\n{server.log()[start:][-3000:]}")


def long_messages(tag: str) -> list[dict]:
    """A long system prompt, unique from its first word."""
    system = f"{tag}. " + FILLER
    return [{"role": "system", "content": system}, {"role": "user", "content": "Go on."}]


@pytest.fixture(scope="module")
def long_model(models_dir):
    """Tiny, but with a long context: prompts of thousands of tokens take a while to read."""
    return build_random_model(models_dir / "random-long", context_length=LONG_CONTEXT)


@pytest.fixture
def fresh_server(tmp_path, random_model, greeting_model):
    """A server whose prefix cache starts empty, so cached-token counts are exact."""
    server = ServerProcess(
        tmp_path,
        ["--model", str(greeting_model.path), "--model", str(random_model), "--max-loaded-models", "2"],
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cold_server(tmp_path_factory, random_model, greeting_model):
    """The same models with no prefix cache at all: every prompt is read from scratch."""
    server = ServerProcess(
        tmp_path_factory.mktemp("cold"),
        ["--model", str(greeting_model.path), "--model", str(random_model),
         "--max-loaded-models", "2", "--prompt-cache-gb", "0", "--prompt-cache-disk-gb", "0"],
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def single_server(tmp_path_factory, long_model):
    """One request decodes at a time and one may wait; keep-alive comments every 50 ms."""
    server = ServerProcess(
        tmp_path_factory.mktemp("single"),
        ["--model", str(long_model), "--max-batch-size", "1", "--max-queue", "1"],
        env={"MLXD_KEEPALIVE_SECONDS": "0.05"},
    ).start()
    yield server
    server.stop()


# Prefix cache ---------------------------------------------------------------


def test_prefix_hit_is_reported_and_gives_the_cold_output(fresh_server, cold_server, random_model):
    system = {"role": "system", "content": "You are a helpful assistant. Answer the user in one line."}
    first = [system, {"role": "user", "content": "What is the capital of France?"}]
    second = [system, {"role": "user", "content": "Please read the file, then run the tests."}]
    ids1, ids2 = prompt_ids(random_model, first), prompt_ids(random_model, second)

    r1 = ask(fresh_server, "random-qwen2", first, max_tokens=12)
    assert cached(r1) == 0
    # Same system prompt, another question: the shared prefix is not read again.
    r2 = ask(fresh_server, "random-qwen2", second, max_tokens=12)
    assert r2.usage.prompt_tokens == len(ids2)
    assert cached(r2) == common_prefix(ids1, ids2) > len(ids2) // 2
    # The same prompt again: all cached but the last token, which is fed to get logits.
    r3 = ask(fresh_server, "random-qwen2", first, max_tokens=12)
    assert cached(r3) == len(ids1) - 1

    for warm, messages in ((r2, second), (r3, first)):
        cold = ask(cold_server, "random-qwen2", messages, max_tokens=12)
        assert cached(cold) == 0
        assert warm.choices[0].message.content == cold.choices[0].message.content
        assert warm.usage.completion_tokens == cold.usage.completion_tokens == 12


def _conversation_turns(greeting_model):
    """A conversation with the scripted model, and what its cache holds after each turn."""
    system = {"role": "system", "content": "You are opencode, a coding agent. Be brief."}
    turn1 = [system, {"role": "user", "content": "Say hello."}]
    turn2 = turn1 + [{"role": "assistant", "content": GREETING}, {"role": "user", "content": "Again."}]
    turn3 = turn2 + [{"role": "assistant", "content": GREETING}, {"role": "user", "content": "Once more."}]
    return turn1, turn2, turn3


def _after(model, messages) -> list[int]:
    """The tokens cached once the scripted model answered: prompt, script, end token."""
    return prompt_ids(model.path, messages) + model.script_token_ids + [tokenizer_of(model.path).eos_token_id]


def test_next_turn_reuses_the_previous_turn_and_its_answer(fresh_server, greeting_model):
    turn1, turn2, turn3 = _conversation_turns(greeting_model)
    ids2, ids3 = prompt_ids(greeting_model.path, turn2), prompt_ids(greeting_model.path, turn3)
    assert cached(ask(fresh_server, "greeter", turn1)) == 0

    r2 = ask(fresh_server, "greeter", turn2)
    assert r2.choices[0].message.content == GREETING
    expected = common_prefix(_after(greeting_model, turn1), ids2)
    # The reply is part of the reuse: everything up to the new user message.
    assert expected == len(_after(greeting_model, turn1))
    assert (r2.usage.prompt_tokens, cached(r2)) == (len(ids2), expected)

    r3 = ask(fresh_server, "greeter", turn3)
    assert cached(r3) == common_prefix(_after(greeting_model, turn2), ids3) == len(_after(greeting_model, turn2))

    # /health shows what the prefix cache holds, within its budget (--prompt-cache-gb 4).
    memory = fresh_server.get("/health").json()["memory"]
    assert memory["prompt_cache_budget_bytes"] == 4 << 30
    assert 0 < memory["prompt_cache_bytes"] <= memory["prompt_cache_budget_bytes"]
    assert memory["mlx_peak_bytes"] >= memory["mlx_active_bytes"] > 0


def test_title_request_between_turns_does_not_evict_the_conversation(fresh_server, greeting_model):
    turn1, turn2, turn3 = _conversation_turns(greeting_model)
    title = [
        {"role": "system", "content": "Generate a short title for this conversation."},
        {"role": "user", "content": "Say hello."},
    ]
    # opencode sends the title request beside the first turn.
    with ThreadPoolExecutor(2) as pool:
        first, side = pool.map(lambda m: ask(fresh_server, "greeter", m), [turn1, title])
    assert first.choices[0].message.content == side.choices[0].message.content == GREETING

    r2 = ask(fresh_server, "greeter", turn2)
    assert cached(r2) == len(_after(greeting_model, turn1))

    # And once more between turns 2 and 3: it reuses what it shares with the
    # conversation (the template's opening), and the conversation keeps its cache.
    title_ids = prompt_ids(greeting_model.path, title)
    entries = [_after(greeting_model, m) for m in (turn1, turn2, title)]
    r_title = ask(fresh_server, "greeter", title)
    assert cached(r_title) == len(title_ids) - 1  # its own earlier answer covers it
    r3 = ask(fresh_server, "greeter", turn3)
    assert cached(r3) == len(_after(greeting_model, turn2))
    assert max(common_prefix(e, prompt_ids(greeting_model.path, turn3)) for e in entries) == cached(r3)


def build_sliding_window_model(out_dir: Path, window: int) -> Path:
    """A random llama whose first layer attends to the last `window` tokens only.

    Its RotatingKVCache cannot be trimmed once a prompt is longer than the
    window, like Gemma's, Mistral's and gpt-oss's local layers.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    tokenizer = build_tokenizer_files(out_dir, "chatml", model_max_length=4096)
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6,
        "vocab_size": tokenizer.get_vocab_size(),
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": window,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "eos_token_id": tokenizer.token_to_id("<|im_end|>"),
    }
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.save_safetensors(str(out_dir / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out_dir / "config.json").write_text(json.dumps(config))
    return out_dir


def test_a_cache_that_cannot_be_trimmed_resumes_at_message_checkpoints(tmp_path):
    model = build_sliding_window_model(tmp_path / "sliding", window=32)
    server = ServerProcess(tmp_path, ["--model", str(model)]).start()
    try:
        system = {"role": "system", "content": "You are a helpful assistant. Answer the user in one line. " * 4}
        first = [system, {"role": "user", "content": "What is the capital of France?"}]
        second = [system, {"role": "user", "content": "Please read the file, then run the tests."}]
        ids1, ids2 = prompt_ids(model, first), prompt_ids(model, second)
        tokenizer = tokenizer_of(model)
        system_end = len(tokenizer.apply_chat_template([system], tokenize=True, return_dict=False))
        first_end = len(tokenizer.apply_chat_template(first, tokenize=True, return_dict=False))
        assert 32 < system_end < common_prefix(ids1, ids2)

        assert cached(ask(server, "sliding", first, max_tokens=2)) == 0
        # The first answer's cache holds the shared prefix but cannot be cut
        # back to it; the checkpoint at the end of the system prompt can be used.
        assert cached(ask(server, "sliding", second, max_tokens=2)) == system_end
        # The same prompt again resumes where its last message ended.
        assert cached(ask(server, "sliding", first, max_tokens=2)) == first_end
    finally:
        server.stop()


# Continuous batching --------------------------------------------------------


def test_eight_concurrent_streams_each_get_their_own_output_and_usage(fresh_server, cold_server, random_model):
    questions = [
        "What is the capital of France?",
        "Fix the bug in main.py.",
        "Write a haiku about MLX.",
        "List the files in /tmp.",
        "How many tests pass?",
        "Tell me a joke.",
        "Explain the quick brown fox.",
        "Run git status and summarize.",
    ]
    prompts = [[{"role": "user", "content": q}] for q in questions]
    expected = [stream_text(cold_server, "random-qwen2", m, max_tokens=16) for m in prompts]
    assert len({text for text, _, _ in expected}) == len(prompts)  # distinct outputs to tell apart

    for server in (cold_server, fresh_server):
        with ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(lambda m: stream_text(server, "random-qwen2", m, max_tokens=16), prompts))
        for messages, (text, usage, finish), (want, _, _) in zip(prompts, results, expected):
            assert (text, finish) == (want, "length")
            assert usage.prompt_tokens == len(prompt_ids(random_model, messages))
            assert usage.completion_tokens == 16
            assert usage.total_tokens == usage.prompt_tokens + 16
            if server is cold_server:
                assert usage.prompt_tokens_details.cached_tokens == 0


def test_concurrent_streams_keep_their_own_limits_and_stop_strings(cold_server, greeting_model):
    tokenizer = tokenizer_of(greeting_model.path)
    script = greeting_model.script_token_ids
    cases = [{"max_tokens": n} for n in range(2, 6)] + [{"stop": s} for s in ["fox", "lazy", ". The", "dog"]]

    def run(kwargs):
        return stream_text(cold_server, "greeter", [{"role": "user", "content": "Say hello."}], **kwargs)

    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(run, cases))
    for kwargs, (text, usage, finish) in zip(cases, results):
        if "max_tokens" in kwargs:
            n = kwargs["max_tokens"]
            assert (text, finish, usage.completion_tokens) == (tokenizer.decode(script[:n]), "length", n)
        else:
            assert (text, finish) == (GREETING[: GREETING.index(kwargs["stop"])], "stop")
            assert 0 < usage.completion_tokens <= len(script)


# Cancellation, queue limit, keep-alive (one slot) -----------------------------


def _read_until(lines, predicate) -> None:
    """Read a stream's lines up to the first one that satisfies `predicate`.

    Takes the line iterator rather than the response: dropping an httpx line
    iterator closes the connection.
    """
    for line in lines:
        if predicate(line):
            return
    raise AssertionError("the stream ended first")


def _has_content(line: str) -> bool:
    if not line.startswith("data: {"):
        return False
    choices = json.loads(line[6:])["choices"]
    return bool(choices and choices[0]["delta"].get("content"))


def _body(messages, **kwargs) -> dict:
    return {"model": "random-long", "messages": messages, "temperature": 0, **kwargs}


@contextlib.contextmanager
def _holding_the_slot(server, content: str):
    """A stream that runs until the context is full, read up to its first token."""
    body = _body([{"role": "user", "content": content}], stream=True)
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=WAIT_S) as held:
        lines = held.iter_lines()  # kept: dropping it would close the stream
        _read_until(lines, _has_content)
        yield held


def _race_for_the_queue_place(server, release) -> tuple[httpx.Response, httpx.Response]:
    """While the one slot is taken, two requests race for the one queue place:
    the answer that comes first, then, once `release()` freed the slot, the other."""
    url = server.base_url + "/v1/chat/completions"
    short = _body([{"role": "user", "content": "Hi."}], max_tokens=2)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(httpx.post, url, json=short, timeout=WAIT_S) for _ in range(2)]
        done, pending = wait(futures, timeout=WAIT_S, return_when=FIRST_COMPLETED)
        assert len(done) == 1
        release()
        return done.pop().result(), pending.pop().result(timeout=WAIT_S)


def test_a_dropped_stream_frees_its_slot(single_server):
    start = len(single_server.log())
    with _holding_the_slot(single_server, "Count forever."):
        pass  # dropped after its first token
    # With one slot, this is served only once the dropped stream has left it.
    after = ask(single_server, "random-long", [{"role": "user", "content": "Hello!"}], max_tokens=3)
    assert after.usage.completion_tokens == 3
    done = wait_for_log(single_server, r"request done \(length\): .* completion 3 tokens", start)
    dropped = wait_for_log(single_server, r"request cancelled by the client after (\d+) tokens", start)
    assert dropped.start() < done.start()
    assert int(dropped.group(1)) < LONG_CONTEXT // 2


def test_a_non_streaming_client_that_leaves_frees_its_slot(single_server):
    start = len(single_server.log())
    body = _body([{"role": "user", "content": "Count forever, please."}])
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(single_server.base_url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(WAIT_S, read=1.0))
    wait_for_log(single_server, r"request cancelled by the client after \d+ tokens", start)
    after = ask(single_server, "random-long", [{"role": "user", "content": "Hello again!"}], max_tokens=3)
    assert after.usage.completion_tokens == 3


def test_cancel_during_a_long_prefill_stops_between_chunks(single_server, long_model):
    messages = long_messages("Cancelled")
    n_prompt = len(prompt_ids(long_model, messages))
    start = len(single_server.log())
    body = _body(messages, stream=True, max_tokens=4)
    with httpx.stream("POST", single_server.base_url + "/v1/chat/completions", json=body, timeout=WAIT_S) as r:
        _read_until(r.iter_lines(), lambda line: line.startswith("data: "))  # accepted: the prompt is being read
    match = wait_for_log(
        single_server, r"request cancelled by the client after (\d+) tokens \((\d+) of (\d+) prompt tokens read\)", start
    )
    completion, read, total = map(int, match.groups())
    assert completion == 0 and total == n_prompt
    assert 0 < read < total  # stopped between chunks, long before the end of the prompt
    # What was read is kept: the same request again starts from there.
    again = ask(single_server, "random-long", messages, max_tokens=1)
    assert cached(again) == read


def test_queue_limit_answers_429_with_retry_after(single_server):
    with _holding_the_slot(single_server, "Hold the slot.") as held:
        rejected, served = _race_for_the_queue_place(single_server, held.close)
    assert rejected.status_code == 429
    assert int(rejected.headers["Retry-After"]) >= 1
    error = rejected.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("rate_limit_error", "queue_full")
    assert served.status_code == 200
    assert served.json()["usage"]["completion_tokens"] == 2


def test_a_client_that_leaves_the_queue_frees_its_place(single_server):
    url = single_server.base_url + "/v1/chat/completions"
    start = len(single_server.log())
    with _holding_the_slot(single_server, "Hold the slot again.") as held:
        with pytest.raises(httpx.ReadTimeout):  # waits in the queue, then gives up
            body = _body([{"role": "user", "content": "Hi there."}], max_tokens=2)
            httpx.post(url, json=body, timeout=httpx.Timeout(WAIT_S, read=1.0))
        wait_for_log(single_server, "request cancelled by the client while queued", start)
        rejected, served = _race_for_the_queue_place(single_server, held.close)
    assert (rejected.status_code, served.status_code) == (429, 200)


def test_keep_alive_comments_while_a_long_prompt_is_read(single_server, long_model):
    body = _body(long_messages("Keep-alive"), stream=True, max_tokens=2)
    pings = 0
    with httpx.stream("POST", single_server.base_url + "/v1/chat/completions", json=body, timeout=WAIT_S) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith(": ping"):
                pings += 1
            elif _has_content(line):
                break
        rest = list(lines)
    assert pings >= 1
    assert "data: [DONE]" in rest
