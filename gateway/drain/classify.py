"""API.md's table of upstream answers: which class an answer belongs to.

The class decides what the worker does (see `gateway.drain.worker`); the names are also the
`outcome` label of `gateway_upstream_requests_total`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


class Outcome(Enum):
    OK = "ok"
    THROUGHPUT = "throughput"
    PAIR_RATE = "pair_rate"
    UPGRADE = "upgrade"
    AUTH = "auth"
    BLOCKED = "blocked"
    NUMBER_GONE = "number_gone"
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    # Not an answer: the request was never written, its start came too late for its stamp.
    LATE = "late"


THROUGHPUT_CODES = frozenset({130429, 80007, 4})
TRANSIENT_CODES = frozenset({1, 2, 131000, 131016})
_BY_CODE = {
    131056: Outcome.PAIR_RATE,
    131057: Outcome.UPGRADE,
    190: Outcome.AUTH,
    368: Outcome.BLOCKED,
    33: Outcome.NUMBER_GONE,
}


@dataclass(slots=True)
class Answer:
    """One upstream answer, classified."""

    outcome: Outcome
    upstream_message_id: str | None = None
    code: int | str | None = None
    message: str = ""
    http_status: int | None = None
    started_at: float | None = None  # when the request was written (monotonic s)

    def error(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "retryable": False}


def classify(status: int, body: Any) -> Answer:
    """Classify an HTTP answer of `POST /{phone_number_id}/messages`."""
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    message = str(error.get("message", "")) if isinstance(error, dict) else ""
    if status == 200 and error is None:
        try:
            wamid = body["messages"][0]["id"]
        except (KeyError, IndexError, TypeError):
            wamid = None
        if isinstance(wamid, str) and wamid:
            return Answer(Outcome.OK, upstream_message_id=wamid, http_status=status)
        return Answer(
            Outcome.TRANSIENT,
            code="bad_upstream_answer",
            message="HTTP 200 without messages[0].id",
            http_status=status,
        )
    if not isinstance(code, int) or isinstance(code, bool):
        code = None
    if status == 429 or code in THROUGHPUT_CODES:
        outcome = Outcome.THROUGHPUT
    elif code in _BY_CODE:
        outcome = _BY_CODE[code]
    elif status == 401:
        outcome = Outcome.AUTH
    elif status >= 500 or code in TRANSIENT_CODES:
        outcome = Outcome.TRANSIENT
    else:
        outcome = Outcome.PERMANENT
    if not message:
        message = f"HTTP {status} from the Cloud API"
    return Answer(
        outcome,
        code=code if code is not None else f"http_{status}",
        message=message,
        http_status=status,
    )


def transport_failure(reason: str) -> Answer:
    """A timeout or a connection error: transient."""
    return Answer(Outcome.TRANSIENT, code="upstream_unreachable", message=reason)
