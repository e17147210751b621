"""The sandbox: a simulated WhatsApp Cloud API for development, tests and benchmarks.

It answers like Meta (success bodies with a wamid, error bodies with Meta's codes), enforces each
number's rate with a sliding one-second window (130429 beyond it), records what it received
(access tokens masked when shown), and injects faults on request through `/_sandbox/` admin routes.
"""

from gateway.sandbox.app import (
    RateSource,
    StaticRates,
    create_sandbox_app,
    mask_token,
    start_sandbox,
)

__all__ = ["RateSource", "StaticRates", "create_sandbox_app", "mask_token", "start_sandbox"]
