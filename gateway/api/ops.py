"""Operations routes: liveness, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from gateway import metrics
from gateway.api.http import error_response, json_response
from gateway.api.state import SERVICES
from gateway.errors import unavailable

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    if await request.app[SERVICES].store.ping():
        return json_response({"status": "ready"})
    return error_response(unavailable())


@routes.get("/metrics")
async def prometheus_metrics(request: web.Request) -> web.Response:
    body, content_type = metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    document = (resources.files("gateway.api") / "openapi.json").read_bytes()
    return web.Response(body=document, content_type="application/json")
