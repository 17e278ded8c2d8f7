"""The generation loop: one thread owns MLX and serves every request through it.

Requests arrive on a thread-safe inbox. The engine thread loads models, hands
prompt building to worker threads (`prompt_builder`), reuses cached prefixes, and
runs mlx-lm's `BatchGenerator` so that concurrent requests share each decode step.
Events go back to each request's asyncio queue with `call_soon_threadsafe`, so the
event loop never blocks on MLX.

The loop is supervised: an error tied to one request (its prompt, its output
parsing) ends that request alone; an error in the batch step ends the batch's
requests and starts a fresh batch; any other error fails every request at once,
marks the engine degraded (new requests get 503) and restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import EngineError, EngineUnavailable, InternalError
from .events import Failure, Finish, ReasoningDelta, TokenLogprob, Usage
from .ledger import RequestRecord
from .lockstep import Steps
from .model_slots import ModelSlots
from .models import LoadedModel
from .output import OutputParser
from .prefix_cache import PrefixCache
from .request_log import ledger_record, log_request
from .requests import Accepted, GenerationRequest, ModelRef, RequestHandle, SamplingParams
from .scheduler import Scheduler

log = logging.getLogger("mlxd.engine")

# Fallbacks when neither the request nor the model's generation_config sets them
# (OpenAI's defaults).
DEFAULT_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
# Restart attempts after an engine error wait 0.5 s, 1 s, 2 s, ... up to this.
MAX_RESTART_BACKOFF_S = 30.0


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
        queue_timeout: float = 600.0,
        client_timeout: float = 60.0,
        on_request_end: Optional[Callable[[RequestRecord], None]] = None,
        link=None,
        loader: Optional[Callable[..., LoadedModel]] = None,
    ):
        self.max_loaded_models = max(1, max_loaded_models)
        self.keep_alive = keep_alive
        self.trust_remote_code = trust_remote_code
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill_step_size = prefill_step_size
        self.prompt_cache_bytes = prompt_cache_bytes
        self.prompt_cache_entries = prompt_cache_entries
        self.client_timeout = client_timeout
        # Called on the engine thread with one record per request, however it ends;
        # it must only hand the record on (the usage ledger queues it for its writer).
        self.on_request_end = on_request_end
        # distributed: rank 0's line to the other ranks (distributed.Link)
        self._link = link

        self._scheduler = Scheduler(max_in_flight=max_batch_size + max_queue, queue_timeout=queue_timeout,
                                    on_release=self._record)
        self._models = ModelSlots(max_loaded=max_loaded_models, keep_alive=keep_alive, on_unload=self._on_unload,
                                  loader=loader)
        self._current: Optional[LoadedModel] = None
        self._steps: Optional[Steps] = None  # the batch, and the prefix cache's operations
        self._active: dict[int, _Active] = {}
        self._prompt_cache = PrefixCache(
            ram_bytes=prompt_cache_bytes,
            ram_entries=prompt_cache_entries,
            disk_dir=prompt_cache_dir,
            disk_bytes=prompt_cache_disk_bytes,
        )
        self._degraded: Optional[str] = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mlxd-engine", daemon=True)

    # ------------------------------------------------------------------
    # Public API (any thread)
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._scheduler.inbox.put(None)
        self._thread.join(timeout=30)
        self._scheduler.close()

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self._degraded is None

    @property
    def degraded_reason(self) -> Optional[str]:
        """Why the engine is not serving (restarting after an error, or stopped); None when it is."""
        if not self._thread.is_alive():
            return "the generation thread has stopped"
        return self._degraded

    def abandon(self, error: EngineError) -> None:
        """The process exits next (a distributed group lost a rank): every request fails
        now with `error`, and new ones are refused with it. Any thread: the engine thread
        may be stuck in an MLX collective that never returns."""
        self._degraded = str(error)
        for active in list(self._active.values()):
            active.handle._push([Failure(str(error), active.usage, code=error.code, status=503)])
        self._scheduler.fail_all(error)

    def preload(self, ref: ModelRef) -> None:
        """Load a model in the engine thread now rather than on first use."""
        self._scheduler.inbox.put(("load", ref))

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> RequestHandle:
        """Queue a request; raises QueueFull when active and waiting slots are all taken,
        EngineUnavailable while the engine restarts."""
        reason = self.degraded_reason
        if reason is not None:
            raise EngineUnavailable(reason)
        handle = RequestHandle(request, loop)
        self._scheduler.submit(handle)
        return handle

    def prompt_format(self, name: str):
        """The (tokenizer, OutputFormat) of loaded model `name`, or None; any thread may
        render prompts with them (rendering and encoding do not change the tokenizer)."""
        lm = self._models.get(name)
        return (lm.tokenizer, lm.output_format) if lm is not None and lm.output_format is not None else None

    @property
    def queue_depth(self) -> int:
        """Requests submitted and not yet decoding (waiting or having their prompt built)."""
        return max(0, self._scheduler.in_flight - len(self._active))

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
            for m in list(self._models.loaded.values())
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
    # Engine thread: the supervised loop
    def _run(self) -> None:
        import mlx.core as mx

        self._stream = mx.new_stream(mx.default_device())
        self._steps = self._new_steps()
        while not self._stopping:
            try:
                self._iterate()
            except Exception as e:
                try:
                    self._fail_everything(e)
                except Exception:
                    log.exception("failing the requests after an engine error raised too")
                self._recover()
        self._end_in_flight()
        self._close_batch()
        self._prompt_cache.close()

    def _end_in_flight(self) -> None:
        """The server stops under the requests in the batch: each ends, and what it read
        and generated is saved like a cancelled request's, so the disk tier keeps it."""
        built = []
        if self._active:
            try:
                built = self._remove_from_batch(list(self._active))
            except Exception:
                log.warning("could not take the requests in flight out of the batch", exc_info=True)
        for active in list(self._active.values()):
            self._release(active.handle, None, outcome="cancelled", reason="shutdown", active=active)
        self._active.clear()
        for uid in built:
            try:
                self._steps.save(uid)
            except Exception:
                log.warning("could not save the cache of a request in flight", exc_info=True)

    def _iterate(self) -> None:
        self._take_inbox(block=not self._active and not self._scheduler.waiting)
        self._scheduler.expire()
        self._admit_waiting()
        if self._active:
            self._step_safely()
        else:
            self._models.unload_idle()
            self._steps.idle()

    def _fail_everything(self, error: Exception) -> None:
        """The engine cannot go on: every request it holds gets an error now."""
        reason = f"{type(error).__name__}: {error}"
        self._degraded = reason
        log.exception("engine error outside any one request; failing every request and restarting")
        for uid, active in list(self._active.items()):
            self._finish(uid, active, Failure(f"the engine failed and restarts ({reason})", active.usage))
        if not self._scheduler.fail_all(EngineUnavailable(reason)):
            self._stopping = True

    def _recover(self) -> None:
        """Start over from nothing (models load again on next use), retrying with backoff."""
        attempt = 0
        while not self._stopping:
            try:
                self._restart()
            except Exception:
                attempt += 1
                delay = min(MAX_RESTART_BACKOFF_S, 0.5 * 2 ** (attempt - 1))
                log.exception("engine restart failed (attempt %d); retrying in %.1f s", attempt, delay)
                time.sleep(delay)
                continue
            log.info("engine restarted after: %s; models load again on next use", self._degraded)
            self._degraded = None
            return

    def _restart(self) -> None:
        import gc

        import mlx.core as mx

        self._active.clear()
        steps, self._steps, self._current = self._steps, None, None
        if steps is not None:
            try:
                steps.close()
            except Exception:
                log.warning("closing the failed batch raised; dropping it", exc_info=True)
        self._models.clear()
        self._steps = self._new_steps()
        self._steps.spill()  # the saved caches were whole before the error: RAM to disk
        gc.collect()
        mx.clear_cache()

    # ------------------------------------------------------------------
    # Engine thread: requests in
    def _take_inbox(self, block: bool) -> None:
        for item in self._scheduler.take(block, self._models.get):
            if item is None:
                return
            try:
                self._models.ensure(item[1])  # ("load", ref): the batch switches to it on first use
            except EngineError as e:
                log.error("%s", e)

    def _admit_waiting(self) -> None:
        """Admit waiting requests in order; a request for another model waits for the batch to drain."""
        waiting = self._scheduler.waiting
        while waiting and len(self._active) < self.max_batch_size:
            handle = waiting[0]
            model_name = handle.request.model.name
            if self._active and self._current is not None and self._current.name != model_name:
                return
            waiting.popleft()
            try:
                lm = self._ensure_loaded(handle.request.model)  # other errors here are the engine's
            except EngineError as e:
                self._release(handle, e, outcome="rejected", reason=e.code)
                continue
            try:
                if handle.prepared is None:
                    self._scheduler.build(handle, lm)
                else:
                    self._admit(handle, lm)
            except EngineError as e:
                self._release(handle, e, outcome="rejected", reason=e.code)
            except Exception as e:  # tied to this request: it alone fails
                log.exception("[%s] could not start the request", handle.request.request_id)
                self._release(handle, InternalError(f"could not start the request: {type(e).__name__}: {e}"),
                              outcome="failed", reason=InternalError.code)

    def _release(self, handle: RequestHandle, error: Optional[Exception], *, outcome: str, reason: str,
                 active: Optional[_Active] = None) -> None:
        self._scheduler.release(handle, error, outcome=outcome, reason=reason, active=active)

    def _record(self, handle: RequestHandle, error: Optional[Exception], outcome: str, reason: str,
                active: Optional[_Active]) -> None:
        """Hand the request's usage-ledger record on, once, however the request ended."""
        if self.on_request_end is None:
            return
        try:
            self.on_request_end(ledger_record(handle, active, outcome, reason, error))
        except Exception:
            log.exception("[%s] could not hand the request's record to the usage ledger", handle.request.request_id)

    # ------------------------------------------------------------------
    # Engine thread: models
    def _ensure_loaded(self, ref: ModelRef) -> LoadedModel:
        lm = self._models.ensure(ref)
        if self._current is not lm:
            self._switch_to(lm)
        return lm

    def _on_unload(self, lm: LoadedModel) -> None:
        if self._current is lm:
            self._close_batch()
        self._steps.spill()

    def _new_steps(self) -> Steps:
        return Steps(stream=self._stream, prefix_cache=self._prompt_cache, max_batch_size=self.max_batch_size,
                     prefill_step_size=self.prefill_step_size, link=self._link)

    def _switch_to(self, lm: LoadedModel) -> None:
        self._close_batch()
        self._current = lm
        self._steps.open(lm)

    def _close_batch(self) -> None:
        if self._steps is not None:
            self._steps.close()
        self._current = None

    # ------------------------------------------------------------------
    # Engine thread: generation
    def _admit(self, handle: RequestHandle, lm: LoadedModel) -> None:
        req = handle.request
        prepared = handle.prepared
        prompt = prepared.prompt
        n_prompt = len(prompt.tokens)

        sampling = _effective_sampling(req.sampling, lm.sampling_defaults)
        sampling.update(seed=req.sampling.seed, logit_bias=req.sampling.logit_bias,
                        presence_penalty=req.sampling.presence_penalty,
                        frequency_penalty=req.sampling.frequency_penalty)
        fmt = lm.output_format
        grammar = dict(  # constrained.processor_for's arguments; Steps builds it with the tokenizer
            response_format=req.response_format,
            tool_format=fmt.name,
            tools=prepared.tools,
            tool_choice=req.tool_choice,
            forced=bool(prompt.suffix),
            think=(fmt.think_start, fmt.think_end) if fmt.think_start and fmt.think_end else None,
            starts_in_reasoning=prompt.starts_in_reasoning,
        )
        parser = OutputParser(
            lm.output_format,
            tools=prepared.tools,
            tool_choice=req.tool_choice,
            parallel_tool_calls=req.parallel_tool_calls,
            stop=req.stop if req.response_format is None else (),  # a stop string must not cut the JSON
            starts_in_reasoning=prompt.starts_in_reasoning,
            prefix=prompt.suffix,
        )
        uid, n_cached = self._steps.admit(
            prompt.tokens, prompt.checkpoints, prepared.max_tokens, sampling, grammar,
            [(t,) for t in lm.tokenizer.eos_token_ids],  # as mlx-lm's make_stop_sequences
        )
        checkpoints = {n: kind for n, kind in prompt.checkpoints.items() if n > n_cached}
        self._active[uid] = _Active(
            handle=handle,
            detokenizer=lm.tokenizer.detokenizer,
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
                self._switch_to(self._current)  # a fresh batch; if this fails, the engine restarts

    def _step(self) -> None:
        self._drop_cancelled()
        if not self._active:
            return
        prompt_responses, gen_responses = self._steps.next()
        self._on_prefill(prompt_responses)
        for r in gen_responses:
            active = self._active.get(r.uid)
            if active is None:
                continue
            try:
                self._on_token(r, active)
            except Exception as e:  # its parser, detokenizer or logprobs: this request alone fails
                self._fail_request(r, active, e)
        if self._current is not None:
            self._current.last_used = time.monotonic()

    def _fail_request(self, r, active: _Active, error: Exception) -> None:
        log.exception("[%s] processing the output failed; ending this request", active.handle.request.request_id)
        if r.uid not in self._active:
            return  # it had finished already
        if r.finish_reason is None and not active.parser.stopped:  # a stopped parser took it out already
            self._steps.remove([r.uid])
        self._finish(r.uid, active, Failure(f"processing the output failed: {type(error).__name__}: {error}",
                                            active.usage))

    def _drop_cancelled(self) -> None:
        for uid, active in self._active.items():
            reason = None if active.handle.cancelled else active.handle._stalled(self.client_timeout)
            if reason is not None:
                active.handle.dropped = reason
                active.handle.cancel()
        gone = [uid for uid, a in self._active.items() if a.handle.cancelled]
        if not gone:
            return
        built = self._remove_from_batch(gone)
        for uid in gone:
            active = self._active.pop(uid)
            handle = active.handle
            if handle.dropped:
                handle._push([Failure(f"dropped: {handle.dropped}", active.usage)])
            phase = "decode" if active.first_token_at is not None else "prefill"
            self._release(handle, None, outcome="cancelled", reason="stalled" if handle.dropped else phase,
                          active=active)
            log.info(
                "[%s] request %s after %d tokens (%d of %d prompt tokens read)",
                handle.request.request_id,
                f"dropped: {handle.dropped}," if handle.dropped else "cancelled by the client",
                active.usage.completion_tokens,
                active.prompt_read,
                active.usage.prompt_tokens,
            )
        for uid in built:
            self._steps.save(uid)

    def _remove_from_batch(self, uids: list[int]) -> list[int]:
        """Take sequences out of the batch; returns those whose caches are to be saved
        for later prefix hits: any that started from a cached prefix (a conversation's
        turn takes its cache out of the prefix cache, and gives it back even when
        cancelled before reading a token) or read beyond it."""
        sizes = self._steps.remove(uids)
        return [uid for uid, n in sizes.items() if n > 0 and n >= self._active[uid].usage.cached_tokens]

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
        for uid, n in self._steps.extract(at_checkpoint).items():
            self._steps.save(uid, self._active[uid].checkpoints.pop(n))

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
        built = [r.uid] if reason is not None else []
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
        for uid in built:  # once the answer is out: saving copies the cache
            self._steps.save(uid)

    def _finish(self, uid: int, active: _Active, last: Any) -> None:
        self._active.pop(uid, None)
        active.handle._push([last])
        if isinstance(last, Finish):
            self._release(active.handle, None, outcome="finished", reason=last.reason, active=active)
        else:
            self._release(active.handle, None, outcome="failed", reason="generation_failed", active=active)
        log_request(active, last)

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


def _effective_sampling(sampling: SamplingParams, model_defaults: dict) -> dict:
    """Request values first, then the model's generation_config, then OpenAI's defaults."""
    merged = dict(DEFAULT_SAMPLING)
    merged.update(model_defaults)
    for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        value = getattr(sampling, key)
        if value is not None:
            merged[key] = value
    return merged
