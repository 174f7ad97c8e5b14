"""Fakes for unit tests of logic (never what a user runs): a scripted backend and a scripted
OpenAI-compatible server.

The scripted backend follows the one-pass contract exactly, through the base class's
``one_pass`` (so the shared forcing rule, seeds and result assembly are the real ones): sample i
of a query "reasons" for a seeded number of tokens and answers; a cut sample's forced answer
depends on how far it got.
"""

from __future__ import annotations

import json
import random
import time

from pipelines.backends.base import Backend, Completion, ForcedAnswer


class ScriptedBackend(Backend):
    name = "scripted"

    def __init__(self, model_id="scripted", config=None, answer="4", calls=None):
        super().__init__(model_id, config)
        self.answer = answer
        self.calls = calls if calls is not None else []
        self.closed = False
        self._scripts: dict[tuple[int, int], tuple[random.Random, int]] = {}

    def sample(self, run):
        self.calls.append([r.key for r in run.requests])
        self._scripts = {}
        for q, r in enumerate(run.requests):
            run.prompt_tokens[q] = len(r.prompt.split())
            for i in range(r.n):
                rng = random.Random(run.sample_seed(q, i))
                length = rng.randint(1, r.max_tokens + 8)
                n_tokens = min(length, r.max_tokens)
                text = "step " * (n_tokens - 1) + f"The final answer is {self.answer if rng.random() < 0.6 else '5'}."
                # the sample's generator goes on drawing its forced answers, budgets ascending
                self._scripts[(q, i)] = (rng, length)
                run.put(q, i, Completion(text, ["step"] * n_tokens, length <= r.max_tokens))

    def force(self, run, jobs):
        answers = []
        for job in jobs:
            rng, length = self._scripts[(job.request, job.sample)]
            ans = self.answer if job.budget >= length // 2 and rng.random() < 0.7 else "7"
            answers.append(ForcedAnswer(f" {ans}.", 2))
        return answers


class FakeOpenAIServer:
    """A scripted OpenAI-compatible ``/v1/completions`` server on loopback (standard library), for
    unit tests of fault handling and for timing the proxy's own overhead: it answers at once.

    A completion is ``"The final answer is 4."`` (6 tokens) if ``max_tokens`` allows, else
    ``max_tokens`` words cut by length. ``script``: a list of actions consumed one per completion
    request ("ok", "garbage", "nonhttp", "500", "400", "slow", "drop" = answer then close the
    connection without saying so, "cut" = a stream that breaks after two events); when it is
    empty, "ok".
    """

    TEXT = "The final answer is 4."

    def __init__(self, script=(), delay: float = 1.0, model: str = "fake", port: int = 0):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        fake = self
        self.script = list(script)
        self.delay = delay  # seconds a "slow" answer takes
        self.calls: list[dict] = []
        self.connections = 0
        self.model = model
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else ~40 ms per keep-alive answer (Nagle + delayed ACK)

            def log_message(self, *a):
                pass

            def _send(self, status, data: bytes, ctype="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                self._send(200, json.dumps({"object": "list", "data": [{"id": fake.model}]}).encode())

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    fake.calls.append(body)
                    action = fake.script.pop(0) if fake.script else "ok"
                if action == "garbage":
                    return self._send(200, b"<html>not json</html>", "text/html")
                if action in ("500", "400"):
                    return self._send(int(action), b'{"error": {"message": "scripted"}}')
                if action == "nonhttp":  # not even an HTTP status line
                    self.wfile.write(b"SSH-2.0-OpenSSH\r\n\r\n")
                    self.close_connection = True
                    return
                if action == "slow":
                    time.sleep(fake.delay)
                words = fake.TEXT.split(" ")
                n = int(body.get("max_tokens") or 16)
                if n >= len(words):
                    text, finish, k = fake.TEXT, "stop", len(words)
                else:
                    text, finish, k = " ".join(["step"] * n), "length", n
                usage = {"prompt_tokens": len(body["prompt"]) // 4, "completion_tokens": k,
                         "total_tokens": len(body["prompt"]) // 4 + k}
                if body.get("stream"):
                    return self._stream(text, finish, usage, cut=action == "cut")
                choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
                self._send(200, json.dumps({"id": "x", "object": "text_completion", "choices": [choice],
                                            "usage": usage}).encode())
                if action == "drop":
                    self.close_connection = True  # without a Connection: close header

            def _stream(self, text, finish, usage, cut: bool):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                pieces = [t + " " for t in text.split(" ")[:-1]] + [text.split(" ")[-1]]
                for i, piece in enumerate(pieces):
                    if cut and i == 2:
                        self.close_connection = True
                        return  # the upstream dies mid-stream
                    last = i == len(pieces) - 1
                    ev = {"choices": [{"index": 0, "text": piece, "finish_reason": finish if last else None}]}
                    self._chunk(b"data: " + json.dumps(ev).encode() + b"\n\n")
                self._chunk(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
                self._chunk(b"data: [DONE]\n\n")
                self._chunk(b"")

            def _chunk(self, data: bytes):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that gave up on a slow answer: expected here

            def get_request(self):
                conn = super().get_request()
                with fake._lock:
                    fake.connections += 1
                return conn

        self.server = Server(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
