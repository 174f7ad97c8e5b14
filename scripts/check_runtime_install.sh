#!/usr/bin/env bash
# CI step: the runtime installs alone. The pipeline venv exports two bundles the way a user does
# (`python -m pipelines all` on a small outcome table): one on contextual MiniLM features (ONNX
# encoder shipped in the bundle, with export's parity check) and one on the static embedding
# (the default). A fresh venv then gets the base install only (no torch, no pipeline extras), loads
# both and routes with the torch-free featurizers. Prints the install time and size.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
.venv/bin/python - "$WORK" <<'PY'
import sys
from pathlib import Path

import yaml

from tests.pipelines.test_train import outcome_table, raw_params

work = Path(sys.argv[1])
for name, embedding in (("contextual", "all-MiniLM-L6-v2"), ("static", "all-MiniLM-L6-v2-static")):
    d = work / name
    d.mkdir()
    outcome_table(d / "table.csv", n=60)
    raw = raw_params(d, d / "table.csv", evaluate={"metrics": str(d / "evaluate.json"), "plots_dir": str(d / "plots"),
                                                   "bootstrap": 20},
                     export={"out_dir": str(d / "router"), "register": False,
                             "promotion_report": str(d / "promotion.json"),  # not the checkout's metrics/
                             "promotion_audit": str(d / "promotions.jsonl")})
    raw["featurize"] = {"out": str(d / "features.parquet"), **({"embedding": embedding} if embedding else {})}
    raw["mlflow"] = {"tracking_uri": f"sqlite:///{d / 'mlflow.db'}"}
    (d / "params.yaml").write_text(yaml.safe_dump(raw))
PY
for name in contextual static; do
  MLFLOW_TRACKING_URI="sqlite:///$WORK/$name/mlflow.db" .venv/bin/python -m pipelines all \
    --params "$WORK/$name/params.yaml" > "$WORK/$name/pipeline.log" 2>&1 \
    || { tail -40 "$WORK/$name/pipeline.log"; exit 1; }
done
start=$(date +%s)
python3 -m venv "$WORK/rt"
"$WORK/rt/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt .
echo "runtime install: $(( $(date +%s) - start )) s, $(du -sm "$WORK/rt" | cut -f1) MB venv"
cd "$WORK"  # away from the checkout, so only the installed package can be imported
"$WORK/rt/bin/python" - "$WORK/contextual/router" "$WORK/static/router" <<'PY'
import importlib.util, json, sys
assert importlib.util.find_spec("torch") is None, "the base install must not pull torch"
assert importlib.util.find_spec("sentence_transformers") is None
from router import Router
r = Router.load(sys.argv[1])  # auto: the ONNX encoder the pipeline exported
d = r.route("What is 17 * 23?")
e = r.route("")
print(json.dumps({"encoder": r.featurizer.encoder_name, "decision": d.to_dict(), "empty": e.reason}))
assert r.featurizer.encoder_name == "onnx"
assert d.reason.startswith(("utility", "fallback")) and e.reason == "fallback:empty-query"
s = Router.load(sys.argv[2])
ds = s.route("What is 17 * 23?")
print(json.dumps({"static_encoder": s.featurizer.encoder_name, "decision": ds.to_dict()}))
assert s.featurizer.encoder_name == "static" and ds.reason.startswith(("utility", "fallback"))
assert "torch" not in sys.modules and "onnxruntime" in sys.modules  # ONNX came from the first bundle
import router.proxy, router.upstream  # the OpenAI-compatible proxy runs on the base install (stdlib HTTP)
assert not any(m == "pipelines" or m.startswith("pipelines.") for m in sys.modules), "routing imported the pipeline"
print("runtime-alone check: OK")
PY
