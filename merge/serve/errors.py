"""Errors as OpenAI's API writes them: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status
that says whose fault it was (400 bad input naming the field, 404 an unknown model or route, 413 too large, 429 a
full queue, 503 a stopped engine, 500 a failure of ours, in one line)."""

from __future__ import annotations

from typing import Any

TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
         413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class ApiError(Exception):
    """One error response: ``status``, a one-line ``message``, the request field it concerns (``param``), and a
    machine-readable ``code``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())
        self.param = param
        self.code = code
        self.kind = kind or TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)
