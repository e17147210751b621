"""The sandbox's HTTP server: `POST /{version}/{phone_number_id}/messages` and `/_sandbox/*`."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import os
import time
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

import orjson
from aiohttp import web

from gateway.sandbox.faults import Answer, FaultError, Faults
from gateway.sandbox.statuses import STATUSES, StatusConfig, StatusWebhooks, status_loop

RATE_CACHE_S = 1.0
WINDOW_S = 1.0
# Meta's pair rate is "about" one message per interval: arrivals may come this share of an
# interval early (network jitter on paced sends) before 131056.
PAIR_TOLERANCE = 0.1
PAIR_MEMORY = 100_000  # pairs remembered before the idle ones are forgotten
# A token at least this long shows its first characters when masked (Meta's start with `EAA`,
# which tells a user token from another kind); a shorter one would give too much of itself away.
MASK_PREFIX_MIN_LENGTH = 20
MASK_PREFIX = 4

# Meta's messages for the codes the sandbox answers with.
_MESSAGES = {
    1: ("An unknown error occurred", "OAuthException"),
    2: ("Service temporarily unavailable", "OAuthException"),
    4: ("(#4) Application request limit reached", "OAuthException"),
    33: ("Unsupported post request: the phone number does not exist", "GraphMethodException"),
    100: ("(#100) Invalid parameter", "OAuthException"),
    190: ("Invalid OAuth access token - Cannot parse access token", "OAuthException"),
    368: ("Temporarily blocked for policies violations", "OAuthException"),
    80007: ("(#80007) Rate limit issues", "OAuthException"),
    130429: ("(#130429) Rate limit hit", "OAuthException"),
    131000: ("Something went wrong", "OAuthException"),
    131016: ("Service unavailable", "OAuthException"),
    131026: ("Message undeliverable", "OAuthException"),
    131056: ("(Business Account, Consumer Account) pair rate limit hit", "OAuthException"),
    131057: ("Account in maintenance mode", "OAuthException"),
}


class RateSource(Protocol):
    async def rate_for(self, phone_number_id: str) -> int | None:
        """Messages per sliding second for the number; None = unlimited."""


class StaticRates:
    """Rates set by hand (or `PUT /_sandbox/numbers/{pn}`), with a default for the rest."""

    def __init__(self, default: int | None = None) -> None:
        self.default = default
        self.rates: dict[str, int | None] = {}

    def set(self, phone_number_id: str, rate: int | None) -> None:
        self.rates[phone_number_id] = rate

    async def rate_for(self, phone_number_id: str) -> int | None:
        return self.rates.get(phone_number_id, self.default)


class Record(NamedTuple):
    """One request the sandbox received (kept as a plain tuple: see `Sandbox.keep`)."""

    time: float
    phone_number_id: str
    outcome: str
    token: str
    body: bytes


class Sandbox:
    """The state behind the routes: rate windows, faults and recordings."""

    def __init__(
        self,
        rates: RateSource,
        record_limit: int,
        pair_interval_s: float = 0.0,
        pair_burst: int = 1,
    ) -> None:
        self.rates = rates
        # Meta's pair rate (0: not enforced): a GCRA per (number, user), theoretical arrival times
        self.pair_interval = pair_interval_s
        self.pair_tau = pair_interval_s * (pair_burst - 1)
        self.pairs: dict[tuple[str, str], float] = {}
        self.records: deque[tuple[float, str, str, str, bytes]] = deque(maxlen=record_limit)
        # (outcome, phone_number_id) -> records kept: what tests poll, without a pass over all
        self.counts: Counter[tuple[str, str]] = Counter()
        self.windows: dict[str, deque[float]] = {}
        self.rate_cache: dict[str, tuple[float, int | None]] = {}
        self.faults = Faults()
        self.ids = itertools.count(1)
        self.prefix = base64.urlsafe_b64encode(os.urandom(6)).decode()

    async def rate_for(self, pn: str, now: float) -> int | None:
        cached = self.rate_cache.get(pn)
        if cached is not None and now - cached[0] < RATE_CACHE_S:
            return cached[1]
        rate = await self.rates.rate_for(pn)
        self.rate_cache[pn] = (now, rate)
        return rate

    def admit(self, pn: str, now: float, rate: int | None) -> bool:
        """Count an arrival in the number's sliding second; False beyond its rate."""
        if rate is None:
            return True
        window = self.windows.get(pn)
        if window is None:
            window = self.windows[pn] = deque()
        while window and now - window[0] >= WINDOW_S:
            window.popleft()
        if len(window) >= rate:
            return False
        window.append(now)
        return True

    def admit_pair(self, pn: str, to: str, now: float) -> bool:
        """Count a message to `to` against its pair allowance; False beyond it (131056)."""
        if self.pair_interval <= 0:
            return True
        if len(self.pairs) > PAIR_MEMORY:
            self.pairs = {pair: tat for pair, tat in self.pairs.items() if tat > now}
        pair = (pn, to.lstrip("+"))
        tat = max(self.pairs.get(pair, now), now)
        if tat - self.pair_tau > now + PAIR_TOLERANCE * self.pair_interval:
            return False
        self.pairs[pair] = tat + self.pair_interval
        return True

    def keep(self, record: Record) -> None:
        """Record a request, as a plain tuple of plain values.

        The garbage collector stops tracking such a tuple (never a NamedTuple), so tens of
        thousands of records add nothing to a full collection: kept as `Record`s they made one
        take 20-40 ms, a stall no real Cloud API has, which bunched the answers a worker got.
        """
        if len(self.records) == self.records.maxlen:
            oldest = Record._make(self.records[0])
            self.counts[(oldest.outcome, oldest.phone_number_id)] -= 1
        time_, pn, outcome, token, body = record
        self.records.append((time_, pn, outcome, token, body))
        self.counts[(record.outcome, record.phone_number_id)] += 1

    def recorded(self) -> Iterator[Record]:
        return map(Record._make, self.records)

    def forget(self) -> None:
        self.records.clear()
        self.counts.clear()
        self.windows.clear()
        self.pairs.clear()

    def wamid(self) -> str:
        raw = f"{self.prefix}.{next(self.ids)}".encode()
        return "wamid." + base64.urlsafe_b64encode(raw).decode().rstrip("=")


SANDBOX = web.AppKey("sandbox", Sandbox)


def meta_error(status: int, code: int, message: str | None = None) -> web.Response:
    default_message, kind = _MESSAGES.get(code, ("Error", "OAuthException"))
    body = {
        "error": {
            "message": message or default_message,
            "type": kind,
            "code": code,
            "fbtrace_id": base64.urlsafe_b64encode(os.urandom(9)).decode(),
        }
    }
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _problem(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    if body.get("messaging_product") != "whatsapp":
        return "messaging_product must be whatsapp"
    if not isinstance(body.get("to"), str) or not body["to"]:
        return "to is required"
    kind = body.get("type")
    if not isinstance(kind, str) or not isinstance(body.get(kind), dict):
        return "type and the object it names are required"
    return None


async def send_message(request: web.Request) -> web.Response:
    now = time.monotonic()
    sandbox = request.app[SANDBOX]
    pn = request.match_info["phone_number_id"]
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    raw = await request.read()

    def record(outcome: str) -> None:
        sandbox.keep(Record(now, pn, outcome, token, raw))

    if not token:
        record("error:190")
        return meta_error(401, 190)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    problem = _problem(body)
    if problem is not None:
        record("error:100")
        return meta_error(400, 100, f"(#100) Invalid parameter: {problem}")

    faults = sandbox.faults
    forced: Answer | None = faults.forced(pn)
    delay = faults.delay_s() + (forced.timeout_ms / 1000.0 if forced else 0.0)
    if delay > 0:
        await asyncio.sleep(delay)
    if forced is not None and forced.status != 200:
        code = forced.code if forced.code is not None else (2 if forced.status >= 500 else 100)
        record(f"error:{code}")
        return meta_error(forced.status, code)
    if not sandbox.admit(pn, now, await sandbox.rate_for(pn, now)):
        record("throttled")
        return meta_error(400, 130429)
    if not sandbox.admit_pair(pn, body["to"], now):
        record("error:131056")
        return meta_error(400, 131056)
    record("ok")
    wamid = sandbox.wamid()
    statuses = request.app.get(STATUSES)
    if statuses is not None:
        statuses.accepted(pn, wamid, body)
    answer = {
        "messaging_product": "whatsapp",
        "contacts": [{"input": body["to"], "wa_id": body["to"].lstrip("+")}],
        "messages": [{"id": wamid}],
    }
    return web.Response(body=orjson.dumps(answer), content_type="application/json")


def mask_token(token: str) -> str:
    """How `/_sandbox/requests` shows an access token: never the token itself.

    8 hex digits of its SHA-256 tell tokens apart (a test compares `mask_token(expected)`),
    after the first 4 characters of a long one; `""` stays `""` (no token was sent).
    """
    if not token:
        return ""
    digest = hashlib.sha256(token.encode()).hexdigest()[:8]
    prefix = token[:MASK_PREFIX] if len(token) >= MASK_PREFIX_MIN_LENGTH else ""
    return f"{prefix}…{digest}"


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def arrivals(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX]
    pn = request.query.get("phone_number_id")
    outcome = request.query.get("outcome", "ok")
    if pn is None:
        counts = {p: n for (o, p), n in sandbox.counts.items() if o == outcome and n}
        return _json({"numbers": counts})
    times = [r.time for r in sandbox.recorded() if r.phone_number_id == pn and r.outcome == outcome]
    return _json({"phone_number_id": pn, "times": times})


async def requests(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX]
    pn = request.query.get("phone_number_id")
    limit = int(request.query.get("limit", "100"))
    chosen = [r for r in sandbox.recorded() if pn is None or r.phone_number_id == pn][-limit:]
    out = []
    for r in chosen:
        try:
            body = orjson.loads(r.body)
        except orjson.JSONDecodeError:
            body = r.body.decode(errors="replace")
        out.append(
            {
                "path": f"/{r.phone_number_id}/messages",
                "phone_number_id": r.phone_number_id,
                # Masked: whoever can read the sandbox must not learn the numbers' tokens.
                "token": mask_token(r.token),
                "body": body,
                "outcome": r.outcome,
                "time": r.time,
            }
        )
    return _json({"requests": out})


async def clear_records(request: web.Request) -> web.Response:
    request.app[SANDBOX].forget()
    return _json({"cleared": True})


async def set_number(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX]
    if not isinstance(sandbox.rates, StaticRates):
        return _json({"error": "rates come from the gateway's registry here"}, 409)
    body = await request.json()
    mps = body.get("mps") if isinstance(body, dict) else None
    if mps is not None and (not isinstance(mps, int) or mps < 1):
        return _json({"error": "mps must be a positive integer or null"}, 400)
    pn = request.match_info["phone_number_id"]
    sandbox.rates.set(pn, mps)
    sandbox.rate_cache.pop(pn, None)
    return _json({"phone_number_id": pn, "mps": mps})


async def put_faults(request: web.Request) -> web.Response:
    try:
        faults = Faults.parse(await request.json())
    except (FaultError, ValueError) as exc:
        return _json({"error": str(exc)}, 400)
    request.app[SANDBOX].faults = faults
    return _json(faults.as_dict())


async def get_faults(request: web.Request) -> web.Response:
    return _json(request.app[SANDBOX].faults.as_dict())


async def clear_faults(request: web.Request) -> web.Response:
    request.app[SANDBOX].faults = Faults()
    return _json(Faults().as_dict())


async def webhook_stats(request: web.Request) -> web.Response:
    """What the status webhooks did: planned, posted, retries, dropped, abandoned, pending."""
    statuses = request.app.get(STATUSES)
    return _json({"enabled": statuses is not None, **(statuses.stats() if statuses else {})})


async def stats(request: web.Request) -> web.Response:
    records = list(request.app[SANDBOX].recorded())
    by_number: dict[str, Counter[str]] = {}
    for r in records:
        by_number.setdefault(r.phone_number_id, Counter())[r.outcome] += 1
    return _json(
        {
            "outcomes": dict(Counter(r.outcome for r in records)),
            "numbers": {pn: dict(c) for pn, c in by_number.items()},
        }
    )


def create_sandbox_app(
    rates: RateSource | None = None,
    *,
    record_limit: int = 1_000_000,
    statuses: StatusConfig | None = None,
    pair_interval_s: float = 0.0,
    pair_burst: int = 1,
) -> web.Application:
    """The sandbox app; with `statuses`, it posts Meta's status webhooks for what it accepts.

    With a `pair_interval_s`, it enforces Meta's pair rate (131056 beyond the allowance).
    """
    app = web.Application()
    app[SANDBOX] = Sandbox(rates or StaticRates(), record_limit, pair_interval_s, pair_burst)
    if statuses is not None:
        app[STATUSES] = StatusWebhooks(statuses)
        app.cleanup_ctx.append(status_loop)
    app.router.add_post("/{version}/{phone_number_id}/messages", send_message)
    app.router.add_post("/{phone_number_id}/messages", send_message)
    app.router.add_get("/_sandbox/arrivals", arrivals)
    app.router.add_get("/_sandbox/requests", requests)
    app.router.add_delete("/_sandbox/records", clear_records)
    app.router.add_put("/_sandbox/numbers/{phone_number_id}", set_number)
    app.router.add_put("/_sandbox/faults", put_faults)
    app.router.add_get("/_sandbox/faults", get_faults)
    app.router.add_delete("/_sandbox/faults", clear_faults)
    app.router.add_get("/_sandbox/stats", stats)
    app.router.add_get("/_sandbox/webhooks", webhook_stats)
    return app


async def start_sandbox(
    host: str,
    port: int,
    rates: RateSource | None = None,
    statuses: StatusConfig | None = None,
    *,
    pair_interval_s: float = 0.0,
    pair_burst: int = 1,
) -> tuple[web.AppRunner, str]:
    """Serve the sandbox on host:port (0: a free port); the runner and the upstream base URL."""
    app = create_sandbox_app(
        rates, statuses=statuses, pair_interval_s=pair_interval_s, pair_burst=pair_burst
    )
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = runner.addresses[0][1]  # the port actually bound when 0 was asked for
    return runner, f"http://{host}:{bound}/v21.0"
