"""Admin routes of /v1/phone-numbers: the registry."""

from __future__ import annotations

import re

from aiohttp import web

from gateway.api.http import MESSAGE_BODY, json_response, read_json
from gateway.api.state import SERVICES
from gateway.errors import FieldProblem, invalid_request, not_found
from gateway.registry.model import phone_number_id_problem

routes = web.RouteTableDef()

DEFAULT_PAGE = 100
MAX_PAGE = 500
_LIMIT = re.compile(r"[0-9]{1,4}")


def _path_id(request: web.Request) -> str:
    pn = request.match_info["phone_number_id"]
    why = phone_number_id_problem(pn)
    if why is not None:
        raise invalid_request([FieldProblem("phone_number_id", why)])
    return pn


def _limit(raw: str | None) -> int:
    # ASCII digits only: str.isdigit() also takes "²", which int() then refuses.
    if raw is None:
        return DEFAULT_PAGE
    if _LIMIT.fullmatch(raw) and 1 <= int(raw) <= MAX_PAGE:
        return int(raw)
    raise invalid_request([FieldProblem("limit", f"must be a whole number from 1 to {MAX_PAGE}")])


@routes.put("/v1/phone-numbers/{phone_number_id}")
async def put_number(request: web.Request) -> web.Response:
    pn = _path_id(request)
    body = await read_json(request, MESSAGE_BODY)
    view, created = await request.app[SERVICES].registry.put(pn, body)
    return json_response(view, 201 if created else 200)


@routes.patch("/v1/phone-numbers/{phone_number_id}")
async def patch_number(request: web.Request) -> web.Response:
    pn = _path_id(request)
    body = await read_json(request, MESSAGE_BODY)
    return json_response(await request.app[SERVICES].registry.patch(pn, body))


@routes.get("/v1/phone-numbers/{phone_number_id}")
async def get_number(request: web.Request) -> web.Response:
    view = await request.app[SERVICES].registry.get(_path_id(request))
    if view is None:
        raise not_found("phone number")
    return json_response(view)


@routes.delete("/v1/phone-numbers/{phone_number_id}")
async def delete_number(request: web.Request) -> web.Response:
    return json_response(await request.app[SERVICES].registry.delete(_path_id(request)))


@routes.get("/v1/phone-numbers")
async def list_numbers(request: web.Request) -> web.Response:
    limit = _limit(request.query.get("limit"))
    cursor = request.query.get("cursor") or None
    numbers, next_cursor = await request.app[SERVICES].registry.page(cursor, limit)
    return json_response({"data": numbers, "next_cursor": next_cursor})
