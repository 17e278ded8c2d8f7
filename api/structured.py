"""Structured outputs on every door: the JSON a request asks for, as the engine's constraint.

Chat completions spells it `response_format: {"type", "json_schema": {"name", "schema"}}`,
the Responses API `text.format: {"type", "name", "schema"}`; both mean the same, and
both get the same checks (server/constrained.py) and the same answers: enforced by
the grammar, or validated and regenerated (api/validated.py) when the schema has
keywords no grammar enforces.
"""

from __future__ import annotations

from typing import Any, Optional

from mlxd.server import constrained


def response_format(
    kind: str, schema: Any = None, name: str = "", param: str = "response_format"
) -> Optional[constrained.ResponseFormat]:
    """`text` (None: no constraint), `json_object` or `json_schema`; a schema that cannot
    be enforced raises InvalidSchema naming `param` (HTTP 400)."""
    if kind == "text":
        return None
    if kind == "json_object":
        return constrained.ResponseFormat("json_object")
    checked, relaxed = constrained.check_schema(schema, param=param)
    return constrained.ResponseFormat("json_schema", checked, name, validate=relaxed)
