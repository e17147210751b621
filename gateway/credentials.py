"""Auth is never silently off: keys and the webhook secret are generated when none are set.

On first start without `GATEWAY_API_KEYS` and `GATEWAY_ADMIN_KEYS` the gateway generates one send
key and one admin key (and a webhook secret when `GATEWAY_WEBHOOK_SECRET` is unset), stores them
in `<data_dir>/credentials.json` with mode 0600 and prints them once. Later starts read the file
and print only where it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import sys
from pathlib import Path
from typing import TextIO

import orjson

from gateway.settings import Settings

FILE_NAME = "credentials.json"


def _generate() -> dict[str, str]:
    return {
        "send_key": "gws_" + secrets.token_urlsafe(24),
        "admin_key": "gwa_" + secrets.token_urlsafe(24),
        "webhook_secret": "gwh_" + secrets.token_urlsafe(24),
    }


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def ensure(settings: Settings, out: TextIO = sys.stderr) -> Settings:
    """Settings with keys and a webhook secret, generating and storing them when unset."""
    needs_keys = not settings.api_keys and not settings.admin_keys
    needs_secret = not settings.webhook_secret
    if not needs_keys and not needs_secret:
        return settings
    path = settings.data_dir / FILE_NAME
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        stored = orjson.loads(path.read_bytes())
        with contextlib.suppress(OSError):  # an older version left it readable by others
            path.chmod(0o600)
        fresh = False
    except FileNotFoundError:
        stored = _generate()
        try:
            _write_private(path, orjson.dumps(stored, option=orjson.OPT_INDENT_2))
            fresh = True
        except FileExistsError:  # another process of this start wrote it first
            stored = orjson.loads(path.read_bytes())
            fresh = False
    changes: dict[str, object] = {}
    if needs_keys:
        changes["api_keys"] = (stored["send_key"],)
        changes["admin_keys"] = (stored["admin_key"],)
    if needs_secret:
        changes["webhook_secret"] = stored["webhook_secret"]
    if fresh:
        lines = [f"No keys were configured; generated these (stored in {path}, mode 0600):"]
        if needs_keys:
            lines += [f"  admin key: {stored['admin_key']}", f"  send key:  {stored['send_key']}"]
        if needs_secret:
            lines.append(f"  webhook secret: {stored['webhook_secret']}")
        out.write("\n".join(lines) + "\n")
    else:
        out.write(f"Using generated credentials from {path}\n")
    out.flush()
    return dataclasses.replace(settings, **changes)  # type: ignore[arg-type]
