"""Bearer-key auth of API.md: send keys may use /v1/messages*, admin keys every /v1 route.

Keys are compared in constant time, and every configured key is compared, so the time taken
does not tell which key nearly matched. `/v1/events` and `/v1/webhooks/meta` are authenticated by
their signatures instead.
A header is compared as the bytes it arrived as: a byte that is not UTF-8 (aiohttp keeps it as a
surrogate escape) matches no key and is a `401`, not an encoding error.
"""

from __future__ import annotations

import hmac
from enum import Enum

from aiohttp import web

from gateway.errors import ApiError

# Routes authenticated by a signature (or a verify token) instead of a key.
SIGNED_ROUTES = frozenset({"/v1/events", "/v1/webhooks/meta"})
# The challenge of every 401 on a bearer route (RFC 6750).
CHALLENGE = 'Bearer realm="whatsapp-gateway"'


def _raw(text: str) -> bytes:
    """`text` as the bytes it was read from (headers and the environment keep bad bytes)."""
    return text.encode("utf-8", "surrogateescape")


class Role(Enum):
    SEND = "send"
    ADMIN = "admin"


class KeyRing:
    def __init__(self, send_keys: tuple[str, ...], admin_keys: tuple[str, ...]) -> None:
        self._keys = [(_raw(k), Role.SEND) for k in send_keys] + [
            (_raw(k), Role.ADMIN) for k in admin_keys
        ]

    def role_of(self, presented: str) -> Role | None:
        candidate = _raw(presented)
        found: Role | None = None
        for key, role in self._keys:
            if hmac.compare_digest(candidate, key) and found is not Role.ADMIN:
                found = role
        return found


def required_role(path: str) -> Role | None:
    """The role a path needs; None for routes outside the key scheme."""
    if not path.startswith("/v1/") or path in SIGNED_ROUTES:
        return None
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return Role.SEND
    return Role.ADMIN


def authenticate(request: web.Request, ring: KeyRing) -> str | None:
    """The presented key when the request may proceed; raises 401/403 otherwise."""
    needed = required_role(request.path)
    if needed is None:
        return None
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    role = ring.role_of(presented.strip()) if scheme.lower() == "bearer" and presented else None
    if role is None:
        raise ApiError(
            401, "unauthorized", "Send a valid API key as 'Authorization: Bearer <key>'."
        )
    if needed is Role.ADMIN and role is not Role.ADMIN:
        raise ApiError(403, "forbidden", "This route needs an admin key.")
    return presented.strip()
