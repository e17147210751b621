"""Reading and canceling one message by id."""

from __future__ import annotations

from typing import Any

import orjson

from gateway import ids, metrics
from gateway.clock import rfc3339
from gateway.errors import ApiError, not_found
from gateway.store import Store

_PRIORITIES = {"h": "high", "n": "normal", "l": "low"}
_SHOWS_ERROR = frozenset({"failed", "delivered", "read", "played"})
_RECEIPT_TIMES = (
    ("delivered_at", "da"),
    ("read_at", "ra"),
    ("played_at", "pa"),
    ("failed_at", "fa"),
)


def status_view(message_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """A stored message as `GET /v1/messages/{id}` shows it."""
    payload = orjson.loads(fields["p"]) if "p" in fields else {}
    # `e` is cleared when a message is sent, so past `sent` it holds only a failure Meta
    # reported: the status's own, or one that came after `delivered` and kept the status.
    error = orjson.loads(fields["e"]) if fields.get("e") and fields["s"] in _SHOWS_ERROR else None
    view = {
        "id": message_id,
        "phone_number_id": fields.get("pn"),
        "to": payload.get("to"),
        "status": fields["s"],
        "category": fields.get("c"),
        "priority": _PRIORITIES.get(fields.get("l", "n"), "normal"),
        "client_reference": fields.get("r"),
        "attempts": int(fields.get("a", 0)),
        "created_at": rfc3339(fields.get("ca")),
        "updated_at": rfc3339(fields.get("ua") or fields.get("ca")),
        "sent_at": rfc3339(fields.get("sa")),
        "upstream_message_id": fields.get("w"),
        "error": error,
    }
    # Meta's receipt times appear once Meta reports them ("when they apply", API.md), so a
    # message without receipts reads exactly as before.
    for name, field in _RECEIPT_TIMES:
        if field in fields:
            view[name] = rfc3339(fields[field])
    # A scheduled send shows its `send_at` for good, and `not_before` while it waits for it;
    # a message over its pair allowance shows `not_before` while it waits for that (`nb`).
    if "sd" in fields:
        view["send_at"] = rfc3339(fields["sd"])
        if fields["s"] == "scheduled":
            view["not_before"] = view["send_at"]
    if "nb" in fields and fields["s"] == "queued":
        view["not_before"] = rfc3339(fields["nb"])
    return view


class Messages:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.retention = int(store.settings.status_retention)
        # (a message being sent was taken this long before its lease runs out: status.lua)
        self.lease_ms = int(store.settings.lease_seconds * 1000)

    def _shard(self, message_id: str) -> int:
        shard = ids.shard_of_id(message_id)
        if shard is None or shard >= self.store.shards:
            raise not_found("message")
        return shard

    async def get(self, message_id: str) -> dict[str, Any]:
        shard = self._shard(message_id)
        reply = await self.store.script(
            "status", shard, [message_id, self.retention, self.lease_ms]
        )
        if not reply:
            raise not_found("message")
        if reply[0] == b"expired":
            metrics.MESSAGES_FAILED.labels("expired").inc()
        flat = reply[1:]
        fields = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
        return status_view(message_id, fields)

    async def cancel(self, message_id: str) -> dict[str, str]:
        shard = self._shard(message_id)
        outcome = (await self.store.script("cancel", shard, [message_id, self.retention])).decode()
        if outcome == "not_found":
            raise not_found("message")
        if outcome == "expired_now":
            metrics.MESSAGES_FAILED.labels("expired").inc()
            outcome = "expired"
        if outcome != "done":
            raise ApiError(
                409,
                "not_cancelable",
                f"The message is {outcome}; only a queued or scheduled message can be canceled.",
            )
        metrics.MESSAGES_FAILED.labels("canceled").inc()
        return {"id": message_id, "status": "canceled"}
