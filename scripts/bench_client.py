"""The benchmarks' served model: a real mlxd server, a client for it, and the same
model loaded in this process for the raw mlx-lm figures."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlxd.server.blas import setup_blas  # noqa: E402  (must run before mlx.core is imported)

BLAS = setup_blas()

from mlx_lm import load, stream_generate  # noqa: E402
from mlx_lm.sample_utils import make_logits_processors  # noqa: E402

from tests.server_process import ServerProcess  # noqa: E402

# Between two turns the agent runs the tool; the server saves the last turn's
# cache meanwhile (and finishes the decode step it started past the answer's end).
TOOL_SECONDS = 0.5
SYSTEM_WORDS = "You are opencode, an interactive CLI coding agent. Follow the user's instructions exactly. "
STORY = [{"role": "user", "content": "Write a story."}]


def opencode_like_tools(n: int = 10) -> list[dict]:
    """Tools shaped like opencode's (with "$schema" keys), to make the prompt realistic."""
    return [
        {
            "type": "function",
            "function": {
                "name": f"tool_{i}",
                "description": f"Tool number {i}. " + "It does a useful thing with files and commands. " * 8,
                "parameters": {
                    "$schema": "http://json-schema.org/draft-07/schema#",
                    "type": "object",
                    "properties": {
                        "path": {"type": "string", "description": "The absolute path to operate on."},
                        "command": {"type": "string", "description": "The command to run, if any."},
                    },
                    "required": ["path"],
                    "additionalProperties": False,
                },
            },
        }
        for i in range(n)
    ]


def system_prompt_of(n_tokens: int, tokenizer) -> str:
    text = ""
    while len(tokenizer.encode(text)) < n_tokens:
        text += SYSTEM_WORDS
    return text


class Bench:
    """The served model, a client for it, and the same model loaded in this process."""

    def __init__(self, server: ServerProcess, model_dir: Path):
        self.server = server
        self.client = server.client()
        self.model_name = self.client.models.list().data[0].id
        self.model, self.tokenizer = load(str(model_dir))
        eos = self.tokenizer.eos_token_ids
        self.raw_no_eos = make_logits_processors({t: -1e9 for t in eos})
        self.served_no_eos = {str(t): -100 for t in eos}

    def raw_decode(self, n_tokens: int, processor=None) -> float:
        """Decode tokens/s of mlx-lm itself, in this process (with one more logits processor)."""
        prompt = self.tokenizer.apply_chat_template(STORY, add_generation_prompt=True)
        last = None
        for last in stream_generate(
            self.model, self.tokenizer, prompt, max_tokens=n_tokens,
            logits_processors=self.raw_no_eos + ([processor] if processor else []),
        ):
            pass
        assert last.generation_tokens == n_tokens
        return last.generation_tps

    def stream(self, messages, *, max_tokens, tools=None, no_eos=False) -> dict:
        """One streamed completion, timed from the request to the first and last token.

        The first token is the first chunk with output or a finish_reason: a
        random model's first tokens can be partial UTF-8 that the server holds
        back, so the agent turns ask for max_tokens=1 and time that chunk.
        """
        start = time.perf_counter()
        first = last = answered = None
        usage = None
        chunks = self.client.chat.completions.create(
            model=self.model_name,
            messages=messages,
            tools=tools,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            logit_bias=self.served_no_eos if no_eos else None,
        )
        for chunk in chunks:
            choice = chunk.choices[0] if chunk.choices else None
            if choice and (choice.delta.content or choice.delta.tool_calls):
                last = time.perf_counter()
                first = first or last
            if choice and (choice.delta.content or choice.delta.tool_calls or choice.finish_reason):
                answered = answered or time.perf_counter()
            if chunk.usage:
                usage = chunk.usage
        decode_s = (last or 0) - (first or 0)
        return {
            "ttft": (answered or time.perf_counter()) - start,
            "decode_tps": (usage.completion_tokens - 1) / decode_s if decode_s > 0 else 0.0,
            "completion_tokens": usage.completion_tokens,
            "prompt_tokens": usage.prompt_tokens,
            "cached_tokens": usage.prompt_tokens_details.cached_tokens,
        }

    def light_decode(self, n_tokens: int, response_format: dict | None = None, on_first=None) -> float:
        """Decode tokens/s through the server, read by a minimal SSE client
        (httpx and json.loads): the openai SDK's per-chunk parsing shares the
        CPU with the model on a small machine and shows up as server time.
        `on_first()` runs when the first token arrives; the longest wait between
        two tokens is kept in `self.max_gap`."""
        body = {"model": self.model_name, "messages": STORY, "max_tokens": n_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}, "logit_bias": self.served_no_eos}
        if response_format:
            body["response_format"] = response_format
        first = last = None
        completion_tokens = 0
        self.max_gap = 0.0
        with httpx.stream("POST", self.server.base_url + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[len("data: "):])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    now = time.perf_counter()
                    self.max_gap = max(self.max_gap, now - (last or now))
                    if first is None and on_first is not None:
                        on_first()
                    last = now
                    first = first or last
                if chunk.get("usage"):
                    completion_tokens = chunk["usage"]["completion_tokens"]
        assert completion_tokens == n_tokens
        return (completion_tokens - 1) / (last - first)

    def timed_first_chunk(self, response_format: dict) -> float:
        """Seconds from the request to its one token's finish (max_tokens=1)."""
        body = {"model": self.model_name, "messages": STORY, "max_tokens": 1, "temperature": 0,
                "stream": True, "response_format": response_format}
        start = time.perf_counter()
        with httpx.stream("POST", self.server.base_url + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"finish_reason":"' in line:
                    return time.perf_counter() - start
        raise RuntimeError("no output")

    def concurrent(self, n: int, max_tokens: int) -> float:
        """Aggregate decode tokens/s of n simultaneous streams with distinct prompts."""
        results = [None] * n

        def run(i):
            story = [{"role": "user", "content": f"Write story number {i}."}]
            results[i] = self.stream(story, max_tokens=max_tokens, no_eos=True)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(r["completion_tokens"] for r in results) / (time.perf_counter() - start)


def peak_rss_gb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return float("nan")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _list(values) -> str:
    return " ".join(f"{v:.0f}" if v >= 100 else f"{v:.1f}" for v in values)
