"""`mlxd serve` whose prefix-cache disk writer is stuck until a file appears: a stand-in
for a very slow disk, which the tests cannot make for real.

Each write waits until the file named by MLXD_TEST_WRITER_GATE exists; everything
else is the real server.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from mlxd.server.blas import setup_blas

setup_blas()  # before mlx.core, as server.cli does

from mlxd.server import disk_cache  # noqa: E402
from mlxd.server.cli import main  # noqa: E402

GATE = Path(os.environ["MLXD_TEST_WRITER_GATE"])
_real_write_file = disk_cache.write_file


def _write_file_when_let(*args, **kwargs):
    while not GATE.exists():
        time.sleep(0.05)
    return _real_write_file(*args, **kwargs)


disk_cache.write_file = _write_file_when_let

if __name__ == "__main__":
    sys.exit(main())
