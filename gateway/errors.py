"""The gateway's exception root and the errors that cross module boundaries.

`ApiError` carries everything the HTTP layer needs to answer in API.md's error shape; the other
errors are wrapped at their boundary (Redis, the upstream, configuration) so that callers never
see a library's exception type.
"""

from __future__ import annotations

from dataclasses import dataclass


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A setting is missing or malformed."""


class StoreUnavailable(GatewayError):
    """Redis did not answer (connection refused, timeout, loading, read-only)."""


@dataclass(frozen=True)
class FieldProblem:
    field: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class ApiError(GatewayError):
    """An error answered to an HTTP client, in API.md's shape."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[FieldProblem] | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.retry_after = retry_after

    def body(self) -> dict[str, object]:
        error: dict[str, object] = {"code": self.code, "message": self.message}
        if self.details:
            error["details"] = [d.as_dict() for d in self.details]
        return {"error": error}


def invalid_request(problems: list[FieldProblem]) -> ApiError:
    fields = ", ".join(p.field for p in problems)
    return ApiError(400, "invalid_request", f"The request is invalid ({fields}).", problems)


def not_found(what: str = "resource") -> ApiError:
    return ApiError(404, "not_found", f"No such {what}.")


def unknown_phone_number(pn: str) -> ApiError:
    return ApiError(
        404,
        "unknown_phone_number",
        f"Phone number {pn} is not registered; register it with PUT /v1/phone-numbers/{pn}.",
    )


def phone_number_deleted(pn: str) -> ApiError:
    return ApiError(
        409, "phone_number_deleted", f"Phone number {pn} is deleted and takes no new sends."
    )


def backlog_full(pn: str, limit: int) -> ApiError:
    return ApiError(
        429,
        "backlog_full",
        f"Phone number {pn} already has {limit} queued messages; retry later.",
        retry_after=5,
    )


def unavailable() -> ApiError:
    return ApiError(
        503,
        "unavailable",
        "The message store did not answer in time, so the outcome is unknown: a write may "
        "still land. Retry shortly; a send retried with the same idempotency key is never "
        "queued twice.",
        retry_after=2,
    )
