"""The bounded fuzz of `make test`: schemathesis, every check, against the real `gateway run`.

A few thousand derandomized cases (the same ones on every run) from the served /openapi.json:
one pass with an admin key, which reaches every route, and one with no key, where schemathesis
generates the Authorization header itself. Any 5xx, any answer that breaks the document (status,
content type, headers, body schema), any invalid request accepted or valid one refused fails the
test, with schemathesis' report of each failure and a curl line to reproduce it.
The long fuzz is `make fuzz`, i.e. `python -m tests.fuzz` (see tests/fuzz/__main__.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuzz.runner import Budget, Outcome, run_st
from tests.fuzz.stack import Target, running_gateway

# Cases per operation and phase; with 13 operations and the coverage phase's own cases this is
# ~1,700 requests for the admin pass and ~1,000 for the keyless one, about 45 s in all.
ADMIN_BUDGET = Budget(max_examples=50)
NO_KEY_BUDGET = Budget(max_examples=10)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with running_gateway(tmp_path_factory.mktemp("fuzz")) as running:
        yield running


def report(outcome: Outcome, gateway_log: Path | None) -> str:
    """Schemathesis' failures section and summary (the case list above it is long)."""
    text = outcome.output
    start = text.find("=== FAILURES")
    if start < 0:
        start = text.find("=== ERRORS")
    section = text[start:] if start >= 0 else text[-20_000:]
    if gateway_log is not None:
        section += f"\n\ngateway log: {gateway_log}"
    return section


def gateway_log(target: Target) -> Path | None:
    return next(iter(sorted(target.workdir.glob("gateway-run-*.log"))), None)


def test_admin_key_every_check(target: Target) -> None:
    outcome = run_st(target, target.admin_key, ADMIN_BUDGET, target.workdir / "st-admin")
    assert outcome.passed, report(outcome, gateway_log(target))


def test_no_key_every_check(target: Target) -> None:
    outcome = run_st(target, None, NO_KEY_BUDGET, target.workdir / "st-no-key")
    assert outcome.passed, report(outcome, gateway_log(target))
