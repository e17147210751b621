"""Property: whatever JSON arrives at the message routes, no 5xx and nothing invalid queued."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.accept.validation import parse_message
from tests.conftest import ADMIN, SEND, register, text_message

PN = "555123456789"
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "phone_number_id",
    "to",
    "type",
    "text",
    "image",
    "category",
    "priority",
    "client_reference",
    "ttl_seconds",
    "context",
    "recipient_type",
    "extra",
]
near_valid = st.fixed_dictionaries(
    {},
    optional={
        "phone_number_id": st.sampled_from([PN, "+5491155551234", "", "12", 555123456789]),
        "to": st.sampled_from(["5491140123456", "+1234567", "12", "", None]),
        "type": st.sampled_from(["text", "image", "fax", None, 3]),
        "text": st.one_of(st.just({"body": "hi"}), json_values),
        "image": json_values,
        "category": st.sampled_from(["marketing", "utility", "authentication", "service", "x"]),
        "priority": st.sampled_from(["high", "normal", "low", "urgent", 1]),
        "client_reference": st.one_of(st.text(max_size=300), st.integers()),
        "ttl_seconds": st.one_of(st.integers(-5, 2_600_000), st.booleans(), st.floats()),
        "context": json_values,
        "recipient_type": json_values,
        "extra": json_values,
    },
)
bodies = st.one_of(json_values, near_valid)


async def depth(client: TestClient[Any, Any]) -> int:
    body = await (await client.get(f"/v1/phone-numbers/{PN}", headers=ADMIN)).json()
    return sum(body["queue_depth"].values())


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=bodies)
async def test_random_bodies_never_500_and_queue_only_valid_messages(
    client: TestClient[Any, Any], body: Any
) -> None:
    await register(client)
    before = await depth(client)
    single = await client.post("/v1/messages", json=body, headers=SEND)
    batch = await client.post(
        "/v1/messages/batch", json={"messages": [body, text_message()]}, headers=SEND
    )
    assert single.status < 500 and batch.status < 500
    accepted = 1 if single.status == 202 else 0
    if single.status == 202:
        parse_message(body)  # raises if the gateway queued something invalid
    if batch.status == 200:
        result = await batch.json()
        if "id" in result["results"][0]:
            parse_message(body)
        accepted += result["accepted"]
    assert await depth(client) == before + accepted
