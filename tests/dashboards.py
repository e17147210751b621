"""Grafana dashboards as PromQL: each panel's queries, and Grafana's variables substituted.

Tests use this to check dashboards without a Grafana: `panel_queries` lists every query of a
dashboard, and `grafana_substitute` turns one into the PromQL that Grafana would send, so it can
be parsed by `promtool` or run against a real Prometheus.

What Grafana substitutes, and how this module does it:

- `$__interval`: the step Grafana picks from the time range and the panel's width, but never
  below the data source's scrape interval ("min interval"). Here: `interval_s`, raised to
  `scrape_interval_s` when lower, exactly as Grafana raises it.
- `$__rate_interval`: Grafana's rule is
  `max(4 * scrape interval, $__interval + scrape interval)`, so a `rate()` window always holds
  at least four scrapes, and always at least one scrape more than the step (no gaps between
  points). The scrape interval is the data source's "Scrape interval" (`timeInterval`, Grafana's
  default 15s; our provisioned data source says 5s, matching deploy/prometheus/prometheus.yml).
- `$__range`: the dashboard's time range, in seconds (`range_s`).
- `$__interval_ms`, `$__rate_interval_ms`, `$__range_s`, `$__range_ms`: the same in those units.
- Template variables, written `$name`, `${name}`, `${name:format}` or `[[name]]`. Every variable is
  taken to be like `tier`: multi-value with "Include All". A value is a string (one selected
  option), a sequence of strings (several options) or `ALL` ("All" selected). In Grafana's
  default format for Prometheus, several options become the regex `(a|b)`, each option with
  its regex metacharacters escaped for a PromQL string (`\\.`); "All" becomes the variable's
  custom all value verbatim (`all_value`, `.*` in our dashboards). `${name:regex}` gives the
  same alternation with single-backslash escapes, and the custom all value verbatim too.
  Either way the result is meant for an `=~` matcher. Names that are not given are left as
  they are, as Grafana leaves unknown variables, so a typo shows up as a PromQL parse error.

Durations are written as whole seconds (`20s`, `3600s`), which every PromQL version accepts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

ALL = "$__all"
"""The value Grafana stores for "All" in a multi-value variable's current selection."""

GRAFANA_DEFAULT_SCRAPE_INTERVAL_S = 15

_BUILTIN = re.compile(
    r"\$(?:\{(__(?:rate_interval_ms|rate_interval|interval_ms|interval|range_ms|range_s|range))\}"
    r"|(__(?:rate_interval_ms|rate_interval|interval_ms|interval|range_ms|range_s|range))\b)"
)
_VARIABLE = re.compile(
    r"\$\{(?P<braced>\w+)(?::(?P<format>[\w-]+))?\}"
    r"|\[\[(?P<bracketed>\w+)(?::(?P<bformat>[\w-]+))?\]\]"
    r"|\$(?P<plain>\w+)"
)
_REGEX_META = re.compile(r"[\\^$.|?*+()\[\]{}]")


def _panels(panels: Sequence[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    for panel in panels:
        yield panel
        # A collapsed row keeps its panels inside itself.
        yield from _panels(panel.get("panels", []))


def panel_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every query of every panel, rows included."""
    queries = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if expr and not target.get("hide", False):
                queries.append((str(panel.get("title", "")), str(expr)))
    return queries


def default_variables(dashboard: Mapping[str, Any]) -> dict[str, str | list[str]]:
    """Each template variable's current (saved) selection: `ALL`, a value, or a list of values."""
    values: dict[str, str | list[str]] = {}
    for variable in dashboard.get("templating", {}).get("list", []):
        current = variable.get("current", {}).get("value", ALL)
        if isinstance(current, list):
            values[variable["name"]] = ALL if ALL in current else [str(v) for v in current]
        else:
            values[variable["name"]] = str(current)
    return values


def rate_interval_s(interval_s: int, scrape_interval_s: int) -> int:
    """Grafana's `$__rate_interval`: max(4 * scrape interval, interval + scrape interval)."""
    interval_s = max(interval_s, scrape_interval_s)
    return max(4 * scrape_interval_s, interval_s + scrape_interval_s)


def _escape(value: str, *, for_promql_string: bool) -> str:
    escaped = _REGEX_META.sub(lambda m: "\\" + m.group(0), value)
    # Inside a PromQL string literal a regex backslash is itself written `\\`.
    return escaped.replace("\\", "\\\\") if for_promql_string else escaped


def _format(value: str | Sequence[str], fmt: str | None, all_value: str) -> str:
    if fmt not in (None, "regex"):
        raise ValueError(f"variable format {fmt!r} is not supported (use the default or :regex)")
    if value == ALL or (not isinstance(value, str) and ALL in value):
        return all_value
    values = [value] if isinstance(value, str) else list(value)
    if not values:
        raise ValueError("a multi-value variable needs at least one selected value")
    escaped = [_escape(v, for_promql_string=fmt is None) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def grafana_substitute(
    expr: str,
    *,
    interval_s: int = 15,
    variables: Mapping[str, str | Sequence[str]],
    scrape_interval_s: int = GRAFANA_DEFAULT_SCRAPE_INTERVAL_S,
    range_s: int = 3600,
    all_value: str = ".*",
) -> str:
    """`expr` with Grafana's built-in and template variables replaced (see the module docstring)."""
    if interval_s <= 0 or scrape_interval_s <= 0 or range_s <= 0:
        raise ValueError("intervals and the range must be positive")
    interval = max(interval_s, scrape_interval_s)
    rate = rate_interval_s(interval, scrape_interval_s)
    builtins = {
        "__rate_interval_ms": str(rate * 1000),
        "__rate_interval": f"{rate}s",
        "__interval_ms": str(interval * 1000),
        "__interval": f"{interval}s",
        "__range_ms": str(range_s * 1000),
        "__range_s": str(range_s),
        "__range": f"{range_s}s",
    }
    expr = _BUILTIN.sub(lambda m: builtins[m.group(1) or m.group(2)], expr)

    def replace(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("bracketed") or match.group("plain")
        fmt = match.group("format") or match.group("bformat")
        if name not in variables:
            return match.group(0)
        return _format(variables[name], fmt, all_value)

    return _VARIABLE.sub(replace, expr)
