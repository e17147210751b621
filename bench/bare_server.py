"""The accept benchmark's reference: an aiohttp + orjson endpoint that only parses the JSON.

`python -m bench.bare_server PORT` serves POST /v1/messages on uvloop and answers 202 with a
body shaped like the gateway's. It does what any JSON API must do and nothing more, so the
gateway's single-send rate is measured as a fraction of it.
"""

from __future__ import annotations

import sys

import orjson
import uvloop
from aiohttp import web


async def send(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    answer = {
        "id": "0-0000000000aaaaaaaaaaaa",
        "status": "queued",
        "phone_number_id": body.get("phone_number_id"),
    }
    return web.Response(body=orjson.dumps(answer), status=202, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    app = web.Application()
    app.router.add_post("/v1/messages", send)
    app.router.add_get("/healthz", healthz)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
