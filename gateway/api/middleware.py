"""The one middleware every request passes: auth, error shape, and HTTP metrics.

Errors leave in API.md's shape whatever raised them: `ApiError` as itself (a `401` with its
`WWW-Authenticate` challenge), Redis being unreachable as `503 unavailable`, aiohttp's own HTTP
errors (no route, wrong method with its `Allow`, body too large) translated, and anything else —
a bug — logged with its traceback and answered as a generic 500 that shows no internals.

What a client sent is logged through `logs.untrusted` only; the Redis warning, which would
otherwise repeat with every request of an outage, is throttled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway import metrics
from gateway.api.auth import CHALLENGE, KeyRing, authenticate, required_role
from gateway.api.http import MAX_BODY, error_response, payload_too_large
from gateway.api.state import API_KEY
from gateway.errors import ApiError, StoreUnavailable, unavailable
from gateway.logs import Throttled, untrusted

log = logging.getLogger("gateway.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES = {
    404: ("not_found", "No such route."),
    405: ("method_not_allowed", "This route does not take that method."),
}


def _route_label(request: web.Request) -> str:
    info = request.match_info
    if isinstance(info, web.UrlMappingMatchInfo) and info.http_exception is None:
        return info.route.resource.canonical if info.route.resource else "unmatched"
    return "unmatched"


def _translate(exc: web.HTTPException) -> ApiError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return payload_too_large(MAX_BODY)
    code, message = _HTTP_CODES.get(exc.status, ("invalid_request", exc.reason))
    return ApiError(exc.status, code, message)


def _api_error_response(request: web.Request, exc: ApiError) -> web.Response:
    response = error_response(exc)
    if exc.status == 401 and required_role(request.path) is not None:
        response.headers["WWW-Authenticate"] = CHALLENGE
    return response


def _http_error_response(exc: web.HTTPException) -> web.Response:
    response = error_response(_translate(exc))
    if isinstance(exc, web.HTTPMethodNotAllowed):
        response.headers["Allow"] = exc.headers["Allow"]
    return response


def make_middleware(ring: KeyRing) -> Middleware:
    # One per process: an outage is told once every few seconds, not once per request.
    redis_warnings = Throttled(log)

    @web.middleware
    async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            presented = authenticate(request, ring)
            if presented is not None:
                request[API_KEY] = presented
            response = await handler(request)
        except ApiError as exc:
            response = _api_error_response(request, exc)
        except StoreUnavailable as exc:
            metrics.REDIS_ERRORS.inc()
            redis_warnings.warning(
                "redis unavailable for %s %s: %s",
                untrusted(request.method),
                untrusted(request.path),
                untrusted(exc),
            )
            response = error_response(unavailable())
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _http_error_response(exc)
        except Exception:
            log.exception(
                "unhandled error for %s %s", untrusted(request.method), untrusted(request.path)
            )
            response = error_response(
                ApiError(500, "internal", "The gateway failed to answer; this is a bug.")
            )
        else:
            if response.status < 500 and required_role(request.path) is not None:
                redis_warnings.recovered("redis answers again")
        route = _route_label(request)
        metrics.local_http_requests.inc(route, str(response.status))
        metrics.local_http_duration.observe(time.perf_counter() - started, route)
        return response

    return gateway_middleware
