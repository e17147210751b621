"""What a phone number is: its fields, their validation, and the rate in force.

The registry keeps what the seed calls a PhoneNumber. Its record lives in the number's `cfg`
hash in Redis beside the drain's state for it; this module knows only the record.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from gateway.errors import FieldProblem, invalid_request

TIER_RATES: dict[str, int] = {"standard": 80, "medium": 200, "high": 1000, "unlimited": 0}
COEXISTENCE_CAP = 20
MAX_MPS = 1_000_000
QUALITIES = ("green", "yellow", "red", "unknown")
CONNECTION_TYPES = ("dedicated", "coexistence")
STATUSES = ("pending", "active", "disconnected", "deleted")

DEFAULTS: dict[str, str] = {
    "throughput_tier": "standard",
    "quality_rating": "unknown",
    "connection_type": "dedicated",
    "status": "active",
}
# Fields a client writes. access_token is write-only: stored, never read back.
RECORD_FIELDS = (
    "waba_id",
    "display_phone_number",
    "display_name",
    "verified_name",
    "quality_rating",
    "throughput_tier",
    "connection_type",
    "status",
    "access_token",
    "max_mps",
)
# Fields of the view a client may send back unchanged (GET, edit, PUT); they are ignored.
READ_ONLY_FIELDS = frozenset(
    {
        "has_access_token",
        "queue_depth",
        "retry_waiting",
        "inflight",
        "rate_limit_mps",
        "sent_last_minute",
        "eta_seconds",
        "created_at",
        "updated_at",
    }
)

# ASCII digits only, matched in full: `\d` takes any script's digits and `$` a final newline.
_DIGITS = re.compile(r"[0-9]{1,32}")
TOKEN_MAX = 4096
_TOKEN = re.compile(rf"[\x21-\x7e]{{1,{TOKEN_MAX}}}")
PHONE_NUMBER_ID_HINT = (
    "must be Meta's phone_number_id (1-32 digits, e.g. 106540352242922), "
    "not the display phone number"
)


def phone_number_id_problem(value: object) -> str | None:
    """Why `value` is not a phone_number_id, or None when it is one."""
    if not isinstance(value, str):
        return f"must be a string; it {PHONE_NUMBER_ID_HINT}"
    if _DIGITS.fullmatch(value):
        return None
    if any(ch in value for ch in "+-() ") or len(value) > 32:
        return f"looks like a display phone number; it {PHONE_NUMBER_ID_HINT}"
    return PHONE_NUMBER_ID_HINT


def _text(limit: int) -> Callable[[object], str]:
    def check(value: object) -> str:
        if not isinstance(value, str) or not value or len(value) > limit:
            raise ValueError(f"must be a non-empty string of at most {limit} characters")
        return value

    return check


def _token(value: object) -> str:
    """An access token: sent as `Authorization: Bearer <token>`, so visible ASCII only (a
    control character would end or forge a header line)."""
    if isinstance(value, str) and _TOKEN.fullmatch(value):
        return value
    raise ValueError(
        f"must be a token of 1-{TOKEN_MAX} visible ASCII characters (no spaces or control "
        "characters)"
    )


def _choice(options: tuple[str, ...]) -> Callable[[object], str]:
    def check(value: object) -> str:
        if isinstance(value, str) and value.lower() in options:
            return value.lower()
        raise ValueError("must be one of " + ", ".join(options))

    return check


def _digits(value: object) -> str:
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        return value
    raise ValueError("must be a string of 1-32 digits")


def json_integer(value: object) -> int | None:
    """`value` as an int when JSON Schema calls it an integer (`3` or `3.0`), else None.

    Booleans are not integers here, though Python says they are.
    """
    if isinstance(value, int):
        return None if isinstance(value, bool) else value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _max_mps(value: object) -> str:
    # The bound keeps the cap a number Redis' Lua handles exactly (1e20 would not be).
    whole = json_integer(value)
    if whole is not None and 1 <= whole <= MAX_MPS:
        return str(whole)
    raise ValueError(f"must be a whole number of messages per second from 1 to {MAX_MPS}")


_CHECKS: dict[str, Callable[[object], str]] = {
    "waba_id": _digits,
    "display_phone_number": _text(32),
    "display_name": _text(256),
    "verified_name": _text(256),
    "quality_rating": _choice(QUALITIES),
    "throughput_tier": _choice(tuple(TIER_RATES)),
    "connection_type": _choice(CONNECTION_TYPES),
    "status": _choice(STATUSES),
    "access_token": _token,
    "max_mps": _max_mps,
}
# Fields that may be null in a PATCH, meaning "remove".
_NULLABLE = frozenset(
    {"waba_id", "display_phone_number", "display_name", "verified_name", "access_token", "max_mps"}
)


def parse_changes(
    phone_number_id: str, body: object, *, replace: bool
) -> tuple[dict[str, str], list[str]]:
    """Validate a PUT (`replace`) or PATCH body: the fields to set and the fields to remove.

    A replace fills the defaults of API.md for what the body leaves out.
    """
    if not isinstance(body, dict):
        raise invalid_request([FieldProblem("body", "must be a JSON object")])
    problems: list[FieldProblem] = []
    sets: dict[str, str] = {}
    removes: list[str] = []
    for name, value in body.items():
        if name == "phone_number_id":
            if value != phone_number_id:
                problems.append(FieldProblem(name, "must equal the phone_number_id in the path"))
            continue
        if name in READ_ONLY_FIELDS:
            continue
        check = _CHECKS.get(name)
        if check is None:
            problems.append(FieldProblem(name, "is not a phone number field"))
            continue
        if value is None and name in _NULLABLE:
            removes.append(name)
            continue
        try:
            sets[name] = check(value)
        except ValueError as exc:
            problems.append(FieldProblem(name, str(exc)))
    if problems:
        raise invalid_request(problems)
    if replace:
        for name, default in DEFAULTS.items():
            sets.setdefault(name, default)
    return sets, removes


def rate_in_force(rate: int, headroom: float) -> int | None:
    """Messages per second a number may send: `rate` is its cap before headroom (0 = none).

    The drain's take script applies the same rule to the same stored cap.
    """
    if rate <= 0:
        return None
    return max(1, math.floor(rate * (1.0 - headroom) + 1e-9))


def view(
    phone_number_id: str, record: Mapping[str, str], figures: Mapping[str, Any]
) -> dict[str, Any]:
    """The number as API.md shows it: the record without its token, plus live figures."""
    out: dict[str, Any] = {"phone_number_id": phone_number_id}
    for name in RECORD_FIELDS:
        if name == "access_token":
            continue
        value = record.get(name)
        out[name] = int(value) if name == "max_mps" and value is not None else value
    out["has_access_token"] = bool(record.get("access_token"))
    out.update(figures)
    return out
