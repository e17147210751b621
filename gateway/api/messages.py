"""Routes of /v1/messages: send, batch, status and cancel."""

from __future__ import annotations

from aiohttp import web

from gateway.accept.service import Idempotency
from gateway.api.http import BATCH_BODY, MESSAGE_BODY, json_response, read_json
from gateway.api.state import API_KEY, SERVICES
from gateway.errors import FieldProblem, invalid_request

routes = web.RouteTableDef()
# A message id starts with its shard number, so `/v1/messages/batch` is not one: a GET or an
# OPTIONS of the batch route answers 405 with `Allow: POST`, not the methods of a message.
MESSAGE_PATH = "/v1/messages/{id:[0-9][^/]*}"


@routes.post("/v1/messages")
async def send(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    body = await read_json(request, MESSAGE_BODY)
    header = request.headers.get("Idempotency-Key")
    idempotency = None if header is None else Idempotency.from_header(header, request[API_KEY])
    accepted = await services.acceptor.send(body, idempotency)
    headers = {"Idempotent-Replayed": "true"} if accepted.replayed else None
    return json_response(accepted.body(), 202, headers)


@routes.post("/v1/messages/batch")
async def send_batch(request: web.Request) -> web.Response:
    if "Idempotency-Key" in request.headers:
        raise invalid_request(
            [
                FieldProblem(
                    "Idempotency-Key",
                    "is for POST /v1/messages; in a batch, give each message its own "
                    "idempotency_key",
                )
            ]
        )
    body = await read_json(request, BATCH_BODY)
    acceptor = request.app[SERVICES].acceptor
    return json_response(await acceptor.send_batch(body, request[API_KEY]))


@routes.get(MESSAGE_PATH)
async def get_status(request: web.Request) -> web.Response:
    return json_response(await request.app[SERVICES].messages.get(request.match_info["id"]))


@routes.delete(MESSAGE_PATH)
async def cancel(request: web.Request) -> web.Response:
    return json_response(await request.app[SERVICES].messages.cancel(request.match_info["id"]))
