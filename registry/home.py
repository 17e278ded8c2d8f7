"""Where mlxd keeps its own data (usage ledger, converted models, disk KV cache)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def mlxd_home() -> Path:
    """`MLXD_HOME`, else the platform's user data directory."""
    if os.environ.get("MLXD_HOME"):
        return Path(os.environ["MLXD_HOME"]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "mlxd"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "mlxd"
