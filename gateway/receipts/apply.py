"""Applying a webhook's statuses and inbound messages: one `receipts` script call per shard.

A number's statuses live in its shard (the wamid index `w:<wamid>` is there, beside the
message), so a webhook costs one call per shard it touches — usually one, as Meta batches by
business account — and each call applies its part atomically, in the order Meta listed it.
The calls of different shards run concurrently; the webhook is answered `200` only when all of
them are done, so a `GET` right after shows every status.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from gateway import keys, metrics
from gateway.receipts.envelope import Envelope
from gateway.settings import Settings
from gateway.store import Store

# The order of the first counts `receipts.lua` returns (its RECEIPT_RANK).
_RANKED = ("sent", "failed", "delivered", "read", "played")


@dataclass
class Applied:
    """What one webhook did, summed over its shards."""

    changed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_RANKED, 0))
    recorded: int = 0  # a time or an error kept without a status change
    unchanged: int = 0  # repeats, and statuses below the one a message already has
    held: int = 0  # statuses of wamids no message has yet
    inbound: int = 0
    delivery_ms: list[int] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        return {
            "applied": sum(self.changed.values()),
            "recorded": self.recorded,
            "unchanged": self.unchanged,
            "held": self.held,
            "inbound": self.inbound,
        }

    def add(self, reply: list[Any]) -> None:
        counts = [int(x) for x in reply]
        for status, count in zip(_RANKED, counts[:5], strict=True):
            self.changed[status] += count
        self.recorded += counts[5]
        self.unchanged += counts[6]
        self.held += counts[7]
        self.inbound += counts[8]
        self.delivery_ms += counts[9:]


class Receipts:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.retention = int(settings.status_retention)
        self.hold = max(int(settings.receipt_hold), 1)

    def _shard_args(self, envelope: Envelope) -> dict[int, list[Any]]:
        shards = self.store.shards
        args: dict[int, list[Any]] = defaultdict(lambda: [self.retention, self.hold])
        for update in envelope.statuses:
            args[keys.shard_of(update.phone_number_id, shards)] += [
                "S",
                update.wamid,
                update.status,
                update.at_ms,
                update.error_json,
            ]
        for message in envelope.inbound:
            args[keys.shard_of(message.phone_number_id, shards)] += [
                "I",
                message.phone_number_id,
                message.user,
                message.at_ms,
                "",
            ]
        return args

    async def apply(self, envelope: Envelope) -> Applied:
        """Write everything `envelope` says; raises `StoreUnavailable` if any shard failed.

        A shard that failed may still have been applied (the answer was lost): the sender's
        retry of the whole webhook is harmless, since every status is applied by precedence.
        """
        calls = [
            self.store.script("receipts", shard, args, durable=True)
            for shard, args in self._shard_args(envelope).items()
        ]
        replies = await asyncio.gather(*calls, return_exceptions=True)
        applied = Applied()
        failure: BaseException | None = None
        for reply in replies:
            if isinstance(reply, BaseException):
                failure = failure or reply
            else:
                applied.add(reply)
        _count(envelope, applied)
        if failure is not None:
            raise failure
        return applied


def _count(envelope: Envelope, applied: Applied) -> None:
    for status, count in applied.changed.items():
        if count:
            metrics.local_receipts_applied.inc(status, amount=count)
    if applied.held:
        metrics.RECEIPTS_HELD.inc(applied.held)
    if applied.inbound:
        metrics.INBOUND_MESSAGES.inc(applied.inbound)
    for label, count in envelope.ignored.items():
        metrics.WEBHOOK_IGNORED.labels(label).inc(count)
    for ms in applied.delivery_ms:
        metrics.local_delivery_seconds.observe(ms / 1000.0)
