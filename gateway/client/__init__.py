"""A Python client of the gateway, for the services that send through it.

`AsyncGatewayClient` (aiohttp) and `GatewayClient` (blocking, standard library) send one
message, a batch of any size (1,000 per request), read a status and cancel; both retry `429`
and `503` after `Retry-After` with jittered backoff, and every send carries an idempotency key
(generated when none is given) so that a retry never queues a message twice. Errors are
`GatewayAPIError`s with API.md's code, message and HTTP status. `verify_callback` checks a
status callback's Standard Webhooks signature and returns its event.

It imports nothing from the rest of `gateway`: a service may vendor this package alone.
"""

from gateway.client.aio import AsyncGatewayClient
from gateway.client.callbacks import verify_callback
from gateway.client.errors import (
    CallbackVerificationError,
    ClientError,
    GatewayAPIError,
    GatewayConnectionError,
)
from gateway.client.sync import GatewayClient
from gateway.client.wire import BATCH_LIMIT, Accepted, Rejected

__all__ = [
    "BATCH_LIMIT",
    "Accepted",
    "AsyncGatewayClient",
    "CallbackVerificationError",
    "ClientError",
    "GatewayAPIError",
    "GatewayClient",
    "GatewayConnectionError",
    "Rejected",
    "verify_callback",
]
