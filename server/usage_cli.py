"""`mlxd usage`: the usage ledger summarized, read from the database directly."""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys

from . import ledger


def add_parser(sub) -> None:
    p = sub.add_parser("usage", help="tokens used per model, day, client... from the usage ledger")
    p.add_argument("--since", default="7d", help="ISO date or time, or an age: 7d, 12h (default: 7d); 'all' for everything")
    p.add_argument("--until", help="ISO date (inclusive) or time")
    p.add_argument("--by", default="model,day", help=f"group by, comma separated: {','.join(ledger.GROUP_KEYS)} (default: model,day)")
    p.add_argument("--model", help="only this model")
    p.add_argument("--client", help="only this client")
    p.add_argument("--json", action="store_true", help="print the same JSON as GET /v1/usage")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    group_by = [k for k in args.by.split(",") if k]
    try:
        since = None if args.since == "all" else ledger.parse_time(args.since)
        until = ledger.parse_time(args.until, end=True)
        conn = ledger.connect(ledger.default_path())
        try:
            result = ledger.summary(conn, since=since, until=until, group_by=group_by, model=args.model, client=args.client)
        finally:
            conn.close()
    except (ValueError, sqlite3.Error, OSError) as e:
        print(f"mlxd usage: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result, group_by))
    return 0


_COLUMNS = [
    ("requests", "requests"),
    ("prompt_tokens", "prompt"),
    ("cached_tokens", "cached"),
    ("computed_prompt_tokens", "computed"),
    ("completion_tokens", "completion"),
    ("reasoning_tokens", "reasoning"),
]


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else f"{value:.2f}"


def format_table(result: dict, group_by: list[str]) -> str:
    headers = group_by + [h for _, h in _COLUMNS] + ["ttft p50 s", "ttft p95 s", "tok/s p50"]
    rows = [
        [str(g["key"][k]) for k in group_by]
        + [_fmt(g[c]) for c, _ in _COLUMNS]
        + [_fmt(g["ttft_p50_s"]), _fmt(g["ttft_p95_s"]), _fmt(g["decode_tps_p50"])]
        for g in result["groups"]
    ]
    totals = result["totals"]
    rows.append(["total"] + [""] * (len(group_by) - 1) + [_fmt(totals[c]) for c, _ in _COLUMNS] + ["", "", ""]
                if group_by else [_fmt(totals[c]) for c, _ in _COLUMNS] + ["", "", ""])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    n_keys = len(group_by)

    def line(cells):
        return "  ".join(c.ljust(w) if i < n_keys else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    span = f"since {result['since'] or 'the start'}" + (f" until {result['until']}" if result["until"] else "")
    return "\n".join([f"usage {span} (times UTC)", line(headers), *(line(r) for r in rows)])
