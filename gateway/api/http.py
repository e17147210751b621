"""Small HTTP helpers shared by the route modules: JSON in and out, with API.md's limits."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway.accept.validation import parse_json
from gateway.errors import ApiError

KIB = 1024
MIB = 1024 * KIB
MESSAGE_BODY = 64 * KIB
BATCH_BODY = 4 * MIB
# aiohttp refuses anything larger before a handler runs.
MAX_BODY = BATCH_BODY


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def error_response(error: ApiError) -> web.Response:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return json_response(error.body(), error.status, headers)


def payload_too_large(limit: int) -> ApiError:
    return ApiError(
        413, "payload_too_large", f"The body is larger than the limit of {limit // KIB} KiB."
    )


async def read_json(request: web.Request, limit: int) -> Any:
    """The body as JSON: 415 unless it is JSON, 413 above `limit` bytes, 400 if malformed."""
    if request.content_type != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            "Send the body as JSON with Content-Type: application/json.",
        )
    if request.content_length is not None and request.content_length > limit:
        raise payload_too_large(limit)
    raw = await request.read()
    if len(raw) > limit:
        raise payload_too_large(limit)
    return parse_json(raw)
