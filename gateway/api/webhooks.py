"""`GET|POST /v1/webhooks/meta`: Meta's webhooks in (delivery receipts, inbound messages).

No API key: Meta has none. The `GET` is Meta's subscription check, answered only to whoever
knows `GATEWAY_META_VERIFY_TOKEN`; a `POST` must carry `X-Hub-Signature-256`, the HMAC-SHA256
of its raw body with `GATEWAY_META_APP_SECRET`, checked before anything else is read from it.
A `POST` is answered `200` once everything in it is written (Meta retries anything else for days,
and repeats are harmless).
"""

from __future__ import annotations

import hmac

from aiohttp import web

from gateway import metrics
from gateway.accept.validation import parse_json
from gateway.api.events import signature_ok
from gateway.api.http import BATCH_BODY, json_response, read_body, require_json_type
from gateway.api.state import SERVICES
from gateway.errors import ApiError, FieldProblem, invalid_request
from gateway.receipts import Receipts, parse_envelope

routes = web.RouteTableDef()

PATH = "/v1/webhooks/meta"
# Meta's payloads reach 3 MB.
WEBHOOK_BODY = BATCH_BODY
MAX_CHALLENGE = 256


def _raw(text: str) -> bytes:
    # A query's bytes that are not UTF-8 arrive as surrogates: compared as they came.
    return text.encode("utf-8", "surrogateescape")


@routes.get(PATH)
async def verify(request: web.Request) -> web.Response:
    token = request.app[SERVICES].settings.meta_verify_token
    query = request.query
    presented = query.get("hub.verify_token", "")
    if (
        not token
        or query.get("hub.mode") != "subscribe"
        or not hmac.compare_digest(_raw(presented), _raw(token))
    ):
        raise ApiError(
            403,
            "forbidden",
            "Meta's subscription check needs hub.mode=subscribe and the configured "
            "hub.verify_token (GATEWAY_META_VERIFY_TOKEN).",
        )
    challenge = query.get("hub.challenge", "")
    if not 1 <= len(challenge) <= MAX_CHALLENGE or not challenge.isprintable():
        raise invalid_request(
            [FieldProblem("hub.challenge", f"must be 1-{MAX_CHALLENGE} printable characters")]
        )
    return web.Response(text=challenge, content_type="text/plain")


@routes.post(PATH)
async def receive(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    raw = await read_body(request, WEBHOOK_BODY)
    secret = services.settings.meta_app_secret or ""
    if not secret or not signature_ok(secret, raw, request.headers.get("X-Hub-Signature-256")):
        metrics.WEBHOOK_BAD_SIGNATURE.inc()
        raise ApiError(
            401,
            "unauthorized",
            "Missing or wrong X-Hub-Signature-256 (sha256=<hex HMAC-SHA256 of the body with "
            "the Meta app secret>).",
        )
    require_json_type(request)
    envelope = parse_envelope(parse_json(raw))
    applied = await Receipts(services.store, services.settings).apply(envelope)
    return json_response(applied.body())
