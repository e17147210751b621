"""Meta's webhooks into the real `gateway` process: receipts, the service window, the metrics."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.acceptance.commands import call
from tests.acceptance.test_gateway_process import PN, Gateway

APP_SECRET = "acceptance-meta-app-secret"
VERIFY_TOKEN = "acceptance-verify-token"
USER = "5491140123456"
TEMPLATE = {
    "phone_number_id": PN,
    "to": USER,
    "type": "template",
    "template": {"name": "hello_world", "language": {"code": "en_US"}},
}
TEXT = {"phone_number_id": PN, "to": USER, "type": "text", "text": {"body": "hi"}}


def post_webhook(base: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    raw = json.dumps(body).encode()
    signature = "sha256=" + hmac.new(APP_SECRET.encode(), raw, hashlib.sha256).hexdigest()
    request = urllib.request.Request(
        f"{base}/v1/webhooks/meta",
        data=raw,
        method="POST",
        headers={"X-Hub-Signature-256": signature, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def messages_change(**value: Any) -> dict[str, Any]:
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "102290129340398",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": "15550783881",
                                "phone_number_id": PN,
                            },
                            **value,
                        },
                    }
                ],
            }
        ],
    }


def test_receipts_and_the_service_window_in_the_real_process(tmp_path: Path) -> None:
    gateway = Gateway(
        tmp_path / "service",
        GATEWAY_META_APP_SECRET=APP_SECRET,
        GATEWAY_META_VERIFY_TOKEN=VERIFY_TOKEN,
        GATEWAY_ENFORCE_SERVICE_WINDOW="true",
    ).start()
    try:
        keys = gateway.keys()
        send, admin = keys["send_key"], keys["admin_key"]
        with urllib.request.urlopen(
            f"{gateway.base}/v1/webhooks/meta?hub.mode=subscribe"
            f"&hub.verify_token={VERIFY_TOKEN}&hub.challenge=31337",
            timeout=5,
        ) as response:
            assert response.read() == b"31337"
        status, _ = call(gateway.base, "PUT", f"/v1/phone-numbers/{PN}", admin, {})
        assert status in (200, 201)
        status, refused = call(gateway.base, "POST", "/v1/messages", send, TEXT)
        assert (status, refused["error"]["code"]) == (422, "outside_service_window")
        status, accepted = call(gateway.base, "POST", "/v1/messages", send, TEMPLATE)
        assert status == 202, accepted
        shown: dict[str, Any] = {}
        for _ in range(200):
            _, shown = call(gateway.base, "GET", f"/v1/messages/{accepted['id']}", send)
            if shown.get("upstream_message_id"):
                break
            time.sleep(0.05)
        wamid = shown["upstream_message_id"]
        assert wamid, shown
        now = int(time.time())
        statuses = [
            {"id": wamid, "status": "read", "timestamp": str(now), "recipient_id": USER},
            {"id": wamid, "status": "delivered", "timestamp": str(now - 1), "recipient_id": USER},
        ]
        inbound = [{"from": USER, "id": "wamid.in", "timestamp": str(now), "type": "text"}]
        status, result = post_webhook(
            gateway.base, messages_change(statuses=statuses, messages=inbound)
        )
        assert status == 200, result
        _, shown = call(gateway.base, "GET", f"/v1/messages/{accepted['id']}", send)
        assert shown["status"] == "read"
        assert shown["read_at"] and shown["delivered_at"]
        status, accepted_text = call(gateway.base, "POST", "/v1/messages", send, TEXT)
        assert status == 202, accepted_text
        with urllib.request.urlopen(f"{gateway.base}/metrics", timeout=5) as response:
            exposition = response.read().decode()
        assert 'gateway_receipts_applied_total{status="read"}' in exposition
        assert "gateway_inbound_messages_total" in exposition
    finally:
        assert gateway.terminate() == 0
