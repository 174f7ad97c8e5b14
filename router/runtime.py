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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from router.bundle import MANIFEST, BundleError, read_manifest, sha256_file
from router.caps import CAP_NAMES, Caps
from router.decision import Decision
from router.execution import ModelExecution, execution_of, require
from router.policy import choose, explore_choice, explore_uniform
from router.tiers import Tier

CAPS = CAP_NAMES  # the cap names, kept here for callers that imported them from the runtime


@dataclass(frozen=True)
class Routed:
    """A decision with what it was made from: for the proxy's decision log (and off-policy
    evaluation), which needs the features' digest and every admitted tier's utility."""

    decision: Decision
    features: Any  # the query's feature row (NumPy), None for a fallback without prediction
    p: Sequence[float] | None  # predicted success per tier
    c: Sequence[float] | None  # predicted cost per tier
    allowed: Sequence[bool]  # which tiers the caps admitted
    lam: float  # the price of cost the utility used
    propensity: float = 1.0  # probability the logging policy gave the chosen tier (policy.explore)
    explored: bool = False  # the chosen tier is an exploration draw, not the greedy tier
    greedy: int | None = None  # index of the tier the greedy policy picked (None: a fallback)
    explore: float = 0.0  # the exploration rate this decision was drawn with

    def utilities(self) -> list[dict[str, Any]]:
        """Every admitted tier with its predicted success, cost and utility ``p - lam * c``."""
        if self.p is None or self.c is None:
            return []
        return [{"tier": i, "p_correct": float(self.p[i]), "cost": float(self.c[i]),
                 "utility": float(self.p[i] - self.lam * self.c[i])} for i, ok in enumerate(self.allowed) if ok]


class Router:
    """A loaded bundle. Thread-safe for concurrent ``route`` calls."""

    def __init__(self, path: Path, manifest: dict[str, Any], success, cost, featurizer, ood_ref=None):
        self.path = Path(path)
        self.manifest = manifest
        self.tiers = [Tier.from_dict(t) for t in manifest["tiers"]]
        self.tier_map = {t.name: t for t in self.tiers}  # adaptive tiers name the tiers they chain
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
        # epsilon-greedy exploration rate (router.policy.explore_choice); applied only to requests routed
        # with a key (``route_detailed(keys=...)``: the proxy's request ids), so library calls stay
        # deterministic
        self.explore = float(pol.get("explore", 0.0))
        if not 0.0 <= self.explore < 1.0:
            raise ValueError(f"policy.explore must be in [0, 1), got {self.explore}")
        self._lock = threading.Lock()  # encoders are not all thread-safe
        # how each model's tiers are executed (the labels' settings); {} for an older bundle
        self.executions = execution_of(manifest, str(self.path / MANIFEST))
        # generated tokens per second per model: the bundle's measurement, replaced by the
        # proxy's own (``set_speed``); what ``max_latency_ms`` compares against
        self.tokens_per_second = {m: float(e.tokens_per_second) for m, e in self.executions.items()
                                  if e.tokens_per_second}
        self.bundle_sha256: str | None = None  # of manifest.json, which lists every file's sha256

    # ---------------------------------------------------------------- loading

    @classmethod
    def load(cls, path: str | Path, encoder: str = "auto", verify: bool = True) -> "Router":
        """Load and verify a bundle. ``encoder``: "auto" (ONNX if the bundle carries it and
        onnxruntime is installed, else sentence-transformers; the static table for a bundle
        trained on static embeddings; the model itself, through llama.cpp, for a ``model:<name>``
        bundle), "onnx", "sentence-transformers", "static" or "model"."""
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
            router.bundle_sha256 = sha256_file(path / MANIFEST)
        except (KeyError, ValueError, TypeError, OSError) as e:
            raise BundleError(f"{path / 'manifest.json'}: invalid policy or tiers ({type(e).__name__}: {e})") from e
        # build the encoder now, so a missing dependency fails at load, not on the first query
        featurizer.encoder  # noqa: B018
        return router

    # ---------------------------------------------------------------- execution and latency

    def execution(self, model: str) -> ModelExecution:
        """How ``model``'s tiers are executed (``router.executor.execute``, the proxy); a
        ``BundleError`` naming what is missing for a bundle exported without it."""
        require(self.executions, [model], str(self.path / MANIFEST))
        return self.executions[model]

    def set_speed(self, model: str, tokens_per_second: float) -> None:
        """Replace ``model``'s measured speed (thread-safe: the mapping is swapped, not changed)."""
        if not tokens_per_second > 0:
            raise ValueError(f"tokens_per_second must be > 0, got {tokens_per_second}")
        self.tokens_per_second = {**self.tokens_per_second, model: float(tokens_per_second)}

    def tier_latency_ms(self) -> list[float] | None:
        """Each tier's expected latency: its latency tokens / its model's tokens per second, in
        ms; None unless every model's speed is known."""
        speeds = self.tokens_per_second
        if any(t.model not in speeds for t in self.tiers):
            return None
        return [1000.0 * lat / speeds[t.model] for lat, t in zip(self.latency, self.tiers)]

    def check_caps(self, caps: Caps) -> Caps:
        """``caps`` if this router can apply them, else a ``ValueError`` saying why."""
        if caps.max_latency_ms is not None and self.tier_latency_ms() is None:
            missing = sorted({t.model for t in self.tiers} - set(self.tokens_per_second))
            raise ValueError(f"max_latency_ms needs the measured speed of model(s) {missing}: the bundle has no "
                             f"execution.models.<model>.tokens_per_second and nothing was measured yet")
        return caps

    # ---------------------------------------------------------------- deciding

    def _allowed(self, caps: Caps, costs: Sequence[float] | None = None) -> list[bool]:
        latency_ms = self.tier_latency_ms() if caps.max_latency_ms is not None else None
        return caps.allowed(self.tiers, self.latency, costs, latency_ms)

    def allowed(self, caps: Caps | Mapping[str, Any] | None = None, costs: Sequence[float] | None = None,
                **kw) -> list[bool]:
        """Which tiers the caps admit (``max_cost`` only given this query's predicted ``costs``)."""
        return self._allowed(Caps.coerce(caps, **kw), costs)

    def decide(self, p: Sequence[float], c: Sequence[float], lam: float | None = None,
               caps: Caps | Mapping[str, Any] | None = None, **kw) -> tuple[int, str]:
        """Decision only, from predicted success and cost: (tier index, reason)."""
        caps = Caps.coerce(caps, **kw)
        return self._choose(p, c, self.lam if lam is None else lam, self._allowed(caps, c) if caps.active else None)

    def _choose(self, p, c, lam: float, allowed: Sequence[bool] | None) -> tuple[int, str]:
        i = choose(p, c, lam, allowed)
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
        allowed = self._allowed(caps)
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
        return [r.decision for r in self.route_detailed(texts, lam, caps=caps, **kw)]

    def route_detailed(self, texts: Sequence[Any], lam: float | None = None, *,
                       caps: Caps | Mapping[str, Any] | None = None, keys: Sequence[str] | None = None,
                       explore: float | None = None, **kw) -> list[Routed]:
        """``route_batch`` with what each decision was made from (``Routed``).

        With ``keys`` (one request id per text), a decision the policy made by utility explores:
        with probability ``explore`` (default the bundle's ``policy.explore``) it goes to another
        admitted tier drawn uniformly, seeded by its key (``router.policy.explore_choice``), reason
        ``explore``; ``Routed.propensity`` is the chosen tier's probability under that rule.
        Fallbacks (empty, out-of-distribution, no tier within caps) never explore."""
        caps = Caps.coerce(caps, **kw)
        epsilon = self.explore if explore is None else float(explore)
        if keys is not None and len(keys) != len(texts):
            raise ValueError(f"keys: {len(keys)} for {len(texts)} texts")
        lam = self.lam if lam is None else float(lam)
        clean = [t if isinstance(t, str) else ("" if t is None else str(t)) for t in texts]
        # lone surrogates and NULs cannot be tokenized: replace them, they carry no meaning
        clean = [t.encode("utf-8", "replace").decode("utf-8").replace("\x00", " ") for t in clean]
        out: list[Routed | None] = [None] * len(clean)
        live = [i for i, t in enumerate(clean) if t.strip()]
        live_set = set(live)
        admitted = self._allowed(caps)
        for i in range(len(clean)):
            if i not in live_set:  # nothing to answer: the cheapest tier the caps admit
                k = self._admitted(self.cheapest_index, caps)
                d = (self._decision(k, None, None, "fallback:empty-query") if k is not None else
                     self._decision(self.cheapest_index, None, None, "fallback:no-tier-within-caps"))
                out[i] = Routed(d, None, None, None, admitted, lam)
        if live:
            X, P, C = self.predict([clean[i] for i in live])
            ood = self._ood(X)
            for j, i in enumerate(live):
                allowed = self._allowed(caps, C[j])
                k, reason = self._choose(P[j], C[j], lam, allowed if caps.active else None)
                # far from training: the fallback tier, unless the caps exclude it
                if ood is not None and ood[j] and allowed[self.fallback_index]:
                    k, reason = self.fallback_index, "fallback:out-of-distribution"
                if len(clean[i]) > self.featurizer.spec.max_chars and reason == "utility":
                    reason = "utility:truncated"
                greedy, prop, explored = (k if reason.startswith("utility") else None), 1.0, False
                if greedy is not None and keys is not None and epsilon > 0:
                    k, prop, explored = explore_choice(greedy, allowed, epsilon, explore_uniform(str(keys[i])))
                    reason = "explore" if explored else reason
                out[i] = Routed(self._decision(k, P[j], C[j], reason), X[j], P[j], C[j], allowed, lam,
                                prop, explored, greedy, epsilon if greedy is not None and keys is not None else 0.0)
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
                "execution": {k: e.to_dict() for k, e in self.executions.items()},
                "metrics": m.get("metrics", {}), "training": m.get("training", {}), "versions": m.get("versions", {})}

