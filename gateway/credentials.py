"""Auth is never silently off: keys and secrets are generated when none are set.

On first start without `GATEWAY_API_KEYS` and `GATEWAY_ADMIN_KEYS` the gateway generates one send
key and one admin key (and a webhook secret when `GATEWAY_WEBHOOK_SECRET` is unset), stores them
in `<data_dir>/credentials.json` with mode 0600 and prints them once. Later starts read the file
and print only where it is. The status callback signing secret (`GATEWAY_CALLBACK_SECRET`,
Standard Webhooks' `whsec_...`) and the Meta app secret (`GATEWAY_META_APP_SECRET`) are generated
and stored the same way when unset, but never printed: receivers read the callback secret from
the file. A file written by an older version gets the entries it lacks added.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import orjson

from gateway.callbacks.signing import generate_secret
from gateway.settings import Settings

FILE_NAME = "credentials.json"
LOCK_NAME = "credentials.lock"

# Each entry of the file and how it is made.
_GENERATORS: dict[str, Callable[[], str]] = {
    "send_key": lambda: "gws_" + secrets.token_urlsafe(24),
    "admin_key": lambda: "gwa_" + secrets.token_urlsafe(24),
    "webhook_secret": lambda: "gwh_" + secrets.token_urlsafe(24),
    "callback_secret": generate_secret,
    "meta_app_secret": lambda: secrets.token_hex(16),
}
# Entries printed when generated: what a client of the API needs to be handed.
_PRINTED = {
    "admin_key": "admin key:",
    "send_key": "send key: ",
    "webhook_secret": "webhook secret:",
}


def _write_private(path: Path, data: bytes) -> None:
    """Replace `path` with `data`, mode 0600 from the start (never readable by others)."""
    temporary = path.with_name(path.name + ".new")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temporary, path)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    # `gateway api` and `gateway worker` may start together on one data directory: one of
    # them adds what is missing, the other then reads it.
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure(settings: Settings, out: TextIO = sys.stderr, *, api: bool = True) -> Settings:
    """Settings with keys and secrets, generating and storing those that are unset.

    A process serving the API (`api`) needs keys and the webhook secret; every process needs
    the callback signing secret and the Meta app secret.
    """
    wanted: dict[str, str] = {}  # file entry -> settings field
    if api and not settings.api_keys and not settings.admin_keys:
        wanted |= {"send_key": "api_keys", "admin_key": "admin_keys"}
    if api and not settings.webhook_secret:
        wanted["webhook_secret"] = "webhook_secret"
    if not settings.callback_secret:
        wanted["callback_secret"] = "callback_secret"
    if not settings.meta_app_secret:
        wanted["meta_app_secret"] = "meta_app_secret"
    if not wanted:
        return settings
    path = settings.data_dir / FILE_NAME
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(settings.data_dir):
        try:
            stored: dict[str, str] = orjson.loads(path.read_bytes())
            with contextlib.suppress(OSError):  # an older version left it readable by others
                path.chmod(0o600)
        except FileNotFoundError:
            stored = {}
        added = [name for name in wanted if not stored.get(name)]
        if added:
            for name in added:
                stored[name] = _GENERATORS[name]()
            _write_private(path, orjson.dumps(stored, option=orjson.OPT_INDENT_2))
    changes: dict[str, object] = {}
    for name, setting in wanted.items():
        changes[setting] = (stored[name],) if setting.endswith("_keys") else stored[name]
    printed = [name for name in ("admin_key", "send_key", "webhook_secret") if name in added]
    if printed:
        lines = [f"No keys were configured; generated these (stored in {path}, mode 0600):"]
        lines += [f"  {_PRINTED[name]} {stored[name]}" for name in printed]
        out.write("\n".join(lines) + "\n")
    else:
        out.write(f"Using generated credentials from {path}\n")
    if "callback_secret" in added:
        out.write(f"Status callbacks are signed with the callback_secret stored in {path}\n")
    out.flush()
    return dataclasses.replace(settings, **changes)  # type: ignore[arg-type]
