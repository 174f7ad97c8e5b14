"""``Router``: load a bundle, featurize a query, predict per-tier success and cost, decide.

The decision rule is ``router.policy.choose``, the same function the evaluation swept.
Inputs the model was not trained for get a documented fallback with a ``reason``, never an
exception: an empty query goes to the cheapest tier; a query far from every training query
(embedding similarity below the bundle's threshold) goes to the fallback tier (the most
accurate fixed tier on validation); caps no tier satisfies give the cheapest tier.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any, Sequence

from router.bundle import BundleError, read_manifest
from router.decision import Decision
from router.policy import choose
from router.tiers import Tier

CAPS = ("max_budget", "max_samples", "max_cost", "max_latency", "models")


class Router:
    """A loaded bundle. Thread-safe for concurrent ``route`` calls."""

    def __init__(self, path: Path, manifest: dict[str, Any], success, cost, featurizer, ood_ref=None):
        self.path = Path(path)
        self.manifest = manifest
        self.tiers = [Tier.from_dict(t) for t in manifest["tiers"]]
        self.success = success
        self.cost = cost
        self.featurizer = featurizer
        pol = manifest["policy"]
        self.lam = float(pol["lambda"])
        names = [t.name for t in self.tiers]
        self.fallback_index = names.index(pol.get("fallback_tier", names[-1]))
        self.cheapest_index = names.index(pol.get("cheapest_tier", names[0]))
        self.latency = [float(x) for x in pol.get("tier_latency_tokens", [t.budget * 1.0 for t in self.tiers])]
        self.ood_ref = ood_ref
        self.ood_threshold = pol.get("ood_min_similarity")
        self._lock = threading.Lock()  # encoders are not all thread-safe

    # ---------------------------------------------------------------- loading

    @classmethod
    def load(cls, path: str | Path, encoder: str = "auto", verify: bool = True) -> "Router":
        """Load and verify a bundle. ``encoder``: "auto" (ONNX if the bundle carries it and
        onnxruntime is installed, else sentence-transformers; the static table for a bundle
        trained on static embeddings), "onnx", "sentence-transformers" or "static"."""
        import numpy as np

        from router.featurizer import MINILM_STATIC, Featurizer, FeaturizerSpec
        from router.models import load_predictor

        path = Path(path)
        manifest = read_manifest(path, verify=verify)
        try:
            success = load_predictor(path, manifest["success"])
            cost = load_predictor(path, manifest["cost"])
            spec = FeaturizerSpec.from_dict(manifest["featurizer"])
        except BundleError:
            raise
        except Exception as e:  # a verified bundle should load; if not, say which
            raise BundleError(f"{path / 'manifest.json'}: cannot build models ({type(e).__name__}: {e})") from e
        enc = manifest.get("encoder") or {}
        name = encoder
        if spec.embedding == MINILM_STATIC:
            if encoder not in ("auto", "static"):
                raise BundleError(f"{path}: the bundle's embedding {spec.embedding} is computed by the static "
                                  f"encoder only, not {encoder!r}")
            if not enc.get("static"):
                raise BundleError(f"{path / 'manifest.json'}: static embedding but no encoder.static table")
            name = "static"
        elif encoder == "static":
            raise BundleError(f"{path}: the static encoder computes {MINILM_STATIC} embeddings; this bundle "
                              f"was trained on {spec.embedding}")
        elif encoder == "auto":
            name = "onnx" if enc.get("onnx") and _has("onnxruntime") else "sentence-transformers"
        kwargs = {}
        if name == "onnx":
            if not enc.get("onnx"):
                raise BundleError(f"{path}: bundle has no ONNX encoder; export with export.onnx_encoder: true")
            kwargs = {"model_path": str(path / enc["onnx"]), "tokenizer_path": str(path / enc["tokenizer"])}
        elif name == "static":
            kwargs = {"table_path": str(path / enc["static"]), "tokenizer_path": str(path / enc["tokenizer"])}
        featurizer = Featurizer(spec, encoder=name, encoder_kwargs=kwargs)
        names = manifest.get("feature_names")
        if names is not None and list(names) != spec.feature_names():
            raise BundleError(f"{path / 'manifest.json'}: feature_names do not match the featurizer spec")
        try:
            ood_ref = None
            if manifest["policy"].get("ood_ref"):
                ood_ref = np.load(path / manifest["policy"]["ood_ref"], allow_pickle=False)
            router = cls(path, manifest, success, cost, featurizer, ood_ref)
        except (KeyError, ValueError, TypeError, OSError) as e:
            raise BundleError(f"{path / 'manifest.json'}: invalid policy or tiers ({type(e).__name__}: {e})") from e
        # build the encoder now, so a missing dependency fails at load, not on the first query
        featurizer.encoder  # noqa: B018
        return router

    # ---------------------------------------------------------------- deciding

    def allowed(self, max_budget=None, max_samples=None, max_cost=None, max_latency=None, models=None,
                costs: Sequence[float] | None = None) -> list[bool]:
        """Which tiers a request's caps admit."""
        out = []
        for i, t in enumerate(self.tiers):
            ok = True
            if max_budget is not None and t.budget > max_budget:
                ok = False
            if max_samples is not None and t.samples > max_samples:
                ok = False
            if max_latency is not None and self.latency[i] > max_latency:
                ok = False
            if models is not None and t.model not in models:
                ok = False
            if max_cost is not None and costs is not None and costs[i] > max_cost:
                ok = False
            out.append(ok)
        return out

    def decide(self, p: Sequence[float], c: Sequence[float], lam: float | None = None, **caps) -> tuple[int, str]:
        """Decision only, from predicted success and cost: (tier index, reason)."""
        allowed = self.allowed(costs=c, **caps) if any(v is not None for v in caps.values()) else None
        i = choose(p, c, self.lam if lam is None else lam, allowed)
        if i < 0:
            return self.cheapest_index, "fallback:no-tier-within-caps"
        return i, "utility"

    def _decision(self, i: int, p, c, reason: str) -> Decision:
        t = self.tiers[i]
        pi = float(p[i]) if p is not None else None
        ci = float(c[i]) if c is not None else None
        return Decision(t.name, t.budget, t.samples, t.model, pi, ci, reason)

    def _empty_decision(self, caps: dict) -> Decision:
        """Nothing to answer: the cheapest tier the caps allow (tiers are stored in cost order)."""
        allowed = self.allowed(**{k: v for k, v in caps.items() if k != "max_cost"})
        order = [self.cheapest_index] + [i for i in range(len(self.tiers)) if i != self.cheapest_index]
        for i in order:
            if allowed[i]:
                return self._decision(i, None, None, "fallback:empty-query")
        return self._decision(self.cheapest_index, None, None, "fallback:no-tier-within-caps")

    def predict(self, texts: Sequence[str]):
        """Per-tier predicted success and cost for each text: two (n, tiers) arrays."""
        import numpy as np

        if self.featurizer.encoder_name in ("onnx", "static"):  # ONNX Runtime sessions are thread-safe
            X = self.featurizer.transform(list(texts))
        else:
            with self._lock:
                X = self.featurizer.transform(list(texts))
        P = np.clip(self.success.predict(X), 0.0, 1.0)
        C = np.maximum(self.cost.predict(X), 0.0)
        return X, P, C

    def route(self, text: Any, lam: float | None = None, **caps) -> Decision:
        """Pick the tier for one query. Never raises on odd input (see module docstring)."""
        return self.route_batch([text], lam=lam, **caps)[0]

    def route_batch(self, texts: Sequence[Any], lam: float | None = None, **caps) -> list[Decision]:
        """Route many queries with one featurizer call."""
        import numpy as np

        unknown = set(caps) - set(CAPS)
        if unknown:
            raise TypeError(f"unknown cap(s) {sorted(unknown)}; valid: {list(CAPS)}")
        clean = [t if isinstance(t, str) else ("" if t is None else str(t)) for t in texts]
        # lone surrogates and NULs cannot be tokenized: replace them, they carry no meaning
        clean = [t.encode("utf-8", "replace").decode("utf-8").replace("\x00", " ") for t in clean]
        out: list[Decision | None] = [None] * len(clean)
        live = [i for i, t in enumerate(clean) if t.strip()]
        live_set = set(live)
        for i in range(len(clean)):
            if i not in live_set:
                out[i] = self._empty_decision(caps)
        if live:
            X, P, C = self.predict([clean[i] for i in live])
            ood = self._ood(X)
            for j, i in enumerate(live):
                if ood is not None and ood[j]:
                    k, reason = self.fallback_index, "fallback:out-of-distribution"
                    allowed = self.allowed(costs=C[j], **caps) if caps else None
                    if allowed is not None and not allowed[k]:
                        k, reason = self.decide(P[j], C[j], lam, **caps)
                else:
                    k, reason = self.decide(P[j], C[j], lam, **caps)
                if len(clean[i]) > self.featurizer.spec.max_chars and reason == "utility":
                    reason = "utility:truncated"
                out[i] = self._decision(k, P[j], C[j], reason)
        return out  # type: ignore[return-value]

    def _ood(self, X):
        if self.ood_ref is None or self.ood_threshold is None:
            return None
        import numpy as np

        names = self.featurizer.feature_names
        emb = [i for i, n in enumerate(names) if n.startswith("emb_")]
        if not emb:
            return None
        e = X[:, emb[0]:emb[-1] + 1].astype(np.float32)
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        sims = (e @ self.ood_ref.T).max(axis=1)
        return sims < float(self.ood_threshold)

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {"path": str(self.path), "schema_version": m["schema_version"], "created": m.get("created"),
                "tiers": [t.to_dict() for t in self.tiers], "policy": {k: v for k, v in m["policy"].items()
                                                                      if k != "tier_latency_tokens"},
                "featurizer": m["featurizer"], "encoder": self.featurizer.encoder_name,
                "metrics": m.get("metrics", {}), "training": m.get("training", {}), "versions": m.get("versions", {})}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
