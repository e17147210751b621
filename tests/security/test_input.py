"""Hostile input replayed against the real API over raw sockets: never a 500, never a trailing
newline or a foreign digit taken for a valid id, never an old event applied (issue 8, items 3,
7 and 10).

aiohttp's client refuses to send some of these (bytes that are not UTF-8 in a header), so each
request is written byte for byte on a socket.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import ADMIN_KEY, SEND_KEY, WEBHOOK_SECRET, register, text_message

PN = "555123456789"


class Answer:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines)
        }

    def json(self) -> Any:
        assert self.headers["content-type"].startswith("application/json"), self.headers
        return orjson.loads(self.body)

    def error_code(self) -> str:
        return str(self.json()["error"]["code"])


async def send_raw(
    client: TestClient[Any, Any],
    method: str,
    target: bytes,
    headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
    body: bytes = b"",
) -> Answer:
    """One HTTP/1.1 request written as the given bytes; the whole answer (the server closes)."""
    assert client.server.host is not None and client.server.port is not None
    lines = [
        method.encode() + b" " + target + b" HTTP/1.1",
        b"Host: 127.0.0.1",
        b"Connection: close",
        b"Content-Length: " + str(len(body)).encode(),
        *(name + b": " + value for name, value in headers),
    ]
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    return Answer(raw)


SEND_AUTH = (b"Authorization", b"Bearer " + SEND_KEY.encode())
ADMIN_AUTH = (b"Authorization", b"Bearer " + ADMIN_KEY.encode())
JSON = (b"Content-Type", b"application/json")


def sign(raw: bytes) -> bytes:
    return b"sha256=" + hmac.new(WEBHOOK_SECRET.encode(), raw, hashlib.sha256).hexdigest().encode()


def rfc3339(seconds_from_now: float) -> str:
    return datetime.fromtimestamp(time.time() + seconds_from_now, tz=UTC).isoformat()


async def queue_depth(client: TestClient[Any, Any]) -> int:
    answer = await send_raw(client, "GET", f"/v1/phone-numbers/{PN}".encode(), [ADMIN_AUTH])
    return sum(answer.json()["queue_depth"].values())


# --- item 3: unhandled 500s ---


@pytest.mark.parametrize(
    "signature", [b"sha256=\xff", b"sha256=" + b"\xe9" * 64, b"\xff\xfe", b"sha256=" + b"a" * 64]
)
async def test_a_signature_in_foreign_bytes_is_401(
    client: TestClient[Any, Any], signature: bytes
) -> None:
    body = orjson.dumps({"id": "e1", "type": "whatsapp.phone_number.created", "data": {}})
    answer = await send_raw(
        client, "POST", b"/v1/events", [JSON, (b"X-Signature-256", signature)], body
    )
    assert answer.status == 401
    assert answer.error_code() == "unauthorized"


@pytest.mark.parametrize("key", [b"\xff\xfe", b"caf\xc3\xa9", b"k" * 256])
async def test_an_idempotency_key_in_foreign_bytes_is_400(
    client: TestClient[Any, Any], key: bytes
) -> None:
    await register(client)
    answer = await send_raw(
        client,
        "POST",
        b"/v1/messages",
        [SEND_AUTH, JSON, (b"Idempotency-Key", key)],
        orjson.dumps(text_message()),
    )
    assert answer.status == 400
    assert answer.error_code() == "invalid_request"
    assert answer.json()["error"]["details"][0]["field"] == "Idempotency-Key"
    assert await queue_depth(client) == 0


@pytest.mark.parametrize(
    "query",
    [
        b"limit=%C2%B2",  # superscript two: str.isdigit() says yes, int() says no
        b"limit=%D9%A3",  # Arabic-Indic three
        b"limit=%EF%BC%91",  # fullwidth one
        b"limit=1%0A",
        b"limit=+5",
        b"limit=99999999999999999999999",
        b"cursor=%D9%A3%D9%A3",
        b"cursor=555%0A",
    ],
)
async def test_a_page_query_in_foreign_digits_is_400(
    client: TestClient[Any, Any], query: bytes
) -> None:
    await register(client)
    answer = await send_raw(client, "GET", b"/v1/phone-numbers?" + query, [ADMIN_AUTH])
    assert answer.status == 400, answer.body
    assert answer.error_code() == "invalid_request"


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def nested_text(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"body": "hi"}
    for _ in range(depth - 1):
        value = {"x": value}
    return value


@pytest.mark.parametrize("depth", [254, 400])
async def test_a_text_nested_too_deep_is_400_for_that_message_only(
    client: TestClient[Any, Any], depth: int
) -> None:
    await register(client)
    deep = text_message(text=nested_text(depth))
    # the standard library writes what orjson will not: the point of the test
    answer = await send_raw(client, "POST", b"/v1/messages", [SEND_AUTH, JSON], dumps(deep))
    assert answer.status == 400
    assert [d["field"] for d in answer.json()["error"]["details"]] == ["text"]
    for with_key in (False, True):
        headers = [SEND_AUTH, JSON]
        if with_key:
            headers.append((b"Idempotency-Key", b"deep-%d" % depth))
        answer = await send_raw(client, "POST", b"/v1/messages", headers, dumps(deep))
        assert answer.status == 400
    batch = {
        "messages": [
            text_message(),
            deep,
            {**deep, "idempotency_key": "deep"},
            text_message(idempotency_key="fine"),
        ]
    }
    answer = await send_raw(client, "POST", b"/v1/messages/batch", [SEND_AUTH, JSON], dumps(batch))
    assert answer.status == 200
    out = answer.json()
    assert (out["accepted"], out["rejected"]) == (2, 2)
    assert [r["error"]["code"] for r in out["results"][1:3]] == ["invalid_request"] * 2
    assert await queue_depth(client) == 2


@pytest.mark.parametrize(
    "body",
    [
        b'{"phone_number_id": "555123456789", "ttl_seconds": NaN}',
        b'{"phone_number_id": "555123456789", "ttl_seconds": Infinity}',
        b'{"phone_number_id": "555123456789", "ttl_seconds": 1e400}',
        b'{"phone_number_id": "555123456789", "to": "\\ud800"}',
        b'{"phone_number_id": "555123456789", "to": "\xff"}',
        b"[" * 2000 + b"]" * 2000,
    ],
)
async def test_json_that_is_not_json_is_invalid_json(
    client: TestClient[Any, Any], body: bytes
) -> None:
    for target in (b"/v1/messages", b"/v1/messages/batch"):
        answer = await send_raw(client, "POST", target, [SEND_AUTH, JSON], body)
        assert answer.status == 400
        assert answer.error_code() == "invalid_json"


@pytest.mark.parametrize(
    "ttl", [b"1000000000000000000000000000000", b"-1e30", b"1e300", b"2.5", b"true", b'"60"']
)
async def test_huge_or_odd_numbers_are_invalid_not_errors(
    client: TestClient[Any, Any], ttl: bytes
) -> None:
    await register(client)
    body = orjson.dumps(text_message())[:-1] + b',"ttl_seconds":' + ttl + b"}"
    answer = await send_raw(client, "POST", b"/v1/messages", [SEND_AUTH, JSON], body)
    assert answer.status == 400, answer.body
    assert [d["field"] for d in answer.json()["error"]["details"]] == ["ttl_seconds"]
    patch = b'{"max_mps":' + ttl + b"}"
    target = f"/v1/phone-numbers/{PN}".encode()
    answer = await send_raw(client, "PATCH", target, [ADMIN_AUTH, JSON], patch)
    assert answer.status == 400, answer.body
    assert [d["field"] for d in answer.json()["error"]["details"]] == ["max_mps"]


# --- item 7: whole matches, not `$` ---


@pytest.mark.parametrize("method", ["PUT", "PATCH", "GET", "DELETE"])
@pytest.mark.parametrize("path_id", [b"777%0A", b"777%0D%0A", b"%D9%A7%D9%A7", b"777%00"])
async def test_a_phone_number_id_with_a_trailing_newline_or_foreign_digits_is_400(
    client: TestClient[Any, Any], method: str, path_id: bytes
) -> None:
    body = b"{}" if method in ("PUT", "PATCH") else b""
    answer = await send_raw(
        client, method, b"/v1/phone-numbers/" + path_id, [ADMIN_AUTH, JSON], body
    )
    assert answer.status == 400, answer.body
    assert answer.error_code() == "invalid_request"
    listing = await send_raw(client, "GET", b"/v1/phone-numbers", [ADMIN_AUTH])
    assert listing.json()["data"] == []


@pytest.mark.parametrize(
    "fields",
    [
        {"to": "5491140123456\n"},
        {"to": "+5491140123456\n"},
        {"to": "\u0665\u0664\u0669\u0661\u0661\u0664\u0660\u0661\u0662\u0663"},
        {"phone_number_id": PN + "\n"},
    ],
)
async def test_a_message_with_a_trailing_newline_is_400(
    client: TestClient[Any, Any], fields: dict[str, str]
) -> None:
    await register(client)
    body = orjson.dumps(text_message(**fields))
    answer = await send_raw(client, "POST", b"/v1/messages", [SEND_AUTH, JSON], body)
    assert answer.status == 400
    assert [d["field"] for d in answer.json()["error"]["details"]] == list(fields)
    assert await queue_depth(client) == 0


async def test_a_message_id_with_a_trailing_newline_is_not_found(
    client: TestClient[Any, Any],
) -> None:
    await register(client)
    sent = await send_raw(
        client, "POST", b"/v1/messages", [SEND_AUTH, JSON], orjson.dumps(text_message())
    )
    message_id = sent.json()["id"].encode()
    for method in ("GET", "DELETE"):
        answer = await send_raw(client, method, b"/v1/messages/" + message_id + b"%0A", [SEND_AUTH])
        assert answer.status == 404
        assert answer.error_code() == "not_found"
    found = await send_raw(client, "GET", b"/v1/messages/" + message_id, [SEND_AUTH])
    assert found.json()["status"] == "queued"


# --- item 10: replayed events ---


async def test_a_captured_event_replayed_after_7_days_is_stale(
    client: TestClient[Any, Any],
) -> None:
    await register(client)
    captured = orjson.dumps(
        {
            "id": "evt_captured",
            "type": "whatsapp.phone_number.deleted",
            "created_at": rfc3339(-8 * 86400),
            "data": {"phone_number_id": PN},
        }
    )
    answer = await send_raw(
        client, "POST", b"/v1/events", [JSON, (b"X-Signature-256", sign(captured))], captured
    )
    assert answer.status == 400
    assert answer.error_code() == "stale_event"
    number = await send_raw(client, "GET", f"/v1/phone-numbers/{PN}".encode(), [ADMIN_AUTH])
    assert number.json()["status"] == "active"


async def test_an_event_without_created_at_is_400(client: TestClient[Any, Any]) -> None:
    raw = orjson.dumps(
        {"id": "evt_x", "type": "whatsapp.phone_number.deleted", "data": {"phone_number_id": PN}}
    )
    answer = await send_raw(
        client, "POST", b"/v1/events", [JSON, (b"X-Signature-256", sign(raw))], raw
    )
    assert answer.status == 400
    assert [d["field"] for d in answer.json()["error"]["details"]] == ["created_at"]
