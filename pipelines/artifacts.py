"""Every file the stages exchange, read and written in one place.

Queries, rollout records (in resumable shards), outcomes with their column schema, tiers,
features and the trained models: a stage reads what an earlier stage wrote through this module,
never through the earlier stage's code. Every write goes through :func:`atomic_output` (temporary
file, fsync, rename, fsync of the folder), so a crash leaves either the old file or the new one,
never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from pipelines.queries import QUERY_COLUMNS, Query

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it becomes ``path`` atomically.

    The caller writes the temporary file (any library, any format); it is fsynced and renamed
    over ``path``, and the folder is fsynced so the rename itself survives a power cut. On an
    exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    """Pretty JSON with a final newline (metrics and reports are read by people and by DVC)."""
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_parquet(df, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
    """A DataFrame as Parquet; ``metadata`` (JSON-able) goes into the file's schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata:
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), **{k.encode(): json.dumps(v).encode() for k, v in metadata.items()}})
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp)


def parquet_metadata(path: str | Path, key: str) -> Any:
    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(key.encode())
    return json.loads(raw) if raw else None


# ---------------------------------------------------------------- queries


def write_queries(queries: Iterable[Query], path: str | Path) -> None:
    """The queries table (Parquet, string columns even when empty)."""
    import pandas as pd

    rows = [q.to_row() for q in queries]
    if rows:
        df = pd.DataFrame(rows, columns=list(QUERY_COLUMNS))
    else:  # an all-empty frame would be typed null
        df = pd.DataFrame({c: pd.Series([], dtype="string") for c in QUERY_COLUMNS})
    write_parquet(df, path)


def read_queries(path: str | Path) -> list[Query]:
    """Read the table written by :func:`write_queries`."""
    import pandas as pd

    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no queries table; run the prepare stage first")
    df = pd.read_parquet(path)
    missing = set(QUERY_COLUMNS) - set(df.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    return [Query.from_row(r) for r in df.to_dict("records")]


# ---------------------------------------------------------------- rollout records (shards)
#
# A model's rollout lives in data/rollouts/<model>/ as shards of a few whole queries each, with a
# fingerprint of everything that determines a sample. Records hold what the model produced, never
# a score: one row per (query, sample, budget) with the forced answer at that budget (null where
# the sample finished within it: its own completion, stored once at the largest budget, answers).

RECORDS_SCHEMA = 2  # 2: generation only (answers are extracted and scored by the label stage)
FINGERPRINT = "fingerprint.json"
SHARD_GLOB = "shard-*.parquet"
RECORD_COLUMNS = ("query_id", "model", "sample", "seed", "budget", "answer_text", "tokens", "reasoning_tokens",
                  "forced", "forced_tokens", "finished", "completion", "prompt_tokens")


def fingerprint_of(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_model_dir(root: str | Path, model: str, spec: dict[str, Any]) -> Path:
    """The folder for ``model``'s shards, valid for ``spec`` (what determines a sample).

    Leftover temporary files of a crashed write are removed. If the folder was made for a
    different spec, it is renamed to ``<model>.stale-<time>`` (kept for inspection, never mixed in).
    """
    d = Path(root) / model
    spec = {**spec, "records_schema": RECORDS_SCHEMA}
    fp = fingerprint_of(spec)
    if d.exists():
        meta = d / FINGERPRINT
        old = json.loads(meta.read_text()).get("fingerprint") if meta.exists() else None
        if old != fp and any(d.glob(SHARD_GLOB)):
            stale = d.with_name(f"{model}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
            log.warning("rollout settings of %s changed; moving its old shards to %s", model, stale)
            shutil.move(str(d), str(stale))
    d.mkdir(parents=True, exist_ok=True)
    for tmp in d.glob("*.tmp"):
        tmp.unlink()
    write_json(d / FINGERPRINT, {"fingerprint": fp, "spec": spec})
    return d


def shard_name(query_ids: Iterable[str]) -> str:
    """Content-addressed name: the same queries always map to the same shard file."""
    h = hashlib.sha256("\n".join(sorted(query_ids)).encode()).hexdigest()[:16]
    return f"shard-{h}.parquet"


def write_shard(d: Path, records: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """Write the records of a few whole queries as one shard; ``meta`` (timings, token counts)
    goes in the file's metadata. Either the whole shard exists afterwards or none of it."""
    import pandas as pd

    path = Path(d) / shard_name({r["query_id"] for r in records})
    write_parquet(pd.DataFrame(records, columns=list(RECORD_COLUMNS)), path, {"difficulty_router": meta})
    return path


def shard_files(d: str | Path) -> list[Path]:
    return sorted(Path(d).glob(SHARD_GLOB))


def shard_meta(p: Path) -> dict[str, Any]:
    return parquet_metadata(p, "difficulty_router") or {}


def shard_query_ids(p: Path) -> set[str]:
    """The queries a complete shard holds (reads one column only)."""
    import pyarrow.parquet as pq

    try:
        return set(pq.read_table(p, columns=["query_id"]).column("query_id").to_pylist())
    except Exception as e:  # a complete shard is never corrupt; say which file if it is
        raise RuntimeError(f"rollout shard {p} is unreadable ({e}); delete it to regenerate its queries") from e


def done_queries(d: str | Path) -> set[str]:
    """Query ids held by the complete shards in ``d``."""
    done: set[str] = set()
    for p in shard_files(d):
        done |= shard_query_ids(p)
    return done


def read_records(d: str | Path, query_ids: set[str] | None = None):
    """All records of the shards in ``d`` as a DataFrame (optionally only ``query_ids``).

    Records are unique per (query, sample, budget); a duplicate (possible only if two
    executors raced on the same query) keeps the first shard's copy.
    """
    import pandas as pd

    frames = [pd.read_parquet(p) for p in shard_files(d)]
    if not frames:
        return pd.DataFrame(columns=list(RECORD_COLUMNS))
    df = pd.concat(frames, ignore_index=True)
    if "correct" in df.columns:
        raise ValueError(f"{d}: rollout shards of an older format (scored in the rollout stage); rerun the "
                         f"rollout stage, which moves them aside")
    if query_ids is not None:
        df = df[df["query_id"].isin(query_ids)]
    return df.drop_duplicates(["query_id", "model", "sample", "budget"], keep="first").reset_index(drop=True)


# ---------------------------------------------------------------- outcomes and tiers

# one row per (query, tier): what the tier would have scored and spent on the query
OUTCOME_COLUMNS = ("query_id", "split", "tier", "model", "budget", "samples", "p_correct",
                   "cost_tokens", "latency_tokens", "cost")


OUTCOMES_KEY = "difficulty_router_outcomes"


def write_outcomes(df, path: str | Path, splits_from: str = "queries") -> None:
    """The outcomes table; ``splits_from`` says who assigned the splits: "table" (an imported
    table's own split column), "hash" (of query_id) or "queries" (the prepared queries)."""
    missing = [c for c in OUTCOME_COLUMNS if c not in df.columns]
    if missing:  # an internal invariant: every producer builds the full schema
        raise AssertionError(f"outcomes lack column(s) {missing}")
    write_parquet(df, path, {OUTCOMES_KEY: {"splits_from": splits_from}})


def outcome_summary(path: str | Path) -> dict[str, Any]:
    """Labelled queries per split and who assigned the splits, without reading any outcome."""
    out = read_outcomes(path, columns=["query_id", "split"]).drop_duplicates("query_id")
    meta = parquet_metadata(path, OUTCOMES_KEY) or {}
    return {"queries": int(len(out)), "by_split": {str(k): int(v) for k, v in out["split"].value_counts().items()},
            "splits_from": meta.get("splits_from", "queries")}


def read_outcomes(path: str | Path, splits: Iterable[str] | None = None, columns=None):
    import pandas as pd

    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no outcomes; run the label stage first")
    df = pd.read_parquet(path, columns=columns)
    return df if splits is None else df[df["split"].isin(tuple(splits))]


def labelled_data_digest(path: str | Path) -> str:
    """sha256 of the labelled (query, split, tier) rows of an outcomes file: two bundles with the same
    digest were fitted and evaluated on the same queries (the promotion gate compares their own
    out-of-sample figures then, never one bundle's in-sample ones)."""
    import hashlib

    df = read_outcomes(path, columns=["query_id", "split", "tier"])
    rows = sorted(f"{q}\t{s}\t{t}" for q, s, t in zip(df["query_id"], df["split"], df["tier"]))
    return hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()


def write_tiers(tiers: list[dict], path: str | Path) -> None:
    write_json(path, tiers)


def read_tiers(path: str | Path) -> list[dict]:
    return read_json(path)


# ---------------------------------------------------------------- features

FEATURIZER_KEY = "featurizer_spec"


def write_features(df, spec, path: str | Path) -> None:
    """Feature rows keyed by ``query_id``, with the featurizer spec that made them."""
    write_parquet(df, path, {FEATURIZER_KEY: spec.to_dict()})


def read_features_spec(path: str | Path):
    """The featurizer spec a features table was made with (None if unrecorded), from its metadata only."""
    from router.featurizer import FeaturizerSpec

    raw = parquet_metadata(path, FEATURIZER_KEY)
    return FeaturizerSpec.from_dict(raw) if raw else None


def read_features(path: str | Path):
    """The features table and the featurizer spec it was made with (None if unrecorded)."""
    import pandas as pd

    return pd.read_parquet(path), read_features_spec(path)


# ---------------------------------------------------------------- the training table


@dataclass
class Dataset:
    """Outcomes pivoted to (queries, tiers) with features aligned by query_id."""

    query_ids: list[str]
    split: np.ndarray
    X: np.ndarray
    Y: np.ndarray  # realized p_correct
    Cost: np.ndarray  # realized cost
    tiers: list[dict]
    feature_names: list[str]
    Latency: np.ndarray | None = None  # expected tokens on the longest path (None: the table has none)

    def rows(self, split: str) -> np.ndarray:
        return np.nonzero(self.split == split)[0]


def load_dataset(label_cfg, featurize_cfg, splits: tuple[str, ...]) -> Dataset:
    """Join outcomes and features for the given splits only (train never asks for test)."""
    tiers = read_tiers(label_cfg.tiers_out)
    names = [t["name"] for t in tiers]
    out = read_outcomes(label_cfg.out, splits)
    if out.empty:
        raise ValueError(f"{label_cfg.out}: no rows in split(s) {splits}")
    P = out.pivot(index="query_id", columns="tier", values="p_correct")
    C = out.pivot(index="query_id", columns="tier", values="cost")
    missing = set(names) - set(P.columns)
    if missing:
        raise ValueError(f"{label_cfg.out}: tiers {sorted(missing)} have no outcomes")
    P = P[names].dropna()
    C = C[names].loc[P.index]
    feats, _ = read_features(featurize_cfg.out)
    feats = feats.drop_duplicates("query_id", keep="last").set_index("query_id")
    lost = set(P.index) - set(feats.index)
    if lost:
        raise ValueError(f"{len(lost)} queries have outcomes but no features; rerun featurize")
    split = out.drop_duplicates("query_id").set_index("query_id")["split"]
    qids = list(P.index)
    lat = None
    if "latency_tokens" in out.columns and out["latency_tokens"].notna().all():
        lat = out.pivot(index="query_id", columns="tier", values="latency_tokens")[names].loc[qids]
        lat = lat.to_numpy(dtype=np.float64)
    return Dataset(qids, split.loc[qids].to_numpy(), feats.loc[qids].to_numpy(dtype=np.float64),
                   P.to_numpy(dtype=np.float64), C.to_numpy(dtype=np.float64), tiers, list(feats.columns), lat)


# ---------------------------------------------------------------- trained models


def save_model(d: str | Path, success, cost, meta: dict) -> None:
    """Write the chosen models: JSON + LightGBM text + .npy, never pickle (whole folder or none)."""
    d = Path(d)
    tmp = d.with_name(d.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    meta = {**meta, "success": success.save(tmp, "success_"), "cost": cost.save(tmp, "cost_")}
    (tmp / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    if d.exists():
        shutil.rmtree(d)
    tmp.rename(d)


def load_model(d: str | Path):
    """(success predictor, cost predictor, meta) from a train output folder."""
    from router.models import load_predictor

    d = Path(d)
    if not (d / "model.json").exists():
        raise FileNotFoundError(f"{d}: no trained model; run the train stage first")
    meta = read_json(d / "model.json")
    return load_predictor(d, meta["success"]), load_predictor(d, meta["cost"]), meta


# ---------------------------------------------------------------- production feedback


def write_feedback(df, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
    """The feedback table (``pipelines.feedback``): one row per logged request."""
    write_parquet(df, path, metadata)


def read_feedback(path: str | Path):
    """The table written by :func:`write_feedback`; a clear error if it is missing."""
    import pandas as pd

    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no feedback table; run `python -m pipelines feedback` first")
    return pd.read_parquet(path)


def answered_rows(df, tiers: list[str]):
    """The feedback rows that pair a tier with its outcome (an outcome exists, the tier the policy
    chose answered, a tier in ``tiers``), and how many of the others were left out, by reason."""
    keep = (df["correct"].notna() & (df["executed"] == df["chosen"]) & df["chosen"].isin(tiers)).fillna(False)
    excluded = {"no_outcome": int(df["correct"].isna().sum()),
                "executed_other_tier_or_unknown_tier": int((df["correct"].notna() & ~keep).sum())}
    return df[keep.to_numpy(dtype=bool)].reset_index(drop=True), excluded


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line to an append-only log (an audit trail): one ``write`` of the whole line
    on a file opened for appending, fsynced, so a crash leaves at most a torn last line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, default=str, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def derived_bundle(src: str | Path, out: str | Path, manifest: dict[str, Any] | None = None,
                   files: dict[str, str] | None = None) -> None:
    """Write ``out`` as a copy of the bundle ``src`` (whole folder or nothing: built beside it,
    then renamed). With ``manifest`` (the new manifest without ``files``) and ``files`` (name ->
    text written into the copy), the copy is a new bundle whose manifest hashes every file;
    without, it is the parent unchanged, byte for byte (a pass-through)."""
    from router.bundle import write_manifest

    src, out = Path(src), Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    if manifest is not None:
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        (tmp / "manifest.json").unlink()
        write_manifest(tmp, {k: v for k, v in manifest.items() if k not in ("files", "schema_version")})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def passed_through(src: str | Path, out: str | Path, report: str | Path, fields: dict[str, Any]) -> dict[str, Any]:
    """A loop stage with too little evidence: ``out`` is the bundle ``src`` unchanged, and the report
    ``{bundle, out, applied: false, **fields}`` (``fields`` say why) is written and returned."""
    derived_bundle(src, out)
    result = {"bundle": str(src), "out": str(out), "applied": False, **fields}
    write_json(report, result)
    return result
