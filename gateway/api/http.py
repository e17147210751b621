"""Small HTTP helpers shared by the route modules: JSON in and out, with API.md's limits.

A body is read by `read_body` only: it refuses a declared length over the route's limit before
reading a byte, stops reading a chunked body as soon as it passes the limit, and gives up on a
body that has not arrived within `BODY_TIMEOUT_S`. Those errors are `BodyError`s: the rest of
the body is unread, so the answer closes the connection rather than parse it as a next request.
"""

from __future__ import annotations

import asyncio
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
# The whole body must arrive within this (a 4 MiB batch needs about 2.2 Mbit/s).
BODY_TIMEOUT_S = 15.0


class BodyError(ApiError):
    """The body could not be read to its end: the answer closes the connection."""


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def error_response(error: ApiError) -> web.Response:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    response = json_response(error.body(), error.status, headers)
    if isinstance(error, BodyError):
        response.force_close()
    return response


def payload_too_large(limit: int) -> ApiError:
    return BodyError(
        413, "payload_too_large", f"The body is larger than the limit of {limit // KIB} KiB."
    )


async def read_body(request: web.Request, limit: int) -> bytes:
    """The raw body: 413 above `limit` bytes (unread), 408 if it is too slow to arrive."""
    if request.content_length is not None and request.content_length > limit:
        raise payload_too_large(limit)
    content = request.content
    if content.is_eof() and content.exception() is None:
        # The whole body came with the head (the common case: a small JSON body): nothing to
        # wait for, so no deadline either.
        raw = content.read_nowait()
        if len(raw) > limit:
            raise payload_too_large(limit)
        return raw
    body = bytearray()
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            while chunk := await request.content.readany():
                body += chunk
                if len(body) > limit:
                    raise payload_too_large(limit)
    except TimeoutError:
        raise BodyError(
            408,
            "request_timeout",
            f"The body did not arrive within {BODY_TIMEOUT_S:.0f} seconds.",
        ) from None
    except (web.RequestPayloadError, ConnectionResetError):
        # Bad chunked encoding, a body shorter than its Content-Length, a client gone.
        raise BodyError(
            400, "invalid_request", "The body ended early or its transfer encoding is malformed."
        ) from None
    return bytes(body)


def require_json_type(request: web.Request) -> None:
    """415 unless the body is declared as JSON in UTF-8 (no charset, or charset=utf-8)."""
    if request.content_type != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            "Send the body as JSON with Content-Type: application/json.",
        )
    charset = request.charset
    if charset is not None and charset.lower() != "utf-8":
        raise ApiError(
            415,
            "unsupported_media_type",
            "The body must be UTF-8: send Content-Type: application/json with no charset or "
            "with charset=utf-8.",
        )


async def read_json(request: web.Request, limit: int) -> Any:
    """The body as JSON: 415 unless it is UTF-8 JSON, 413 above `limit` bytes, 400 if malformed."""
    require_json_type(request)
    return parse_json(await read_body(request, limit))
