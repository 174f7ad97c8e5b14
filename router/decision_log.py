"""The proxy's decision log: one JSON line per request, append-only, rotated by size.

It is what the feedback loop reads (off-policy evaluation needs, per request, what the policy
saw, which tiers it could choose, with which utilities and propensity, what it chose and what
that cost), so it is written for durability:

- **One ``write()`` per record** on a file opened ``O_APPEND``, before the response is sent: a
  process crash (kill -9, OOM) loses nothing that was answered. At most the record being written
  can be torn; ``read_records`` skips a torn last line.
- **fsync policy** ``record`` (default): a syncer thread fsyncs the file as soon as records are
  written (group commit: one fsync covers every record written before it started), so a machine
  crash or power loss loses at most the records written during the last fsync, and no request
  waits for the disk: an fsync in the request path would add its time to every request (3.6 ms
  p50 on this machine's disk, more than the proxy's whole overhead target of 3 ms;
  ``bench/proxy_overhead.py`` measures it beside the overhead). ``none``:
  no fsync; the OS writes back when it likes (Linux: within ~30 s), so a power loss can lose that
  much; a process crash still loses nothing.
- **Rotation by size**: when the file would pass ``max_bytes`` it is fsynced, closed and renamed
  ``<name>.<UTC time>.<n>.jsonl`` (never overwritten), and a new file starts; ``keep`` > 0
  deletes the oldest rotated files beyond that many (0, the default, keeps all: the feedback
  loop decides what to drop).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

FSYNC_POLICIES = ("record", "none")
SCHEMA = 1  # the record's "v"


class DecisionLog:
    """Append-only JSONL with size rotation. Thread-safe: ``write`` one record per request."""

    def __init__(self, path: str | Path, max_bytes: int = 64 << 20, keep: int = 0, fsync: str = "record"):
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {list(FSYNC_POLICIES)}, got {fsync!r}")
        if int(max_bytes) < 1024:
            raise ValueError(f"max_bytes must be >= 1024, got {max_bytes}")
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.keep = int(keep)
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Condition()  # file writes, rotation, and the syncer's wake-ups
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size
        self._written = 0  # records written since start (sequence numbers)
        self._synced = 0  # records known to be on disk
        self._rotations = 0
        self._closing = False
        self.fsyncs = 0  # fsync calls made, for tests
        self.records = 0  # written since start, for /health and tests
        self._syncer = None
        if fsync == "record":
            self._syncer = threading.Thread(target=self._sync_loop, name="decision-log-fsync", daemon=True)
            self._syncer.start()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, record: dict[str, Any]) -> int:
        """Append one record as one line (one ``write()``); returns its sequence number for ``sync``."""
        line = (json.dumps(record, allow_nan=False, separators=(",", ":"), default=str) + "\n").encode("utf-8")
        with self._lock:
            if self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            view = memoryview(line)
            while view:  # a regular file takes it in one call; loop for the rare short write
                n = os.write(self._fd, view)
                view = view[n:]
            self._size += len(line)
            self._written += 1
            self.records += 1
            self._lock.notify_all()
            return self._written

    def _sync_loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._written > self._synced or self._closing)
                if self._written <= self._synced:  # closing, nothing left
                    return
                fd, upto = self._fd, self._written
            try:
                os.fsync(fd)
            except OSError:  # rotated (and fsynced) meanwhile
                pass
            with self._lock:
                self.fsyncs += 1
                self._synced = max(self._synced, upto)
                self._lock.notify_all()

    def wait_synced(self, seq: int, timeout: float | None = None) -> bool:
        """Wait until record ``seq`` is on disk (policy ``record``); True if it is."""
        if self.fsync == "none":
            return False
        with self._lock:
            return self._lock.wait_for(lambda: self._synced >= seq, timeout=timeout)

    def _rotate(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        self._synced = self._written
        self._rotations += 1
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        n = self._rotations
        while True:  # never overwrite an earlier rotation (a restart within the same second)
            target = self.path.with_name(f"{self.path.stem}.{stamp}.{n}{self.path.suffix or '.jsonl'}")
            if not target.exists():
                break
            n += 1
        os.replace(self.path, target)
        self._fd = self._open()
        self._size = 0
        if self.keep > 0:
            for old in rotated_files(self.path)[: -self.keep]:
                old.unlink(missing_ok=True)

    def close(self) -> None:
        """Sync what is written (policy ``record``) and close. Safe to call twice."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._syncer is not None:
            self._syncer.join()
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def rotated_files(path: str | Path) -> list[Path]:
    """The rotated files of a log, oldest first (by modification time, then name)."""
    path = Path(path)
    suffix = path.suffix or ".jsonl"
    files = [p for p in path.parent.glob(f"{path.stem}.*{suffix}") if p != path]

    def order(p: Path):  # <stem>.<UTC time>.<n><suffix>: by time written, then rotation number
        n = p.name[len(path.stem) + 1: -len(suffix)].rpartition(".")[2]
        return p.stat().st_mtime_ns, int(n) if n.isdigit() else 0, p.name

    return sorted(files, key=order)


def log_files(path: str | Path) -> list[Path]:
    """Every file of a log, oldest first: the rotated ones, then the current one."""
    path = Path(path)
    return rotated_files(path) + ([path] if path.exists() else [])


def read_records(paths: str | Path | Iterable[str | Path]) -> Iterator[dict[str, Any]]:
    """Records of one log (its rotated files too) or of the given files, oldest first. A line
    that does not parse is skipped only if it is a file's last line (a record torn by a crash);
    anywhere else it is a ``ValueError`` naming the file and line."""
    files = log_files(paths) if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    for f in files:
        lines = f.read_bytes().split(b"\n")
        last = len(lines) - 1 if lines[-1] else len(lines) - 2  # index of the last non-empty line
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except ValueError as e:
                if i == last:
                    break
                raise ValueError(f"{f}:{i + 1}: not a JSON record ({e})") from e
