"""Traffic through the routing proxy and the loop's commands on it, for tests and benchmarks (no
pytest here: ``bench/`` imports it): the proxy on loopback fronting the scripted upstream, a
features table made with a bundle's featurizer, ``pipelines feedback`` and ``pipelines drift``."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipelines import artifacts
from pipelines.__main__ import main as pipelines_main

COMMON = ["--set", "mlflow.enabled=false"]


def start_proxy(router, config):
    """The routing proxy on a free loopback port, serving from a daemon thread (stop: ``drain``)."""
    import threading

    from router.proxy import make_proxy_server

    srv = make_proxy_server(router, config, port=0)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


def get_text(srv, path: str = "/metrics") -> str:
    """GET ``path`` from a server started by ``start_proxy``: the body as text."""
    import http.client

    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def post_json(srv, path: str, body: dict) -> tuple[int, dict, dict]:
    """POST ``body`` to a server started by ``start_proxy``: (status, JSON answer, headers)."""
    import http.client
    import json

    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read()), dict(resp.headers)
    finally:
        conn.close()


def proxy_traffic(router, texts, log: Path, seed: int = 0, **config) -> list[tuple[int, dict, dict]]:
    """Send each text as a chat request through a proxy fronting a scripted upstream
    (``tests.fakes.FakeOpenAIServer``) that logs to ``log``; the answers, in order.

    Request ids come from a generator seeded with ``seed`` instead of ``uuid4``: exploration
    draws from the request id, so with random ids the explored tiers (and every figure fitted
    on them) would change from run to run, and a test's margin would hold on one machine and
    not on the next."""
    import random
    import types
    import uuid
    from unittest import mock

    from router.proxy import ProxyConfig
    from tests.fakes import FakeOpenAIServer

    rng = random.Random(seed)
    ids = types.SimpleNamespace(uuid4=lambda: uuid.UUID(int=rng.getrandbits(128), version=4))
    with FakeOpenAIServer() as fake, mock.patch("router.proxy.uuid", ids):
        models = sorted({t.model for t in router.tiers})
        srv = start_proxy(router, ProxyConfig(upstreams={m: fake.url for m in models}, decision_log=str(log), **config))
        try:
            return [post_json(srv, "/v1/chat/completions", {"model": "router", "messages": [{"role": "user",
                                                                                            "content": t}]})
                    for t in texts]
        finally:
            srv.drain(5)


def write_features(router, texts, path, ids=None) -> None:
    """The features table of ``texts`` (ids ``ids``, default q0, q1, ...) made with the bundle's
    featurizer, as the featurize stage writes it."""
    df = pd.DataFrame(router.featurizer.transform(list(texts)), columns=router.featurizer.feature_names)
    df.insert(0, "query_id", list(ids) if ids is not None else [f"q{i}" for i in range(len(texts))])
    artifacts.write_features(df, router.featurizer.spec, path)


def write_labelled(router, texts, Y, Cost, d: Path, ids, split="test", source: str = "synthetic") -> dict:
    """Labelled queries in the files the pipeline's stages write (queries, outcomes, tiers, features
    in ``d``): per (query, tier) of ``router`` the p_correct ``Y`` and cost ``Cost`` ((queries, tiers));
    ``split`` one name or one per query. Returns the params sections that point at them."""
    import numpy as np

    from pipelines.queries import Query

    splits = [split] * len(texts) if isinstance(split, str) else [str(x) for x in split]
    artifacts.write_queries([Query(q, t, "", "exact", source, sp) for q, t, sp in zip(ids, texts, splits)],
                            d / "queries.parquet")
    rows = [{"query_id": q, "split": splits[i], "tier": t.name, "model": t.model, "budget": t.budget,
             "samples": t.samples, "p_correct": Y[i, j], "cost_tokens": Cost[i, j] / t.cost_per_token,
             "latency_tokens": np.nan, "cost": Cost[i, j]}
            for i, q in enumerate(ids) for j, t in enumerate(router.tiers)]
    artifacts.write_outcomes(pd.DataFrame(rows), d / "outcomes.parquet", splits_from="table")
    artifacts.write_tiers([t.to_dict() for t in router.tiers], d / "tiers.json")
    write_features(router, texts, d / "features.parquet", ids)
    return {"prepare": {"out": str(d / "queries.parquet")},
            "label": {"out": str(d / "outcomes.parquet"), "tiers_out": str(d / "tiers.json")},
            "featurize": {"out": str(d / "features.parquet")}}


def feedback_of(d, log, name, records, correct) -> str:
    """Outcomes `correct` of the logged `records` to `d/name.csv`, joined with the log `d/log.jsonl` by
    ``pipelines feedback`` into `d/name/`: the feedback table's path."""
    rows = pd.DataFrame({"request_id": [r["request_id"] for r in records], "correct": correct})
    rows.to_csv(d / f"{name}.csv", index=False)
    pipelines_main(["feedback", "--decisions", str(d / f"{log}.jsonl"), "--outcomes", str(d / f"{name}.csv"),
                    "--out", str(d / name), *COMMON])
    return str(d / name / "feedback.parquet")


def run_drift(bundle, d, production, name, *extra) -> dict:
    """``pipelines drift`` of `production` against the training features `d/features.parquet`: the report."""
    pipelines_main(["drift", "--train", str(d / "features.parquet"), "--production", production, "--bundle",
                    str(bundle), "--out", str(d / f"{name}.json"), "--plot", str(d / f"{name}.png"), *extra, *COMMON])
    return json.loads((d / f"{name}.json").read_text())
