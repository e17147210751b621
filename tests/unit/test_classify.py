"""API.md's upstream error table, answer by answer."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.drain.classify import Outcome, classify, transport_failure


def meta_error(code: int, subcode: int | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {
        "message": "m",
        "type": "OAuthException",
        "code": code,
        "fbtrace_id": "x",
    }
    if subcode is not None:
        error["error_subcode"] = subcode
    return {"error": error}


def test_success_carries_the_wamid() -> None:
    answer = classify(200, {"messaging_product": "whatsapp", "messages": [{"id": "wamid.A"}]})
    assert answer.outcome is Outcome.OK
    assert answer.upstream_message_id == "wamid.A"


def test_success_without_an_id_is_retried_not_trusted() -> None:
    assert classify(200, {"messages": []}).outcome is Outcome.TRANSIENT


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (429, None, Outcome.THROUGHPUT),
        (400, meta_error(130429), Outcome.THROUGHPUT),
        (400, meta_error(80007), Outcome.THROUGHPUT),
        (400, meta_error(4), Outcome.THROUGHPUT),
        (400, meta_error(131056), Outcome.PAIR_RATE),
        (400, meta_error(131057), Outcome.UPGRADE),
        (401, None, Outcome.AUTH),
        (400, meta_error(190), Outcome.AUTH),
        (401, meta_error(190), Outcome.AUTH),
        (400, meta_error(368), Outcome.BLOCKED),
        (400, meta_error(33), Outcome.NUMBER_GONE),
        (500, None, Outcome.TRANSIENT),
        (503, meta_error(2), Outcome.TRANSIENT),
        (400, meta_error(1), Outcome.TRANSIENT),
        (400, meta_error(2), Outcome.TRANSIENT),
        (500, meta_error(131000), Outcome.TRANSIENT),
        (400, meta_error(131016), Outcome.TRANSIENT),
        (400, meta_error(131026), Outcome.PERMANENT),
        (400, meta_error(100), Outcome.PERMANENT),
        (404, None, Outcome.PERMANENT),
        (403, {"not": "meta"}, Outcome.PERMANENT),
    ],
)
def test_each_class_of_the_table(status: int, body: Any, outcome: Outcome) -> None:
    assert classify(status, body).outcome is outcome


def test_failure_keeps_the_upstream_code_and_message() -> None:
    answer = classify(400, {"error": {"message": "Message undeliverable", "code": 131026}})
    assert answer.error() == {
        "code": 131026,
        "message": "Message undeliverable",
        "retryable": False,
    }


def test_an_answer_without_a_code_gets_one_from_the_status() -> None:
    assert classify(404, None).code == "http_404"


def test_timeouts_and_connection_errors_are_transient() -> None:
    answer = transport_failure("the Cloud API did not answer in time")
    assert answer.outcome is Outcome.TRANSIENT
    assert answer.code == "upstream_unreachable"
