"""Prometheus metrics of every gateway process of a host.

`gateway` sets PROMETHEUS_MULTIPROC_DIR before this module is imported (prometheus_client chooses
its storage at import), so each process writes its samples to files there and any process serves
all of them at `/metrics`. Labels are bounded sets (tier, lane, category, outcome, route, ...);
never a message id or recipient. Gauges that describe Redis (queue depth, numbers, capacity) are
published by one process every few seconds, so they use the "most recent" mode.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_DELAY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)

MESSAGES_ACCEPTED = Counter(
    "gateway_messages_accepted", "Messages accepted (202 or batch result).", ["category", "tier"]
)
MESSAGES_SENT = Counter("gateway_messages_sent", "Messages the upstream accepted.", ["tier"])
MESSAGES_FAILED = Counter(
    "gateway_messages_failed",
    "Messages that ended without being sent, by reason "
    "(permanent, retries_exhausted, expired, canceled, phone_number_deleted).",
    ["reason"],
)
UPSTREAM_REQUESTS = Counter(
    "gateway_upstream_requests", "Requests to the Cloud API, by outcome class.", ["outcome"]
)
UPSTREAM_DURATION = Histogram(
    "gateway_upstream_request_duration_seconds",
    "Duration of one Cloud API request.",
    buckets=_LATENCY_BUCKETS,
)
SEND_DELAY = Histogram(
    "gateway_send_delay_seconds",
    "From accept to the upstream's answer for sent messages.",
    buckets=_DELAY_BUCKETS,
)
RATE_LIMITED = Counter(
    "gateway_rate_limited",
    "Sends deferred by a number's rate limit (a take found the number's window full).",
    ["tier"],
)
SEND_ERRORS = Counter(
    "gateway_send_errors",
    "Sends or settles that met an unexpected error of the gateway itself (a bug, logged with "
    "its traceback): the message is retried as after a transient failure. Should stay 0.",
)
GRANTS_RETURNED = Counter(
    "gateway_grants_returned",
    "Grants given back unsent: the send could not start within the tolerance (half the rate "
    "slack) of its stamp. Should stay under 1% of sends. stage: where it was caught — queued "
    "(the process is short of CPU), connect (opening a connection took too long; it is kept "
    "for the next send), write (a stall between the two).",
    ["tier", "stage"],
)
START_LATENESS = Histogram(
    "gateway_send_start_lateness_seconds",
    "How long after its stamp (its planned start) each upstream request was written.",
    buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1),
)
DRAIN_START_RATE = Gauge(
    "gateway_drain_start_rate",
    "Sends per second the worker processes have learned they can start on time (summed over "
    "this host's processes).",
    multiprocess_mode="livesum",
)
NUMBER_PAUSED = Counter(
    "gateway_number_paused",
    "Times a number was paused or held by an upstream answer, by reason.",
    ["reason"],
)
HTTP_REQUESTS = Counter(
    "gateway_http_requests", "HTTP requests answered, by route and status.", ["route", "status"]
)
HTTP_DURATION = Histogram(
    "gateway_http_request_duration_seconds",
    "Time to answer an HTTP request, by route.",
    ["route"],
    buckets=_LATENCY_BUCKETS,
)
REDIS_ERRORS = Counter("gateway_redis_errors", "Operations that found Redis unreachable.")

# Delivery receipts: Meta's webhooks in (`gateway.receipts`).
RECEIPTS_APPLIED = Counter(
    "gateway_receipts_applied",
    "Meta statuses that changed a message's status, by the status it moved to.",
    ["status"],
)
RECEIPTS_HELD = Counter(
    "gateway_receipts_held",
    "Meta statuses for a wamid no message had yet, held for GATEWAY_RECEIPT_HOLD (applied "
    "when a send gets that wamid, else dropped when the hold runs out).",
)
WEBHOOK_BAD_SIGNATURE = Counter(
    "gateway_webhook_bad_signature",
    "Meta webhooks refused for a missing or wrong X-Hub-Signature-256.",
)
WEBHOOK_IGNORED = Counter(
    "gateway_webhook_ignored",
    "Parts of Meta webhooks ignored: changes of other fields, statuses of unknown values.",
    ["field"],
)
INBOUND_MESSAGES = Counter(
    "gateway_inbound_messages", "Users' inbound messages recorded for the service window."
)
DELIVERY_SECONDS = Histogram(
    "gateway_delivery_seconds",
    "From sent (the upstream's answer) to delivered (Meta's time, whole seconds).",
    buckets=(1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0),
)
CALLBACKS_DELIVERED = Counter(
    "gateway_callbacks_delivered", "Status callbacks a receiver answered with a 2xx."
)
CALLBACKS_RETRIED = Counter(
    "gateway_callbacks_retried",
    "Status callback attempts that failed (non-2xx, timeout, no connection) and will be retried.",
)
CALLBACKS_DROPPED = Counter(
    "gateway_callbacks_dropped",
    "Status callbacks given up, by reason: gone (the receiver answered 410), max_age (still "
    "failing GATEWAY_CALLBACK_MAX_AGE after the status change).",
    ["reason"],
)
CALLBACK_LAG = Histogram(
    "gateway_callback_lag_seconds",
    "From a status change to its callback's 2xx.",
    buckets=_DELAY_BUCKETS,
)
CALLBACKS_INFLIGHT = Gauge(
    "gateway_callbacks_inflight",
    "Status callback requests in flight (summed over this host's processes).",
    multiprocess_mode="livesum",
)

QUEUE_DEPTH = Gauge(
    "gateway_queue_depth",
    "Queued messages, by tier and lane.",
    ["tier", "lane"],
    multiprocess_mode="livemostrecent",
)
INFLIGHT = Gauge(
    "gateway_inflight",
    "Messages handed to workers and not yet settled.",
    multiprocess_mode="livemostrecent",
)
NUMBERS = Gauge(
    "gateway_numbers",
    "Registered phone numbers, by status and tier.",
    ["status", "tier"],
    multiprocess_mode="livemostrecent",
)
TIER_CAPACITY = Gauge(
    "gateway_tier_capacity_messages_per_second",
    "Sum of the rate in force of active numbers, by tier (unlimited counts 0).",
    ["tier"],
    multiprocess_mode="livemostrecent",
)
BACKLOG_ETA = Gauge(
    "gateway_backlog_eta_seconds",
    "The longest time any number of the tier needs to drain its backlog at its rate.",
    ["tier"],
    multiprocess_mode="livemostrecent",
)

# Per-number series: only with GATEWAY_METRICS_PER_NUMBER, for fleets small enough.
NUMBER_QUEUE_DEPTH = Gauge(
    "gateway_number_queue_depth",
    "Queued messages of one phone number (GATEWAY_METRICS_PER_NUMBER only).",
    ["phone_number_id"],
    multiprocess_mode="livemostrecent",
)
NUMBER_RATE = Gauge(
    "gateway_number_rate_limit_messages_per_second",
    "The rate in force of one phone number, 0 when unlimited (GATEWAY_METRICS_PER_NUMBER only).",
    ["phone_number_id"],
    multiprocess_mode="livemostrecent",
)


class LocalCounter:
    """Increments gathered in this process and added to a shared counter by `flush_local()`.

    In multiprocess mode every increment takes a lock, checks the pid and writes a file
    mapping — on the accept path that was a sixth of the CPU. Hot paths count here instead;
    each process flushes every second and before it serves /metrics.
    """

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._counts: dict[tuple[str, ...], float] = {}
        _LOCAL.append(self)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self._counts[labels] = self._counts.get(labels, 0.0) + amount

    def flush(self) -> None:
        counts, self._counts = self._counts, {}
        for labels, amount in counts.items():
            (self._counter.labels(*labels) if labels else self._counter).inc(amount)


class LocalHistogram:
    """Observations gathered in this process and added to a shared histogram in batches.

    Same idea as `LocalCounter`. It relies on prometheus_client's Histogram keeping per-bucket
    values in `_buckets` and the sum in `_sum` (stable for years;
    tests/unit/test_metrics_batching.py checks the result against `observe`).
    """

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._bounds: list[float] = list(histogram._upper_bounds)
        self._pending: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        _LOCAL.append(self)

    def observe(self, value: float, *labels: str) -> None:
        pending = self._pending.get(labels)
        if pending is None:
            pending = self._pending[labels] = ([0] * len(self._bounds), [0.0])
        pending[0][bisect.bisect_left(self._bounds, value)] += 1
        pending[1][0] += value

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for labels, (counts, total) in pending.items():
            child = self._histogram.labels(*labels) if labels else self._histogram
            for index, count in enumerate(counts):
                if count:
                    child._buckets[index].inc(count)
            child._sum.inc(total[0])


_LOCAL: list[LocalCounter | LocalHistogram] = []


def flush_local() -> None:
    """Add what this process gathered locally to the shared metrics."""
    for local in _LOCAL:
        local.flush()


# Hot-path views of the metrics above (see LocalCounter).
local_accepted = LocalCounter(MESSAGES_ACCEPTED)
local_http_requests = LocalCounter(HTTP_REQUESTS)
local_http_duration = LocalHistogram(HTTP_DURATION)
local_upstream_requests = LocalCounter(UPSTREAM_REQUESTS)
local_upstream_duration = LocalHistogram(UPSTREAM_DURATION)
local_send_delay = LocalHistogram(SEND_DELAY)
local_sent = LocalCounter(MESSAGES_SENT)
local_failed = LocalCounter(MESSAGES_FAILED)
local_grants_returned = LocalCounter(GRANTS_RETURNED)
local_start_lateness = LocalHistogram(START_LATENESS)
local_receipts_applied = LocalCounter(RECEIPTS_APPLIED)
local_delivery_seconds = LocalHistogram(DELIVERY_SECONDS)
local_callbacks_delivered = LocalCounter(CALLBACKS_DELIVERED)
local_callbacks_retried = LocalCounter(CALLBACKS_RETRIED)
local_callbacks_dropped = LocalCounter(CALLBACKS_DROPPED)
local_callback_lag = LocalHistogram(CALLBACK_LAG)


class HostProcesses(Collector):
    """process_* metrics of every gateway process of this host, labelled by pid.

    prometheus_client's own process collector describes only the scraped process; in
    multiprocess mode the pids come from the files of the shared directory.
    """

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def _pids(self) -> list[int]:
        pids = set()
        for path in self.directory.glob("*.db"):
            pid = path.stem.rsplit("_", 1)[-1]
            if pid.isdigit() and Path(f"/proc/{pid}").exists():
                pids.add(int(pid))
        return sorted(pids)

    def collect(self) -> Iterator[Metric]:
        cpu = CounterMetricFamily(
            "process_cpu_seconds", "CPU time of a gateway process.", labels=["pid"]
        )
        rss = GaugeMetricFamily(
            "process_resident_memory_bytes", "Resident memory of a gateway process.", labels=["pid"]
        )
        fds = GaugeMetricFamily(
            "process_open_fds", "Open file descriptors of a gateway process.", labels=["pid"]
        )
        ticks = os.sysconf("SC_CLK_TCK")
        page = os.sysconf("SC_PAGE_SIZE")
        for pid in self._pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                open_fds = len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                continue
            label = [str(pid)]
            cpu.add_metric(label, (int(fields[11]) + int(fields[12])) / ticks)
            rss.add_metric(label, int(fields[21]) * page)
            fds.add_metric(label, open_fds)
        yield from (cpu, rss, fds)


def render() -> tuple[bytes, str]:
    """The exposition of every process of this host (or of this one without a shared dir)."""
    flush_local()
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        if Path("/proc/self/stat").exists():
            registry.register(HostProcesses(directory))
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
