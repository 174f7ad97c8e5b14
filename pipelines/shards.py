"""Atomic, resumable rollout shards.

A shard holds every record of a few whole queries and is written to a temporary name, fsynced
and renamed, so after ``kill -9`` at any moment a shard is either complete or absent. A rerun
reads which queries the complete shards hold and rolls out only the rest. Each model's shards
live in their own folder with a fingerprint of everything that determines a sample; shards
made under another fingerprint are moved aside, never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"
SHARD_GLOB = "shard-*.parquet"


def fingerprint_of(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_model_dir(root: str | Path, model: str, spec: dict[str, Any]) -> Path:
    """The folder for ``model``'s shards, valid for ``spec``.

    Leftover temporary files of a crashed write are removed. If the folder was made for a
    different spec, it is renamed to ``<model>.stale-<time>`` (kept for inspection).
    """
    d = Path(root) / model
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
    atomic_write_text(d / FINGERPRINT, json.dumps({"fingerprint": fp, "spec": spec}, indent=2, default=str))
    return d


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_name(query_ids: Iterable[str]) -> str:
    """Content-addressed name: the same queries always map to the same shard file."""
    h = hashlib.sha256("\n".join(sorted(query_ids)).encode()).hexdigest()[:16]
    return f"shard-{h}.parquet"


def write_shard(d: Path, records: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """Write one shard atomically; ``meta`` (timings, token counts) goes in the file's metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    qids = {r["query_id"] for r in records}
    path = d / shard_name(qids)
    table = pa.Table.from_pylist(records)
    table = table.replace_schema_metadata({b"difficulty_router": json.dumps(meta).encode()})
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(d)
    return path


def _fsync_dir(d: Path) -> None:
    # the rename itself must reach the disk, or a power cut could lose a finished shard
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_files(d: Path) -> list[Path]:
    return sorted(Path(d).glob(SHARD_GLOB))


def done_queries(d: Path) -> set[str]:
    """Query ids held by the complete shards in ``d`` (reads one column only)."""
    import pyarrow.parquet as pq

    done: set[str] = set()
    for p in shard_files(d):
        try:
            col = pq.read_table(p, columns=["query_id"]).column("query_id").to_pylist()
        except Exception as e:  # a complete shard is never corrupt; say which file if it is
            raise RuntimeError(f"rollout shard {p} is unreadable ({e}); delete it to regenerate its queries") from e
        done.update(col)
    return done


def shard_meta(p: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    md = pq.read_schema(p).metadata or {}
    raw = md.get(b"difficulty_router")
    return json.loads(raw) if raw else {}


def read_records(d: Path, query_ids: set[str] | None = None):
    """All records of the shards in ``d`` as a DataFrame (optionally only ``query_ids``).

    Records are unique per (query, sample, budget); a duplicate (possible only if two
    executors raced on the same query) keeps the first shard's copy.
    """
    import pandas as pd

    frames = [pd.read_parquet(p) for p in shard_files(d)]
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    if query_ids is not None:
        df = df[df["query_id"].isin(query_ids)]
    return df.drop_duplicates(["query_id", "model", "sample", "budget"], keep="first").reset_index(drop=True)
