"""The usage ledger: one row per request that reached the engine, however it ended.

The engine hands a `RequestRecord` to `Ledger.record`, which only puts it on a queue:
one writer thread owns the SQLite connection, so a slow disk never delays a token.
Rows are committed in small batches; what is committed survives a crash (WAL mode).
The schema carries a version and migrates forward: a database written by an older
mlxd opens in a newer one, and columns it did not have read as 0.

Readers (`summary`, `recent`) open their own connection: `/v1/usage`, `/metrics`
and `mlxd usage` read the same file, with or without a running server.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterable, Optional

from mlxd.registry.home import mlxd_home

log = logging.getLogger("mlxd.ledger")

DEFAULT_RETENTION_DAYS = 365
PRUNE_EVERY_S = 24 * 3600
GROUP_KEYS = ("model", "day", "hour", "door", "client", "outcome")
TOKEN_KINDS = ("prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens", "computed_prompt_tokens")


@dataclass
class RequestRecord:
    """One request's end. `outcome` is finished, cancelled, failed or rejected;
    `finish_reason` is stop, length or tool_calls when finished, else where it ended
    (queued, prefill, decode) or the error code. Counts are the engine's own."""

    ts: float  # wall-clock time the request reached the engine (Unix seconds)
    request_id: str
    door: str
    model: str
    client: str
    outcome: str
    finish_reason: str
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    computed_prompt_tokens: int = 0  # prompt tokens prefilled (not taken from the cache)
    queue_s: float = 0.0
    ttft_s: Optional[float] = None  # None when no token was sampled
    duration_s: float = 0.0
    decode_tps: Optional[float] = None  # None below two sampled tokens


COLUMNS = [f.name for f in fields(RequestRecord)]

# MIGRATIONS[n] takes a database from schema version n to n + 1. Never edit a step
# that has shipped: append one. A column added later reads as 0 in old rows.
MIGRATIONS = [
    """
    CREATE TABLE requests (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        request_id TEXT NOT NULL DEFAULT '',
        door TEXT NOT NULL DEFAULT '',
        model TEXT NOT NULL DEFAULT '',
        client TEXT NOT NULL DEFAULT '',
        outcome TEXT NOT NULL DEFAULT '',
        finish_reason TEXT NOT NULL DEFAULT '',
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        cached_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX requests_ts ON requests (ts);
    """,
    """
    ALTER TABLE requests ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE requests ADD COLUMN computed_prompt_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE requests ADD COLUMN queue_s REAL NOT NULL DEFAULT 0;
    ALTER TABLE requests ADD COLUMN ttft_s REAL;
    ALTER TABLE requests ADD COLUMN duration_s REAL NOT NULL DEFAULT 0;
    ALTER TABLE requests ADD COLUMN decode_tps REAL;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def default_path() -> Path:
    return mlxd_home() / "usage.db"


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating and migrating as needed) the ledger database."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    migrate(conn)
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    return row[0] or 0


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the file to SCHEMA_VERSION in one write transaction, so that two processes
    opening a new file at once migrate it once and a half-migrated file never stays behind."""
    version = schema_version(conn)
    if version >= SCHEMA_VERSION:
        if version > SCHEMA_VERSION:
            log.warning("usage.db has schema version %d, newer than this mlxd's %d", version, SCHEMA_VERSION)
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = schema_version(conn)  # again, under the write lock
        for n in range(version, SCHEMA_VERSION):
            for statement in filter(str.strip, MIGRATIONS[n].split(";")):
                conn.execute(statement)
            log.info("usage ledger: migrated schema %d -> %d", n, n + 1)
        conn.execute("DELETE FROM schema_version")
        conn.execute("INSERT INTO schema_version VALUES (?)", (max(version, SCHEMA_VERSION),))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def prune(conn: sqlite3.Connection, retention_days: float, now: Optional[float] = None) -> int:
    cutoff = (now or time.time()) - retention_days * 86400
    with conn:
        deleted = conn.execute("DELETE FROM requests WHERE ts < ?", (cutoff,)).rowcount
    if deleted:
        log.info("usage ledger: pruned %d rows older than %g days", deleted, retention_days)
    return deleted


class Ledger:
    """Takes records from any thread; one writer thread stores them."""

    def __init__(self, path: Optional[Path] = None, *, retention_days: float = DEFAULT_RETENTION_DAYS):
        self.path = Path(path) if path is not None else default_path()
        self.retention_days = retention_days
        # Called on the writer thread with each batch once it is committed (/metrics' counters).
        self.listeners: list[Callable[[list[RequestRecord]], None]] = []
        self._queue: queue.Queue = queue.Queue()
        conn = connect(self.path)  # here, so a bad path fails at start, not in the thread
        conn.close()
        self._thread = threading.Thread(target=self._run, name="mlxd-ledger", daemon=True)

    def start(self) -> "Ledger":
        self._thread.start()
        return self

    def record(self, rec: RequestRecord) -> None:
        """Never blocks: the record waits on the queue for the writer."""
        self._queue.put(rec)

    def close(self, timeout: float = 30) -> None:
        """Store what is queued, then stop the writer."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        conn = connect(self.path)
        next_prune = 0.0
        try:
            while True:
                if time.time() >= next_prune:
                    try:
                        prune(conn, self.retention_days)
                    except sqlite3.Error:
                        log.exception("usage ledger: could not prune old rows; trying again tomorrow")
                    next_prune = time.time() + PRUNE_EVERY_S
                try:
                    first = self._queue.get(timeout=60)
                except queue.Empty:
                    continue
                batch, stopping = _drain(self._queue, first)
                if batch:
                    self._write(conn, batch)
                if stopping:
                    return
        finally:
            conn.close()

    def _write(self, conn: sqlite3.Connection, batch: list[RequestRecord]) -> None:
        sql = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        try:
            with conn:
                conn.executemany(sql, [tuple(asdict(r).values()) for r in batch])
        except sqlite3.Error:
            log.exception("usage ledger: could not store %d records", len(batch))
            return
        for listener in self.listeners:
            try:
                listener(batch)
            except Exception:
                log.exception("usage ledger: a listener failed")


def _drain(q: queue.Queue, first) -> tuple[list[RequestRecord], bool]:
    """`first` and whatever else is queued now: one transaction for a burst."""
    batch, item = [], first
    while True:
        if item is None:
            return batch, True
        batch.append(item)
        try:
            item = q.get_nowait()
        except queue.Empty:
            return batch, False


# ----------------------------------------------------------------------
# Queries


def parse_time(text: Optional[str], *, end: bool = False, now: Optional[float] = None) -> Optional[float]:
    """An ISO date or time, or an age like `7d`, `12h`, `30m` -> Unix seconds.

    A bare date as an end (`until`) means the end of that day, so `until=2026-05-01`
    includes May 1st. Times without a zone are UTC."""
    if not text:
        return None
    text = text.strip()
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        return (now or time.time()) - float(text[:-1]) * units[text[-1]]
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO date or time, nor an age like 7d or 12h") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    if end and len(text) == 10:  # a date: the whole day
        moment += timedelta(days=1)
    return moment.timestamp()


def _iso(ts: Optional[float]) -> Optional[str]:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


_KEY_SQL = {
    "model": "model",
    "door": "door",
    "client": "client",
    "outcome": "outcome",
    "day": "strftime('%Y-%m-%d', ts, 'unixepoch')",
    "hour": "strftime('%Y-%m-%dT%H:00', ts, 'unixepoch')",
}


def _where(since: Optional[float], until: Optional[float], model: Optional[str], client: Optional[str]):
    clauses, params = [], []
    for clause, value in (("ts >= ?", since), ("ts < ?", until), ("model = ?", model), ("client = ?", client)):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def percentile(values: list[float], q: float) -> Optional[float]:
    """Nearest-rank percentile; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100)
    return ordered[int(rank) - 1]


def summary(
    conn: sqlite3.Connection,
    *,
    since: Optional[float] = None,
    until: Optional[float] = None,
    group_by: Iterable[str] = (),
    model: Optional[str] = None,
    client: Optional[str] = None,
) -> dict:
    """Totals and per-group counts with TTFT p50/p95 and decode tokens/s p50: `/v1/usage`'s body."""
    group_by = list(group_by)
    unknown = [k for k in group_by if k not in GROUP_KEYS]
    if unknown:
        raise ValueError(f"group_by {unknown[0]!r} is not one of {', '.join(GROUP_KEYS)}")
    where, params = _where(since, until, model, client)
    sums = ", ".join(f"coalesce(sum({k}), 0) AS {k}" for k in TOKEN_KINDS)
    totals = dict(conn.execute(f"SELECT count(*) AS requests, {sums} FROM requests{where}", params).fetchone())

    keys = [f"{_KEY_SQL[k]} AS {k}" for k in group_by]
    select = ", ".join(keys + ["count(*) AS requests", sums])
    group = f" GROUP BY {', '.join(group_by)} ORDER BY {', '.join(group_by)}" if group_by else ""
    groups = []
    if group_by:
        timings = _timings(conn, where, params, group_by)
        for row in conn.execute(f"SELECT {select} FROM requests{where}{group}", params):
            row = dict(row)
            key = {k: row.pop(k) for k in group_by}
            ttft, tps = timings.get(tuple(key.values()), ([], []))
            groups.append({
                "key": key,
                **row,
                "ttft_p50_s": percentile(ttft, 50),
                "ttft_p95_s": percentile(ttft, 95),
                "decode_tps_p50": percentile(tps, 50),
            })
    return {
        "object": "usage.summary",
        "since": _iso(since),
        "until": _iso(until),
        "totals": totals,
        "groups": groups,
    }


def _timings(conn, where: str, params: list, group_by: list[str]) -> dict[tuple, tuple[list, list]]:
    keys = ", ".join(_KEY_SQL[k] for k in group_by)
    out: dict[tuple, tuple[list, list]] = {}
    for row in conn.execute(f"SELECT {keys}, ttft_s, decode_tps FROM requests{where}", params):
        ttft_list, tps_list = out.setdefault(tuple(row)[: len(group_by)], ([], []))
        if row["ttft_s"] is not None:
            ttft_list.append(row["ttft_s"])
        if row["decode_tps"] is not None:
            tps_list.append(row["decode_tps"])
    return out


def recent(conn: sqlite3.Connection, limit: int = 50) -> list[dict]:
    """The last `limit` requests, newest first, with an ISO `time` beside `ts`."""
    rows = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM requests ORDER BY ts DESC, id DESC LIMIT ?", (limit,))
    return [{"time": _iso(r["ts"]), **dict(r)} for r in rows]


def counts_by(conn: sqlite3.Connection) -> list[dict]:
    """Requests and tokens per (door, model, outcome) over the whole ledger: what
    `/metrics` starts its counters from."""
    sums = ", ".join(f"coalesce(sum({k}), 0) AS {k}" for k in TOKEN_KINDS)
    sql = f"SELECT door, model, outcome, count(*) AS requests, {sums} FROM requests GROUP BY door, model, outcome"
    return [dict(r) for r in conn.execute(sql)]
