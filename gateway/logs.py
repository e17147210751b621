"""Log setup: human text or one JSON object per line (`GATEWAY_LOG_FORMAT=json`).

Extra context goes in `extra={"phone_number_id": ..., "message_id": ...}` and becomes fields of
the JSON line. Secrets are never passed to a log call; as a second line of defence every record
passes `SecretScrubber`, which masks bearer tokens, the gateway's keys and access tokens wherever
they appear (a library's message, a traceback, an extra field). Anything a client controls is
logged through `untrusted`, so a path cannot forge a line, and a warning that repeats with every
request (Redis down) goes through `Throttled`.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

import orjson

_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

REDACTED = "[redacted]"
# Each pattern keeps its group 1 (the name of the thing) and masks the rest (the secret).
_SECRETS = [
    # An Authorization header or field, whatever its scheme.
    re.compile(r"""(authorization\\?["']?\s*[:=]\s*\\?["']?)[^\r\n"'\\,}]+""", re.IGNORECASE),
    re.compile(r"(bearer\s+)[^\s\"'\\,;}]+", re.IGNORECASE),
    # The gateway's generated keys and secrets, and Standard Webhooks secrets.
    re.compile(r"\b(gw[sah]_)[A-Za-z0-9_\-]+"),
    re.compile(r"\b(whsec_)[A-Za-z0-9+/=_\-]+"),
    # A phone number's access token or Meta's verify token, as a field or a query parameter.
    re.compile(
        r"""((?:access|verify)_token\\?["']?\s*[:=]\s*\\?["']?)[^\s"'\\,&;}]+""", re.IGNORECASE
    ),
]


def scrub(text: str) -> str:
    """`text` with every secret it carries masked."""
    for pattern in _SECRETS:
        text = pattern.sub(lambda match: match.group(1) + REDACTED, text)
    return text


class SecretScrubber(logging.Filter):
    """Masks secrets in a record's message, traceback, stack and extra fields.

    Installed on the handler, so it sees every record that reaches the output, whichever logger
    (the gateway's, aiohttp's, redis-py's) made it.
    """

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg, record.args = scrub(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
            # The formatters use exc_text; the raw exception would bring the secret back.
            record.exc_info = None
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        for name, value in list(vars(record).items()):
            if name in _STANDARD or isinstance(value, int | float | None):
                continue
            text = str(value)
            cleaned = scrub(text)
            if cleaned != text:  # a structured extra keeps its type unless it held a secret
                setattr(record, name, cleaned)
        return True


def untrusted(value: object, limit: int = 200) -> str:
    """`value` safe to log: control and invisible characters escaped as repr does, and cut.

    For anything a client sent (a path, a header): a newline in it cannot start a forged line,
    and a megabyte of it cannot flood the log.
    """
    text = str(value)
    cut = text[:limit]
    escaped = repr(cut)[1:-1]
    if len(text) > limit:
        escaped += f"...[{len(text) - limit} more chars]"
    return escaped


class Throttled:
    """A warning that would repeat with every request, logged at most once per `every_s`.

    The next line that gets through says how many were held back; `recovered` logs one line at
    the end of the episode, with the total, if there was one.
    """

    def __init__(
        self,
        logger: logging.Logger,
        every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._every_s = every_s
        self._clock = clock
        self._next_at = 0.0
        self._held = 0
        self._episode = 0

    def warning(self, msg: str, *args: object) -> None:
        self._episode += 1
        now = self._clock()
        if now < self._next_at:
            self._held += 1
            return
        if self._held:
            msg += " (%d more like this in the last %.0f s)"
            args = (*args, self._held, self._every_s)
        self._held = 0
        self._next_at = now + self._every_s
        self._logger.warning(msg, *args)

    def recovered(self, msg: str) -> None:
        """The condition has passed: one line with the number of warnings of the episode."""
        if not self._episode:
            return
        self._logger.info("%s (after %d warnings)", msg, self._episode)
        self._episode = self._held = 0
        self._next_at = 0.0


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                line[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        return orjson.dumps(line, default=str).decode()


def configure(log_format: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
        )
    handler.addFilter(SecretScrubber())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log is one line per request: far too much under load.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
