"""The sandbox: a simulated WhatsApp Cloud API for development, tests and benchmarks.

It answers like Meta (success bodies with a wamid, error bodies with Meta's codes), enforces each
number's rate with a sliding one-second window (130429 beyond it), records what it received
(access tokens masked when shown), and injects faults on request through `/_sandbox/` admin routes.
Given a `StatusConfig`, it also plays Meta's webhooks: signed `sent`, `delivered`, `read` (or
`failed`) statuses for every message it accepted, posted to the gateway (`statuses.py`).
"""

from gateway.sandbox.app import (
    RateSource,
    StaticRates,
    create_sandbox_app,
    mask_token,
    start_sandbox,
)
from gateway.sandbox.statuses import StatusConfig, signature

__all__ = [
    "RateSource",
    "StaticRates",
    "StatusConfig",
    "create_sandbox_app",
    "mask_token",
    "signature",
    "start_sandbox",
]
