"""The callback benchmark's receiver: an aiohttp endpoint that counts what is posted to it.

`python -m bench.receiver PORT` answers every POST (any path) with 204 after reading the body,
and `GET /count` with how many it has received and the times of the first and last. It is the
cheapest receiver a service could run, so the callback sender is measured against a client
posting to the same thing.
"""

from __future__ import annotations

import sys
import time

import orjson
import uvloop
from aiohttp import web

COUNT = web.AppKey("count", list)


async def receive(request: web.Request) -> web.Response:
    await request.read()
    seen = request.app[COUNT]
    now = time.monotonic()
    if not seen[0]:
        seen[1] = now
    seen[0] += 1
    seen[2] = now
    return web.Response(status=204)


async def count(request: web.Request) -> web.Response:
    received, first, last = request.app[COUNT]
    body = {"received": received, "seconds": last - first}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def reset(request: web.Request) -> web.Response:
    request.app[COUNT][:] = [0, 0.0, 0.0]
    return web.Response(status=204)


def main() -> None:
    app = web.Application()
    app[COUNT] = [0, 0.0, 0.0]
    app.router.add_get("/count", count)
    app.router.add_delete("/count", reset)
    app.router.add_get("/healthz", count)
    app.router.add_post("/{tail:.*}", receive)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
