"""deploy/grafana-winkr.json charts only metrics that exist (issue 13, item 8): every PromQL
query of every panel and template variable names at least one metric, and every metric it
names is served by a real server's scrape endpoint."""
from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import trio
from conftest import Harness
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana-winkr.json"
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum"),
            "summary": ("", "_count", "_sum"), "info": ("_info",), "unknown": ("",)}
NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
               "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label matchers, ranges, grouping
    clauses, strings and function names stripped)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        rest = expr[match.end():].lstrip()
        if rest.startswith("(") or match.group() in NOT_METRICS:
            continue  # a function call or a keyword
        names.add(match.group())
    return names


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((f"panel {panel['title']!r}", target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            assert match, f"variable {variable['name']}: unexpected query {query!r}"
            found.append((f"variable {variable['name']!r}", match.group(1)))
    return found


def test_the_parser_finds_the_metrics_in_an_expression() -> None:
    expr = ('histogram_quantile(0.99, sum by (le) (rate(winkr_message_fanout_seconds_bucket'
            '{job=~"$job", instance=~"$instance"}[$__rate_interval]))) / on (instance) time() - up')
    assert metric_names(expr) == {"winkr_message_fanout_seconds_bucket", "up"}


async def test_every_dashboard_query_names_a_served_metric(harness: Harness) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    alice = await harness.connect("alice")
    await harness.conversation(alice, "bob")  # some traffic, so labelled series exist too
    port = harness.server.metrics.serve_http(0, "127.0.0.1")

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return response.read().decode()

    served = set()
    for family in text_string_to_metric_families(await trio.to_thread.run_sync(scrape)):
        served.update(family.name + suffix for suffix in SUFFIXES[family.type])
    assert "winkr_connections" in served and "process_resident_memory_bytes" in served

    found = queries(dashboard)
    assert len(found) >= 20, "every panel of the dashboard has its query here"
    for where, expr in found:
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= served, f"{where}: {sorted(names - served)} not served by winkr ({expr!r})"
