"""The Redis store: connection, Lua scripts and the translation of Redis failures."""

from gateway.settings import is_cluster_url
from gateway.store.connection import (
    Store,
    as_text,
    close_client,
    connect,
    unavailable_on_redis_errors,
)

__all__ = [
    "Store",
    "as_text",
    "close_client",
    "connect",
    "is_cluster_url",
    "unavailable_on_redis_errors",
]
