"""The usage ledger's own parts on real SQLite files: writer, migrations, retention, queries."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from datetime import datetime, timezone

import pytest

from mlxd.server import ledger
from mlxd.server.ledger import Ledger, RequestRecord
from mlxd.api.clients import client_family

DAY = 86400
T0 = datetime(2026, 5, 1, 10, 30, tzinfo=timezone.utc).timestamp()


def rec(ts=T0, model="m", client="other", outcome="finished", reason="stop", prompt=10, cached=4, completion=5,
        reasoning=0, ttft=0.5, tps=20.0, door="chat") -> RequestRecord:
    return RequestRecord(ts, "req", door, model, client, outcome, reason, prompt, cached, completion, reasoning,
                         prompt - cached, 0.01, ttft, 1.0, tps)


def write(path, records, **kwargs) -> None:
    book = Ledger(path, **kwargs).start()
    for r in records:
        book.record(r)
    book.close()


def read(path, **kwargs) -> dict:
    conn = ledger.connect(path)
    try:
        return ledger.summary(conn, **kwargs)
    finally:
        conn.close()


def test_records_are_stored_and_summed_by_group(tmp_path):
    path = tmp_path / "usage.db"
    write(path, [rec(), rec(model="n", prompt=20, cached=0, completion=7, ttft=1.5, tps=10.0),
                 rec(ts=T0 + DAY, completion=3, ttft=0.25, tps=None)])
    whole = read(path)
    assert whole["totals"] == {"requests": 3, "prompt_tokens": 40, "cached_tokens": 8, "completion_tokens": 15,
                               "reasoning_tokens": 0, "computed_prompt_tokens": 32}
    assert whole["groups"] == []
    by = read(path, group_by=["model", "day"])
    keys = [g["key"] for g in by["groups"]]
    assert keys == [{"model": "m", "day": "2026-05-01"}, {"model": "m", "day": "2026-05-02"},
                    {"model": "n", "day": "2026-05-01"}]
    assert [g["completion_tokens"] for g in by["groups"]] == [5, 3, 7]
    assert by["groups"][1]["decode_tps_p50"] is None  # one token: no decode speed
    by_model = read(path, group_by=["model"])["groups"][0]
    assert (by_model["ttft_p50_s"], by_model["ttft_p95_s"], by_model["decode_tps_p50"]) == (0.25, 0.5, 20.0)


def test_filters_and_time_bounds(tmp_path):
    path = tmp_path / "usage.db"
    write(path, [rec(), rec(ts=T0 + DAY, client="opencode"), rec(ts=T0 + 2 * DAY, model="n")])
    assert read(path, client="opencode")["totals"]["requests"] == 1
    assert read(path, model="n")["totals"]["requests"] == 1
    since = ledger.parse_time("2026-05-02")
    assert read(path, since=since)["totals"]["requests"] == 2
    until = ledger.parse_time("2026-05-02", end=True)  # a date as the end: the whole day
    assert read(path, until=until)["totals"]["requests"] == 2
    assert read(path, since=since, until=until)["since"] == "2026-05-02T00:00:00+00:00"
    assert ledger.parse_time("7d", now=T0) == T0 - 7 * DAY
    with pytest.raises(ValueError):
        ledger.parse_time("last tuesday")
    with pytest.raises(ValueError):
        read(path, group_by=["weather"])


def test_an_older_schema_migrates_and_its_rows_read_zero_in_new_columns(tmp_path):
    path = tmp_path / "usage.db"
    old = sqlite3.connect(path)
    old.executescript(ledger.MIGRATIONS[0])
    old.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    old.execute("INSERT INTO schema_version VALUES (1)")
    old.execute("INSERT INTO requests (ts, request_id, door, model, client, outcome, finish_reason, prompt_tokens, "
                "cached_tokens, completion_tokens) VALUES (?, 'old', 'chat', 'm', 'other', 'finished', 'stop', 9, 2, 4)",
                (T0,))
    old.commit()
    old.close()
    write(path, [rec()])
    conn = ledger.connect(path)
    assert ledger.schema_version(conn) == ledger.SCHEMA_VERSION
    rows = ledger.recent(conn, 10)
    conn.close()
    old_row = next(r for r in rows if r["request_id"] == "old")
    assert (old_row["reasoning_tokens"], old_row["computed_prompt_tokens"], old_row["ttft_s"]) == (0, 0, None)
    assert read(path)["totals"]["prompt_tokens"] == 19


def _open_after(barrier, path) -> None:
    barrier.wait()
    ledger.connect(path).close()


def test_processes_opening_a_new_file_at_once_all_succeed(tmp_path):
    path = tmp_path / "usage.db"
    fork = multiprocessing.get_context("fork")
    barrier = fork.Barrier(8)
    procs = [fork.Process(target=_open_after, args=(barrier, path)) for _ in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 8
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(ledger.SCHEMA_VERSION,)]
    conn.close()


def test_retention_prunes_old_rows(tmp_path):
    path = tmp_path / "usage.db"
    now = datetime.now(timezone.utc).timestamp()
    write(path, [rec(ts=now - 40 * DAY), rec(ts=now - DAY)], retention_days=30)
    write(path, [], retention_days=30)  # the writer prunes when it starts, then daily
    assert read(path)["totals"]["requests"] == 1


def test_record_never_waits_for_the_writer(tmp_path):
    book = Ledger(tmp_path / "usage.db")
    gate = threading.Event()
    book.listeners.append(lambda batch: gate.wait())  # a writer stuck after its first commit
    book.start()
    for _ in range(1000):
        book.record(rec())  # returns at once though nothing more is written
    gate.set()
    book.close()
    assert read(tmp_path / "usage.db")["totals"]["requests"] == 1000


def test_percentile_is_nearest_rank():
    assert ledger.percentile([], 50) is None
    assert ledger.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert ledger.percentile(list(range(1, 101)), 95) == 95


@pytest.mark.parametrize("agent, family", [
    ("opencode/1.0.20 ai-sdk/openai-compatible/1.0.0", "opencode"),
    ("claude-cli/1.0.83 (external, cli)", "claude-code"),
    ("codex_cli_rs/0.20.0 (Mac OS 15.5.0; arm64)", "codex"),
    ("OpenAI/Python 1.99.0", "openai-python"),
    ("OpenAI/JS 5.12.0", "openai-node"),
    ("curl/8.5.0", "other"),
    ("", "other"),
])
def test_client_family_from_user_agent(agent, family):
    assert client_family(agent) == family
