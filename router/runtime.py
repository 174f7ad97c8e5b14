"""``Router``: load a bundle, featurize a query, predict per-tier success and cost, decide.

The decision rule is ``router.policy.choose``, the same function the evaluation swept.
Inputs the model was not trained for get a documented fallback with a ``reason``, never an
exception: an empty query goes to the cheapest tier; a query far from every training query
(embedding similarity below the bundle's threshold) goes to the fallback tier (the most
accurate fixed tier on validation); caps no tier satisfies give the cheapest tier.

Callers use ``route``/``route_batch``, ``fallback`` and a ``Caps`` value; which tiers caps admit
is ``Caps.allowed``, and which encoder serves the bundle is ``Featurizer.from_bundle``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

from router.bundle import BundleError, read_manifest
from router.caps import CAP_NAMES, Caps
from router.decision import Decision
from router.policy import choose
from router.tiers import Tier

CAPS = CAP_NAMES  # the cap names, kept here for callers that imported them from the runtime


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

        from router.featurizer import Featurizer
        from router.models import load_predictor

        path = Path(path)
        manifest = read_manifest(path, verify=verify)
        try:
            success = load_predictor(path, manifest["success"])
            cost = load_predictor(path, manifest["cost"])
        except BundleError:
            raise
        except Exception as e:  # a verified bundle should load; if not, say which
            raise BundleError(f"{path / 'manifest.json'}: cannot build models ({type(e).__name__}: {e})") from e
        featurizer = Featurizer.from_bundle(path, manifest, encoder=encoder)
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

    def allowed(self, caps: Caps | Mapping[str, Any] | None = None, costs: Sequence[float] | None = None,
                **kw) -> list[bool]:
        """Which tiers the caps admit (``max_cost`` only given this query's predicted ``costs``)."""
        return Caps.coerce(caps, **kw).allowed(self.tiers, self.latency, costs)

    def decide(self, p: Sequence[float], c: Sequence[float], lam: float | None = None,
               caps: Caps | Mapping[str, Any] | None = None, **kw) -> tuple[int, str]:
        """Decision only, from predicted success and cost: (tier index, reason)."""
        caps = Caps.coerce(caps, **kw)
        allowed = caps.allowed(self.tiers, self.latency, c) if caps.active else None
        i = choose(p, c, self.lam if lam is None else lam, allowed)
        if i < 0:
            return self.cheapest_index, "fallback:no-tier-within-caps"
        return i, "utility"

    def fallback(self, caps: Caps | Mapping[str, Any] | None = None, reason: str = "fallback:error") -> Decision:
        """The decision when there is no prediction to decide by (routing failed): the bundle's
        fallback tier if the caps admit it, else the cheapest tier they admit, else the cheapest
        tier. ``max_cost`` is not applied: no cost was predicted. Never raises on valid caps."""
        i = self._admitted(self.fallback_index, Caps.coerce(caps))
        return self._decision(self.cheapest_index if i is None else i, None, None, reason)

    def _admitted(self, first: int, caps: Caps) -> int | None:
        """Tier ``first`` if the caps admit it, else the cheapest admitted one (tiers are stored
        in cost order), else None. ``max_cost`` is not applied: no cost was predicted."""
        allowed = caps.allowed(self.tiers, self.latency)
        return next((i for i in (first, self.cheapest_index, *range(len(self.tiers))) if allowed[i]), None)

    def _decision(self, i: int, p, c, reason: str) -> Decision:
        t = self.tiers[i]
        pi = float(p[i]) if p is not None else None
        ci = float(c[i]) if c is not None else None
        return Decision(t.name, t.budget, t.samples, t.model, pi, ci, reason)

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

    def route(self, text: Any, lam: float | None = None, *, caps: Caps | Mapping[str, Any] | None = None,
              **kw) -> Decision:
        """Pick the tier for one query. Caps as ``caps=Caps(...)`` or as keywords
        (``max_budget=64``); an unknown keyword is a TypeError. Never raises on odd text (see
        the module docstring)."""
        return self.route_batch([text], lam=lam, caps=caps, **kw)[0]

    def route_batch(self, texts: Sequence[Any], lam: float | None = None, *,
                    caps: Caps | Mapping[str, Any] | None = None, **kw) -> list[Decision]:
        """Route many queries with one featurizer call."""
        caps = Caps.coerce(caps, **kw)
        clean = [t if isinstance(t, str) else ("" if t is None else str(t)) for t in texts]
        # lone surrogates and NULs cannot be tokenized: replace them, they carry no meaning
        clean = [t.encode("utf-8", "replace").decode("utf-8").replace("\x00", " ") for t in clean]
        out: list[Decision | None] = [None] * len(clean)
        live = [i for i, t in enumerate(clean) if t.strip()]
        live_set = set(live)
        for i in range(len(clean)):
            if i not in live_set:  # nothing to answer: the cheapest tier the caps admit
                k = self._admitted(self.cheapest_index, caps)
                out[i] = (self._decision(k, None, None, "fallback:empty-query") if k is not None else
                          self._decision(self.cheapest_index, None, None, "fallback:no-tier-within-caps"))
        if live:
            X, P, C = self.predict([clean[i] for i in live])
            ood = self._ood(X)
            for j, i in enumerate(live):
                k, reason = self.decide(P[j], C[j], lam, caps)
                # far from training: the fallback tier, unless the caps exclude it
                if ood is not None and ood[j] and self.allowed(caps, C[j])[self.fallback_index]:
                    k, reason = self.fallback_index, "fallback:out-of-distribution"
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

