"""Who sent a request, for the usage ledger: an API key's label, else the client's family."""

from __future__ import annotations

from fastapi import Request

# First match wins: opencode and the agents name themselves before the SDK they embed.
_FAMILIES = (
    ("opencode", ("opencode",)),
    ("claude-code", ("claude-code", "claude-cli")),
    ("codex", ("codex",)),
    ("openai-python", ("openai/python",)),
    ("openai-node", ("openai/js",)),
)


def client_family(user_agent: str) -> str:
    """opencode, claude-code, codex, openai-python, openai-node, or other."""
    agent = user_agent.lower()
    for family, needles in _FAMILIES:
        if any(needle in agent for needle in needles):
            return family
    return "other"


def client_of(request: Request) -> str:
    """The API-key label the auth layer put on the request, else the User-Agent's family."""
    label = getattr(request.state, "api_key_label", None)
    return label or client_family(request.headers.get("user-agent", ""))
