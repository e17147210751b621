"""Batched histogram observations add up to exactly what `observe` would have recorded."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram

from gateway.metrics import LocalHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0)


def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    out = {}
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name.endswith("_created"):
                continue
            out[(sample.name.rsplit("_", 1)[-1], sample.labels.get("le", ""))] = sample.value
    return out


def test_local_histogram_matches_observe() -> None:
    direct_registry, batched_registry = CollectorRegistry(), CollectorRegistry()
    direct = Histogram("h", "direct", buckets=BUCKETS, registry=direct_registry)
    batched = Histogram("h", "batched", buckets=BUCKETS, registry=batched_registry)
    local = LocalHistogram(batched)
    rng = random.Random(5)
    values = [rng.choice([0.0, 0.001, 0.01, 1.0, 99.0]) or rng.random() for _ in range(500)]
    for i, value in enumerate(values):
        direct.observe(value)
        local.observe(value)
        if i % 97 == 0:
            local.flush()
    local.flush()
    local.flush()  # a second flush adds nothing
    got, want = samples(batched_registry), samples(direct_registry)
    assert got.pop(("sum", "")) == pytest.approx(want.pop(("sum", "")))
    assert got == want
    assert want[("count", "")] == 500
