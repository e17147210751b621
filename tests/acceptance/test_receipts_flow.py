"""With nothing configured, `gateway run` follows a message past `sent`: the built-in sandbox
posts Meta's signed status webhooks back to the gateway's own `/v1/webhooks/meta`."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.acceptance.commands import call
from tests.acceptance.test_gateway_process import Gateway

ORDER = ["queued", "sending", "sent", "delivered", "read"]


def test_a_message_goes_queued_sent_delivered_read(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path / "service").start()
    try:
        send_key = gateway.keys()["send_key"]
        accepted = gateway.register_and_send()
        seen = [accepted["status"]]
        deadline = time.monotonic() + 30
        message: dict[str, object] = {}
        while seen[-1] != "read" and time.monotonic() < deadline:
            status, message = call(gateway.base, "GET", f"/v1/messages/{accepted['id']}", send_key)
            assert status == 200, message
            if message["status"] != seen[-1]:
                seen.append(str(message["status"]))
            time.sleep(0.02)
    finally:
        assert gateway.terminate() == 0, gateway.command.output()
    # Polling may miss the short `sending`, but never sees a status go back.
    assert seen == sorted(seen, key=ORDER.index), seen
    assert [s for s in seen if s != "sending"] == ["queued", "sent", "delivered", "read"], seen
    assert message["sent_at"] and message["upstream_message_id"]
    # Meta's timestamps are whole seconds: `delivered_at` may read earlier than the gateway's own
    # millisecond `sent_at`, but never later than `read_at`.
    delivered_at, read_at = (
        datetime.fromisoformat(str(message[name]).replace("Z", "+00:00"))
        for name in ("delivered_at", "read_at")
    )
    assert delivered_at <= read_at
    assert message["error"] is None


def test_the_sandbox_can_be_told_to_fail_a_share_like_meta(tmp_path: Path) -> None:
    settings = {"GATEWAY_SANDBOX_FAIL_SHARE": "1", "GATEWAY_SANDBOX_STATUS_DELAYS": "100ms,200ms"}
    gateway = Gateway(tmp_path / "service", **settings).start()
    try:
        send_key = gateway.keys()["send_key"]
        accepted = gateway.register_and_send()
        deadline = time.monotonic() + 30
        message: dict[str, Any] = {"status": "queued"}
        while message["status"] != "failed" and time.monotonic() < deadline:
            _, message = call(gateway.base, "GET", f"/v1/messages/{accepted['id']}", send_key)
            time.sleep(0.02)
    finally:
        assert gateway.terminate() == 0, gateway.command.output()
    assert message["status"] == "failed", message
    assert message["error"]["code"] in (131026, 131047), message
    assert message["failed_at"] and message["upstream_message_id"]
