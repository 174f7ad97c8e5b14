#!/usr/bin/env bash
# CI step: the runtime installs alone. A fresh venv gets the base install only (no torch, no
# pipeline extras), loads a bundle exported by the pipeline venv and routes with the torch-free
# ONNX featurizer. Prints the install time and size.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
.venv/bin/python -c "from tests.router.bundle_fixture import make_bundle; print(make_bundle('$WORK/b', onnx=True))" > "$WORK/bundle_path"
BUNDLE=$(tail -1 "$WORK/bundle_path")
start=$(date +%s)
python3 -m venv "$WORK/rt"
"$WORK/rt/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt .
echo "runtime install: $(( $(date +%s) - start )) s, $(du -sm "$WORK/rt" | cut -f1) MB venv"
"$WORK/rt/bin/python" - "$BUNDLE" <<'PY'
import importlib.util, json, sys
assert importlib.util.find_spec("torch") is None, "the base install must not pull torch"
assert importlib.util.find_spec("sentence_transformers") is None
from router import Router
r = Router.load(sys.argv[1], encoder="onnx")
d = r.route("What is 17 * 23?")
e = r.route("")
print(json.dumps({"decision": d.to_dict(), "empty": e.reason}))
assert d.reason.startswith(("utility", "fallback")) and e.reason == "fallback:empty-query"
print("runtime-alone check: OK")
PY
