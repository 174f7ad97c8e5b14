"""The latest drift report (``python -m pipelines drift``) as gauges on the proxy's ``/metrics``.

The proxy sees requests, not outcomes or the training data: drift and observed accuracy come from
the report the feedback loop writes. ``DriftGauges`` re-reads it when its modification time
changes (at most once per scrape), so a new report shows on the next scrape without a restart. A
missing or unreadable report leaves the gauges without samples (declared, so dashboards resolve).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# metric -> (help, labels)
GAUGES = {
    "router_proxy_drift_flagged": ("1 if the latest drift report flags drift, else 0.", ()),
    "router_proxy_drift_feature_psi_max": ("Largest population stability index over the features.", ()),
    "router_proxy_drift_predicted_psi": ("Population stability index of predicted p(correct), per tier.", ("tier",)),
    "router_proxy_drift_tier_mix_tv": ("Total variation between the training and production tier mix.", ()),
    "router_proxy_drift_ood_rate": ("Share of production requests routed out-of-distribution.", ()),
    "router_proxy_observed_accuracy": ("Observed accuracy per executed tier, where outcomes exist.", ("tier",)),
    "router_proxy_predicted_accuracy": ("Mean predicted p(correct) of the same requests, per tier.", ("tier",)),
    "router_proxy_drift_report_timestamp_seconds": ("When the drift report was written (file time).", ()),
}


class DriftGauges:
    """Values of ``GAUGES`` from a drift report file, cached by modification time."""

    def __init__(self, path: str | Path | None):
        self.path = None if path is None else Path(path)
        self._lock = threading.Lock()
        self._mtime: int | None = None
        self._values: dict[str, dict[tuple, float]] = {}

    def declare(self, prom) -> None:
        for name, (help_, labels) in GAUGES.items():
            prom.declare(name, "gauge", help_, labels, collect=lambda name=name: self.values().get(name, {}))

    def values(self) -> dict[str, dict[tuple, float]]:
        if self.path is None:
            return {}
        with self._lock:
            try:
                mtime = os.stat(self.path).st_mtime_ns
            except OSError:
                self._mtime, self._values = None, {}
                return {}
            if mtime != self._mtime:
                self._mtime = mtime
                try:
                    self._values = gauges_of(json.loads(self.path.read_text()), mtime / 1e9)
                except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
                    log.warning("drift report %s unreadable (%s); its gauges are empty", self.path, e)
                    self._values = {}
            return self._values


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def gauges_of(report: dict[str, Any], written: float) -> dict[str, dict[tuple, float]]:
    """The gauges' samples from a drift report (``pipelines/drift.py``'s keys)."""
    out: dict[str, dict[tuple, float]] = {name: {} for name in GAUGES}
    out["router_proxy_drift_flagged"][()] = 1.0 if report.get("drift") else 0.0
    out["router_proxy_drift_report_timestamp_seconds"][()] = written
    for name, value in (("router_proxy_drift_feature_psi_max", (report.get("features") or {}).get("max_psi")),
                        ("router_proxy_drift_tier_mix_tv", report.get("tier_mix_tv")),
                        ("router_proxy_drift_ood_rate", report.get("ood_rate"))):
        if _num(value) is not None:
            out[name][()] = _num(value)
    for tier, v in (report.get("predicted_p_correct") or {}).items():
        if _num(v.get("psi")) is not None:
            out["router_proxy_drift_predicted_psi"][(tier,)] = _num(v["psi"])
    for tier, v in (report.get("accuracy_per_tier") or {}).items():
        for key, name in (("observed", "router_proxy_observed_accuracy"), ("predicted", "router_proxy_predicted_accuracy")):
            if _num(v.get(key)) is not None:
                out[name][(tier,)] = _num(v[key])
    return out
