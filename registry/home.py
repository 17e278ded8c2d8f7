"""Where mlxd keeps its own state (the starter model, the usage ledger, the disk cache)."""

import os
import sys
from pathlib import Path


def mlxd_home() -> Path:
    """`MLXD_HOME`, else the platform's per-user data directory."""
    if home := os.environ.get("MLXD_HOME"):
        return Path(home).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "mlxd"
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "mlxd"
