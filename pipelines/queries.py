"""The query record: stable ids, splits by hash, and the on-disk table format."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

SPLITS = ("train", "val", "test")
QUERY_COLUMNS = ("query_id", "text", "answer", "verifier", "source", "split", "meta")


def make_query_id(source: str, text: str, answer: str) -> str:
    """Stable id of a query: a hash of its source, text and answer.

    The unit separator keeps ("a", "bc") and ("ab", "c") apart.
    """
    h = hashlib.sha256(f"{source}\x1f{text}\x1f{answer}".encode("utf-8")).hexdigest()
    return h[:16]


def split_of(query_id: str, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> str:
    """Assign train/val/test by hashing ``query_id``, so a query never changes split.

    The hash is salted so the split is independent of the id's own bits used elsewhere
    (e.g. shard assignment).
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    u = int(hashlib.sha256(f"split:{query_id}".encode()).hexdigest()[:12], 16) / float(16**12)
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "val"
    return "test"


@dataclass(frozen=True)
class Query:
    """One query with a checkable answer."""

    query_id: str
    text: str
    answer: str
    verifier: str  # verifier spec, e.g. "gsm8k", "math", "exact", "choice", "reasoning_gym"
    source: str  # where the query came from, e.g. "gsm8k:test.jsonl" or "reasoning_gym:chain_sum"
    split: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def create(cls, text: str, answer: str, verifier: str, source: str, meta: dict | None = None,
               fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), split: str | None = None) -> "Query":
        qid = make_query_id(source, text, answer)
        return cls(qid, text, answer, verifier, source, split or split_of(qid, fractions), dict(meta or {}))

    def to_row(self) -> dict[str, Any]:
        return {
            "query_id": self.query_id,
            "text": self.text,
            "answer": self.answer,
            "verifier": self.verifier,
            "source": self.source,
            "split": self.split,
            # meta is free-form; JSON keeps the Parquet schema fixed across sources
            "meta": json.dumps(self.meta, sort_keys=True, default=str),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Query":
        meta = row.get("meta") or "{}"
        return cls(
            query_id=str(row["query_id"]),
            text=str(row["text"]),
            answer=str(row["answer"]),
            verifier=str(row["verifier"]),
            source=str(row["source"]),
            split=str(row["split"]),
            meta=json.loads(meta) if isinstance(meta, str) else dict(meta),
        )
