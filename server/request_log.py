"""What is kept of a request when it ends: its log line and its usage-ledger record.

Both read the engine's own counters (`_Active.usage`), never a re-tokenization.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from .events import Finish
from .ledger import RequestRecord

log = logging.getLogger("mlxd.engine")


def log_request(active, last: Any) -> None:
    """One line per request: its id, door and model, tokens, speed and cache hit."""
    usage = active.usage
    req = active.handle.request
    now = time.perf_counter()
    ttft = (active.first_token_at or now) - active.started_at
    decode_s = now - (active.first_token_at or now)
    tps = (usage.completion_tokens - 1) / decode_s if decode_s > 0 and usage.completion_tokens > 1 else 0.0
    outcome = last.reason if isinstance(last, Finish) else f"failed: {last.message}"
    (log.info if isinstance(last, Finish) else log.error)(
        "[%s] request done (%s): prompt %d tokens (%d cached), completion %d tokens (%d reasoning), "
        "first token %.2f s, %.1f tokens/s; %s, model %s, client %s",
        req.request_id,
        outcome,
        usage.prompt_tokens,
        usage.cached_tokens,
        usage.completion_tokens,
        usage.reasoning_tokens,
        ttft,
        tps,
        req.door,
        req.model.name,
        req.client,
    )


def ledger_record(handle, active, outcome: str, reason: str, error: Optional[Exception]) -> RequestRecord:
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
