#!/usr/bin/env bash
# CI step: the runtime installs alone. A fresh venv gets the base install only (no torch, no
# pipeline extras), loads bundles exported by the pipeline venv and routes with both torch-free
# featurizers: ONNX (contextual MiniLM) and the static table. Prints the install time and size.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
.venv/bin/python -c "from tests.router.bundle_fixture import make_bundle; print(make_bundle('$WORK/b', onnx=True))" > "$WORK/bundle_path"
.venv/bin/python -c "from tests.router.bundle_fixture import make_bundle; print(make_bundle('$WORK/s', static=True))" > "$WORK/static_path"
BUNDLE=$(tail -1 "$WORK/bundle_path")
STATIC=$(tail -1 "$WORK/static_path")
start=$(date +%s)
python3 -m venv "$WORK/rt"
"$WORK/rt/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt .
echo "runtime install: $(( $(date +%s) - start )) s, $(du -sm "$WORK/rt" | cut -f1) MB venv"
"$WORK/rt/bin/python" - "$BUNDLE" "$STATIC" <<'PY'
import importlib.util, json, sys
assert importlib.util.find_spec("torch") is None, "the base install must not pull torch"
assert importlib.util.find_spec("sentence_transformers") is None
from router import Router
r = Router.load(sys.argv[1], encoder="onnx")
d = r.route("What is 17 * 23?")
e = r.route("")
print(json.dumps({"decision": d.to_dict(), "empty": e.reason}))
assert d.reason.startswith(("utility", "fallback")) and e.reason == "fallback:empty-query"
s = Router.load(sys.argv[2])
ds = s.route("What is 17 * 23?")
print(json.dumps({"static_encoder": s.featurizer.encoder_name, "decision": ds.to_dict()}))
assert s.featurizer.encoder_name == "static" and ds.reason.startswith(("utility", "fallback"))
assert "torch" not in sys.modules and "onnxruntime" in sys.modules  # ONNX came from the first bundle
print("runtime-alone check: OK")
PY
