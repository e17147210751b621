"""Delivery receipts: Meta's status webhooks and users' inbound messages, applied to messages.

`envelope` reads Meta's webhook body (and refuses a malformed one); `apply` writes what it says
with one `receipts` script call per shard, by the precedence rule of `lib.lua`'s
`apply_receipt`.
"""

from gateway.receipts.apply import Applied, Receipts
from gateway.receipts.envelope import Envelope, InboundMessage, StatusUpdate, parse_envelope

__all__ = [
    "Applied",
    "Envelope",
    "InboundMessage",
    "Receipts",
    "StatusUpdate",
    "parse_envelope",
]
