"""tests/dashboards.py: panel queries and Grafana's variable substitution."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.dashboards import (
    ALL,
    default_variables,
    grafana_substitute,
    panel_queries,
    rate_interval_s,
)

DASHBOARDS = Path(__file__).resolve().parents[2] / "grafana" / "dashboards"


def sub(
    expr: str, *, variables: Mapping[str, str | Sequence[str]] | None = None, **kwargs: Any
) -> str:
    return grafana_substitute(expr, variables=variables or {}, **kwargs)


@pytest.mark.parametrize(
    ("interval_s", "scrape_s", "expected_s"),
    [
        (15, 15, 60),  # Grafana's defaults: four scrapes win
        (60, 15, 75),  # a wide step: one scrape more than the step
        (15, 5, 20),  # our data source (5s scrapes) at a 15s step
        (30, 5, 35),
        (1, 15, 60),  # the step is never below the scrape interval
    ],
)
def test_rate_interval_is_the_larger_of_four_scrapes_and_step_plus_one_scrape(
    interval_s: int, scrape_s: int, expected_s: int
) -> None:
    assert rate_interval_s(interval_s, scrape_s) == expected_s
    expr = "rate(x[$__rate_interval])"
    got = sub(expr, interval_s=interval_s, scrape_interval_s=scrape_s)
    assert got == f"rate(x[{expected_s}s])"


def test_interval_range_and_their_unit_forms() -> None:
    got = sub(
        "a[$__interval] b[${__interval}] $__interval_ms c[$__range] $__range_s $__range_ms "
        "$__rate_interval_ms",
        interval_s=30,
        scrape_interval_s=15,
        range_s=1800,
    )
    assert got == "a[30s] b[30s] 30000 c[1800s] 1800 1800000 60000"


def test_interval_is_raised_to_the_scrape_interval() -> None:
    assert sub("x[$__interval]", interval_s=5, scrape_interval_s=15) == "x[15s]"


def test_defaults_are_grafanas() -> None:
    # A 15s step on a data source without a scrape interval (Grafana assumes 15s), last hour.
    assert sub("rate(x[$__rate_interval]) increase(x[$__range])") == (
        "rate(x[60s]) increase(x[3600s])"
    )


@pytest.mark.parametrize("form", ["$tier", "${tier}", "[[tier]]"])
def test_all_becomes_the_custom_all_value(form: str) -> None:
    expr = f'x{{tier=~"{form}"}}'
    assert sub(expr, variables={"tier": ALL}) == 'x{tier=~".*"}'
    assert sub(expr, variables={"tier": [ALL]}) == 'x{tier=~".*"}'
    assert sub(expr, variables={"tier": ALL}, all_value="(a|b)") == 'x{tier=~"(a|b)"}'


def test_one_and_several_values() -> None:
    expr = 'x{tier=~"$tier"}'
    assert sub(expr, variables={"tier": "high"}) == 'x{tier=~"high"}'
    assert sub(expr, variables={"tier": ["high"]}) == 'x{tier=~"high"}'
    got = sub(expr, variables={"tier": ["standard", "high"]})
    assert got == 'x{tier=~"(standard|high)"}'


def test_regex_format() -> None:
    expr = 'x{tier=~"${tier:regex}"}'
    assert sub(expr, variables={"tier": ALL}) == 'x{tier=~".*"}'
    assert sub(expr, variables={"tier": ["a", "b"]}) == 'x{tier=~"(a|b)"}'
    # :regex escapes for a regex, not for the PromQL string around it.
    assert sub(expr, variables={"tier": ["a.b"]}) == 'x{tier=~"a\\.b"}'


def test_default_format_escapes_regex_characters_for_a_promql_string() -> None:
    got = sub('x{route=~"$route"}', variables={"route": ["/v1/messages", "a.b", "c|d", "e\\f"]})
    assert got == 'x{route=~"(/v1/messages|a\\\\.b|c\\\\|d|e\\\\\\\\f)"}'


def test_other_names_are_left_alone() -> None:
    variables = {"tier": "high"}
    assert sub("$tiers $tier_x ${other} $other", variables=variables) == (
        "$tiers $tier_x ${other} $other"
    )
    # label_replace's capture groups are not variables.
    expr = 'label_replace(x, "a", "$1", "b", "(.*)")'
    assert sub(expr, variables=variables) == expr
    assert sub("$__interval_x $__name", variables=variables) == "$__interval_x $__name"


def test_unsupported_format_and_empty_selection_are_errors() -> None:
    with pytest.raises(ValueError, match="format"):
        sub("${tier:csv}", variables={"tier": ["a"]})
    with pytest.raises(ValueError, match="at least one"):
        sub("$tier", variables={"tier": []})
    with pytest.raises(ValueError, match="positive"):
        sub("x", interval_s=0)


def test_panel_queries_walks_rows_and_skips_hidden_and_non_promql_targets() -> None:
    dashboard = {
        "panels": [
            {"title": "A", "targets": [{"expr": "up"}, {"expr": "down", "hide": True}]},
            {
                "title": "row",
                "type": "row",
                "collapsed": True,
                "panels": [{"title": "B", "targets": [{"expr": "sum(up)"}, {"refId": "C"}]}],
            },
            {"title": "text", "type": "text"},
        ]
    }
    assert panel_queries(dashboard) == [("A", "up"), ("B", "sum(up)")]


def test_the_gateway_dashboard_substitutes_completely() -> None:
    dashboard = json.loads((DASHBOARDS / "gateway.json").read_text())
    variables = default_variables(dashboard)
    assert variables == {"tier": ALL}
    queries = panel_queries(dashboard)
    assert len(queries) >= 14
    for title, expr in queries:
        got = grafana_substitute(expr, interval_s=15, variables=variables, scrape_interval_s=5)
        assert "$" not in got, f"{title}: {got}"
        assert "[20s]" in got or "[3600s]" in got or "rate(" not in expr, f"{title}: {got}"
