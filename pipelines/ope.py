"""``python -m pipelines ope``: off-policy evaluation of routing policies on logged traffic.

    python -m pipelines ope [--feedback data/production/feedback.parquet] [--lambda 0.01 ...]
                            [--candidate [NAME=]models/candidate ...] [--out metrics/ope.json]

As the DVC stage ``ope`` (after ``recalibrate`` and ``retrain``) it evaluates the served bundle's
policies and the candidates ``ope.candidates`` (``models/recalibrated``, ``models/retrained``) on the
logged traffic, so a candidate comes with its off-policy evidence.

The proxy logged, per request, the tier it chose with that tier's probability under the logging
policy (``propensity``: epsilon-greedy, ``router.policy.explore_choice``), the tiers the caps
admitted with their predicted success and cost, and ``pipelines feedback`` joined the observed
``correct``. For a target policy pi (probabilities over tiers per request) and logged rows
(x_i, a_i, r_i, pi0_i = propensity), with weights w_i = pi(a_i | x_i) / pi0_i:

- **IPS** (inverse propensity): mean(w_i r_i). Unbiased when pi0 > 0 wherever pi > 0.
- **SNIPS** (self-normalised): sum(w_i r_i) / sum(w_i). Slightly biased, far less variance when
  weights are large.
- **DR** (doubly robust): mean(sum_a pi(a | x_i) q(x_i, a) + w_i (r_i - q(x_i, a_i))), with q the
  logging bundle's own predictions (``p_correct`` per admitted tier; ``cost`` for the cost value):
  unbiased if either the propensities or q are right, and with a useful q much less variance.

Each is computed for accuracy (r = correct) and for cost (r = observed cost), with percentile
bootstrap intervals over requests. Policies: ``logged`` (the logging policy itself: w = 1, a check
that the estimates equal the observed mean), ``greedy`` (the bundle's policy without exploration),
``lambda=X`` (the bundle's predictions at another price of cost), and each candidate by its name
(another bundle, routed on the logged text: needs the proxy's ``--log-text``). Rows used: an outcome exists, the
chosen tier is the one executed (a fallback after an upstream failure is not the policy's action),
the propensity is positive; the report counts every excluded row by reason.

Library: no maintained OPE library fits. Open Bandit Pipeline (``obp``, the reference
implementation of these estimators) last released 0.5.7 in April 2023 and is not installed here;
SCOPE-RL (2023) targets sequential RL. The three estimators are a few lines of NumPy, tested
against a simulation with a known true value (``tests/pipelines/test_ope.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipelines import artifacts
from pipelines.config import Params
from pipelines.off_policy import ESTIMATORS, evaluate_policies, logged_arrays
from pipelines.tracking import NULL_RUN, run_stage, stage_arguments

log = logging.getLogger(__name__)

SECTIONS = ("ope", "feedback")


def ope(params: Params, run=NULL_RUN, feedback_path=None, lambdas=(), candidates=None, out=None) -> dict:
    """Evaluate the policies on the feedback table. ``candidates``: ``[NAME=]PATH`` strings (a bare
    path is named ``candidate``); None: ``ope.candidates`` from params, those that exist, and only if
    the log has the text to route them on (else the report says why they were left out)."""
    cfg = params.ope
    path = Path(feedback_path or Path(params.feedback.out_dir) / "feedback.parquet")
    data = logged_arrays(artifacts.read_feedback(path))
    notes = {}
    if candidates:
        named = dict(c.split("=", 1) if "=" in c else ("candidate", c) for c in candidates)
    else:
        named = {n: b for n, b in cfg.candidates.items() if (Path(b) / "manifest.json").exists()}
        rows = data["rows"]
        if named and len(rows) and ("text" not in rows or rows["text"].isna().any()):
            notes["candidates_left_out"] = (f"{sorted(named)}: the log has no text to route them on "
                                            "(run the proxy with --log-text)")
            named = {}
    result = evaluate_policies(data, lambdas, named, cfg.bootstrap, cfg.confidence, cfg.seed, cfg.min_propensity)
    report = {"feedback": str(path), "rows": int(len(data["rows"])), "excluded": data["excluded"],
              "tiers": data["tiers"], "confidence": cfg.confidence, "bootstrap": cfg.bootstrap,
              "candidates": {n: str(b) for n, b in named.items()}, **notes, **result}
    out = Path(out or cfg.out)
    artifacts.write_json(out, report)
    run.log_metrics({f"{p}.{m}.{e}": v[m][e] for p, v in result["policies"].items() for m in ("accuracy", "cost")
                     for e in ESTIMATORS if v[m].get(e) is not None})
    run.log_artifact(out)
    summary = {p: {m: v[m].get("dr") for m in ("accuracy", "cost")} for p, v in result["policies"].items()}
    return {"rows": report["rows"], "out": str(out), "dr": summary}


def _arguments(ap) -> None:
    ap.add_argument("--feedback", default=None, help="feedback table (default: <feedback.out_dir>/feedback.parquet)")
    ap.add_argument("--lambda", dest="lambdas", type=float, action="append", default=[],
                    help="also evaluate the logging bundle's predictions at this price of cost (repeat)")
    ap.add_argument("--candidate", action="append", default=None, metavar="[NAME=]BUNDLE",
                    help="a candidate bundle, routed on the logged text (repeat; a bare path is named "
                         "'candidate'; default: ope.candidates that exist)")
    ap.add_argument("--out", default=None, help="report JSON (default: ope.out)")


def main(argv=None) -> dict:
    description = "ope: off-policy evaluation (IPS, SNIPS, DR) of routing policies on logged traffic"
    args = stage_arguments(description, _arguments, argv)
    return run_stage("ope", lambda params, run: ope(params, run, args.feedback, args.lambdas, args.candidate, args.out),
                     description=description, sections=SECTIONS, args=args, summary=("rows", "out", "dr"))


if __name__ == "__main__":
    main()
