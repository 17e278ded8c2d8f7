"""A bounded loopback load test through a real server: a burst of simultaneous
streams gets only complete answers or 429s, and many more requests after it do
not grow the server's memory.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.ground_truth import ground_truth_prompt_tokens
from tests.server_process import ServerProcess

BURST = 64  # against --max-batch-size 8 and --max-queue 32 (the defaults): 40 places
PLACES = 8 + 32
MORE = 500
BASELINE_AFTER = 100
MAX_TOKENS = 4
WAIT_S = 300  # generous bound on the whole burst; never a speed assertion


@pytest.fixture(scope="module")
def load_server(tmp_path_factory, random_model):
    server = ServerProcess(tmp_path_factory.mktemp("load"), ["--model", str(random_model)]).start()
    yield server
    server.stop()


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Request {i}: list the files, then run the tests."}]


async def _stream(client: httpx.AsyncClient, i: int):
    body = {"model": "random-qwen2", "messages": _messages(i), "temperature": 0, "max_tokens": MAX_TOKENS,
            "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = [line async for line in response.aiter_lines()]
    return i, response, lines


def _check_answer(random_model, i: int, response, lines: list[str]) -> bool:
    """True for a complete answer with exact usage, False for a 429; anything else fails."""
    if response.status_code == 429:
        assert int(response.headers["Retry-After"]) >= 1
        return False
    assert response.status_code == 200
    data = [line[6:] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all("error" not in c for c in chunks)
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens"] == ground_truth_prompt_tokens(random_model, _messages(i))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert finish in (["length"], ["stop"])
    assert 1 <= usage["completion_tokens"] <= MAX_TOKENS
    assert finish == ["stop"] or usage["completion_tokens"] == MAX_TOKENS
    return True


def test_a_burst_of_streams_gets_answers_or_429_and_memory_stays_flat(load_server, random_model):
    async def run():
        limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
        async with httpx.AsyncClient(base_url=load_server.base_url, limits=limits, timeout=WAIT_S) as client:
            burst = await asyncio.gather(*(_stream(client, i) for i in range(BURST)))
            gate, rss = asyncio.Semaphore(8), {}

            async def one(i: int):
                async with gate:
                    result = await _stream(client, BURST + i)
                if i + 1 == BASELINE_AFTER:
                    rss["baseline"] = _rss_bytes(load_server.proc.pid)
                return result

            more = await asyncio.gather(*(one(i) for i in range(MORE)))
            rss["end"] = _rss_bytes(load_server.proc.pid)
            return burst, more, rss

    burst, more, rss = asyncio.run(run())
    served = sum(_check_answer(random_model, *result) for result in burst)
    assert PLACES <= served <= BURST
    # With at most 8 at a time, nothing more is refused.
    assert all(_check_answer(random_model, *result) for result in more)
    assert abs(rss["end"] - rss["baseline"]) <= 0.15 * rss["baseline"], rss
