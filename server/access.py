"""Who may use the server: API keys (with labels) and what a bind address exposes.

The composition root and `mlxd doctor` read this; `api/security.py` enforces it.
A key is never logged or shown: only its label is (`label:KEY`, or `key-` and the
first 8 hex digits of the key's SHA-256 when it has none).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "MLXD_API_KEY"
_LABEL = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class ApiKey:
    label: str
    secret: bytes

    def __repr__(self) -> str:  # never print a secret by accident
        return f"ApiKey({self.label!r})"


def parse_key(text: str) -> ApiKey:
    """`KEY` or `label:KEY`; a key that itself contains ':' needs a label in front."""
    text = text.strip()
    label, sep, secret = text.partition(":")
    if not (sep and _LABEL.fullmatch(label) and secret):
        label, secret = "", text
    if not secret:
        raise ValueError("an API key must not be empty")
    return ApiKey(label or "key-" + hashlib.sha256(secret.encode()).hexdigest()[:8], secret.encode())


def env_keys(environ: dict | None = None) -> list[ApiKey]:
    """Keys from MLXD_API_KEY (comma-separated)."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "")
    return [parse_key(k) for k in value.split(",") if k.strip()]


def file_keys(path: str) -> list[ApiKey]:
    """Keys from a file, one a line; blank lines and `#` comments are skipped."""
    lines = Path(path).read_text().splitlines()
    return [parse_key(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def load_keys(args_keys: list[str], key_files: list[str], environ: dict | None = None) -> list[ApiKey]:
    """Every key given to `serve`: --api-key, --api-key-file and MLXD_API_KEY together.

    Raises ValueError (an empty key, a label used twice) or OSError (an unreadable file)."""
    keys = [parse_key(k) for k in args_keys] + [k for f in key_files for k in file_keys(f)] + env_keys(environ)
    labels = [k.label for k in keys]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"API key label(s) used more than once: {', '.join(repeated)}")
    return keys


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address (127.0.0.0/8, ::1), with or without brackets."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def describe_bind(host: str, port: int | None = None) -> str:
    """Who can reach a server bound to `host`, in words."""
    where = f"{host}:{port}" if port is not None else host
    if is_loopback(host):
        return f"{where}: this machine only"
    if host in ("0.0.0.0", "::", ""):
        return f"{where}: every network interface, so any machine that can reach this one (LAN, VPN, forwarded ports)"
    return f"{where}: any machine that can reach that address"


def exposure_warning(host: str, port: int | None, keys: list[ApiKey]) -> str | None:
    """The warning for a non-loopback bind without keys; None when there is nothing to warn about."""
    if keys or is_loopback(host):
        return None
    return (
        f"mlxd serves {describe_bind(host, port)}, without an API key: anyone who reaches it can run "
        f"the models and read what they answer. Set --api-key, --api-key-file or {ENV_VAR}."
    )
