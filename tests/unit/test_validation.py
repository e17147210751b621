"""Every rule of API.md's POST /v1/messages body, checked on the validator alone."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.accept.validation import MESSAGE_TYPES, parse_message, upstream_body
from gateway.errors import ApiError


def message(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "phone_number_id": "555123456789",
        "to": "5491140123456",
        "type": "text",
        "text": {"body": "hi"},
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}


def problems(body: Any) -> dict[str, str]:
    with pytest.raises(ApiError) as caught:
        parse_message(body)
    assert caught.value.status == 400
    assert caught.value.code == "invalid_request"
    return {d.field: d.message for d in caught.value.details}


def test_a_valid_message_is_accepted() -> None:
    out = parse_message(message())
    assert out.phone_number_id == "555123456789"
    assert out.lane_list == "n"
    assert out.category == "utility"


@pytest.mark.parametrize("display", ["+5491155551234", "54 9 11 5555-1234", "(555) 123-4567"])
def test_a_display_number_is_refused_with_a_pointer_to_phone_number_id(display: str) -> None:
    found = problems(message(phone_number_id=display))
    assert "phone_number_id" in found["phone_number_id"]
    assert "display" in found["phone_number_id"]


@pytest.mark.parametrize("bad", ["", "12a4", "1" * 33, 555123456789, None])
def test_phone_number_id_is_1_to_32_digits_as_a_string(bad: Any) -> None:
    body = message()
    body["phone_number_id"] = bad
    assert "phone_number_id" in problems(body)


@pytest.mark.parametrize("to", ["1234567", "+123456789012345", "5491140123456"])
def test_to_accepts_7_to_15_digits_with_an_optional_plus(to: str) -> None:
    assert parse_message(message(to=to))


@pytest.mark.parametrize("to", ["123456", "1234567890123456", "+54 911", "abc", 5491140123456, ""])
def test_to_refuses_anything_else(to: Any) -> None:
    assert "to" in problems(message(to=to))


@pytest.mark.parametrize("kind", sorted(MESSAGE_TYPES))
def test_every_type_needs_its_object(kind: str) -> None:
    body = message(type=kind, text=None)
    assert kind in problems(body)
    body[kind] = {"any": "thing"}
    assert parse_message(body)


def test_the_type_object_must_be_an_object() -> None:
    assert "text" in problems(message(text="hi"))


def test_an_unknown_type_is_refused() -> None:
    assert "type" in problems(message(type="fax"))


def test_another_types_object_is_an_unknown_field() -> None:
    assert "image" in problems(message(image={"link": "https://x"}))


def test_unknown_fields_are_refused() -> None:
    assert "messaging_product" in problems(message(messaging_product="whatsapp"))


def test_every_problem_is_reported_at_once() -> None:
    found = problems({"phone_number_id": "+1 555", "to": "x", "type": "fax", "extra": 1})
    assert {"phone_number_id", "to", "type", "extra"} <= set(found)


@pytest.mark.parametrize(
    ("category", "lane"),
    [("authentication", "h"), ("marketing", "lm"), ("utility", "n"), ("service", "n")],
)
def test_priority_defaults_from_the_category(category: str, lane: str) -> None:
    assert parse_message(message(category=category)).lane_list == lane


@pytest.mark.parametrize(("priority", "lane"), [("high", "h"), ("normal", "n"), ("low", "l")])
def test_an_explicit_priority_wins(priority: str, lane: str) -> None:
    assert parse_message(message(priority=priority)).lane_list == lane
    assert parse_message(message(priority=priority, category="marketing")).lane_list == lane + "m"


@pytest.mark.parametrize(
    ("field", "value"),
    [("category", "promo"), ("priority", "urgent"), ("priority", 1), ("category", ["marketing"])],
)
def test_category_and_priority_are_enumerations(field: str, value: Any) -> None:
    assert field in problems(message(**{field: value}))


def test_client_reference_is_at_most_256_characters() -> None:
    assert parse_message(message(client_reference="r" * 256)).reference == "r" * 256
    assert "client_reference" in problems(message(client_reference="r" * 257))
    assert "client_reference" in problems(message(client_reference=7))


@pytest.mark.parametrize("ttl", [1, 300, 2_592_000])
def test_ttl_seconds_in_range(ttl: int) -> None:
    assert parse_message(message(ttl_seconds=ttl)).ttl_seconds == str(ttl)


@pytest.mark.parametrize("ttl", [0, -1, 2_592_001, 1.5, "300", True])
def test_ttl_seconds_out_of_range_or_not_a_whole_number(ttl: Any) -> None:
    assert "ttl_seconds" in problems(message(ttl_seconds=ttl))


def test_cloud_api_extras_are_checked_and_passed_on() -> None:
    out = parse_message(
        message(
            context={"message_id": "wamid.X"},
            biz_opaque_callback_data="o",
            recipient_type="individual",
        )
    )
    payload = orjson.loads(out.payload)
    assert payload["context"] == {"message_id": "wamid.X"}
    assert payload["biz_opaque_callback_data"] == "o"
    assert "context" in problems(message(context="wamid.X"))
    assert "biz_opaque_callback_data" in problems(message(biz_opaque_callback_data="o" * 513))
    assert "recipient_type" in problems(message(recipient_type=1))


def test_the_body_must_be_an_object() -> None:
    assert problems([message()]) == {"body": "must be a JSON object"}


def test_the_upstream_body_is_the_cloud_api_request_without_gateway_fields() -> None:
    out = parse_message(
        message(category="marketing", priority="high", client_reference="r", ttl_seconds=5)
    )
    body = orjson.loads(upstream_body(out.payload))
    assert body == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "5491140123456",
        "type": "text",
        "text": {"body": "hi"},
    }


def test_an_explicit_recipient_type_is_kept() -> None:
    out = parse_message(message(recipient_type="group"))
    body = orjson.loads(upstream_body(out.payload))
    assert body["recipient_type"] == "group"
    assert body["messaging_product"] == "whatsapp"
