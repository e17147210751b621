"""The Redis store: connection, Lua scripts and the translation of Redis failures."""

from gateway.store.connection import Store, as_text, connect, unavailable_on_redis_errors

__all__ = ["Store", "as_text", "connect", "unavailable_on_redis_errors"]
