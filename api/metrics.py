"""GET /metrics: Prometheus' text format.

The request and token counters equal the usage ledger: they start from what the
ledger held when the server started and advance with each batch the ledger commits.
Histograms cover the requests since start; gauges read the runtime's live state.
"""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from mlxd.server import ledger as ledger_db
from mlxd.server.engine import Engine
from mlxd.server.ledger import Ledger, RequestRecord

router = APIRouter()

TOKEN_KINDS = ("prompt", "cached", "completion", "reasoning")


class UsageMetrics:
    """The ledger's counters and histograms, plus gauges of the engine."""

    def __init__(self, engine: Engine, ledger: Ledger):
        self.registry = CollectorRegistry()
        self.requests = Counter("mlxd_requests", "Requests that reached the engine, by door, model and outcome",
                                ["door", "model", "outcome"], registry=self.registry)
        self.tokens = Counter("mlxd_tokens", "Tokens by kind (prompt includes cached) and model",
                              ["kind", "model"], registry=self.registry)
        self.queue_seconds = Histogram("mlxd_queue_seconds", "Time from reaching the engine to joining the batch",
                                       buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry)
        self.ttft_seconds = Histogram("mlxd_time_to_first_token_seconds", "Time from reaching the engine to the first token",
                                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=self.registry)
        self.decode_tps = Histogram("mlxd_decode_tokens_per_second", "Decode speed of each request (two tokens or more)",
                                    buckets=(1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500), registry=self.registry)
        self.registry.register(_EngineGauges(engine))
        conn = ledger_db.connect(ledger.path)
        try:
            for row in ledger_db.counts_by(conn):
                self._count(row)
        finally:
            conn.close()
        ledger.listeners.append(self.observe)

    def observe(self, records: list[RequestRecord]) -> None:
        """A committed batch of ledger rows (called on the ledger's writer thread)."""
        for record in records:
            self._count({**asdict(record), "requests": 1})
            self.queue_seconds.observe(record.queue_s)
            if record.ttft_s is not None:
                self.ttft_seconds.observe(record.ttft_s)
            if record.decode_tps is not None:
                self.decode_tps.observe(record.decode_tps)

    def _count(self, row: dict) -> None:
        self.requests.labels(row["door"], row["model"], row["outcome"]).inc(row["requests"])
        for kind in TOKEN_KINDS:
            self.tokens.labels(kind, row["model"]).inc(row[f"{kind}_tokens"])


class _EngineGauges:
    """Read at scrape time: queue, batch, loaded models, memory."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        engine = self.engine
        yield GaugeMetricFamily("mlxd_queue_depth", "Requests waiting to join the batch", value=engine.queue_depth)
        yield GaugeMetricFamily("mlxd_batch_size", "Requests in the batch (prefilling or decoding)", value=engine.batch_size)
        models = engine.loaded_models()
        yield GaugeMetricFamily("mlxd_loaded_models", "Models in memory", value=len(models))
        memory = GaugeMetricFamily("mlxd_model_memory_bytes", "Weights of each loaded model", labels=["model"])
        for m in models:
            memory.add_metric([m["name"]], m["memory_bytes"])
        yield memory
        mem = engine.memory()
        yield GaugeMetricFamily("mlxd_prefix_cache_bytes", "Bytes held by the prefix cache", value=mem["prompt_cache_bytes"])
        yield GaugeMetricFamily("mlxd_mlx_active_memory_bytes", "MLX allocator: memory in use", value=mem["mlx_active_bytes"])
        yield GaugeMetricFamily("mlxd_mlx_peak_memory_bytes", "MLX allocator: peak memory", value=mem["mlx_peak_bytes"])


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
