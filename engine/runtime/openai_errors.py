"""OpenAI-style errors of `corral serve`: the status, the message and the field concerned."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A request the API refuses: the HTTP status, the message, the field it concerns."""

    def __init__(self, status: int, message: str, param: str = "", code: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {
            "error": {
                "message": self.message,
                "type": kind,
                "param": self.param or None,
                "code": self.code or None,
            }
        }


def refuse(param: str, why: str) -> ApiError:
    """A 400 that names the field it refuses."""
    return ApiError(400, f"{param}: {why}", param)
