"""The one error the registry raises, with a kind the server can map to an HTTP status."""

from typing import Literal

NOT_FOUND = "not_found"
UNAVAILABLE = "unavailable"

ErrorKind = Literal["not_found", "unavailable"]


class RegistryError(Exception):
    """A model name that cannot be served, with a message a user can act on.

    `kind` is NOT_FOUND when there is no such model (unknown name, unknown repo,
    not downloaded, not a loadable model) and UNAVAILABLE when the model may exist
    but cannot be had right now (hub unreachable or offline, gated repo), so callers
    can choose 404 or 503 without parsing the message.
    """

    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        self.kind = kind
