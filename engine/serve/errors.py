"""The one error type of the HTTP layer: a status, an OpenAI-style JSON body, extra headers.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "n", "code": null}}

Every route raises ApiError for a request it refuses; the app turns it into that body (and any
other exception into a 500 with the same shape), so a bad request never brings the server down.
"""
from __future__ import annotations

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "service_unavailable"}


class ApiError(Exception):
    """A refused request: HTTP `status`, a message that tells the client what to do, the offending
    parameter, extra JSON fields (`details`) and response headers (e.g. Retry-After)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 details: dict | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.details = details or {}
        self.headers = headers or {}

    def body(self) -> dict:
        err = {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
               "param": self.param, "code": self.code}
        err.update(self.details)
        return {"error": err}


def error_body(status: int, message: str, code: str | None = None) -> dict:
    return ApiError(status, message, code=code).body()
