"""The aiohttp application factory for the HTTP API."""

from __future__ import annotations

from aiohttp import web

from gateway.api import events, messages, ops, phone_numbers, webhooks
from gateway.api.auth import KeyRing
from gateway.api.http import MAX_BODY
from gateway.api.middleware import make_middleware
from gateway.api.state import SERVICES, Services
from gateway.api.wire import handler_args, name_server
from gateway.settings import Settings
from gateway.store import Store


def create_app(settings: Settings, store: Store, *, api: bool = True) -> web.Application:
    """The API of API.md over `store` (only the operations routes when not `api`).

    The caller owns the store and closes it. Serve it with `wire.runner`, which also answers
    malformed HTTP in API.md's shape; the connection deadlines are the app's handler arguments,
    so they hold under any runner (a test's `TestServer` too).
    """
    ring = KeyRing(settings.api_keys, settings.admin_keys)
    app = web.Application(
        middlewares=[make_middleware(ring)], client_max_size=MAX_BODY, handler_args=handler_args()
    )
    app.on_response_prepare.append(name_server)
    app[SERVICES] = Services.build(settings, store)
    tables = [messages.routes, phone_numbers.routes, events.routes, webhooks.routes] if api else []
    for table in [*tables, ops.routes]:
        app.router.add_routes(table)
    return app
