"""The Grafana dashboard and its provisioning files: every panel's PromQL names metrics (and labels)
that a running proxy really exports on /metrics, drift gauges included (from a real drift report),
and the gauges follow a rewritten report."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipelines.config import DriftConfig
from pipelines.drift import drift_report
from pipelines.feedback import join_feedback
from router import Router
from router.proxy import ProxyConfig
from tests.fakes import FakeOpenAIServer
from tests.router.bundle_fixture import session_proxy_bundle, synthetic_queries
from tests.traffic import get_text, post_json, proxy_traffic, start_proxy

REPO = Path(__file__).resolve().parents[1]
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "difficulty-router.json"
IDENT = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


def promql_names(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names it is filtered or grouped by) for each metric an expression reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors ([5m], [$__rate_interval])
    grouped: set[str] = set()
    for m in re.finditer(rf"\b(?:by|without)\s*\(([^)]*)\)", expr):
        grouped |= {x.strip() for x in m.group(1).split(",") if x.strip()}
    expr = re.sub(rf"\b(?:by|without)\s*\([^)]*\)", " ", expr)
    out = []
    for m in re.finditer(rf"({IDENT})\s*(\{{[^}}]*\}})?\s*(\()?", expr):
        name, matchers, call = m.group(1), m.group(2), m.group(3)
        if call or name in KEYWORDS or re.fullmatch(r"\d.*|[eE]\d*", name):
            continue
        labels = set(re.findall(rf"({IDENT})\s*(?:=~|!~|!=|=)", matchers or ""))
        out.append((name, labels | grouped))
    return out


def test_promql_parsing_finds_metrics_and_labels():
    got = promql_names('histogram_quantile(0.95, sum by (le, tier) (rate(a_bucket{code="2.."}[5m]))) / b')
    assert got == [("a_bucket", {"le", "tier", "code"}), ("b", {"le", "tier"})]
    assert promql_names("time() - ts_seconds") == [("ts_seconds", set())]


def exported(text: str) -> dict[str, set[str]]:
    """Series names a /metrics page exposes (histograms as _bucket/_sum/_count) and their labels."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            for n in ([f"{name}_bucket", f"{name}_sum", f"{name}_count"] if kind == "histogram" else [name]):
                out.setdefault(n, set())
        elif line and not line.startswith("#"):
            m = re.match(rf"({IDENT})(?:\{{(.*)\}})?\s", line)
            out.setdefault(m.group(1), set()).update(re.findall(rf"({IDENT})=", m.group(2) or ""))
    return out


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """A real drift report (feedback from proxy traffic with outcomes), then a proxy exporting it,
    scraped after it served a few requests; (metrics text, report, report path, proxy)."""
    d = tmp_path_factory.mktemp("dash")
    router = Router.load(session_proxy_bundle(tmp_path_factory).path)
    texts, _ = synthetic_queries(60, seed=2)
    answers = proxy_traffic(router, texts, d / "d.jsonl", explore=0.2, log_text=True)
    pd.DataFrame({"request_id": [b["router"]["request_id"] for _, b, _ in answers], "correct": 1.0}).to_csv(
        d / "o.csv", index=False)
    feedback, _ = join_feedback([d / "d.jsonl"], d / "o.csv")
    train = pd.DataFrame(router.featurizer.transform(synthetic_queries(200, seed=0)[0]),
                         columns=router.featurizer.feature_names)
    report = drift_report(train, None, feedback, router, DriftConfig(min_rows=10, min_tier_rows=1))
    (d / "drift.json").write_text(json.dumps(report))
    # the first upstream call fails (no retries): a small tier's request is answered by the fallback
    # tier, so the error and fallback counters have samples (and labels) too
    with FakeOpenAIServer(script=["500"]) as fake:
        srv = start_proxy(router, ProxyConfig(upstreams={"small": fake.url, "big": fake.url}, explore=0.2, retries=0,
                                              fallback_tier="big-b12-k1", decision_log=None,
                                              drift_report=str(d / "drift.json")))
        try:
            status, body, _ = post_json(srv, "/v1/chat/completions", {"model": "router", "models": ["small"],
                                                                       "messages": [{"role": "user", "content": texts[0]}]})
            assert status == 200 and body["router"]["fallback_from"]
            for t in texts[:20]:
                assert post_json(srv, "/v1/chat/completions",
                                 {"model": "router", "messages": [{"role": "user", "content": t}]})[0] == 200
            yield get_text(srv), report, d / "drift.json", srv
        finally:
            srv.drain(5)


def test_every_panel_query_names_an_exported_metric_and_its_labels(scraped):
    text, _, _, _ = scraped
    metrics = exported(text)
    dash = json.loads(DASHBOARD.read_text())
    exprs = [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 15
    seen = set()
    for title, expr in exprs:
        names = promql_names(expr)
        assert names, (title, expr)
        for name, labels in names:
            assert name in metrics, f"panel {title!r}: {name} is not on the proxy's /metrics"
            have = metrics[name] | ({"le"} if name.endswith("_bucket") else set())
            assert labels <= have, f"panel {title!r}: {name} has labels {sorted(have)}, the query uses {sorted(labels)}"
            seen.add(name)
    # what the issue asks the dashboard to show is there
    for needed in ("router_proxy_request_seconds_bucket", "router_proxy_tokens_per_request_sum",
                   "router_proxy_decisions_total", "router_proxy_observed_accuracy", "router_proxy_drift_flagged"):
        assert needed in seen
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_provisioning_files_point_at_the_dashboard():
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "difficulty-router.yaml").read_text())
    assert prov["apiVersion"] == 1 and prov["providers"][0]["type"] == "file"
    assert prov["providers"][0]["options"]["path"].endswith("difficulty-router")
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    dash = json.loads(DASHBOARD.read_text())
    assert [v["query"] for v in dash["templating"]["list"] if v["name"] == "datasource"] == ["prometheus"]
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"])


def test_drift_gauges_carry_the_report_and_follow_a_new_one(scraped):
    text, report, path, srv = scraped
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["router_proxy_drift_flagged"] == float(report["drift"])
    assert values["router_proxy_drift_tier_mix_tv"] == pytest.approx(report["tier_mix_tv"])
    assert values["router_proxy_drift_feature_psi_max"] == pytest.approx(report["features"]["max_psi"])
    for tier, v in report["accuracy_per_tier"].items():
        assert values[f'router_proxy_observed_accuracy{{tier="{tier}"}}'] == pytest.approx(v["observed"])
    assert report["accuracy_per_tier"]  # outcomes existed, so the gauges have samples
    path.write_text(json.dumps({**report, "drift": not report["drift"], "tier_mix_tv": 0.75}))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a coarse clock still sees a change
    again = get_text(srv)
    assert f"router_proxy_drift_flagged {float(not report['drift'])}" in again
    assert "router_proxy_drift_tier_mix_tv 0.75" in again
    path.write_text("{not json")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert "\nrouter_proxy_drift_flagged " not in get_text(srv)  # unreadable: declared, no samples
