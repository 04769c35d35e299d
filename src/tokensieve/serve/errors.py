"""OpenAI-style error objects, and the one exception the server raises to send one."""

from __future__ import annotations

from typing import Any

# The OpenAI `type` of each status the server returns.
ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ServeError(Exception):
    """A request the server answers with `status` and an error object (`param`: the offending field)."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        error_type = ERROR_TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.status}}
