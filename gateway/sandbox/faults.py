"""Faults the sandbox injects: latency, random errors, fixed or scripted answers per number."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any


class FaultError(ValueError):
    """A faults document that does not make sense."""


@dataclass
class Answer:
    """A forced answer: an HTTP status and, for errors, a Meta error code."""

    status: int = 200
    code: int | None = None
    timeout_ms: int = 0

    @classmethod
    def parse(cls, raw: Any) -> Answer:
        if not isinstance(raw, dict):
            raise FaultError('an answer is an object like {"status": 400, "code": 131026}')
        status = raw.get("status", 200)
        code = raw.get("code")
        timeout_ms = raw.get("timeout_ms", 0)
        if not isinstance(status, int) or not 200 <= status <= 599:
            raise FaultError("status must be an HTTP status")
        if code is not None and not isinstance(code, int):
            raise FaultError("code must be an integer")
        if not isinstance(timeout_ms, int) or timeout_ms < 0:
            raise FaultError("timeout_ms must be a non-negative integer")
        return cls(status, code, timeout_ms)

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "code": self.code, "timeout_ms": self.timeout_ms}


def _rate(raw: Any, name: str) -> float:
    value = raw.get(name, 0.0)
    if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise FaultError(f"{name} must be between 0 and 1")
    return float(value)


@dataclass
class Faults:
    latency_ms: int = 0
    latency_jitter_ms: int = 0
    error_rate: float = 0.0
    throttle_rate: float = 0.0
    numbers: dict[str, Answer] = field(default_factory=dict)
    script: dict[str, deque[Answer]] = field(default_factory=dict)
    seed: int | None = None
    rng: random.Random = field(default_factory=random.Random)

    @classmethod
    def parse(cls, raw: Any) -> Faults:
        if not isinstance(raw, dict):
            raise FaultError("faults must be an object")
        for name in ("latency_ms", "latency_jitter_ms"):
            value = raw.get(name, 0)
            if not isinstance(value, int) or value < 0:
                raise FaultError(f"{name} must be a non-negative integer")
        numbers = raw.get("numbers", {})
        script = raw.get("script", {})
        if not isinstance(numbers, dict) or not isinstance(script, dict):
            raise FaultError("numbers and script map a phone_number_id to answers")
        seed = raw.get("seed")
        faults = cls(
            latency_ms=raw.get("latency_ms", 0),
            latency_jitter_ms=raw.get("latency_jitter_ms", 0),
            error_rate=_rate(raw, "error_rate"),
            throttle_rate=_rate(raw, "throttle_rate"),
            numbers={pn: Answer.parse(a) for pn, a in numbers.items()},
            script={pn: deque(Answer.parse(a) for a in answers) for pn, answers in script.items()},
            seed=seed,
            rng=random.Random(seed),
        )
        if any(not isinstance(a, list) for a in script.values()):
            raise FaultError("a script is a list of answers")
        return faults

    def as_dict(self) -> dict[str, Any]:
        return {
            "latency_ms": self.latency_ms,
            "latency_jitter_ms": self.latency_jitter_ms,
            "error_rate": self.error_rate,
            "throttle_rate": self.throttle_rate,
            "numbers": {pn: a.as_dict() for pn, a in self.numbers.items()},
            "script": {pn: [a.as_dict() for a in q] for pn, q in self.script.items()},
            "seed": self.seed,
        }

    def delay_s(self) -> float:
        jitter = self.rng.uniform(0, self.latency_jitter_ms) if self.latency_jitter_ms else 0.0
        return (self.latency_ms + jitter) / 1000.0

    def forced(self, phone_number_id: str) -> Answer | None:
        """The answer a fault imposes on this request, if any (consumes a scripted one)."""
        queue = self.script.get(phone_number_id)
        if queue:
            return queue.popleft()
        fixed = self.numbers.get(phone_number_id)
        if fixed is not None:
            return fixed
        if self.error_rate and self.rng.random() < self.error_rate:
            return Answer(503, 2)
        if self.throttle_rate and self.rng.random() < self.throttle_rate:
            return Answer(429, 130429)
        return None
