"""`mlxd serve` whose usage-ledger writer is stuck: it stores nothing until the file
MLXD_TEST_LEDGER_GATE exists. Stands in for a disk that hangs; everything else is the
real server."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from mlxd.server.blas import setup_blas

setup_blas()  # before mlx.core, as server.cli does

from mlxd.server.cli import main  # noqa: E402
from mlxd.server.ledger import Ledger  # noqa: E402

GATE = Path(os.environ["MLXD_TEST_LEDGER_GATE"])
_real_write = Ledger._write


def _write_when_the_gate_opens(self, conn, batch):
    while not GATE.exists():
        time.sleep(0.05)
    _real_write(self, conn, batch)


Ledger._write = _write_when_the_gate_opens

if __name__ == "__main__":
    sys.exit(main())
