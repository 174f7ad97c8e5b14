"""The decision log: one line per record from many threads, rotation by size without losing or
overwriting a record, a torn last line skipped, fsync per policy."""

from __future__ import annotations

import json
import threading

import pytest

from router.decision_log import DecisionLog, log_files, read_records


def test_concurrent_writers_one_whole_line_each(tmp_path):
    log = DecisionLog(tmp_path / "d.jsonl", fsync="none")

    def writer(k):
        for i in range(200):
            log.write({"request_id": f"{k}-{i}", "pad": "x" * (i % 50)})

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    ids = [r["request_id"] for r in read_records(tmp_path / "d.jsonl")]
    assert len(ids) == 1600 and len(set(ids)) == 1600
    assert [i for i in ids if i.startswith("3-")] == [f"3-{i}" for i in range(200)]  # each writer's order kept


def test_rotation_by_size_keeps_every_record_in_order(tmp_path):
    log = DecisionLog(tmp_path / "d.jsonl", max_bytes=2048, fsync="none")
    for i in range(100):
        log.write({"i": i, "pad": "y" * 40})
    log.close()
    files = log_files(tmp_path / "d.jsonl")
    assert len(files) >= 3 and files[-1].name == "d.jsonl"
    assert all(f.stat().st_size <= 2048 for f in files)
    assert [r["i"] for r in read_records(tmp_path / "d.jsonl")] == list(range(100))
    # a restart appends to the current file and never overwrites a rotated one
    again = DecisionLog(tmp_path / "d.jsonl", max_bytes=2048, keep=2, fsync="none")
    for i in range(100, 160):
        again.write({"i": i, "pad": "y" * 40})
    again.close()
    files = log_files(tmp_path / "d.jsonl")
    assert len(files) == 3  # keep=2 rotated files plus the current one
    got = [r["i"] for r in read_records(tmp_path / "d.jsonl")]
    assert got == sorted(got) and got[-1] == 159


def test_a_torn_last_line_is_skipped_a_torn_middle_line_is_an_error(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"i": 1}) + "\n" + json.dumps({"i": 2}) + "\n" + '{"i": 3, "trunc')
    assert [r["i"] for r in read_records(p)] == [1, 2]
    p.write_text(json.dumps({"i": 1}) + "\n" + '{"i": 2, "tru\n' + json.dumps({"i": 3}) + "\n")
    with pytest.raises(ValueError, match="d.jsonl:2"):
        list(read_records(p))


def test_fsync_policy(tmp_path):
    log = DecisionLog(tmp_path / "d.jsonl", fsync="record")
    for i in range(50):
        seq = log.write({"i": i})
    assert log.wait_synced(seq, timeout=10)  # the syncer thread caught up without being asked
    assert 1 <= log.fsyncs <= 50  # group commit: one fsync may cover many records
    log.close()
    log.close()
    none = DecisionLog(tmp_path / "e.jsonl", fsync="none")
    assert none.wait_synced(none.write({"i": 1}), timeout=0.1) is False and none.fsyncs == 0
    none.close()
    with pytest.raises(ValueError, match="fsync"):
        DecisionLog(tmp_path / "f.jsonl", fsync="sometimes")
