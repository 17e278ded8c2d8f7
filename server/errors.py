"""Errors the runtime reports to whoever called it; `api/` maps them to HTTP."""

from __future__ import annotations

from typing import Optional


class EngineError(Exception):
    """A request the runtime cannot serve; `code` and `param` follow OpenAI's error fields."""

    code: str = "invalid_request"
    param: Optional[str] = None

    def __init__(self, message: str, *, param: Optional[str] = None):
        super().__init__(message)
        if param is not None:
            self.param = param


class ModelNotFound(EngineError):
    code = "model_not_found"
    param = "model"


class ModelUnavailable(EngineError):
    """The model exists but cannot be fetched now (hub unreachable, offline)."""

    code = "model_unavailable"
    param = "model"


class ModelLoadFailed(EngineError):
    code = "model_load_failed"
    param = "model"


class ContextLengthExceeded(EngineError):
    code = "context_length_exceeded"
    param = "messages"

    def __init__(self, context_length: int, prompt_tokens: int):
        self.context_length = context_length
        self.prompt_tokens = prompt_tokens  # doors word the message their own way
        super().__init__(
            f"This model's maximum context length is {context_length} tokens, "
            f"but the prompt has {prompt_tokens} tokens. Please reduce the length of the messages."
        )
        self.prompt_tokens = prompt_tokens


class InternalError(EngineError):
    """A bug on our side while starting a request; the server keeps serving."""

    code = "internal_error"


class InvalidPrompt(EngineError):
    code = "invalid_prompt"
    param = "messages"


class QueueFull(EngineError):
    code = "queue_full"

    def __init__(self, retry_after: int = 1):
        super().__init__("The server is busy: too many requests are queued. Retry shortly.")
        self.retry_after = retry_after


class EngineUnavailable(EngineError):
    """The engine hit an error it could not attribute to one request and is restarting."""

    code = "engine_unavailable"

    def __init__(self, reason: str, retry_after: int = 2):
        super().__init__(f"The generation engine is restarting after an internal error ({reason}). Retry shortly.")
        self.retry_after = retry_after


class QueueTimeout(EngineError):
    """A request waited in the queue longer than --queue-timeout."""

    code = "queue_timeout"

    def __init__(self, seconds: float, retry_after: int = 2):
        super().__init__(f"The request waited {seconds:.0f} s in the queue without starting. Retry later.")
        self.retry_after = retry_after
