"""A tiny status-callback receiver: prints each event it gets as one JSON line on stdout.

    python -m gateway.client.echo --port 9000 --secret whsec_...

Point `GATEWAY_CALLBACK_URL` (and `GATEWAY_CALLBACK_ALLOW`) at it to watch a message's statuses
arrive. With `--secret` (the gateway's `GATEWAY_CALLBACK_SECRET`) every callback is verified
first: a bad one is answered `401` and told on stderr, never printed. Stdout holds only events,
so it pipes into `jq`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from gateway.client.callbacks import secret_bytes, verify_callback
from gateway.client.errors import CallbackVerificationError

MAX_BODY = 1024 * 1024


def create_app(secret: str | None) -> web.Application:
    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        if secret is not None:
            try:
                event = verify_callback(request.headers, body, secret)
            except CallbackVerificationError as exc:
                print(f"refused a callback: {exc}", file=sys.stderr, flush=True)
                return web.json_response({"error": "bad signature"}, status=401)
        else:
            try:
                event = json.loads(body)
            except ValueError:
                return web.json_response({"error": "not JSON"}, status=400)
        print(json.dumps(event, separators=(",", ":"), ensure_ascii=False), flush=True)
        return web.Response(status=204)

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/{path:.*}", receive)
    return app


async def serve(host: str, port: int, secret: str | None) -> None:
    runner = web.AppRunner(create_app(secret), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound = runner.addresses[0][1]
    checked = "verifying signatures" if secret else "NOT verifying signatures (no --secret)"
    print(f"listening on http://{host}:{bound}/, {checked}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.client.echo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=9000, help="port to listen on (0: any)")
    parser.add_argument("--secret", help="the gateway's callback secret, whsec_...")
    args = parser.parse_args(argv)
    if args.secret is not None:
        try:
            secret_bytes(args.secret)
        except CallbackVerificationError as exc:
            parser.error(f"--secret: {exc}")
    asyncio.run(serve(args.host, args.port, args.secret))
    return 0


if __name__ == "__main__":
    sys.exit(main())
