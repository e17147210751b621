"""The client's one exception root and what it raises."""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """Everything `gateway.client` raises."""


class GatewayAPIError(ClientError):
    """The gateway answered with an error (API.md's shape): its HTTP status, code and message.

    `details` lists the fields at fault (`[{"field": ..., "message": ...}]`) where there are
    some; `retry_after` is the `Retry-After` seconds of a `429` or `503`.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.retry_after = retry_after


class GatewayConnectionError(ClientError):
    """The gateway could not be reached, or did not answer in time, after every retry."""


class CallbackVerificationError(ClientError):
    """A status callback whose signature, timestamp or body does not check out."""
