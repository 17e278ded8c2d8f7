"""The generation loop: one thread owns MLX and serves every request through it.

Requests arrive on a thread-safe inbox. The engine thread loads models, builds
prompts, reuses cached prefixes, and runs mlx-lm's `BatchGenerator` so that
concurrent requests share each decode step. Events go back to each request's
asyncio queue with `call_soon_threadsafe`, so the event loop never blocks on MLX.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from . import constrained
from .errors import ContextLengthExceeded, EngineError, InternalError, InvalidPrompt, ModelLoadFailed, QueueFull
from .events import Failure, Finish, ReasoningDelta, TokenLogprob, Usage
from .ledger import RequestRecord
from .models import LoadedModel, load_model
from .output import OutputParser, output_format_for
from .prefix_cache import PrefixCache
from .prompt import offered_tools, request_prompt

log = logging.getLogger("mlxd.engine")

# Fallbacks when neither the request nor the model's generation_config sets them
# (OpenAI's defaults).
DEFAULT_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}


@dataclass
class SamplingParams:
    """Sampling as the client asked for it; None means "the model's default"."""

    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    logit_bias: Optional[dict[int, float]] = None


@dataclass
class ModelRef:
    """A model the registry resolved: the name it is served under, its directory,
    its tool-call format when the catalog knows it better than the template, and
    whether its own tokenizer code may run (only for `--trust-remote-code-for` models)."""

    name: str
    path: Path
    tool_format: Optional[str] = None
    trust_remote_code: bool = False


@dataclass
class GenerationRequest:
    """One request in the engine's neutral shape, whatever door it came through.

    `request_id` names it in logs, the `x-request-id` header and the usage ledger; `door`
    is the endpoint family ("chat", "messages", "responses"); `client` is who sent it (an
    API-key label, or the client's family from its User-Agent)."""

    model: ModelRef
    messages: list[dict]
    tools: Optional[list[dict]] = None
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    max_tokens: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    logprobs: bool = False
    top_logprobs: int = 0
    request_id: str = ""
    door: str = "chat"
    client: str = "other"
    # The chat template's `enable_thinking` switch (Qwen3 and kin); None: its default.
    thinking: Optional[bool] = None
    # Content constrained to JSON; None: free text.
    response_format: Optional[constrained.ResponseFormat] = None


@dataclass(frozen=True)
class Accepted:
    """The prompt is built and queued for prefill: the served model's name, and the
    prompt's token count and how many of those tokens the prefix cache already holds
    (doors that announce usage before generating, like Anthropic's, need both)."""

    model: str
    prompt_tokens: int = 0
    cached_tokens: int = 0


class RequestHandle:
    """The asyncio side of one request: an acceptance future and an event queue."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.loop = loop
        self.accepted: asyncio.Future = loop.create_future()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.submitted_at = time.perf_counter()  # for the usage ledger's queue time and TTFT
        self.submitted_wall = time.time()

    def cancel(self) -> None:
        """Called from asyncio when the client goes away; the engine drops it at the next step."""
        self.cancelled = True

    # Engine-thread side -------------------------------------------------
    def _accept(self, accepted: Accepted) -> None:
        self.loop.call_soon_threadsafe(_resolve, self.accepted, accepted, None)

    def _reject(self, error: Exception) -> None:
        self.loop.call_soon_threadsafe(_resolve, self.accepted, None, error)

    def _push(self, events: list) -> None:
        if events:
            self.loop.call_soon_threadsafe(self.events.put_nowait, events)


def _resolve(future: asyncio.Future, value, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


@dataclass
class _Active:
    """Engine-thread state of one admitted request."""

    handle: RequestHandle
    detokenizer: Any
    parser: OutputParser
    usage: Usage
    # Prompt-cache checkpoints still ahead in the prefill: token offset -> kind.
    checkpoints: dict[int, str]
    # Prompt tokens in the sequence's cache so far (cached, then prefilled).
    prompt_read: int
    started_at: float
    first_token_at: Optional[float] = None


class Engine:
    """Owns MLX: loads models, batches requests, streams events back."""

    def __init__(
        self,
        *,
        max_loaded_models: int = 1,
        keep_alive: float = 600.0,
        max_batch_size: int = 8,
        max_queue: int = 32,
        prefill_step_size: int = 512,
        prompt_cache_bytes: int = 4 << 30,
        prompt_cache_entries: int = 16,
        prompt_cache_dir: Optional[Path] = None,
        prompt_cache_disk_bytes: int = 0,
        trust_remote_code: bool = False,
        on_request_end: Optional[Callable[[RequestRecord], None]] = None,
    ):
        self.max_loaded_models = max(1, max_loaded_models)
        self.keep_alive = keep_alive
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill_step_size = prefill_step_size
        self.prompt_cache_bytes = prompt_cache_bytes
        self.prompt_cache_entries = prompt_cache_entries
        self.trust_remote_code = trust_remote_code
        # Called on the engine thread with one record per request, however it ends;
        # it must only hand the record on (the usage ledger queues it for its writer).
        self.on_request_end = on_request_end

        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque[RequestHandle] = deque()
        self._in_flight = 0
        self._count_lock = threading.Lock()
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._current: Optional[LoadedModel] = None
        self._batch = None
        self._active: dict[int, _Active] = {}
        self._prompt_cache = PrefixCache(
            ram_bytes=prompt_cache_bytes,
            ram_entries=prompt_cache_entries,
            disk_dir=prompt_cache_dir,
            disk_bytes=prompt_cache_disk_bytes,
        )
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mlxd-engine", daemon=True)

    # ------------------------------------------------------------------
    # Public API (any thread)
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout=30)

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive()

    def preload(self, ref: ModelRef) -> None:
        """Load a model in the engine thread now rather than on first use."""
        self._inbox.put(("load", ref))

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> RequestHandle:
        """Queue a request; raises QueueFull when active and waiting slots are all taken."""
        with self._count_lock:
            if self._in_flight >= self.max_batch_size + self.max_queue:
                raise QueueFull(retry_after=2)
            self._in_flight += 1
        handle = RequestHandle(request, loop)
        self._inbox.put(handle)
        return handle

    def prompt_format(self, name: str):
        """The (tokenizer, OutputFormat) of loaded model `name`, or None; any thread may
        render prompts with them (rendering and encoding do not change the tokenizer)."""
        lm = self._loaded.get(name)
        return (lm.tokenizer, lm.output_format) if lm is not None and lm.output_format is not None else None
    @property
    def queue_depth(self) -> int:
        """Requests submitted and not yet decoding (waiting or having their prompt built)."""
        return max(0, self._in_flight - len(self._active))

    @property
    def batch_size(self) -> int:
        """Requests in the batch now (prefilling or decoding)."""
        return len(self._active)

    def loaded_models(self) -> list[dict]:
        """Name, memory and idle time of each loaded model (a snapshot)."""
        now = time.monotonic()
        current = self._current  # read once: the engine thread may change it
        busy = current.name if current is not None and self._active else None
        return [
            {
                "name": m.name,
                "memory_bytes": m.nbytes,
                "idle_seconds": 0.0 if m.name == busy else round(now - m.last_used, 1),
            }
            for m in list(self._loaded.values())
        ]

    def memory(self) -> dict:
        """MLX's allocator counters (GPU memory on Metal) and the prefix cache's share,
        with its tiers' sizes, hits by tier and what the disk tier wrote."""
        import mlx.core as mx

        return {
            "mlx_active_bytes": mx.get_active_memory(),
            "mlx_peak_bytes": mx.get_peak_memory(),
            "prompt_cache_bytes": self._prompt_cache.nbytes,
            "prompt_cache_budget_bytes": self.prompt_cache_bytes,
            "prompt_cache": self._prompt_cache.stats(),
        }

    # ------------------------------------------------------------------
    # Engine thread
    def _run(self) -> None:
        import mlx.core as mx

        self._stream = mx.new_stream(mx.default_device())
        while not self._stopping:
            self._take_inbox(block=not self._active and not self._waiting)
            self._admit_waiting()
            if self._active:
                self._step_safely()
            else:
                self._unload_idle()
        for active in list(self._active.values()):  # the server is stopping under them
            self._release(active.handle, None, outcome="cancelled", reason="shutdown", active=active)
        self._active.clear()
        self._close_batch()
        self._prompt_cache.close()

    def _take_inbox(self, block: bool) -> None:
        timeout = 1.0 if block else None
        while True:
            try:
                item = self._inbox.get(block=block, timeout=timeout) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if item is None:
                return
            if isinstance(item, tuple) and item[0] == "load":
                try:
                    self._ensure_loaded(item[1])
                except EngineError as e:
                    log.error("%s", e)
            else:
                self._waiting.append(item)

    def _admit_waiting(self) -> None:
        """Admit waiting requests in order; a request for another model waits for the batch to drain."""
        for handle in [h for h in self._waiting if h.cancelled]:  # their places go to new requests
            self._waiting.remove(handle)
            self._release(handle, None, outcome="cancelled", reason="queued")
            log.info("request cancelled by the client while queued")
        while self._waiting and len(self._active) < self.max_batch_size:
            handle = self._waiting[0]
            model_name = handle.request.model.name
            if self._active and self._current is not None and self._current.name != model_name:
                return
            self._waiting.popleft()
            try:
                self._admit(handle)
            except EngineError as e:
                self._release(handle, e, outcome="rejected", reason=e.code)
            except Exception as e:  # a bug must not kill the engine
                log.exception("could not start request")
                self._release(handle, InternalError(f"could not start the request: {e}"), outcome="failed",
                              reason=InternalError.code)

    def _release(self, handle: RequestHandle, error: Optional[Exception], *, outcome: str, reason: str,
                 active: Optional[_Active] = None) -> None:
        with self._count_lock:
            self._in_flight -= 1
        if error is not None:
            handle._reject(error)
        if self.on_request_end is not None:
            try:
                self.on_request_end(_ledger_record(handle, active, outcome, reason, error))
            except Exception:
                log.exception("could not hand the request's record to the usage ledger")

    def _ensure_loaded(self, ref: ModelRef) -> LoadedModel:
        lm = self._loaded.get(ref.name)
        if lm is None:
            while len(self._loaded) >= self.max_loaded_models:
                self._unload(next(iter(self._loaded)), "to make room")
            try:
                lm = load_model(ref.name, ref.path, trust_remote_code=ref.trust_remote_code)
            except Exception as e:
                log.exception("loading %s failed", ref.name)  # the reason may name paths: log only
                raise ModelLoadFailed(f"model {ref.name!r} could not be loaded; the server log says why") from e
            lm.output_format = output_format_for(lm.tokenizer, tool_format=ref.tool_format)
            log.info("model %s: tool-call format %s", ref.name, lm.output_format.name or "none")
            self._loaded[ref.name] = lm
        self._loaded.move_to_end(ref.name)
        if self._current is not lm:
            self._switch_to(lm)
        return lm

    def _switch_to(self, lm: LoadedModel) -> None:
        from mlx_lm.generate import BatchGenerator

        self._close_batch()
        self._current = lm
        self._batch = BatchGenerator(
            lm.model,
            completion_batch_size=self.max_batch_size,
            prefill_batch_size=self.max_batch_size,
            prefill_step_size=self.prefill_step_size,
            stream=self._stream,
        )

    def _close_batch(self) -> None:
        if self._batch is not None:
            self._batch.close()
            self._batch = None
        self._current = None

    def _unload(self, name: str, why: str) -> None:
        """Drop a model and every reference to it, then give its memory back."""
        import gc

        import mlx.core as mx

        if self._current is self._loaded.pop(name):
            self._close_batch()
        self._prompt_cache.spill()
        log.info("unloaded model %s (%s)", name, why)
        gc.collect()
        mx.clear_cache()

    def _unload_idle(self) -> None:
        if self.keep_alive < 0:
            return
        now = time.monotonic()
        idle = [name for name, lm in self._loaded.items() if now - lm.last_used > self.keep_alive]
        for name in idle:
            self._unload(name, f"idle for {self.keep_alive:.0f} s")

    def _admit(self, handle: RequestHandle) -> None:
        import mlx.core as mx
        from mlx_lm.generate import make_stop_sequences
        from mlx_lm.sample_utils import make_logits_processors

        req = handle.request
        lm = self._ensure_loaded(req.model)
        tokenizer = lm.tokenizer
        fmt = lm.output_format
        tools = offered_tools(req)
        try:
            # A trimmable cache is saved whole at the end and serves every prefix of
            # it, so only the system prompt is checkpointed, for requests that share
            # it while this one runs; other caches resume at message checkpoints.
            prompt = request_prompt(tokenizer, fmt, req, recent_checkpoints=not lm.cache_trimmable)
        except ValueError as e:
            raise InvalidPrompt(str(e)) from e
        prefix = prompt.suffix
        n_prompt = len(prompt.tokens)
        if n_prompt >= lm.context_length:
            raise ContextLengthExceeded(lm.context_length, n_prompt)
        bias = req.sampling.logit_bias or {}
        if any(not 0 <= t < len(tokenizer) for t in bias):
            raise InvalidPrompt(f"logit_bias token ids must be between 0 and {len(tokenizer) - 1}", param="logit_bias")
        room = lm.context_length - n_prompt
        max_tokens = min(req.max_tokens, room) if req.max_tokens else room

        cache, rest = self._prompt_cache.fetch(lm, prompt.tokens)
        n_cached = n_prompt - len(rest)
        checkpoints = {n: kind for n, kind in prompt.checkpoints.items() if n > n_cached}

        sampling = _effective_sampling(req.sampling, lm.sampling_defaults)
        if req.sampling.seed is not None:
            mx.random.seed(req.sampling.seed)
        sampler = _sampler(sampling["temperature"], sampling["top_p"], sampling["min_p"], sampling["top_k"])
        processors = make_logits_processors(
            req.sampling.logit_bias,
            sampling.get("repetition_penalty"),
            presence_penalty=req.sampling.presence_penalty,
            frequency_penalty=req.sampling.frequency_penalty,
        )
        grammar = constrained.processor_for(
            tokenizer,
            response_format=req.response_format,
            tool_format=fmt.name,
            tools=tools,
            tool_choice=req.tool_choice,
            forced=bool(prefix),
            think=(fmt.think_start, fmt.think_end) if fmt.think_start and fmt.think_end else None,
            starts_in_reasoning=prompt.starts_in_reasoning,
        )
        if grammar is not None:  # last, so that no bias can bring back a token it masked
            processors = [*processors, grammar]
        (uid,) = self._batch.insert_segments(
            segments=[_segments(prompt.tokens, n_cached, checkpoints)],
            max_tokens=[max_tokens],
            caches=[cache],
            all_tokens=[prompt.tokens[:n_cached]],
            samplers=[sampler],
            logits_processors=[processors],
            stop_sequences=[make_stop_sequences(tokenizer)],
        )
        parser = OutputParser(
            fmt,
            tools=tools,
            tool_choice=req.tool_choice,
            parallel_tool_calls=req.parallel_tool_calls,
            stop=req.stop if req.response_format is None else (),  # a stop string must not cut the JSON
            starts_in_reasoning=prompt.starts_in_reasoning,
            prefix=prefix,
        )
        self._active[uid] = _Active(
            handle=handle,
            detokenizer=tokenizer.detokenizer,
            parser=parser,
            usage=Usage(prompt_tokens=n_prompt, cached_tokens=n_cached),
            checkpoints=checkpoints,
            prompt_read=n_cached,
            started_at=time.perf_counter(),
        )
        lm.last_used = time.monotonic()
        handle._accept(Accepted(lm.name, prompt_tokens=n_prompt, cached_tokens=n_cached))

    def _step_safely(self) -> None:
        try:
            self._step()
        except Exception as e:
            log.exception("generation failed")
            for uid, active in list(self._active.items()):
                self._finish(uid, active, Failure(f"generation failed: {e}", active.usage))
            if self._current is not None:
                self._switch_to(self._current)  # a fresh batch

    def _step(self) -> None:
        self._drop_cancelled()
        if not self._active:
            return
        prompt_responses, gen_responses = self._batch.next()
        self._on_prefill(prompt_responses)
        for r in gen_responses:
            active = self._active.get(r.uid)
            if active is None:
                continue
            self._on_token(r, active)
        if self._current is not None:
            self._current.last_used = time.monotonic()

    def _drop_cancelled(self) -> None:
        gone = [uid for uid, a in self._active.items() if a.handle.cancelled]
        if not gone:
            return
        built = self._remove_from_batch(gone)
        for uid in gone:
            active = self._active.pop(uid)
            phase = "decode" if active.first_token_at is not None else "prefill"
            self._release(active.handle, None, outcome="cancelled", reason=phase, active=active)
            log.info(
                "request cancelled by the client after %d tokens (%d of %d prompt tokens read)",
                active.usage.completion_tokens,
                active.prompt_read,
                active.usage.prompt_tokens,
            )
        for tokens, cache in built:
            self._save_cache(tokens, cache)

    def _remove_from_batch(self, uids: list[int]) -> list[tuple[list[int], list]]:
        """Take sequences out of the batch; returns the (tokens, cache) of those
        that built on their cached prefix, to be saved for later prefix hits."""
        caches = self._batch.remove(uids, return_prompt_caches=True)
        return [
            (tokens, cache)
            for uid, (cache, tokens) in caches.items()
            if len(tokens) > self._active[uid].usage.cached_tokens
        ]

    def _save_cache(self, tokens: list[int], cache: list, kind: str = "assistant") -> None:
        self._prompt_cache.save(self._current, tokens, cache, kind)

    def _on_prefill(self, prompt_responses) -> None:
        """Track how much of each prompt is read, and store the cache at its
        checkpoints (message boundaries) so later requests can resume there."""
        at_checkpoint = []
        for r in prompt_responses:
            active = self._active.get(r.uid)
            if active is None:
                continue
            active.prompt_read = active.usage.cached_tokens + r.progress[0]
            if r.end_of_segment and active.prompt_read in active.checkpoints:
                at_checkpoint.append(r.uid)
        if not at_checkpoint:
            return
        for uid, (cache, tokens) in self._batch.extract_cache(at_checkpoint).items():
            self._save_cache(tokens, cache, self._active[uid].checkpoints.pop(len(tokens)))

    def _on_token(self, r, active: _Active) -> None:
        active.usage.completion_tokens += 1
        if active.first_token_at is None:
            active.first_token_at = time.perf_counter()
        detok = active.detokenizer
        if r.finish_reason == "stop":
            detok.finalize()  # the end token itself is not text
        else:
            detok.add_token(r.token)
            if r.finish_reason is not None:
                detok.finalize()
        text = detok.last_segment

        parser = active.parser
        was_reasoning = parser.in_reasoning
        events: list = []
        if active.handle.request.logprobs:
            events.append(self._logprob_event(r, active))
        events.extend(parser.feed(text))
        if was_reasoning or parser.in_reasoning or any(isinstance(e, ReasoningDelta) for e in events):
            active.usage.reasoning_tokens += 1

        reason = r.finish_reason
        built = [(r.all_tokens, r.prompt_cache)] if reason is not None else []
        if reason is None and parser.stopped:
            reason = "stop"
            built = self._remove_from_batch([r.uid])
        if reason is None:
            active.handle._push(events)
            return
        tail, final_reason = parser.finish(reason)
        events.extend(tail)
        active.handle._push(events)
        self._finish(r.uid, active, Finish(final_reason, active.usage, parser.stop_sequence))
        for tokens, cache in built:  # once the answer is out: saving copies the cache
            self._save_cache(tokens, cache)

    def _finish(self, uid: int, active: _Active, last: Any) -> None:
        self._active.pop(uid, None)
        active.handle._push([last])
        if isinstance(last, Finish):
            self._release(active.handle, None, outcome="finished", reason=last.reason, active=active)
        else:
            self._release(active.handle, None, outcome="failed", reason="generation_failed", active=active)
        _log_request(active, last)

    def _logprob_event(self, r, active: _Active) -> TokenLogprob:
        import mlx.core as mx

        tokenizer = self._current.tokenizer
        logprobs = r.logprobs
        n_top = active.handle.request.top_logprobs
        top = []
        if n_top > 0:
            ids = mx.argpartition(-logprobs, kth=n_top - 1)[:n_top]
            values = logprobs[ids].tolist()
            ids = ids.tolist()
            top = sorted(
                ((_token_text(tokenizer, i), v) for i, v in zip(ids, values)),
                key=lambda tv: -tv[1],
            )
        text = _token_text(tokenizer, r.token)
        return TokenLogprob(
            token=text,
            logprob=logprobs[r.token].item(),
            bytes=list(text.encode()),
            top=[(t, v, list(t.encode())) for t, v in top],
        )


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _segments(tokens: list[int], n_cached: int, checkpoints: dict[int, str]) -> list[list[int]]:
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


def _effective_sampling(sampling: SamplingParams, model_defaults: dict) -> dict:
    """Request values first, then the model's generation_config, then OpenAI's defaults."""
    merged = dict(DEFAULT_SAMPLING)
    merged.update(model_defaults)
    for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        value = getattr(sampling, key)
        if value is not None:
            merged[key] = value
    return merged


def _log_request(active: _Active, last: Any) -> None:
    usage = active.usage
    now = time.perf_counter()
    ttft = (active.first_token_at or now) - active.started_at
    decode_s = now - (active.first_token_at or now)
    tps = (usage.completion_tokens - 1) / decode_s if decode_s > 0 and usage.completion_tokens > 1 else 0.0
    outcome = last.reason if isinstance(last, Finish) else f"failed: {last.message}"
    log.info(
        "request done (%s): prompt %d tokens (%d cached), completion %d tokens (%d reasoning), "
        "first token %.2f s, %.1f tokens/s",
        outcome,
        usage.prompt_tokens,
        usage.cached_tokens,
        usage.completion_tokens,
        usage.reasoning_tokens,
        ttft,
        tps,
    )


def _ledger_record(
    handle: RequestHandle, active: Optional[_Active], outcome: str, reason: str, error: Optional[Exception]
) -> RequestRecord:
    """The usage ledger's row for a request that ends now: the engine's own counters
    (for a request that never started: none, or the prompt length it was rejected for)."""
    req = handle.request
    now = time.perf_counter()
    record = RequestRecord(
        ts=handle.submitted_wall,
        request_id=req.request_id,
        door=req.door,
        model=req.model.name,
        client=req.client,
        outcome=outcome,
        finish_reason=reason,
        prompt_tokens=getattr(error, "prompt_tokens", 0),
        duration_s=now - handle.submitted_at,
        queue_s=now - handle.submitted_at,
    )
    if active is None:
        return record
    usage = active.usage
    record.prompt_tokens = usage.prompt_tokens
    record.cached_tokens = usage.cached_tokens
    record.completion_tokens = usage.completion_tokens
    record.reasoning_tokens = usage.reasoning_tokens
    # Once a token is sampled the whole prompt was read; before that, as far as prefill got.
    read = usage.prompt_tokens if active.first_token_at is not None else active.prompt_read
    record.computed_prompt_tokens = read - usage.cached_tokens
    record.queue_s = active.started_at - handle.submitted_at
    if active.first_token_at is not None:
        record.ttft_s = active.first_token_at - handle.submitted_at
        decode_s = now - active.first_token_at
        if usage.completion_tokens > 1 and decode_s > 0:
            record.decode_tps = (usage.completion_tokens - 1) / decode_s
    return record
