"""The OpenAPI document (gateway/api/openapi.json) against API.md.

The routes, methods, auth and error codes expected here are written out from API.md on purpose:
the document must change when the contract does, and this test says where it does not.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openapi_spec_validator
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

DOCUMENT_PATH = Path(__file__).parent / "../../gateway/api/openapi.json"
BASE_URI = "urn:gateway-openapi"

# Every route of API.md with its methods, and nothing else.
EXPECTED_OPERATIONS = {
    ("/v1/messages", "post"),
    ("/v1/messages/batch", "post"),
    ("/v1/messages/{id}", "get"),
    ("/v1/messages/{id}", "delete"),
    ("/v1/phone-numbers", "get"),
    ("/v1/phone-numbers/{phone_number_id}", "put"),
    ("/v1/phone-numbers/{phone_number_id}", "patch"),
    ("/v1/phone-numbers/{phone_number_id}", "get"),
    ("/v1/phone-numbers/{phone_number_id}", "delete"),
    ("/v1/events", "post"),
    ("/v1/webhooks/meta", "get"),
    ("/v1/webhooks/meta", "post"),
    ("/healthz", "get"),
    ("/readyz", "get"),
    ("/metrics", "get"),
    ("/openapi.json", "get"),
}
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}

# The codes of API.md, plus the team's 405 for a wrong method on a known path and 408 for a body
# that does not arrive in time.
ERROR_CODES = {
    "invalid_json",
    "invalid_request",
    "stale_event",
    "unauthorized",
    "forbidden",
    "not_found",
    "unknown_phone_number",
    "phone_number_deleted",
    "not_cancelable",
    "idempotency_conflict",
    "payload_too_large",
    "unsupported_media_type",
    "backlog_full",
    "outside_service_window",
    "unavailable",
    "method_not_allowed",
    "request_timeout",
}

_AUTH = {401: {"unauthorized"}}
_ADMIN = {401: {"unauthorized"}, 403: {"forbidden"}}
_BODY = {
    400: {"invalid_json", "invalid_request"},
    408: {"request_timeout"},
    413: {"payload_too_large"},
}
_JSON_BODY = {**_BODY, 415: {"unsupported_media_type"}}
_DOWN = {503: {"unavailable"}}
_NUMBER_NOT_FOUND = {404: {"not_found"}}

# Per operation: every error status it documents and the codes each one may carry.
EXPECTED_ERRORS: dict[tuple[str, str], dict[int, set[str]]] = {
    ("/v1/messages", "post"): {
        **_JSON_BODY,
        **_AUTH,
        **_DOWN,
        404: {"unknown_phone_number"},
        409: {"phone_number_deleted", "idempotency_conflict"},
        422: {"outside_service_window"},
        429: {"backlog_full"},
    },
    ("/v1/messages/batch", "post"): {**_JSON_BODY, **_AUTH, **_DOWN},
    ("/v1/messages/{id}", "get"): {**_AUTH, **_DOWN, 404: {"not_found"}},
    ("/v1/messages/{id}", "delete"): {
        **_AUTH,
        **_DOWN,
        404: {"not_found"},
        409: {"not_cancelable"},
    },
    ("/v1/phone-numbers", "get"): {**_ADMIN, **_DOWN, 400: {"invalid_request"}},
    ("/v1/phone-numbers/{phone_number_id}", "put"): {**_JSON_BODY, **_ADMIN, **_DOWN},
    ("/v1/phone-numbers/{phone_number_id}", "patch"): {
        **_JSON_BODY,
        **_ADMIN,
        **_DOWN,
        **_NUMBER_NOT_FOUND,
    },
    ("/v1/phone-numbers/{phone_number_id}", "get"): {
        **_ADMIN,
        **_DOWN,
        **_NUMBER_NOT_FOUND,
        400: {"invalid_request"},
    },
    ("/v1/phone-numbers/{phone_number_id}", "delete"): {
        **_ADMIN,
        **_DOWN,
        **_NUMBER_NOT_FOUND,
        400: {"invalid_request"},
    },
    ("/v1/events", "post"): {
        **_JSON_BODY,
        **_DOWN,
        400: {"invalid_json", "invalid_request", "stale_event"},
        401: {"unauthorized"},
    },
    ("/v1/webhooks/meta", "get"): {400: {"invalid_request"}, 403: {"forbidden"}},
    ("/v1/webhooks/meta", "post"): {
        **_JSON_BODY,
        **_DOWN,
        401: {"unauthorized"},
    },
    ("/healthz", "get"): {},
    ("/readyz", "get"): {**_DOWN},
    ("/metrics", "get"): {},
    ("/openapi.json", "get"): {},
}

EXPECTED_SUCCESS: dict[tuple[str, str], set[int]] = {
    ("/v1/messages", "post"): {202},
    ("/v1/messages/batch", "post"): {200},
    ("/v1/messages/{id}", "get"): {200},
    ("/v1/messages/{id}", "delete"): {200},
    ("/v1/phone-numbers", "get"): {200},
    ("/v1/phone-numbers/{phone_number_id}", "put"): {200, 201},
    ("/v1/phone-numbers/{phone_number_id}", "patch"): {200},
    ("/v1/phone-numbers/{phone_number_id}", "get"): {200},
    ("/v1/phone-numbers/{phone_number_id}", "delete"): {200},
    ("/v1/events", "post"): {200},
    ("/v1/webhooks/meta", "get"): {200},
    ("/v1/webhooks/meta", "post"): {200},
    ("/healthz", "get"): {200},
    ("/readyz", "get"): {200},
    ("/metrics", "get"): {200},
    ("/openapi.json", "get"): {200},
}

EITHER_KEY: list[dict[str, list[str]]] = [{"sendKey": []}, {"adminKey": []}]
ADMIN_KEY: list[dict[str, list[str]]] = [{"adminKey": []}]

# The example of API.md's POST /v1/messages.
API_MD_SEND = {
    "phone_number_id": "555123456789",
    "to": "5491140123456",
    "type": "text",
    "text": {"body": "Your code is 123456"},
    "category": "authentication",
    "priority": "high",
    "client_reference": "otp-8812",
    "ttl_seconds": 300,
}
MESSAGE_TYPES = (
    "text",
    "template",
    "image",
    "audio",
    "video",
    "document",
    "sticker",
    "location",
    "contacts",
    "interactive",
    "reaction",
)


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DOCUMENT_PATH.read_text(encoding="utf-8"))
    return loaded


def _escape(segment: str) -> str:
    return segment.replace("~", "~0").replace("/", "~1")


def _resolve_pointer(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} does not point inside the document"
    node: Any = document
    for raw in ref[2:].split("/"):
        segment = raw.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and segment in node, f"{ref} does not resolve"
        node = node[segment]
    return node


def _deref(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = _resolve_pointer(document, node["$ref"])
    return node


def _walk(node: Any, pointer: str = "") -> Iterator[tuple[str, Any]]:
    yield pointer, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{pointer}/{_escape(str(key))}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{pointer}/{index}")


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield path, method, operation


def _validator(document: dict[str, Any], pointer: str) -> Draft202012Validator:
    """A validator for the schema at `pointer`, whose `#/...` refs resolve in the document."""
    registry: Registry[Any] = Registry().with_resource(
        BASE_URI, DRAFT202012.create_resource(document)
    )
    return Draft202012Validator({"$ref": f"{BASE_URI}#{pointer}"}, registry=registry)


def _component(document: dict[str, Any], name: str) -> Draft202012Validator:
    return _validator(document, f"/components/schemas/{name}")


def test_is_openapi_3_1(document: dict[str, Any]) -> None:
    assert re.fullmatch(r"3\.1\.\d+", document["openapi"])
    assert document["info"]["title"] == "WhatsApp send gateway"
    assert document["info"]["version"] == "1.0.0"
    assert document["servers"] == [{"url": "http://localhost:8080"}]


def test_has_exactly_the_routes_and_methods_of_api_md(document: dict[str, Any]) -> None:
    found = {(path, method) for path, method, _ in _operations(document)}
    assert found == EXPECTED_OPERATIONS


def test_every_operation_is_described(document: dict[str, Any]) -> None:
    ids = []
    for path, method, operation in _operations(document):
        where = f"{method.upper()} {path}"
        ids.append(operation["operationId"])
        assert operation.get("summary"), where
        assert operation.get("description"), where
        if "requestBody" in operation:
            media = operation["requestBody"]["content"]["application/json"]
            assert "schema" in media, where
            assert "example" in media or "examples" in media, where
        responses = operation["responses"]
        success = {int(status) for status in responses if int(status) < 400}
        assert success == EXPECTED_SUCCESS[(path, method)], where
        for status, raw in responses.items():
            response = _deref(document, raw)
            assert response.get("description"), f"{where} {status}"
            assert response.get("content"), f"{where} {status} has no body schema"
            for media in response["content"].values():
                assert "schema" in media, f"{where} {status}"
    assert len(ids) == len(set(ids)), "operationIds must be unique"


def test_error_codes_are_those_of_api_md(document: dict[str, Any]) -> None:
    error = document["components"]["schemas"]["Error"]
    assert error["required"] == ["error"]
    inner = error["properties"]["error"]
    assert set(inner["required"]) == {"code", "message"}
    assert set(inner["properties"]) == {"code", "message", "details"}
    assert set(inner["properties"]["code"]["enum"]) == ERROR_CODES
    problem = _deref(document, inner["properties"]["details"]["items"])
    assert set(problem["required"]) == {"field", "message"}


@pytest.mark.parametrize(("path", "method"), sorted(EXPECTED_OPERATIONS))
def test_error_responses_use_the_shared_error_schema(
    document: dict[str, Any], path: str, method: str
) -> None:
    responses = document["paths"][path][method]["responses"]
    errors = {
        int(status): _deref(document, r) for status, r in responses.items() if int(status) >= 400
    }
    expected = EXPECTED_ERRORS[(path, method)]
    assert set(errors) == set(expected)
    for status, response in errors.items():
        content = response["content"]
        assert set(content) == {"application/json"}, status
        media = content["application/json"]
        assert media["schema"] == {"$ref": "#/components/schemas/Error"}, status
        codes = {example["value"]["error"]["code"] for example in media["examples"].values()}
        assert codes == expected[status], status
        for code in codes:
            assert f"`{code}`" in response["description"], (status, code)


def test_every_ref_resolves_inside_the_document(document: dict[str, Any]) -> None:
    refs = [
        node["$ref"] for _, node in _walk(document) if isinstance(node, dict) and "$ref" in node
    ]
    assert refs
    for ref in refs:
        _resolve_pointer(document, ref)


def test_security(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes == {
        "sendKey": schemes["sendKey"] | {"type": "http", "scheme": "bearer"},
        "adminKey": schemes["adminKey"] | {"type": "http", "scheme": "bearer"},
    }
    assert "security" not in document, "each operation states its own security"
    for path, _method, operation in _operations(document):
        if path.startswith("/v1/messages"):
            assert operation["security"] == EITHER_KEY, path
        elif path.startswith("/v1/phone-numbers"):
            assert operation["security"] == ADMIN_KEY, path
        else:
            assert operation["security"] == [], path
    events = document["paths"]["/v1/events"]["post"]
    signature = [_deref(document, p) for p in events["parameters"]]
    assert [(p["name"], p["in"], p["required"]) for p in signature] == [
        ("X-Signature-256", "header", True)
    ]
    assert "HMAC-SHA256" in signature[0]["description"]
    metrics = document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(metrics) == {"text/plain"}


def test_headers(document: dict[str, Any]) -> None:
    send = document["paths"]["/v1/messages"]["post"]
    (key,) = [_deref(document, p) for p in send["parameters"]]
    assert (key["name"], key["in"]) == ("Idempotency-Key", "header")
    assert key["schema"]["maxLength"] == 255
    assert "Idempotent-Replayed" in send["responses"]["202"]["headers"]
    for path, method, operation in _operations(document):
        for status in ("429", "503"):
            if status in operation["responses"]:
                response = _deref(document, operation["responses"][status])
                assert "Retry-After" in response.get("headers", {}), f"{method} {path} {status}"


def test_validates_against_the_openapi_3_1_schema(document: dict[str, Any]) -> None:
    openapi_spec_validator.validate(document, cls=openapi_spec_validator.OpenAPIV31SpecValidator)


def test_component_schemas_are_valid_json_schema(document: dict[str, Any]) -> None:
    for name, schema in document["components"]["schemas"].items():
        try:
            Draft202012Validator.check_schema(schema)
        except Exception as exc:  # pragma: no cover - the message names the schema
            raise AssertionError(f"components.schemas.{name}: {exc}") from exc


def test_every_example_matches_its_schema(document: dict[str, Any]) -> None:
    checked = 0
    for pointer, node in _walk(document):
        if not isinstance(node, dict) or "schema" not in node:
            continue
        validator = _validator(document, f"{pointer}/schema")
        samples = [node["example"]] if "example" in node else []
        samples += [_deref(document, e)["value"] for e in node.get("examples", {}).values()]
        for sample in samples:
            errors = [e.message for e in validator.iter_errors(sample)]
            assert not errors, f"{pointer}: {errors}"
            checked += 1
    for name, schema in document["components"]["schemas"].items():
        for sample in schema.get("examples", []):
            assert _component(document, name).is_valid(sample), name
            checked += 1
    assert checked > 30


def test_send_request_accepts_the_api_md_example_and_every_type(document: dict[str, Any]) -> None:
    send = _component(document, "SendRequest")
    assert send.is_valid(API_MD_SEND)
    for kind in MESSAGE_TYPES:
        minimal = {"phone_number_id": "1", "to": "+1234567", "type": kind, kind: {}}
        assert send.is_valid(minimal), kind
    optional = {
        "context": {"message_id": "wamid.X"},
        "biz_opaque_callback_data": "tracking",
        "recipient_type": "individual",
    }
    assert send.is_valid(API_MD_SEND | optional)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"text": None}, "the object named by type is missing"),
        ({"text": "hello"}, "the object named by type is not an object"),
        ({"image": {"link": "https://example.com/a.png"}}, "another type's object is present"),
        ({"colour": "blue"}, "unknown field"),
        ({"phone_number_id": "+5491155551234"}, "a display number"),
        ({"phone_number_id": "5491-155551234"}, "a display number with a dash"),
        ({"phone_number_id": "1" * 33}, "phone_number_id over 32 digits"),
        ({"to": "549114012345a"}, "to with a letter"),
        ({"to": "123456"}, "to under 7 digits"),
        ({"type": "poll"}, "unknown type"),
        ({"category": "promo"}, "unknown category"),
        ({"priority": "urgent"}, "unknown priority"),
        ({"client_reference": "x" * 257}, "client_reference over 256"),
        ({"ttl_seconds": 0}, "ttl under 1"),
        ({"ttl_seconds": 2_592_001}, "ttl over 30 days"),
    ],
)
def test_send_request_rejects(document: dict[str, Any], change: dict[str, Any], why: str) -> None:
    body = API_MD_SEND | change
    body = {k: v for k, v in body.items() if v is not None}
    assert not _component(document, "SendRequest").is_valid(body), why


def test_batch_request_holds_1_to_1000_messages(document: dict[str, Any]) -> None:
    batch = _component(document, "BatchRequest")
    assert batch.is_valid({"messages": [API_MD_SEND]})
    assert batch.is_valid({"messages": [API_MD_SEND] * 1000})
    assert not batch.is_valid({"messages": []})
    assert not batch.is_valid({"messages": [API_MD_SEND] * 1001})


def test_batch_results_are_queued_or_errors(document: dict[str, Any]) -> None:
    response = _component(document, "BatchResponse")
    error = {"error": {"code": "backlog_full", "message": "Retry later."}}
    assert response.is_valid(
        {"accepted": 1, "rejected": 1, "results": [{"id": "0-abc", "status": "queued"}, error]}
    )
    assert not response.is_valid(
        {"accepted": 1, "rejected": 0, "results": [{"id": "0-abc", "status": "sent"}]}
    )


def test_phone_numbers_never_show_the_access_token(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert schemas["PhoneNumber"]["properties"]["access_token"]["writeOnly"] is True
    view = schemas["PhoneNumberView"]
    assert "access_token" not in view["properties"]
    assert view["additionalProperties"] is False
    assert view["properties"]["has_access_token"]["type"] == "boolean"
    tier = _deref(document, schemas["PhoneNumber"]["properties"]["throughput_tier"]["allOf"][0])
    assert tier["enum"] == ["standard", "medium", "high", "unlimited"]
    assert "case-insensitive" in tier["description"].lower()


def test_event_results(document: dict[str, Any]) -> None:
    result = _component(document, "EventResult")
    for body in ({"applied": True}, {"ignored": True}, {"duplicate": True}):
        assert result.is_valid(body), body
    assert not result.is_valid({"applied": False})
    assert not result.is_valid({})


def test_batch_messages_carry_their_own_idempotency_key(document: dict[str, Any]) -> None:
    message = _component(document, "BatchMessage")
    assert message.is_valid(API_MD_SEND | {"idempotency_key": "otp-8812"})
    assert message.is_valid(API_MD_SEND)
    for bad in ("", "k" * 256, "caf\u00e9", "tab\there"):
        assert not message.is_valid(API_MD_SEND | {"idempotency_key": bad}), bad
    assert not _component(document, "SendRequest").is_valid(API_MD_SEND | {"idempotency_key": "k"})
    batch = _component(document, "BatchRequest")
    assert batch.is_valid({"messages": [API_MD_SEND | {"idempotency_key": "k"}]})
    response = _component(document, "BatchResponse")
    replayed = {"id": "0-abc", "status": "queued", "replayed": True}
    assert response.is_valid({"accepted": 1, "rejected": 0, "results": [replayed]})


def test_events_need_a_created_at(document: dict[str, Any]) -> None:
    event = _component(document, "Event")
    body = {
        "id": "evt_1",
        "type": "whatsapp.phone_number.deleted",
        "created_at": "2026-11-24T19:30:00Z",
        "data": {"phone_number_id": "555123456789"},
    }
    assert event.is_valid(body)
    assert not event.is_valid({k: v for k, v in body.items() if k != "created_at"})


def test_integers_are_bounded_as_the_gateway_checks_them(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for name in ("PhoneNumber", "PhoneNumberPatch"):
        assert schemas[name]["properties"]["max_mps"]["maximum"] == 1_000_000
    send = _component(document, "SendRequest")
    assert send.is_valid(API_MD_SEND | {"ttl_seconds": 300.0})
    assert not send.is_valid(API_MD_SEND | {"ttl_seconds": 300.5})
