"""The HTTP connection layer: deadlines, and the answer to a request the app never sees.

aiohttp parses HTTP/1.1 before any middleware runs. A request it cannot parse (a NUL or a bare
LF in the head, an oversize line, a bad request line) is answered by
`web_protocol.RequestHandler.handle_error`, which logs the raw head — `Authorization` included —
at ERROR and echoes it in a text/plain 400. aiohttp offers no setting for that answer, so
`WireHandler` overrides `handle_error` (the method aiohttp documents as its error hook), built by
`WireServer` and installed by `WireRunner`: the answer is API.md's JSON error, nothing of the
request is echoed or logged, and the connection closes.

Deadlines, so that slow or silent clients cannot hold connections (slowloris):
- aiohttp's `keepalive_timeout` closes a connection still waiting for a complete request head
  `HEAD_TIMEOUT_S` after it opened or after its previous answer. That is both the idle keep-alive
  limit and the deadline for a head sent byte by byte.
- A body must arrive within `BODY_TIMEOUT_S` (`gateway.api.http.read_body`), else `408`, and
  reading stops at the route's limit (`413`).
- A body left unread after the answer (an error answered from the head alone) is drained and
  discarded for at most `LINGER_S`, then the connection closes.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadStatusLine, LineTooLong
from aiohttp.web_request import BaseRequest

from gateway.api.http import error_response
from gateway.errors import ApiError
from gateway.logs import untrusted

log = logging.getLogger("gateway.api.wire")

SERVER_NAME = "whatsapp-gateway"
HEAD_TIMEOUT_S = 5.0
LINGER_S = 2.0
MAX_LINE = 8190
MAX_HEADERS = 128


def handler_args() -> dict[str, Any]:
    """The per-connection settings (`web.Application(handler_args=...)`)."""
    return {
        "keepalive_timeout": HEAD_TIMEOUT_S,
        "lingering_time": LINGER_S,
        "max_line_size": MAX_LINE,
        "max_field_size": MAX_LINE,
        "max_headers": MAX_HEADERS,
    }


async def name_server(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: a product name in `Server`, not Python's and aiohttp's versions."""
    response.headers["Server"] = SERVER_NAME


def _malformed(exc: BaseException | None) -> ApiError:
    # The parser's own message quotes the request; only the kind of fault is named here.
    if isinstance(exc, LineTooLong):
        reason = f"a line of the request head is longer than {MAX_LINE} bytes"
    elif isinstance(exc, BadStatusLine):
        reason = "the request line is malformed"
    else:
        reason = "the request head is malformed (a header, a character or a line ending)"
    return ApiError(400, "invalid_request", f"The request is not valid HTTP/1.1: {reason}.")


class WireHandler(web.RequestHandler):
    """aiohttp's connection handler, answering what it cannot parse in API.md's shape."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            # A fault of the gateway outside the middleware (which answers every app error).
            log.error("request failed outside the app", exc_info=exc)
            error = ApiError(500, "internal", "The gateway failed to answer; this is a bug.")
        else:
            # Routine on a public port: named by its kind only; `message` quotes the request.
            log.debug(
                "malformed HTTP from %s: %s",
                untrusted(request.remote),
                type(exc).__name__ if exc else HTTPStatus(status).phrase,
            )
            error = _malformed(exc)
        if request.writer.output_size > 0:
            # An answer had begun: the connection cannot carry another one.
            raise ConnectionError("the answer had begun when the request failed")
        response = error_response(error)
        response.headers["Server"] = SERVER_NAME
        response.force_close()
        return response


class WireServer(web.Server):
    """aiohttp's low-level server, with `WireHandler` for each connection."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._handler_kwargs = {
            name: value
            for name, value in kwargs.items()
            if name not in ("request_factory", "handler_cancellation", "loop")
        }

    def __call__(self) -> web.RequestHandler:
        return WireHandler(self, loop=asyncio.get_running_loop(), **self._handler_kwargs)


class WireRunner(web.AppRunner):
    """`web.AppRunner` serving its app through `WireServer`.

    The app's own server is made as usual (startup hooks, handler arguments) and rebuilt as a
    `WireServer` with the same handler, request factory and arguments.
    """

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return WireServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            # The handler arguments aiohttp gathered (runner's, app's handler_args, debug).
            **plain._kwargs,
        )


def runner(app: web.Application) -> WireRunner:
    """The runner of the gateway's HTTP server (no access log: one line per request)."""
    return WireRunner(app, handle_signals=False, access_log=None, shutdown_timeout=5.0)
