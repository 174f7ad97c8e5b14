"""``python -m router``: route (argument and stdin), info, serve, and clear exit-2 errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.router.bundle_fixture import copy_bundle, session_bundle

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return session_bundle(tmp_path_factory)


def run(*args, stdin=None, env=None, timeout=120):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "router", *args], input=stdin, capture_output=True, text=True,
                          cwd=REPO, env=e, timeout=timeout)


def test_route_one_query(built):
    out = run("route", "What is 17 * 23?", "--bundle", str(built.path), "--max-budget", "64")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["tier"] in {t["name"] for t in built.manifest["tiers"]} and d["budget"] <= 64
    assert d["reason"] in ("utility", "fallback:out-of-distribution")


def test_route_reads_one_query_per_stdin_line(built):
    lines = "What is 2 + 2?\n\nTom has 1234567 apples and gives 3 away. How many are left?\n"
    out = run("route", "-", "--bundle", str(built.path), "--model", "small", stdin=lines)
    assert out.returncode == 0, out.stderr
    ds = [json.loads(x) for x in out.stdout.splitlines()]
    assert len(ds) == 3 and all(d["model"] == "small" for d in ds if d["reason"] != "fallback:empty-query")
    assert ds[1]["reason"] == "fallback:empty-query" and ds[1]["p_correct"] is None


def test_info_prints_the_bundle(built):
    out = run("info", str(built.path))
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert [t["name"] for t in info["tiers"]] == [t["name"] for t in built.manifest["tiers"]]
    assert info["policy"]["lambda"] == built.manifest["policy"]["lambda"] and info["encoder"] == "onnx"


def test_dr_bundle_is_the_default_bundle(built, monkeypatch, capsys):
    from router.cli import main

    monkeypatch.setenv("DR_BUNDLE", str(built.path))
    assert main(["info"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(built.path)


def test_bad_bundle_exits_2_with_a_clear_message(built, tmp_path):
    out = run("route", "hi", "--bundle", str(tmp_path / "missing"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: ") and "missing" in out.stderr and "not a bundle folder" in out.stderr
    d = copy_bundle(built.path, tmp_path / "tampered")
    p = d / "success_lgbm_joint.txt"
    p.write_text(p.read_text().replace("tree", "TREE", 1))
    out = run("info", str(d))
    assert out.returncode == 2 and "success_lgbm_joint.txt" in out.stderr and "sha256" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_arguments_exit_2_without_traceback(built):
    for args in (("route",), ("route", "x", "--max-budget", "lots"), ("nope",),
                 ("route", "x", "--bundle", str(built.path), "--encoder", "torch")):
        out = run(*args)
        assert out.returncode == 2 and "Traceback" not in out.stderr and "usage:" in out.stderr, args


def test_bad_caps_exit_2_naming_the_cap(built):
    out = run("route", "x", "--bundle", str(built.path), "--max-cost", "nan")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "max_cost must be a finite number" in out.stderr


def test_serve_answers_on_loopback_and_stops_on_interrupt(built):
    def default_sigint():
        # a server started by a test run inherits the runner's SIGINT disposition and signal mask;
        # something earlier in the full suite leaves SIGINT ignored or blocked for children (the
        # server then never sees the interrupt), so give it what a shell gives a new process
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])

    p = subprocess.Popen([sys.executable, "-m", "router", "serve", "--bundle", str(built.path), "--port", "0"],
                         cwd=REPO, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         preexec_fn=default_sigint)
    try:
        url = None
        for line in p.stderr:  # wait for the "serving ... on http://127.0.0.1:PORT" line
            m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            if m:
                url = m.group(1)
                break
        assert url, "server did not report its address"
        with urllib.request.urlopen(url + "/health", timeout=30) as r:
            assert json.loads(r.read())["status"] == "ok"
        req = urllib.request.Request(url + "/route", data=json.dumps({"text": "What is 3 + 4?"}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert json.loads(r.read())["tier"] in {t["name"] for t in built.manifest["tiers"]}
    finally:
        p.send_signal(signal.SIGINT)
        try:
            # communicate drains stderr while waiting: a server blocked writing to a full pipe
            # (its request log, warnings) could never exit
            _, rest = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
            p.stderr.close()
    assert p.returncode in (0, 130), rest[-2000:]
