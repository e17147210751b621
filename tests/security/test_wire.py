"""The HTTP layer under hostile clients, against the real `gateway api` process over raw sockets.

Malformed HTTP cannot be sent with an HTTP client library, so every request here is bytes on a
socket. Each gateway runs at DEBUG level, so that whatever any logger might say about a hostile
request reaches its output, which the tests search for the key they presented.
"""

from __future__ import annotations

import asyncio
import io
import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
import yarl
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.api.app import create_app
from gateway.api.http import BODY_TIMEOUT_S
from gateway.api.wire import HEAD_TIMEOUT_S, LINGER_S, SERVER_NAME
from gateway.errors import StoreUnavailable
from gateway.ids import new_id
from gateway.logs import SecretScrubber, Throttled, scrub, untrusted
from gateway.settings import Settings
from gateway.store import Store
from tests.acceptance.commands import Command, clean_env
from tests.conftest import SEND
from tests.servers import RedisServer, free_port

# Deadlines are asserted with room for a busy two-core machine: the point is seconds, not minutes.
SLACK_S = 20.0


@dataclass
class Gateway:
    """`gateway api` over a given Redis, with keys that look like generated ones."""

    workdir: Path
    redis_url: str
    port: int = field(default_factory=free_port)
    send_key: str = field(default_factory=lambda: "gws_" + secrets.token_urlsafe(24))
    admin_key: str = field(default_factory=lambda: "gwa_" + secrets.token_urlsafe(24))
    command: Command | None = None

    def start(self) -> Gateway:
        env = clean_env(
            GATEWAY_PORT=str(self.port),
            GATEWAY_WORKERS="1",
            GATEWAY_REDIS_URL=self.redis_url,
            GATEWAY_API_KEYS=self.send_key,
            GATEWAY_ADMIN_KEYS=self.admin_key,
            GATEWAY_WEBHOOK_SECRET="gwh_" + secrets.token_urlsafe(24),
            GATEWAY_LOG_LEVEL="DEBUG",
        )
        self.command = Command(["api"], env, self.workdir).start()
        self.command.wait_http(f"http://127.0.0.1:{self.port}/healthz", within_s=30)
        return self

    def stop(self) -> None:
        if self.command is not None:
            self.command.stop()

    def output(self) -> str:
        assert self.command is not None
        return self.command.output()

    def assert_no_secret_logged(self) -> None:
        output = self.output()
        assert self.send_key not in output and self.admin_key not in output, output
        assert self.send_key[4:] not in output and self.admin_key[4:] not in output


@pytest.fixture(scope="module")
def gateway(
    shared_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gw = Gateway(tmp_path_factory.mktemp("wire"), shared_redis.url)
    try:
        yield gw.start()
    finally:
        gw.stop()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, str]:
        assert self.headers["content-type"].startswith("application/json"), self
        document = orjson.loads(self.body)
        assert set(document) == {"error"}, document
        assert {"code", "message"} <= set(document["error"]), document
        error: dict[str, str] = document["error"]
        return error


async def read_answer(reader: asyncio.StreamReader, within_s: float = 15.0) -> Answer:
    raw_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), within_s)
    status_line, *lines = raw_head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), within_s)
    return Answer(int(status_line.split()[1]), headers, body)


async def closed_within(reader: asyncio.StreamReader, within_s: float) -> bytes:
    """What the server still sent before it closed the connection (which it must, in time)."""
    rest = b""
    async with asyncio.timeout(within_s):
        try:
            while chunk := await reader.read(65536):
                rest += chunk
        except ConnectionError:
            pass
    return rest


async def exchange(port: int, raw: bytes) -> tuple[Answer, bytes]:
    """Send `raw`, read one answer, then wait for the server to close; the answer and the rest."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        answer = await read_answer(reader)
        return answer, await closed_within(reader, HEAD_TIMEOUT_S + SLACK_S)
    finally:
        writer.close()


def head(method: str, path: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway", *headers, "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


# --- item 4: malformed HTTP is answered in JSON, echoes nothing and logs no secret -----------


def hostile_requests(key: str) -> dict[str, bytes]:
    auth = f"Authorization: Bearer {key}\r\n".encode()
    return {
        "nul in a header": b"GET /healthz HTTP/1.1\r\nHost: g\r\n" + auth + b"X-A: a\x00b\r\n\r\n",
        "bare LF line endings": b"GET /healthz HTTP/1.1\nHost: g\n"
        + auth.replace(b"\r", b"")
        + b"\n",
        "oversize header": b"GET /v1/messages/x HTTP/1.1\r\nHost: g\r\n"
        + auth
        + b"X-Big: "
        + b"a" * 9000
        + b"\r\n\r\n",
        "key in an oversize line": b"GET /healthz HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer "
        + key.encode()
        + b"a" * 9000
        + b"\r\n\r\n",
        "too many headers": b"GET /healthz HTTP/1.1\r\n"
        + auth
        + b"".join(b"X-%d: v\r\n" % i for i in range(200))
        + b"\r\n",
        "bad request line": b"G\x01T /healthz?Bearer "
        + key.encode()
        + b" HTTP/1.1\r\n"
        + auth
        + b"\r\n",
        "bad version": b"GET /healthz HTTP/9.Z\r\nHost: g\r\n" + auth + b"\r\n",
        "space before colon": b"GET /healthz HTTP/1.1\r\nHost: g\r\nAuthorization : Bearer "
        + key.encode()
        + b"\r\n\r\n",
        "length and chunked": b"POST /v1/messages HTTP/1.1\r\nHost: g\r\n"
        + auth
        + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "bad chunk size": b"POST /v1/messages HTTP/1.1\r\nHost: g\r\n"
        + auth
        + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"ZZ\r\n{}\r\n0\r\n\r\n",
        # Sent after a good request on the same connection.
        "second request malformed": b"GET /healthz HTTP/1.1\r\nHost: g\r\n"
        + auth
        + b"X-A: \x01\r\n\r\n",
    }


CASES = list(hostile_requests("k"))


@pytest.mark.parametrize("case", CASES)
async def test_malformed_http_is_answered_in_json_echoing_and_logging_nothing(
    gateway: Gateway, case: str
) -> None:
    raw = hostile_requests(gateway.send_key)[case]
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        if case == "second request malformed":
            writer.write(head("GET", "/healthz"))
            assert (await read_answer(reader)).status == 200
        writer.write(raw)
        await writer.drain()
        answer = await read_answer(reader)
        rest = await closed_within(reader, HEAD_TIMEOUT_S + SLACK_S)
    finally:
        writer.close()
    assert answer.status == 400, answer
    assert answer.error()["code"] == "invalid_request"
    assert answer.headers["server"] == SERVER_NAME
    everything = answer.body + rest + str(answer.headers).encode()
    assert gateway.send_key.encode() not in everything
    assert b"Bearer" not in everything and b"X-Big" not in everything
    gateway.assert_no_secret_logged()


# --- item 3 (a header byte that is not UTF-8) and item 12 (headers of errors) ----------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/messages/x"), ("POST", "/v1/messages"), ("GET", "/v1/phone-numbers")],
)
async def test_a_bearer_key_that_is_not_utf8_is_401(
    gateway: Gateway, method: str, path: str
) -> None:
    raw = head(method, path, "Content-Length: 0", "Connection: close").replace(
        b"Host: gateway\r\n", b"Host: gateway\r\nAuthorization: Bearer \xff\xfe\r\n"
    )
    answer, _ = await exchange(gateway.port, raw)
    assert answer.status == 401
    assert answer.error()["code"] == "unauthorized"
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert "unhandled" not in gateway.output()


async def test_a_401_carries_its_bearer_challenge(gateway: Gateway) -> None:
    answer, _ = await exchange(gateway.port, head("GET", "/v1/messages/x", "Connection: close"))
    assert answer.status == 401
    assert answer.headers["www-authenticate"] == 'Bearer realm="whatsapp-gateway"'


async def test_a_405_carries_allow(gateway: Gateway) -> None:
    answer, _ = await exchange(gateway.port, head("PATCH", "/healthz", "Connection: close"))
    assert answer.status == 405
    assert answer.error()["code"] == "method_not_allowed"
    assert set(answer.headers["allow"].split(",")) == {"GET", "HEAD"}
    auth = f"Authorization: Bearer {gateway.admin_key}"
    answer, _ = await exchange(
        gateway.port, head("POST", "/v1/messages/1-x", auth, "Connection: close")
    )
    assert answer.status == 405
    assert set(answer.headers["allow"].split(",")) == {"GET", "HEAD", "DELETE"}


@pytest.mark.parametrize("path", ["/healthz", "/nowhere", "/v1/messages/x"])
async def test_the_server_header_names_no_versions(gateway: Gateway, path: str) -> None:
    answer, _ = await exchange(gateway.port, head("GET", path, "Connection: close"))
    assert answer.headers["server"] == SERVER_NAME


# --- item 12: bodies read no further than the route's limit; charsets ------------------------


async def test_a_chunked_single_send_stops_reading_at_64_kib(gateway: Gateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(
            head(
                "POST",
                "/v1/messages",
                f"Authorization: Bearer {gateway.send_key}",
                "Content-Type: application/json",
                "Transfer-Encoding: chunked",
            )
        )
        chunk = b"x" * 16384
        for _ in range(6):  # 96 KiB, and no last chunk: the answer cannot wait for the end
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await writer.drain()
        answer = await read_answer(reader)
        await closed_within(reader, LINGER_S + SLACK_S)
    finally:
        writer.close()
    assert answer.status == 413
    assert "64 KiB" in answer.error()["message"]
    assert answer.headers["connection"] == "close"


@pytest.mark.parametrize(
    ("path", "length", "limit"),
    [("/v1/messages", 65 * 1024, "64 KiB"), ("/v1/messages/batch", 5 * 1024 * 1024, "4096 KiB")],
)
async def test_an_oversize_content_length_is_refused_from_the_head_and_closed(
    gateway: Gateway, path: str, length: int, limit: str
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(
            head(
                "POST",
                path,
                f"Authorization: Bearer {gateway.send_key}",
                "Content-Type: application/json",
                f"Content-Length: {length}",
            )
        )
        await writer.drain()
        answer = await read_answer(reader)  # no byte of the body sent
        # The unread body must not be taken for a next request.
        writer.write(head("GET", "/healthz"))
        await writer.drain()
        rest = await closed_within(reader, LINGER_S + SLACK_S)
    finally:
        writer.close()
    assert answer.status == 413
    assert limit in answer.error()["message"]
    assert answer.headers["connection"] == "close"
    assert rest == b""


@pytest.mark.parametrize(
    ("content_type", "refused"),
    [
        ("application/json; charset=latin-1", True),
        ("application/json; charset=ISO-8859-1", True),
        ("application/json; charset=utf-16", True),
        ("application/json", False),
        ("application/json; charset=utf-8", False),
        ("application/json; charset=UTF-8", False),
    ],
)
async def test_only_utf8_json_is_read(gateway: Gateway, content_type: str, refused: bool) -> None:
    raw = head(
        "POST",
        "/v1/messages",
        f"Authorization: Bearer {gateway.send_key}",
        f"Content-Type: {content_type}",
        "Content-Length: 2",
        "Connection: close",
        body=b"{}",
    )
    answer, _ = await exchange(gateway.port, raw)
    if refused:
        assert answer.status == 415
        assert answer.error()["code"] == "unsupported_media_type"
        assert "UTF-8" in answer.error()["message"]
    else:
        assert answer.status == 400  # read, and found to lack its fields
        assert answer.error()["code"] == "invalid_request"


# --- item 8: slow clients are cut off -------------------------------------------------------


async def _hold(port: int, style: str) -> float:
    """Hold a connection the way `style` says; the seconds until the server closed it."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if style == "half head":
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: g\r\n")
        elif style == "kept alive":  # answered, then idle
            writer.write(head("GET", "/healthz"))
        trickle = iter(b"X-Slow: " + b"a" * 10_000) if style == "trickled head" else None
        while True:
            if trickle is not None:
                writer.write(bytes([next(trickle)]))
            try:
                if await asyncio.wait_for(reader.read(1024), 0.5) == b"":
                    break
            except TimeoutError:
                continue
            except ConnectionError:
                break
    finally:
        writer.close()
    return time.monotonic() - started


async def test_slowloris_connections_are_closed_within_seconds(gateway: Gateway) -> None:
    styles = ["idle"] * 40 + ["kept alive"] * 20 + ["half head"] * 40 + ["trickled head"] * 100
    async with asyncio.timeout(HEAD_TIMEOUT_S + 2 * SLACK_S):
        held = await asyncio.gather(*(_hold(gateway.port, style) for style in styles))
    assert max(held) < HEAD_TIMEOUT_S + SLACK_S, sorted(held)[-5:]
    answer, _ = await exchange(gateway.port, head("GET", "/healthz", "Connection: close"))
    assert answer.status == 200


async def _slow_body(port: int, key: str, trickle: bool) -> tuple[Answer, float]:
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            head(
                "POST",
                "/v1/messages",
                f"Authorization: Bearer {key}",
                "Content-Type: application/json",
                "Content-Length: 1000",
                body=b'{"to": ',
            )
        )
        await writer.drain()
        answer_task = asyncio.create_task(read_answer(reader, BODY_TIMEOUT_S + SLACK_S))
        while trickle and not answer_task.done():
            writer.write(b" ")
            await asyncio.wait([answer_task], timeout=1.0)
        answer = await answer_task
        await closed_within(reader, LINGER_S + SLACK_S)
    finally:
        writer.close()
    return answer, time.monotonic() - started


async def test_a_body_too_slow_to_arrive_is_408_and_closed(gateway: Gateway) -> None:
    results = await asyncio.gather(
        _slow_body(gateway.port, gateway.send_key, trickle=False),
        _slow_body(gateway.port, gateway.send_key, trickle=True),
    )
    for answer, took in results:
        assert answer.status == 408
        assert answer.error()["code"] == "request_timeout"
        assert answer.headers["connection"] == "close"
        assert took < BODY_TIMEOUT_S + SLACK_S


# --- item 9: what a client sends cannot forge a log line; an outage is told, not shouted -----


@pytest.fixture
def lonely_gateway(private_redis: RedisServer, tmp_path: Path) -> Iterator[Gateway]:
    """A gateway over a Redis of its own, which the test stops."""
    gw = Gateway(tmp_path / "lonely", private_redis.url)
    try:
        yield gw.start()
    finally:
        gw.stop()


async def test_a_redis_outage_is_told_in_a_few_lines_not_one_per_request(
    lonely_gateway: Gateway, private_redis: RedisServer
) -> None:
    gw = lonely_gateway
    private_redis.stop()
    auth = f"Authorization: Bearer {gw.send_key}"
    for _ in range(100):
        path = f"/v1/messages/{new_id(1)}"
        answer, _ = await exchange(gw.port, head("GET", path, auth, "Connection: close"))
        assert answer.status == 503
        assert answer.error()["code"] == "unavailable"
    warnings = [line for line in gw.output().splitlines() if "redis unavailable" in line]
    assert 1 <= len(warnings) <= 3, warnings  # 100 requests within a few seconds
    gw.assert_no_secret_logged()

    private_redis.start()
    admin = f"Authorization: Bearer {gw.admin_key}"
    deadline = time.monotonic() + SLACK_S
    while "redis answers again" not in gw.output():
        assert time.monotonic() < deadline, gw.output()
        await exchange(gw.port, head("GET", "/v1/phone-numbers", admin, "Connection: close"))
    assert "(after 100 warnings)" in gw.output()


async def test_a_logged_path_cannot_forge_a_line(
    settings: Settings, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    async def redis_gone(request: web.Request) -> web.Response:
        raise StoreUnavailable("ConnectionError: refused")

    app = create_app(settings, store)
    app.router.add_get("/v1/messages/{id}/probe", redis_gone)
    forged = "/v1/messages/x%0A2026-01-01%2000:00:00,000%20CRITICAL%20FORGED%0D%00/probe"
    async with TestClient(TestServer(app)) as client:
        with caplog.at_level(logging.WARNING, logger="gateway.api"):
            response = await client.get(yarl.URL(forged, encoded=True), headers=SEND)
    assert response.status == 503
    [record] = [r for r in caplog.records if "redis unavailable" in r.getMessage()]
    line = record.getMessage()
    assert "\n" not in line and "\r" not in line and "\x00" not in line
    assert r"x\n2026-01-01 00:00:00,000 CRITICAL FORGED\r\x00/probe" in line


# --- the log helpers themselves --------------------------------------------------------------


def test_the_scrubber_masks_secrets_in_messages_tracebacks_and_extras() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(SecretScrubber())
    logger = logging.getLogger("tests.security.scrub")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("header %s", b"Authorization: Bearer gws_SECRET1\r\n")
        logger.warning("number %s", {"access_token": "EAAGSECRET2", "id": 1})
        try:
            raise ValueError("bad Bearer gwa_SECRET3")
        except ValueError:
            logger.exception("failed", extra={"detail": "whsec_SECRET4"})
        logger.warning("query hub.verify_token=SECRET5&hub.challenge=1")
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    assert "SECRET" not in text, text
    assert text.count("[redacted]") >= 4


def test_untrusted_escapes_control_characters_and_caps_length() -> None:
    assert untrusted("/a\nb\rc\x00d\udcff") == r"/a\nb\rc\x00d\udcff"
    assert untrusted("é") == "é"
    long = untrusted("a" * 1000, limit=10)
    assert long.startswith("a" * 10) and "990 more" in long and "\n" not in long


def test_throttled_tells_one_line_per_period_with_the_count() -> None:
    now = [0.0]
    out = io.StringIO()
    logger = logging.getLogger("tests.security.throttle")
    logger.setLevel(logging.INFO)
    handler = logging.StreamHandler(out)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        throttle = Throttled(logger, every_s=10.0, clock=lambda: now[0])
        for step in range(100):
            now[0] = step * 0.25  # 100 warnings in 25 s
            throttle.warning("redis down for %s", "x")
        throttle.recovered("redis back")
    finally:
        logger.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert lines[0] == "redis down for x"
    assert lines[1] == "redis down for x (39 more like this in the last 10 s)"
    assert len(lines) == 4 and lines[-1] == "redis back (after 100 warnings)"


def test_scrub_leaves_ordinary_text_alone() -> None:
    text = "sent wamid.HBgM to 5491140123456 at 80/s"
    assert scrub(text) == text
