"""The door before the doors: Host, Origin and API-key checks, as ASGI middleware.

Order: a request addressed to a name this server does not answer to is refused (403;
on a loopback bind this defeats DNS rebinding, where a web page's own name resolves to
127.0.0.1), then a cross-origin browser request not allowed by `--cors-origin` (403),
then a request without a valid key when keys are set (401; `GET /health` needs none, nor
do the dashboard's page and static files, which hold no data and ask for the key).
Refusals answer in the envelope of the door the path belongs to, before any routing,
so they look the same for every endpoint, present or future.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

from mlxd.server.access import ApiKey, is_loopback

from .dashboard import STATIC_PATHS
from .errors import door_of, error_response

log = logging.getLogger("mlxd.security")

_CORS_METHODS = "GET, POST, DELETE, OPTIONS"
_CORS_HEADERS = "authorization, content-type, x-api-key, anthropic-version, openai-beta"
_UNAUTHENTICATED = {("GET", "/health"), *(("GET", path) for path in STATIC_PATHS)}


@dataclass(frozen=True)
class Policy:
    """What the middleware enforces: by default loopback Host names only, no CORS, no keys.
    `allowed_hosts` None means any Host is answered."""

    keys: tuple[ApiKey, ...] = ()
    allowed_hosts: Optional[frozenset[str]] = frozenset()
    cors_origins: frozenset[str] = frozenset()


def policy_for(bind_host: str, keys: list[ApiKey], allowed_hosts: list[str], cors_origins: list[str]) -> Policy:
    """Host names are checked on a loopback bind (loopback names plus `allowed_hosts`), and on
    any bind once `--allowed-host` names some; a LAN bind otherwise answers any name."""
    check = is_loopback(bind_host) or bool(allowed_hosts)
    hosts = frozenset(host_name(h) for h in allowed_hosts) if check else None
    return Policy(tuple(keys), hosts, frozenset(o.strip().rstrip("/") for o in cors_origins))


def host_name(host: str) -> str:
    """The name in a Host header, without its port: `[::1]:8080` -> `::1`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def matching_label(keys: tuple[ApiKey, ...], presented: bytes) -> Optional[str]:
    """The label of the key `presented` equals, compared in constant time against every key."""
    label = None
    for key in keys:
        if hmac.compare_digest(presented, key.secret) and label is None:
            label = key.label
    return label


def _presented_key(headers: dict[bytes, bytes]) -> Optional[bytes]:
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    if scheme.lower() == b"bearer" and token.strip():
        return token.strip()
    return headers.get(b"x-api-key") or None


class SecurityMiddleware:
    def __init__(self, app, policy: Policy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        method, path = scope["method"], scope["path"]
        allowed = self.policy.allowed_hosts
        if allowed is not None and not (is_loopback(host_name(host)) or host_name(host) in allowed):
            message = (f"Host '{host}' is not allowed: this server answers only requests addressed to "
                       "localhost (DNS-rebinding protection); start it with --allowed-host NAME to add a name.")
            return await self._refuse(scope, receive, send, 403, message, "host_not_allowed", f"Host {host!r}")

        origin = headers.get(b"origin", b"").decode("latin-1").rstrip("/") or None
        cors = origin is not None and origin in self.policy.cors_origins
        if origin is not None and not cors and urlsplit(origin).netloc.lower() != host.lower():
            message = (f"Cross-origin requests from '{origin}' are not allowed; start mlxd with "
                       f"--cors-origin {origin} to allow that origin.")
            return await self._refuse(scope, receive, send, 403, message, "origin_not_allowed", f"Origin {origin!r}")
        if cors:
            send = self._with_cors(send, origin)
            if method == "OPTIONS" and b"access-control-request-method" in headers:
                return await self._preflight(send, headers)

        if self.policy.keys and (method, path) not in _UNAUTHENTICATED:
            presented = _presented_key(headers)
            label = matching_label(self.policy.keys, presented) if presented else None
            if label is None:
                message = ("Incorrect API key provided." if presented else
                           "Missing API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'.")
                return await self._refuse(scope, receive, send, 401, message, "invalid_api_key",
                                          "wrong API key" if presented else "no API key")
            scope.setdefault("state", {})["api_key_label"] = label
            log.debug("%s %s with key %s", method, path, label)
        await self.app(scope, receive, send)

    @staticmethod
    def _with_cors(send, origin: str):
        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                extra = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
                         (b"access-control-expose-headers", b"x-request-id, retry-after")]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        return send_with_cors

    @staticmethod
    async def _preflight(send, headers: dict[bytes, bytes]):
        requested = headers.get(b"access-control-request-headers", _CORS_HEADERS.encode())
        await send({"type": "http.response.start", "status": 204, "headers": [
            (b"access-control-allow-methods", _CORS_METHODS.encode()),
            (b"access-control-allow-headers", requested),
            (b"access-control-max-age", b"600"),
        ]})
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    async def _refuse(scope, receive, send, status: int, message: str, code: str, why: str):
        client = (scope.get("client") or ("?",))[0]
        log.warning("refused %s %s from %s: %s", scope["method"], scope["path"], client, why)
        extra = {"www-authenticate": "Bearer"} if status == 401 else None
        response = error_response(message, status, code=code, headers=extra, door=door_of(scope["path"]))
        await response(scope, receive, send)
