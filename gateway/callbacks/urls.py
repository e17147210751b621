"""Which callback URLs a message may carry: absolute http(s), no user info, inside the allow list.

Every URL is parsed and compared on its parts (scheme, host, port with the scheme's default
filled in, path), never as raw text: `https://hooks.example.com@evil.test/` or
`https://hooks.example.com.evil.test/` must not pass for `https://hooks.example.com/`. Dot
segments are refused outright, so `/hooks/../admin` cannot climb out of an allowed path.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

from gateway.errors import ConfigError
from gateway.settings import Settings

MAX_URL = 2048
DEFAULT_PORTS = {"http": 80, "https": 443}
# Printable ASCII without space: what goes into a request line unchanged (non-ASCII hosts and
# paths are given percent- or punycode-encoded).
_ALLOWED_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))

Origin = tuple[str, str, int]  # scheme, host, port: what concurrency is bounded by


@dataclass(frozen=True, slots=True)
class CallbackUrl:
    url: str
    origin: Origin
    path: str


def parse(url: object) -> CallbackUrl | str:
    """The parsed URL, or why it is not a callback URL (a sentence for the API's error)."""
    rule = f"must be an absolute http(s) URL of at most {MAX_URL} characters"
    if not isinstance(url, str) or not 0 < len(url) <= MAX_URL:
        return rule
    if not _ALLOWED_CHARS.issuperset(url):
        return rule + ", in printable ASCII without spaces (percent-encode the rest)"
    try:
        parts: SplitResult = urlsplit(url)
        port = parts.port
    except ValueError:
        return rule
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return rule
    if "@" in parts.netloc:
        return "must not carry user info (user:password@)"
    if parts.fragment or url.endswith("#"):
        return "must not have a fragment (#...)"
    path = parts.path or "/"
    if any(unquote(segment) in (".", "..") for segment in path.split("/")):
        return "must not have . or .. path segments"
    origin = (scheme, parts.hostname.lower(), port if port is not None else DEFAULT_PORTS[scheme])
    return CallbackUrl(url, origin, path)


class CallbackPolicy:
    """The allow list (`GATEWAY_CALLBACK_ALLOW`) and the default URL, parsed once."""

    def __init__(self, allow: tuple[str, ...], default: str | None) -> None:
        prefixes: list[CallbackUrl] = []
        for prefix in allow:
            parsed = parse(prefix)
            if isinstance(parsed, str):
                raise ConfigError(f"GATEWAY_CALLBACK_ALLOW: {prefix!r} {parsed}")
            if urlsplit(prefix).query:
                raise ConfigError(f"GATEWAY_CALLBACK_ALLOW: {prefix!r} must not have a query")
            prefixes.append(parsed)
        self.prefixes = tuple(prefixes)
        if default is not None:
            parsed = parse(default)
            if isinstance(parsed, str):
                raise ConfigError(f"GATEWAY_CALLBACK_URL {parsed}")
        self.default = default or ""

    @classmethod
    def from_settings(cls, settings: Settings) -> CallbackPolicy:
        return cls(settings.callback_allow, settings.callback_url)

    def allows(self, url: CallbackUrl) -> bool:
        return any(
            url.origin == prefix.origin and url.path.startswith(prefix.path)
            for prefix in self.prefixes
        )

    def problem(self, url: object) -> str | None:
        """Why a message may not carry `url` as its callback_url, or None when it may."""
        parsed = parse(url)
        if isinstance(parsed, str):
            return parsed
        if not self.prefixes:
            return "is not allowed: this gateway allows no callback URLs (GATEWAY_CALLBACK_ALLOW)"
        if not self.allows(parsed):
            return "is not under any of the callback URL prefixes this gateway allows"
        return None
