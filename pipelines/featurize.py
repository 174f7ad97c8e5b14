"""The featurize stage: feature rows for every query, cached by ``query_id``.

Calls the runtime's own featurizer (``router.featurizer``), so training and serving see the
same features. The cache lives in the output file itself (kept across runs by DVC's
``persist``): a rerun embeds only queries it has not seen under the same featurizer spec.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from pipelines import artifacts
from pipelines.config import FeaturizeConfig, Params
from pipelines.tracking import NULL_RUN, run_stage

log = logging.getLogger(__name__)

SECTIONS = ("prepare", "featurize")


def make_featurizer(cfg: FeaturizeConfig, spec=None):
    """The pipeline's featurizer for ``cfg`` (distills the static table on first use)."""
    from router.featurizer import MINILM_STATIC, Featurizer

    spec = spec or cfg.spec()
    kwargs: dict[str, Any] = {"batch_size": cfg.batch_size}
    if spec.embedding == MINILM_STATIC:
        from pipelines.static_distill import static_files

        files = static_files()
        kwargs.update(table_path=files["table"], tokenizer_path=files["tokenizer"])
    return Featurizer(spec, encoder=cfg.encoder, encoder_kwargs=kwargs)


def featurize(params: Params, run=NULL_RUN, *, featurizer=None) -> dict[str, Any]:
    """Run the featurize stage; returns its stats (``embedded`` = texts encoded this run)."""
    from pathlib import Path

    import numpy as np
    import pandas as pd

    from router.featurizer import is_model_embedding

    cfg = params.featurize
    spec = params.feature_spec()
    fz = featurizer
    if is_model_embedding(spec.embedding):  # the width is the model's: load it to know
        fz = fz or make_featurizer(cfg, spec)
        spec = dataclasses.replace(spec, dim=fz.encoder.dim)
        fz.spec = spec
    out = Path(cfg.out)
    queries = artifacts.read_queries(params.prepare.out)
    cached = None
    if out.exists():
        df_old, old_spec = artifacts.read_features(out)
        if old_spec == spec:
            cached = df_old
        else:
            log.info("featurizer spec changed; recomputing every query's features")
    have = set(cached["query_id"]) if cached is not None else set()
    todo = [q for q in queries if q.query_id not in have]
    t0 = time.perf_counter()
    if todo:
        from tqdm import tqdm

        fz = fz or make_featurizer(cfg, spec)
        rows = []
        step = max(cfg.batch_size * 4, 1)
        for i in tqdm(range(0, len(todo), step), desc="featurize", unit="batch", disable=len(todo) <= step):
            chunk = todo[i:i + step]
            rows.append(fz.transform([q.text for q in chunk]))
        new = pd.DataFrame(np.concatenate(rows, axis=0), columns=spec.feature_names())
        new.insert(0, "query_id", [q.query_id for q in todo])
        df = pd.concat([cached, new], ignore_index=True) if cached is not None else new
        artifacts.write_features(df, spec, out)
    elif cached is None:  # no queries at all: still leave a valid (empty) table
        artifacts.write_features(pd.DataFrame(columns=["query_id", *spec.feature_names()]), spec, out)
    seconds = time.perf_counter() - t0
    stats = {"queries": len(queries), "embedded": len(todo), "cached": len(queries) - len(todo),
             "features": len(spec.feature_names()), "seconds": round(seconds, 2),
             "texts_per_second": round(len(todo) / seconds, 1) if todo and seconds else None}
    run.log_params({"featurizer_spec": spec.to_dict()})
    run.log_metrics(stats)
    log.info("featurize: %s", stats)
    return stats


def main(argv=None) -> dict:
    return run_stage("featurize", featurize, argv, sections=SECTIONS,
                     description="featurize: lexical features + MiniLM embeddings, cached by query_id")


if __name__ == "__main__":
    main()
