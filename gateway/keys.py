"""Every Redis key name the gateway uses, in one place.

Phone numbers are spread over `shards` virtual shards (`crc32(phone_number_id) % shards`). Every
key of a shard starts with the shard's prefix `{gw:sN}:`, whose hash tag puts all of them in one
Redis Cluster slot, so each Lua script touches one slot. Scripts receive that prefix as KEYS[1]
and build the shard's key names with the functions of `lua_prelude()`, which is generated from
the same templates as the Python functions below: a name is defined once, here.

Per shard (`{gw:sN}:` + ...):
    q:<pn>:<list>   LIST  queued message ids. <list> is the lane (h, n, l), with an "m" suffix for
                          marketing messages (hm, nm, lm) so quality red can hold them apart.
    m:<id>          HASH  one message (its fields: the top of `store/lua/lib.lua`).
    cfg:<pn>        HASH  the phone number: its record and its drain state (`ls`: the lane lists
                          it has queued to, lib.lua LIST_LETTER).
    rl:<pn>         LIST  sliding-window grant times (ms), newest first: the rate's entries and
                          up to a few chunks more (trimmed now and then); its expiry (ms) is
                          kept in cfg `lx`, renewed by take.lua when it runs low.
    retry:<pn>      ZSET  message id -> due time (ms) of a message waiting to be retried.
    sched:<pn>      ZSET  "<accept sequence>:<message id>" -> send_at (ms) of a scheduled message;
                          the sequence (15 digits, per number) keeps those due together in
                          accept order.
    sent:<pn>       HASH  epoch second -> messages sent, for `sent_last_minute`.
    pr:<pn>:<user>  STRING  a (number, recipient) pair, "<holder> <tat> <parked>": the message
                          holding it (in flight, or waiting for a retry or its pair allowance;
                          '' none), its GCRA theoretical arrival time (ms; '' none) and how many
                          messages are parked behind it; expires when the pair is idle (lib.lua).
    pk:<pn>:<user>  LIST  message ids parked behind the pair's holder, in lane order.
    idem:<scope>:<key>  STRING  first response of an idempotent send (24 h).
    ready           ZSET  pn -> time (whole ms, rounded up) from which the number may send next.
    lease           ZSET  "<message id>#<fence>" -> lease deadline (whole ms) of messages handed
                          to a worker: one member per attempt (take.lua), all that marks a
                          message `sending` (lib.lua, attempt_of), and one member scored +inf
                          that keeps the set a skiplist.
    wake            LIST  at most one token: "something in this shard became ready".
    owner           STRING  id of the worker process draining this shard (short lease).
    successor       STRING  id of a worker that asked for this shard: its owner hands it over
                            at its next renewal (short lease).
    members         ZSET  (shard 0 only) worker id -> heartbeat deadline (ms), server clock.
    w:<wamid>       STRING  the id of the message Meta knows as <wamid> (shard of its number);
                            kept as long as the message's status.
    wh:<wamid>      LIST  Meta statuses for a wamid no message has yet (`GATEWAY_RECEIPT_HOLD`).
    in:<pn>:<user>  STRING  when <user> last wrote to <pn> (ms): the 24 h service window.
    outbox          ZSET  event id -> due time (ms) of status callbacks: each message's first
                          pending event only (see `events`).
    ev:<eid>        HASH  one status callback event (fields in lib.lua, `emit_event`).
    evq:<id>        LIST  a message's later event ids, waiting for the one on the outbox.
    cbwake          LIST  at most one token: "an event became due in this shard's outbox".
Fleet-wide (`{gw:fleet}:` + ..., one hash tag: its script gets that prefix as KEYS[1]):
    up              ZSET  the upstream cap (`GATEWAY_UPSTREAM_MAX_MPS`): one member per send
                          slot reserved ("<worker id>:<serial>") -> the latest stamp (ms, server
                          clock) the send it stands for can have (see fleet.lua).
    pace            STRING  the cap's pacing: the theoretical time (ms) of the next slot (GCRA).
Global (own slots; never used inside a script):
    gw:numbers           ZSET   every registered phone_number_id (score 0, ordered by name).
    gw:idem:<scope>:<key> STRING pn and body hash of an idempotency key, to detect reuse.
    gw:event:<id>        STRING a webhook event id already applied (7 days).
    gw:gauges:leader     STRING the process that publishes the Redis gauges (short lease).
"""

from __future__ import annotations

import re
import zlib

NAMESPACE = "gw"

# Lanes in drain order. A lane list name is the lane, plus "m" for marketing messages.
LANES: tuple[str, ...] = ("h", "n", "l")
LANE_NAMES: dict[str, str] = {"h": "high", "n": "normal", "l": "low"}
LANE_CODES: dict[str, str] = {v: k for k, v in LANE_NAMES.items()}
LANE_LISTS: tuple[str, ...] = ("h", "hm", "n", "nm", "l", "lm")

# Templates of per-shard key names, relative to the shard prefix. `{x}` is an argument.
_SHARD_TEMPLATES: dict[str, str] = {
    "lane": "q:{pn}:{lane}",
    "msg": "m:{id}",
    "cfg": "cfg:{pn}",
    "window": "rl:{pn}",
    "retry": "retry:{pn}",
    "sched": "sched:{pn}",
    "sent": "sent:{pn}",
    "pair": "pr:{pn}:{user}",
    "parked": "pk:{pn}:{user}",
    "idem": "idem:{scope}:{key}",
    "ready": "ready",
    "lease": "lease",
    "wake": "wake",
    "owner": "owner",
    "successor": "successor",
    "members": "members",
    "wamid": "w:{wamid}",
    "held": "wh:{wamid}",
    "inbound": "in:{pn}:{user}",
    "outbox": "outbox",
    "cbevent": "ev:{eid}",
    "cbqueue": "evq:{id}",
    "cbwake": "cbwake",
}

# Templates of the fleet-wide key names, relative to the fleet prefix (in Lua, to P as well).
_FLEET_TEMPLATES: dict[str, str] = {
    "upstream_sends": "up",
    "upstream_pace": "pace",
}

NUMBERS = f"{NAMESPACE}:numbers"
GAUGES_LEADER = f"{NAMESPACE}:gauges:leader"


def shard_of(phone_number_id: str, shards: int) -> int:
    return zlib.crc32(phone_number_id.encode()) % shards


def prefix(shard: int) -> str:
    return f"{{{NAMESPACE}:s{shard}}}:"


def fleet_prefix() -> str:
    """The prefix of the fleet-wide keys: a hash tag of their own, apart from every shard."""
    return f"{{{NAMESPACE}:fleet}}:"


def upstream_sends() -> str:
    return f"{fleet_prefix()}up"


def upstream_pace() -> str:
    return f"{fleet_prefix()}pace"


def lane(shard: int, pn: str, lane_list: str) -> str:
    return f"{prefix(shard)}q:{pn}:{lane_list}"


def msg(shard: int, message_id: str) -> str:
    return f"{prefix(shard)}m:{message_id}"


def cfg(shard: int, pn: str) -> str:
    return f"{prefix(shard)}cfg:{pn}"


def window(shard: int, pn: str) -> str:
    return f"{prefix(shard)}rl:{pn}"


def retry(shard: int, pn: str) -> str:
    return f"{prefix(shard)}retry:{pn}"


def scheduled(shard: int, pn: str) -> str:
    return f"{prefix(shard)}sched:{pn}"


def sent(shard: int, pn: str) -> str:
    return f"{prefix(shard)}sent:{pn}"


def pair(shard: int, pn: str, user: str) -> str:
    return f"{prefix(shard)}pr:{pn}:{user}"


def parked(shard: int, pn: str, user: str) -> str:
    return f"{prefix(shard)}pk:{pn}:{user}"


def ready(shard: int) -> str:
    return f"{prefix(shard)}ready"


def lease(shard: int) -> str:
    return f"{prefix(shard)}lease"


def wake(shard: int) -> str:
    return f"{prefix(shard)}wake"


def owner(shard: int) -> str:
    return f"{prefix(shard)}owner"


def successor(shard: int) -> str:
    return f"{prefix(shard)}successor"


def members() -> str:
    return f"{prefix(0)}members"


def wamid(shard: int, upstream_id: str) -> str:
    return f"{prefix(shard)}w:{upstream_id}"


def held(shard: int, upstream_id: str) -> str:
    return f"{prefix(shard)}wh:{upstream_id}"


def inbound(shard: int, pn: str, user: str) -> str:
    return f"{prefix(shard)}in:{pn}:{user}"


def outbox(shard: int) -> str:
    return f"{prefix(shard)}outbox"


def cbevent(shard: int, event_id: str) -> str:
    return f"{prefix(shard)}ev:{event_id}"


def cbqueue(shard: int, message_id: str) -> str:
    return f"{prefix(shard)}evq:{message_id}"


def cbwake(shard: int) -> str:
    return f"{prefix(shard)}cbwake"


def idempotency_marker(scope: str, key: str) -> str:
    return f"{NAMESPACE}:idem:{scope}:{key}"


def event(event_id: str) -> str:
    return f"{NAMESPACE}:event:{event_id}"


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _lua_expression(template: str) -> str:
    """`q:{pn}:{lane}` -> `P .. 'q:' .. pn .. ':' .. lane`."""
    parts = ["P"]
    position = 0
    for match in _PLACEHOLDER.finditer(template):
        if match.start() > position:
            parts.append(repr(template[position : match.start()]))
        parts.append(match.group(1))
        position = match.end()
    if position < len(template):
        parts.append(repr(template[position:]))
    return " .. ".join(parts)


def lua_prelude() -> str:
    """Lua functions `key_<name>(...)` building this module's names from KEYS[1]: a shard's
    prefix (the per-shard names) or the fleet prefix (the fleet-wide ones, fleet.lua only)."""
    lines = ["-- generated by gateway/keys.py: per-shard key names", "local P = KEYS[1]"]
    for name, template in (_SHARD_TEMPLATES | _FLEET_TEMPLATES).items():
        args = ", ".join(_PLACEHOLDER.findall(template))
        lines.append(f"local function key_{name}({args}) return {_lua_expression(template)} end")
    return "\n".join(lines) + "\n"


def _check_templates() -> None:
    # The Python builders above must agree with the templates the Lua prelude uses.
    sample = {
        "pn": "1",
        "lane": "h",
        "id": "x",
        "scope": "s",
        "key": "k",
        "wamid": "w",
        "user": "u",
        "eid": "e",
    }
    builders = {
        "lane": lane(0, "1", "h"),
        "msg": msg(0, "x"),
        "cfg": cfg(0, "1"),
        "window": window(0, "1"),
        "retry": retry(0, "1"),
        "sched": scheduled(0, "1"),
        "sent": sent(0, "1"),
        "pair": pair(0, "1", "u"),
        "parked": parked(0, "1", "u"),
        "ready": ready(0),
        "lease": lease(0),
        "wake": wake(0),
        "owner": owner(0),
        "successor": successor(0),
        "members": members(),
        "wamid": wamid(0, "w"),
        "held": held(0, "w"),
        "inbound": inbound(0, "1", "u"),
        "outbox": outbox(0),
        "cbevent": cbevent(0, "e"),
        "cbqueue": cbqueue(0, "x"),
        "cbwake": cbwake(0),
    }
    for name, built in builders.items():
        expected = prefix(0) + _SHARD_TEMPLATES[name].format(**sample)
        assert built == expected, (name, built, expected)
    assert upstream_sends() == fleet_prefix() + _FLEET_TEMPLATES["upstream_sends"]
    assert upstream_pace() == fleet_prefix() + _FLEET_TEMPLATES["upstream_pace"]


_check_templates()
