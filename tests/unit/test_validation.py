"""Every rule of API.md's POST /v1/messages body, checked on the validator alone."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from gateway import ids
from gateway.accept.service import Idempotency
from gateway.accept.validation import MESSAGE_TYPES, body_digest, parse_message, upstream_body
from gateway.api.events import EVENT_MEMORY_S, created_at_problem, signature_ok
from gateway.errors import ApiError
from gateway.registry.model import json_integer, parse_changes


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


# --- Hostile input: whole matches, ASCII digits, JSON integers, nesting (issue 8) ---


def nested(depth: int) -> Any:
    """An object `depth` levels deep (the outermost counts)."""
    value: Any = {"body": "hi"}
    for _ in range(depth - 1):
        value = {"x": value}
    return value


@pytest.mark.parametrize(
    "to",
    [
        "5491140123456\n",
        "+5491140123456\n",
        "\u0665\u0664\u0669\u0661\u0661\u0664\u0660\u0661\u0662\u0663",
        "\uff11\uff12\uff13\uff14\uff15\uff16\uff17",
    ],
)
def test_to_is_matched_whole_and_in_ascii_digits(to: str) -> None:
    assert "to" in problems(message(to=to))


@pytest.mark.parametrize(
    "pn", ["555123456789\n", "\u0665\u0665\u0665\u0661\u0662\u0663", "555²", "\n"]
)
def test_phone_number_id_is_matched_whole_and_in_ascii_digits(pn: str) -> None:
    assert "phone_number_id" in problems(message(phone_number_id=pn))


@pytest.mark.parametrize(("ttl", "stored"), [(204102.0, "204102"), (1.0, "1"), (300, "300")])
def test_ttl_seconds_takes_what_json_schema_calls_an_integer(ttl: Any, stored: str) -> None:
    assert parse_message(message(ttl_seconds=ttl)).ttl_seconds == stored


@pytest.mark.parametrize("ttl", [1e29, 0.0, 2_592_001.0, 300.5, False, [300], float("inf")])
def test_ttl_seconds_refuses_fractions_booleans_and_huge_numbers(ttl: Any) -> None:
    assert "ttl_seconds" in problems(message(ttl_seconds=ttl))


def test_a_text_nested_past_what_can_be_sent_is_a_400_naming_it() -> None:
    assert parse_message(message(text=nested(200)))
    found = problems(message(text=nested(254)))
    assert set(found) == {"text"}
    assert "nests too deeply" in found["text"]
    assert set(problems(message(context=nested(300)))) == {"context"}


def test_idempotency_key_is_a_field_of_batch_messages_only() -> None:
    assert parse_message(message(idempotency_key="k-1"), in_batch=True).idempotency_key == "k-1"
    assert parse_message(message(), in_batch=True).idempotency_key == ""
    assert "Idempotency-Key header" in problems(message(idempotency_key="k-1"))["idempotency_key"]


@pytest.mark.parametrize("key", ["", "k" * 256, "clé", "k\n", "\udcff", 7, None, ["k"]])
def test_a_batch_idempotency_key_is_1_to_255_printable_ascii(key: Any) -> None:
    body = message()
    body["idempotency_key"] = key
    with pytest.raises(ApiError) as caught:
        parse_message(body, in_batch=True)
    assert [d.field for d in caught.value.details] == ["idempotency_key"]


def test_a_body_digest_ignores_field_order_and_the_key_itself() -> None:
    body = message(client_reference="r")
    same = dict(reversed(list(body.items())))
    assert body_digest(body) == body_digest({**same, "idempotency_key": "k"})
    assert body_digest(body) != body_digest(message(client_reference="s"))


@pytest.mark.parametrize("header", ["\udcff\udcfe", "k" * 256, "", "tab\there", "é"])
def test_an_idempotency_key_header_must_be_printable_ascii(header: str) -> None:
    with pytest.raises(ApiError) as caught:
        Idempotency.from_header(header, "api-key")
    assert caught.value.status == 400
    assert caught.value.details[0].field == "Idempotency-Key"


@pytest.mark.parametrize(
    "message_id",
    [
        "1-01M87GH5XW1SMrcTe3o0tg\n",
        "\u0661-01M87GH5XW1SMrcTe3o0tg",
        " 1-01M87GH5XW1SMrcTe3o0tg",
        "",
    ],
)
def test_a_message_id_is_matched_whole_and_in_ascii_digits(message_id: str) -> None:
    assert ids.shard_of_id(message_id) is None
    assert ids.shard_of_id("1-01M87GH5XW1SMrcTe3o0tg") == 1


@pytest.mark.parametrize(("value", "whole"), [(3, 3), (3.0, 3), (-2.0, -2), (0, 0)])
def test_json_integers_include_integral_floats(value: Any, whole: int) -> None:
    assert json_integer(value) == whole


@pytest.mark.parametrize("value", [True, False, 3.5, float("nan"), float("inf"), "3", None])
def test_json_integers_exclude_booleans_fractions_and_strings(value: Any) -> None:
    assert json_integer(value) is None


@pytest.mark.parametrize(("max_mps", "stored"), [(10, "10"), (10.0, "10"), (1_000_000, "1000000")])
def test_max_mps_takes_json_integers(max_mps: Any, stored: str) -> None:
    sets, _ = parse_changes("555", {"max_mps": max_mps}, replace=False)
    assert sets["max_mps"] == stored


@pytest.mark.parametrize("max_mps", [10.5, True, 0, 1e20, "10", 1_000_001])
def test_max_mps_refuses_other_values(max_mps: Any) -> None:
    with pytest.raises(ApiError) as caught:
        parse_changes("555", {"max_mps": max_mps}, replace=False)
    assert [d.field for d in caught.value.details] == ["max_mps"]


@pytest.mark.parametrize(
    "header",
    ["sha256=\udcff", "sha256=" + "a" * 63, "sha256=" + "é" * 64, "sha256=" + "g" * 64, "", None],
)
def test_a_malformed_signature_is_refused_without_error(header: str | None) -> None:
    assert signature_ok("secret", b"{}", header) is False


def test_a_signature_is_hex_in_either_case() -> None:
    digest = hmac.new(b"secret", b"{}", hashlib.sha256).hexdigest()
    assert signature_ok("secret", b"{}", f"sha256={digest}")
    assert signature_ok("secret", b"{}", f"sha256={digest.upper()}")


@pytest.mark.parametrize(
    ("offset_s", "code"),
    [
        (0, None),
        (-6 * 86400, None),
        (240, None),
        (-(7 * 86400 + 1), "stale_event"),
        (301, "stale_event"),
    ],
)
def test_created_at_must_be_within_the_time_ids_are_remembered(
    offset_s: float, code: str | None
) -> None:
    now = 1_800_000_000.0
    created = datetime.fromtimestamp(now + offset_s, tz=UTC).isoformat()
    found = created_at_problem(created, now)
    assert (found and found.code) == code
    assert EVENT_MEMORY_S > 7 * 86400 + 300
