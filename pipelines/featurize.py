"""The featurize stage: feature rows for every query, cached by ``query_id``.

Calls the runtime's own featurizer (``router.featurizer``), so training and serving see the
same features. The cache lives in the output file itself (kept across runs by DVC's
``persist``): a rerun embeds only queries it has not seen under the same featurizer spec.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipelines.config import Params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeaturizeConfig:
    out: str = "data/features.parquet"
    # all-MiniLM-L6-v2 (contextual) | all-MiniLM-L6-v2-static (distilled, sub-ms, torch-free
    # at serving time) | none (lexical features only)
    embedding: str = "all-MiniLM-L6-v2"
    lexical: bool = True
    max_chars: int = 2000
    encoder: str | None = None  # null: the embedding's pipeline encoder (sentence-transformers or static)
    batch_size: int = 64


def featurize_config(params: Params) -> FeaturizeConfig:
    from pipelines.config import build

    return build(FeaturizeConfig, params.extra.get("featurize"), "featurize")


def spec_of(cfg: FeaturizeConfig):
    from router.featurizer import FeaturizerSpec

    return FeaturizerSpec(embedding=cfg.embedding, lexical=cfg.lexical, max_chars=cfg.max_chars)


def make_featurizer(cfg: FeaturizeConfig, spec=None):
    """The pipeline's featurizer for ``cfg`` (distills the static table on first use)."""
    from router.featurizer import MINILM_STATIC, Featurizer

    spec = spec or spec_of(cfg)
    kwargs: dict[str, Any] = {"batch_size": cfg.batch_size}
    if spec.embedding == MINILM_STATIC:
        from pipelines.static_distill import static_files

        files = static_files()
        kwargs.update(table_path=files["table"], tokenizer_path=files["tokenizer"])
    return Featurizer(spec, encoder=cfg.encoder, encoder_kwargs=kwargs)


def read_features(path: str | Path):
    """The features table and the featurizer spec it was made with."""
    import pandas as pd
    import pyarrow.parquet as pq

    from router.featurizer import FeaturizerSpec

    md = pq.read_schema(path).metadata or {}
    raw = md.get(b"featurizer_spec")
    spec = FeaturizerSpec.from_dict(json.loads(raw)) if raw else None
    return pd.read_parquet(path), spec


def write_features(df, spec, path: str | Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({b"featurizer_spec": json.dumps(spec.to_dict()).encode()})
    tmp = Path(f"{path}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def featurize(params: Params, *, featurizer=None) -> dict[str, Any]:
    """Run the featurize stage; returns its stats (``embedded`` = texts encoded this run)."""
    import numpy as np
    import pandas as pd

    from pipelines.queries import read_queries
    from pipelines.tracking import stage_run
    from router.featurizer import Featurizer

    cfg = featurize_config(params)
    spec = spec_of(cfg)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    queries = read_queries(params.prepare.out)
    cached = None
    if out.exists():
        df_old, old_spec = read_features(out)
        if old_spec == spec:
            cached = df_old
        else:
            log.info("featurizer spec changed; recomputing every query's features")
    have = set(cached["query_id"]) if cached is not None else set()
    todo = [q for q in queries if q.query_id not in have]
    fz = featurizer or make_featurizer(cfg, spec)
    t0 = time.perf_counter()
    with stage_run(params.mlflow, "featurize") as run:
        run.log_params({"featurize": asdict(cfg), "featurizer_spec": spec.to_dict()})
        if todo:
            from tqdm import tqdm

            rows = []
            step = max(cfg.batch_size * 4, 1)
            for i in tqdm(range(0, len(todo), step), desc="featurize", unit="batch", disable=len(todo) <= step):
                chunk = todo[i:i + step]
                rows.append(fz.transform([q.text for q in chunk]))
            x = np.concatenate(rows, axis=0)
            new = pd.DataFrame(x, columns=spec.feature_names())
            new.insert(0, "query_id", [q.query_id for q in todo])
            df = pd.concat([cached, new], ignore_index=True) if cached is not None else new
            write_features(df, spec, out)
        elif cached is None:  # no queries at all: still leave a valid (empty) table
            write_features(pd.DataFrame(columns=["query_id", *spec.feature_names()]), spec, out)
        seconds = time.perf_counter() - t0
        stats = {"queries": len(queries), "embedded": len(todo), "cached": len(queries) - len(todo),
                 "features": len(spec.feature_names()), "seconds": round(seconds, 2),
                 "texts_per_second": round(len(todo) / seconds, 1) if todo and seconds else None}
        run.log_metrics(stats)
    log.info("featurize: %s", stats)
    return stats


def main(argv=None) -> None:
    from pipelines.config import load_params, stage_args

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = stage_args("featurize: lexical features + MiniLM embeddings, cached by query_id", argv)
    print(json.dumps(featurize(load_params(args.params))))


if __name__ == "__main__":
    main()
