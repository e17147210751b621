"""`POST /v1/events`: phone-number webhooks, authenticated by their HMAC signature.

Each event id is applied once: a marker is set before applying (so concurrent repeats see it)
and removed again when applying fails, so the sender's retry can still apply it. Markers are
kept 7 days, so an event must be younger than that (`created_at`) to be applied at all: a
captured event cannot be replayed once its id is forgotten.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from datetime import datetime
from typing import Any

from aiohttp import web

from gateway import keys
from gateway.accept.validation import parse_json
from gateway.api.http import MESSAGE_BODY, json_response, read_body, require_json_type
from gateway.api.state import SERVICES, Services
from gateway.errors import ApiError, FieldProblem, invalid_request
from gateway.registry.model import phone_number_id_problem
from gateway.store import unavailable_on_redis_errors

routes = web.RouteTableDef()

MAX_AGE_S = 7 * 86400
MAX_AHEAD_S = 300
# An id is remembered until an event created (at most MAX_AHEAD_S ahead) with it is too old.
EVENT_MEMORY_S = MAX_AGE_S + MAX_AHEAD_S + 60
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_SIGNATURE = re.compile(r"sha256=([0-9a-fA-F]{64})")
CREATED = "whatsapp.phone_number.created"
QUALITY_UPDATE = "whatsapp.phone_number.quality_update"
DELETED = "whatsapp.phone_number.deleted"


def signature_ok(secret: str, raw: bytes, header: str | None) -> bool:
    # Matched in ASCII before comparing: a header's non-UTF-8 bytes arrive as surrogates.
    match = _SIGNATURE.fullmatch(header.strip()) if header else None
    if match is None:
        return False
    expected = hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), match.group(1).lower().encode())


def created_at_problem(value: object, now: float) -> ApiError | None:
    """Why an event's `created_at` refuses it (400), or None when it is fresh enough."""
    moment = None
    if isinstance(value, str) and _RFC3339.fullmatch(value):
        try:
            moment = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
        except ValueError:
            moment = None  # e.g. a 30th of February
    if moment is None:
        return invalid_request(
            [FieldProblem("created_at", "must be an RFC 3339 time with an offset, e.g. Z")]
        )
    age = now - moment.timestamp()
    if age > MAX_AGE_S or age < -MAX_AHEAD_S:
        return ApiError(
            400,
            "stale_event",
            "The event's created_at is more than 7 days old or more than 5 minutes ahead; "
            "it is refused so that a captured event cannot be replayed.",
        )
    return None


def _parse_event(body: Any) -> tuple[str, str, dict[str, Any]]:
    if not isinstance(body, dict):
        raise invalid_request([FieldProblem("body", "must be a JSON object")])
    problems = []
    event_id, kind, data = body.get("id"), body.get("type"), body.get("data")
    if not isinstance(event_id, str) or not 1 <= len(event_id) <= 256:
        problems.append(FieldProblem("id", "must be a string of 1-256 characters"))
    if not isinstance(kind, str):
        problems.append(FieldProblem("type", "must be a string"))
    if not isinstance(data, dict):
        problems.append(FieldProblem("data", "must be an object"))
    stale = created_at_problem(body.get("created_at"), time.time())
    if stale is not None and stale.code == "invalid_request":
        problems += stale.details
    if problems:
        raise invalid_request(problems)
    if stale is not None:
        raise stale
    return event_id, kind, data  # type: ignore[return-value]


def _number_id(data: dict[str, Any]) -> str:
    why = phone_number_id_problem(data.get("phone_number_id"))
    if why is not None:
        raise invalid_request([FieldProblem("data.phone_number_id", why)])
    return str(data["phone_number_id"])


async def _apply(services: Services, kind: str, data: dict[str, Any]) -> dict[str, Any]:
    registry = services.registry
    pn = _number_id(data)
    if kind == CREATED:
        await registry.upsert(pn, data)
        return {"applied": True}
    if kind == QUALITY_UPDATE:
        if "quality_rating" not in data:
            raise invalid_request([FieldProblem("data.quality_rating", "is required")])
        change = {"quality_rating": data["quality_rating"]}
        if data.get("throughput_tier") is not None:
            change["throughput_tier"] = data["throughput_tier"]
        if await registry.change(pn, change):
            return {"applied": True}
        return {"ignored": True, "reason": "unknown phone number"}
    # DELETED
    if not await registry.exists(pn):
        return {"ignored": True, "reason": "unknown phone number"}
    await registry.delete(pn)
    return {"applied": True}


@routes.post("/v1/events")
async def receive_event(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    raw = await read_body(request, MESSAGE_BODY)
    secret = services.settings.webhook_secret or ""
    if not secret or not signature_ok(secret, raw, request.headers.get("X-Signature-256")):
        raise ApiError(
            401,
            "unauthorized",
            "Missing or wrong X-Signature-256 (sha256=<hex HMAC-SHA256 of the body>).",
        )
    require_json_type(request)
    event_id, kind, data = _parse_event(parse_json(raw))
    if kind not in (CREATED, QUALITY_UPDATE, DELETED):
        return json_response({"ignored": True})
    marker = keys.event(event_id)
    redis = services.store.redis
    with unavailable_on_redis_errors():
        first = await redis.set(marker, kind, nx=True, ex=EVENT_MEMORY_S)
    if not first:
        return json_response({"duplicate": True})
    try:
        return json_response(await _apply(services, kind, data))
    except BaseException:
        with unavailable_on_redis_errors():
            await redis.delete(marker)
        raise
