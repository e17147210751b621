"""Meta's webhook envelope, read defensively into status updates and inbound messages.

Meta posts `{"object": "whatsapp_business_account", "entry": [{"id", "changes": [{"field",
"value"}]}]}`. For `field: messages`, `value.metadata.phone_number_id` names the business number,
`value.statuses[]` report what became of messages it sent (`id` the wamid, `status`,
`timestamp` in unix seconds as a string, `recipient_id`, `errors[]` of `{code, title, message,
error_data: {details}}` on `failed`), and `value.messages[]` are users writing to it (`from`,
`timestamp`). Every part is checked: anything malformed refuses the whole body (400 with the
path of each fault) rather than apply half of it; other fields, and statuses Meta may add, are
ignored and counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.errors import FieldProblem, invalid_request
from gateway.registry.model import phone_number_id_problem

OBJECT = "whatsapp_business_account"
STATUSES = ("sent", "delivered", "read", "failed", "played")
MAX_WAMID = 512
MAX_PROBLEMS = 10
MAX_ERROR_TEXT = 1024
# A user is Meta's wa_id (digits), or a business-scoped user id: letters, digits, . : _ -.
_USER = re.compile(r"\+?([0-9A-Za-z.:_-]{1,64})")
_SECONDS = re.compile(r"[0-9]{1,11}")
# Field names become a metric label: anything else is counted as "other".
_FIELD_LABEL = re.compile(r"[a-z_]{1,48}")


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    phone_number_id: str
    wamid: str
    status: str
    at_ms: int
    error_json: str  # the message's `error` as API.md shows it; "" unless failed


@dataclass(frozen=True, slots=True)
class InboundMessage:
    phone_number_id: str
    user: str  # without a leading "+", as `to` is compared at accept
    at_ms: int


@dataclass
class Envelope:
    statuses: list[StatusUpdate] = field(default_factory=list)
    inbound: list[InboundMessage] = field(default_factory=list)
    # What was ignored, by label (a change's field, or "status" for an unknown status value).
    ignored: dict[str, int] = field(default_factory=dict)

    def ignore(self, label: str) -> None:
        self.ignored[label] = self.ignored.get(label, 0) + 1


class _Problems:
    def __init__(self) -> None:
        self.found: list[FieldProblem] = []

    def add(self, path: str, message: str) -> None:
        if len(self.found) < MAX_PROBLEMS:
            self.found.append(FieldProblem(path, message))

    def __bool__(self) -> bool:
        return bool(self.found)


def _seconds_ms(value: Any) -> int | None:
    """Meta's unix seconds (a string of digits; a number is taken too) in ms."""
    if isinstance(value, str) and _SECONDS.fullmatch(value):
        return int(value) * 1000
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**11:
        return value * 1000
    return None


def _list_at(value: dict[str, Any], name: str, path: str, problems: _Problems) -> list[Any]:
    items = value.get(name)
    if items is None:
        return []
    if not isinstance(items, list):
        problems.add(f"{path}.{name}", "must be an array")
        return []
    return items


def _error_json(errors: Any, path: str, problems: _Problems) -> str:
    """The first of Meta's errors as API.md's `error` (code, message, retryable: false)."""
    if errors is None or errors == []:
        return orjson.dumps(
            {
                "code": "failed",
                "message": "Meta reported the message failed without saying why.",
                "retryable": False,
            }
        ).decode()
    if not isinstance(errors, list):
        problems.add(path, "must be an array of error objects")
        return ""
    first = errors[0]
    if not isinstance(first, dict):
        problems.add(f"{path}[0]", "must be an object")
        return ""
    code = first.get("code")
    if not (isinstance(code, int) and not isinstance(code, bool)) and not (
        isinstance(code, str) and 1 <= len(code) <= 64
    ):
        problems.add(f"{path}[0].code", "must be Meta's error code (a number)")
        return ""
    texts = []
    for name in ("title", "message"):
        text = first.get(name)
        if text is not None and not isinstance(text, str):
            problems.add(f"{path}[0].{name}", "must be a string")
        elif text and text not in texts:
            texts.append(text)
    data = first.get("error_data")
    if data is not None:
        details = data.get("details") if isinstance(data, dict) else None
        if not isinstance(data, dict) or (details is not None and not isinstance(details, str)):
            problems.add(f"{path}[0].error_data", "must be an object whose details is a string")
        elif details and details not in texts:
            texts.append(details)
    message = ": ".join(texts) or f"Meta error {code}."
    return orjson.dumps(
        {"code": code, "message": message[:MAX_ERROR_TEXT], "retryable": False}
    ).decode()


def _status(
    item: Any, pn: str, path: str, envelope: Envelope, problems: _Problems
) -> StatusUpdate | None:
    if not isinstance(item, dict):
        problems.add(path, "must be an object")
        return None
    wamid, status = item.get("id"), item.get("status")
    at_ms = _seconds_ms(item.get("timestamp"))
    ok = True
    if not isinstance(wamid, str) or not 1 <= len(wamid) <= MAX_WAMID:
        problems.add(f"{path}.id", f"must be the message's wamid (1-{MAX_WAMID} characters)")
        ok = False
    if not isinstance(status, str):
        problems.add(f"{path}.status", "must be a string")
        ok = False
    if at_ms is None:
        problems.add(f"{path}.timestamp", "must be unix seconds (a string of digits)")
        ok = False
    recipient = item.get("recipient_id")
    if recipient is not None and not isinstance(recipient, str):
        problems.add(f"{path}.recipient_id", "must be a string")
        ok = False
    error_json = ""
    if status == "failed":
        error_json = _error_json(item.get("errors"), f"{path}.errors", problems)
        ok = ok and error_json != ""
    if not ok or not isinstance(wamid, str) or not isinstance(status, str) or at_ms is None:
        return None
    if status not in STATUSES:
        envelope.ignore("status")
        return None
    return StatusUpdate(pn, wamid, status, at_ms, error_json)


def _inbound(item: Any, pn: str, path: str, problems: _Problems) -> InboundMessage | None:
    if not isinstance(item, dict):
        problems.add(path, "must be an object")
        return None
    sender = item.get("from")
    match = _USER.fullmatch(sender) if isinstance(sender, str) else None
    at_ms = _seconds_ms(item.get("timestamp"))
    if match is None:
        problems.add(f"{path}.from", "must be the user's WhatsApp id (digits)")
    if at_ms is None:
        problems.add(f"{path}.timestamp", "must be unix seconds (a string of digits)")
    if match is None or at_ms is None:
        return None
    return InboundMessage(pn, match.group(1), at_ms)


def _messages_value(value: Any, path: str, envelope: Envelope, problems: _Problems) -> None:
    if not isinstance(value, dict):
        problems.add(path, "must be an object")
        return
    statuses = _list_at(value, "statuses", path, problems)
    messages = _list_at(value, "messages", path, problems)
    if not statuses and not messages:
        return  # e.g. only `errors` of the whole request: nothing to apply
    metadata = value.get("metadata")
    pn = metadata.get("phone_number_id") if isinstance(metadata, dict) else None
    why = phone_number_id_problem(pn)
    if why is not None or not isinstance(pn, str):
        problems.add(f"{path}.metadata.phone_number_id", why or "must be a string")
        return
    for index, item in enumerate(statuses):
        update = _status(item, pn, f"{path}.statuses[{index}]", envelope, problems)
        if update is not None:
            envelope.statuses.append(update)
    for index, item in enumerate(messages):
        inbound = _inbound(item, pn, f"{path}.messages[{index}]", problems)
        if inbound is not None:
            envelope.inbound.append(inbound)


def parse_envelope(body: Any) -> Envelope:
    """What a webhook body says; raises `ApiError` (400 invalid_request) when any of it is bad."""
    problems = _Problems()
    envelope = Envelope()
    if not isinstance(body, dict):
        raise invalid_request([FieldProblem("body", "must be a JSON object")])
    if body.get("object") != OBJECT:
        problems.add("object", f"must be {OBJECT!r}")
    entries = body.get("entry")
    if not isinstance(entries, list):
        problems.add("entry", "must be an array")
        entries = []
    for e, entry in enumerate(entries):
        changes = entry.get("changes") if isinstance(entry, dict) else None
        if not isinstance(changes, list):
            problems.add(f"entry[{e}].changes", "must be an array")
            continue
        for c, change in enumerate(changes):
            path = f"entry[{e}].changes[{c}]"
            name = change.get("field") if isinstance(change, dict) else None
            if not isinstance(name, str):
                problems.add(f"{path}.field", "must be a string")
            elif name == "messages":
                _messages_value(change.get("value"), f"{path}.value", envelope, problems)
            else:
                envelope.ignore(name if _FIELD_LABEL.fullmatch(name) else "other")
    if problems:
        raise invalid_request(problems.found)
    return envelope
