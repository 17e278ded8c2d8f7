"""The stress matrix (scripts/stress.py) at its smallest: every door, every scenario, one
client each, through a real server; its ledger audit must pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_stress_matrix_audits_every_door():
    run = subprocess.run([sys.executable, "-m", "scripts.stress", "--concurrency", "1", "--rounds", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    for door in ("chat", "messages", "responses"):
        assert f"{door} door:" in run.stdout
    assert "| hang_up | 1 | 1 |" in run.stdout
    assert "17 requests, 17 ledger rows" in run.stdout  # 6 scenarios x 3 doors, less Responses' stop
    assert "ledger audit: passed" in run.stdout
