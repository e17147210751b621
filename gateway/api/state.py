"""What the app holds for its handlers, under typed `web.AppKey`s."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from gateway.accept.service import Acceptor
from gateway.messages import Messages
from gateway.registry import Registry
from gateway.settings import Settings
from gateway.store import Store


@dataclass
class Services:
    settings: Settings
    store: Store
    acceptor: Acceptor
    messages: Messages
    registry: Registry

    @classmethod
    def build(cls, settings: Settings, store: Store) -> Services:
        return cls(settings, store, Acceptor(store, settings), Messages(store), Registry(store))


SERVICES = web.AppKey("services", Services)
# The bearer key the request presented (None on routes outside the key scheme).
API_KEY = web.RequestKey("api_key", str)
