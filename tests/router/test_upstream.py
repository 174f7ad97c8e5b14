"""The stdlib HTTP upstream engine against a scripted server: keep-alive, bounded retries, error
kinds, streaming, and the one-budget execution path (no logprobs)."""

from __future__ import annotations

import pytest

from router.generation import OnePassRequest, SamplingConfig
from router.upstream import OpenAIUpstream, UpstreamError
from tests.fakes import FakeOpenAIServer


def req(budget: int, n: int = 1, seed: int = 3) -> OnePassRequest:
    return OnePassRequest(key="q", prompt="Q: 2+2?\nA:", n=n, budgets=(budget,), seed=seed)


def test_connections_are_kept_alive_and_the_model_is_asked_once():
    with FakeOpenAIServer() as fake:
        up = OpenAIUpstream(fake.url)
        for _ in range(5):
            assert up.complete({"prompt": "x", "max_tokens": 16})["text"] == FakeOpenAIServer.TEXT
        assert fake.connections == 1 and up.model == "fake"
        assert {c["model"] for c in fake.calls} == {"fake"}
        up.close()


def test_a_connection_the_server_dropped_is_replaced_without_an_error():
    with FakeOpenAIServer(["drop", "ok"]) as fake:
        up = OpenAIUpstream(fake.url, model="m", retries=0)
        up.complete({"prompt": "x"})
        up.complete({"prompt": "x"})  # the pooled connection is dead: one fresh try, not a failure
        assert up.errors == {} and fake.connections == 2


@pytest.mark.parametrize("script,kind,calls", [
    (["500", "500", "ok"], None, 3),  # passing failures: retried
    (["garbage"] * 3, "garbage", 3),  # not an OpenAI answer, every time: fails after 2 retries
    (["nonhttp"] * 3, "garbage", 3),  # not even HTTP
    (["400"], "client", 1),  # the same request would be refused again: no retry
])
def test_bounded_retries_by_error_kind(script, kind, calls):
    with FakeOpenAIServer(script) as fake:
        up = OpenAIUpstream(fake.url, model="m", retries=2)
        if kind is None:
            assert up.complete({"prompt": "x"})["text"]
            assert up.errors == {"server": 2}
        else:
            with pytest.raises(UpstreamError) as e:
                up.complete({"prompt": "x"})
            assert e.value.kind == kind and fake.url in str(e.value)
        assert len(fake.calls) == calls


def test_a_slow_upstream_times_out():
    with FakeOpenAIServer(["slow"] * 2, delay=1.0) as fake:
        up = OpenAIUpstream(fake.url, model="m", timeout=0.2, retries=1)
        with pytest.raises(UpstreamError) as e:
            up.complete({"prompt": "x"})
        assert e.value.kind == "timeout" and up.errors == {"timeout": 2}


def test_nothing_listening_is_a_connect_error():
    from tests.upstreams import free_port

    up = OpenAIUpstream(f"http://127.0.0.1:{free_port()}/v1", model="m", retries=0)
    with pytest.raises(UpstreamError) as e:
        up.complete({"prompt": "x"})
    assert e.value.kind == "connect"
    up.close()
    with pytest.raises(UpstreamError, match="closed"):
        up.complete({"prompt": "x"})


def test_one_budget_needs_no_token_strings_and_budget_zero_makes_one_call():
    with FakeOpenAIServer() as fake:
        up = OpenAIUpstream(fake.url, model="m")
        (r,) = up.one_pass([req(16, n=2)], SamplingConfig())
        assert [s.text for s in r.samples] == [FakeOpenAIServer.TEXT] * 2 and r.samples[0].n_tokens == 5
        assert sorted(c["seed"] for c in fake.calls) == [3, 4] and "logprobs" not in fake.calls[0]
        assert r.usage.calls == 2 and r.usage.completion_tokens == 10
        fake.calls.clear()
        (r,) = up.one_pass([req(2)], SamplingConfig())  # cut at 2: forced on prompt + the cut text
        assert r.samples[0].forced[2].text == FakeOpenAIServer.TEXT
        assert fake.calls[1]["prompt"] == "Q: 2+2?\nA:" + "step step" + "\nThe final answer is"
        fake.calls.clear()
        (r,) = up.one_pass([req(0)], SamplingConfig())
        assert len(fake.calls) == 1 and fake.calls[0]["prompt"].endswith("A:The final answer is")
        with pytest.raises(ValueError, match="token strings"):
            up.one_pass([OnePassRequest(key="q", prompt="p", n=1, budgets=(2, 8), seed=1)], SamplingConfig())


def test_streaming_gives_what_one_pass_gives_and_a_cut_stream_fails():
    with FakeOpenAIServer() as fake:
        up = OpenAIUpstream(fake.url, model="m")
        for budget in (0, 2, 16):
            pieces = []
            streamed = up.stream_one(req(budget), SamplingConfig(), pieces.append)
            (whole,) = up.one_pass([req(budget)], SamplingConfig())
            s, w = streamed.samples[0], whole.samples[0]
            assert (s.text, s.n_tokens, s.finished, s.forced) == (w.text, w.n_tokens, w.finished, w.forced)
            forced = w.forced.get(budget)
            assert "".join(pieces) == w.text + (req(budget).forcing_text(budget) + forced.text if forced else "")
        fake.script = ["cut"]
        with pytest.raises(UpstreamError) as e:
            up.stream_one(req(16), SamplingConfig(), lambda t: None)
        assert e.value.kind == "connect"
