"""The keys of the locust users: the environment's, else `gateway run`'s credentials file, else a
clear stop (never a silent run of 401s)."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest

from bench.locust_keys import (
    CREDENTIALS_FILE,
    DEFAULT_DATA_DIR,
    MissingKeysError,
    load_keys,
)
from gateway import credentials
from gateway.settings import FIELDS, Settings


def write_credentials(data_dir: Path) -> dict[str, str]:
    """The file exactly as `gateway run` writes it."""
    settings = dataclasses.replace(Settings(), data_dir=data_dir)
    credentials.ensure(settings, out=io.StringIO())
    stored: dict[str, str] = json.loads((data_dir / credentials.FILE_NAME).read_text())
    return stored


def test_the_defaults_are_the_gateways() -> None:
    [data_dir] = [f for f in FIELDS if f.name == "data_dir"]
    assert Path(DEFAULT_DATA_DIR) == data_dir.default
    assert credentials.FILE_NAME == CREDENTIALS_FILE


def test_keys_in_the_environment_win(tmp_path: Path) -> None:
    write_credentials(tmp_path / DEFAULT_DATA_DIR)
    env = {"GATEWAY_API_KEYS": "send-1, send-2", "GATEWAY_ADMIN_KEY": "admin-1"}
    keys = load_keys(env, cwd=tmp_path, require_admin=True)
    assert (keys.send, keys.admin, keys.source) == ("send-1", "admin-1", "environment")


def test_without_keys_the_default_credentials_file_is_read(tmp_path: Path) -> None:
    stored = write_credentials(tmp_path / DEFAULT_DATA_DIR)
    keys = load_keys({}, cwd=tmp_path, require_admin=True)
    assert (keys.send, keys.admin) == (stored["send_key"], stored["admin_key"])
    assert keys.source == str(tmp_path / DEFAULT_DATA_DIR / CREDENTIALS_FILE)


def test_gateway_data_dir_says_where_the_file_is(tmp_path: Path) -> None:
    stored = write_credentials(tmp_path / "elsewhere")
    keys = load_keys({"GATEWAY_DATA_DIR": str(tmp_path / "elsewhere")}, cwd=tmp_path / "other")
    assert keys.send == stored["send_key"]


def test_an_admin_key_needed_for_registering_comes_from_the_file(tmp_path: Path) -> None:
    stored = write_credentials(tmp_path / DEFAULT_DATA_DIR)
    keys = load_keys({"GATEWAY_API_KEY": "mine"}, cwd=tmp_path, require_admin=True)
    assert (keys.send, keys.admin) == ("mine", stored["admin_key"])


def test_no_keys_and_no_file_stops_with_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(MissingKeysError) as caught:
        load_keys({}, cwd=tmp_path)
    message = str(caught.value)
    assert "GATEWAY_API_KEY" in message
    assert str(tmp_path / DEFAULT_DATA_DIR / CREDENTIALS_FILE) in message
    assert "GATEWAY_DATA_DIR" in message


def test_registering_without_any_admin_key_stops(tmp_path: Path) -> None:
    with pytest.raises(MissingKeysError, match="GATEWAY_ADMIN_KEY"):
        load_keys({"GATEWAY_API_KEY": "mine"}, cwd=tmp_path, require_admin=True)


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"admin_key": "a"}'])
def test_an_unusable_file_stops_naming_it(tmp_path: Path, content: str) -> None:
    (tmp_path / DEFAULT_DATA_DIR).mkdir()
    (tmp_path / DEFAULT_DATA_DIR / CREDENTIALS_FILE).write_text(content)
    with pytest.raises(MissingKeysError, match=CREDENTIALS_FILE):
        load_keys({}, cwd=tmp_path)
