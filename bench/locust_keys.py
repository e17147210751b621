"""Which keys bench/locustfile.py sends with: the environment's, else those `gateway run` made.

`gateway run` with no keys configured generates a send key and an admin key and stores them in
`<GATEWAY_DATA_DIR>/credentials.json` (gateway/credentials.py; the data dir defaults to
`.gateway` in the directory it was started from). Locust started from that same directory finds
them there; with neither keys in the environment nor that file it stops with a message saying
what to set, instead of sending a load of requests that all answer 401.

Standard library only: the compose file's locust image mounts bench/ alone, without the gateway
package (tests/unit/test_bench_locust_keys.py keeps the two defaults below equal to the
gateway's).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = ".gateway"
CREDENTIALS_FILE = "credentials.json"


class MissingKeysError(RuntimeError):
    """No usable key: the message says where keys were looked for and what to set."""


@dataclass(frozen=True)
class Keys:
    send: str
    admin: str | None
    source: str  # "environment" or the credentials file read


def _first(environ: Mapping[str, str], *names: str) -> str | None:
    """The first key of the first variable set (a *_KEYS variable is comma-separated)."""
    for name in names:
        value = environ.get(name, "").split(",")[0].strip()
        if value:
            return value
    return None


def credentials_path(environ: Mapping[str, str], cwd: Path | None = None) -> Path:
    data_dir = Path(environ.get("GATEWAY_DATA_DIR") or DEFAULT_DATA_DIR)
    return data_dir if data_dir.is_absolute() else (cwd or Path.cwd()) / data_dir


def load_keys(
    environ: Mapping[str, str] | None = None,
    *,
    cwd: Path | None = None,
    require_admin: bool = False,
) -> Keys:
    """GATEWAY_API_KEY / GATEWAY_API_KEYS (and the ADMIN ones), else the credentials file."""
    env = os.environ if environ is None else environ
    send = _first(env, "GATEWAY_API_KEY", "GATEWAY_API_KEYS")
    admin = _first(env, "GATEWAY_ADMIN_KEY", "GATEWAY_ADMIN_KEYS")
    source = "environment"
    if send is None or (require_admin and admin is None):
        path = credentials_path(env, cwd) / CREDENTIALS_FILE
        stored = _read(path)
        send = send or stored.get("send_key")
        admin = admin or stored.get("admin_key")
        source = str(path)
        if not send:
            raise MissingKeysError(f"{path} holds no send_key")
    if require_admin and not admin:
        raise MissingKeysError(
            f"BENCH_REGISTER=1 needs an admin key: set GATEWAY_ADMIN_KEY (none in {source})"
        )
    return Keys(send, admin, source)


def _read(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingKeysError(
            "no gateway key to send with: set GATEWAY_API_KEY (a send key; GATEWAY_ADMIN_KEY "
            f"too for BENCH_REGISTER=1), or start locust where `gateway run` keeps {path} "
            "(set GATEWAY_DATA_DIR to the gateway's data directory)"
        ) from None
    except (OSError, ValueError) as exc:
        raise MissingKeysError(f"cannot read the gateway's keys from {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise MissingKeysError(f"{path} is not a JSON object of keys")
    return {k: v for k, v in data.items() if isinstance(v, str)}
