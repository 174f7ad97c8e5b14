"""llama.cpp backend: one-pass rollouts on CPU through llama-cpp-python's low-level API.

Why the low-level API: the high-level ``create_completion`` has no ``n``, so parallel samples
would each re-decode the prompt and run one sequence per decode call. Here one ``llama_batch``
carries one token of every live sequence per ``llama_decode``, each query's prompt is decoded
once and its KV copied to its n sample sequences (``llama_memory_seq_cp``), and answers are
forced in place by truncating a sample's own KV cache (``llama_memory_seq_rm``), budgets in
descending order, with the forced answers of all live sequences sharing the decode calls.
Python work per step is a few microseconds per sequence; the decode and the samplers (C) are
the cost, so the loop runs within a few percent of a bare batched loop (bench/llamacpp_bare.py).

Not thread-safe: one backend, one caller at a time.

Determinism: sample i of a request uses its own sampler seeded ``seed + i``, forced answers use
samplers seeded from (seed, i, budget), and llama.cpp's CPU kernels compute every batch row
independently, so a request's samples do not depend on which other requests share a batch
(tested).
"""

from __future__ import annotations

import bisect
import ctypes
import os
from dataclasses import dataclass

from pipelines.backends.base import (
    Backend,
    ForcedAnswer,
    OnePassRequest,
    OnePassResult,
    RolloutError,
    SampleResult,
    SamplingConfig,
    check_generate_args,
    check_request,
)
from pipelines.backends.model_files import resolve_model_path
from pipelines.prompts import stop_strings

_SEED_MASK = 0xFFFFFFFF
_LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp treats this seed as "pick a random one"


@dataclass(frozen=True)
class LlamaCppOptions:
    """``ModelConfig.options`` for the llama.cpp backend (unknown keys fail)."""

    # total KV cells across all sequences; each sequence gets n_ctx / n_parallel of them
    # (prompt + largest budget + suffix + answer must fit). 16384 x 23 KB/cell = ~380 MB for
    # SmolLM2-135M; raise it for larger budgets
    n_ctx: int = 16384
    # max concurrent sequences in one batch (4 queries x 8 samples); a query's n samples start
    # together once n sequence ids are free (n > n_parallel is split into groups, each
    # decoding the prompt once)
    n_parallel: int = 32
    # None = os.cpu_count(). Measured on 2 idle cores (bench/llamacpp_bare.py, 32 sequences):
    # 2 threads 121 tok/s, 1 thread 65-72. On a machine shared with other busy processes use
    # fewer threads, or OMP_WAIT_POLICY=PASSIVE: ggml's OpenMP barriers spin, and 2 threads on
    # 2 contended cores ran 3-10x slower than 1. PASSIVE is not the default because it costs
    # 1.8x on idle cores (2 threads: 67 vs 121 tok/s batched, 22 vs 57 single stream)
    n_threads: int | None = None
    n_batch: int = 512  # max tokens per llama_decode (prompt chunks + one token per sequence)
    # False: one KV stream of n_ctx / n_parallel cells per sequence, so attention scans only a
    # sequence's own cells, not every live sequence's; copying the prompt to a stream is a
    # memcpy. True: one shared cache where copied prompts cost no cells; groups of samples are
    # then admitted only when the cells they may need are free
    kv_unified: bool = False
    verbose: bool = False  # llama.cpp's own logging to stderr

    @classmethod
    def from_dict(cls, options: dict | None) -> "LlamaCppOptions":
        from pipelines.config import build  # unknown keys fail with the valid ones listed

        opts = build(cls, options, "llamacpp options")
        for name in ("n_ctx", "n_parallel", "n_batch"):
            if int(getattr(opts, name)) < 1:
                raise ValueError(f"llamacpp options: {name} must be >= 1, got {getattr(opts, name)}")
        return opts


# phases of a sequence
_WAIT, _PROMPT, _GEN, _ANSWER, _DONE = range(5)


class _Job:
    """One request (or a ``generate`` call) in token form."""

    __slots__ = ("key", "prompt", "n", "budgets", "seed", "suffix", "direct", "answer_tokens",
                 "force", "results", "need_seq")

    def __init__(self, key, prompt, n, budgets, seed, suffix, direct, answer_tokens, force):
        self.key = key
        self.prompt = prompt  # prompt token ids
        self.n = n
        self.budgets = budgets
        self.seed = seed
        self.suffix = suffix  # force-suffix token ids
        self.direct = direct  # direct-prefix token ids (budget 0)
        self.answer_tokens = answer_tokens
        self.force = force
        self.results: list = [None] * n
        self.need_seq = 0  # KV cells one sample sequence needs at most


class _Seq:
    """A live sample: its KV sequence, sampler and what it generated so far."""

    __slots__ = ("job", "index", "seq", "group", "phase", "sampler", "tokens", "buf", "offsets",
                 "n_kept", "cut", "finished", "kv_len", "kv_valid", "feed", "feed_at", "out",
                 "to_force", "budget", "ans_sampler", "ans_buf", "ans_offsets", "ans_n", "forced")

    def __init__(self, job, index, seq, group):
        self.job = job
        self.index = index
        self.seq = seq  # llama.cpp sequence id (a slot, reused after the sample is done)
        self.group = group  # the samples that share this prompt decode
        self.phase = _WAIT
        self.sampler = None
        self.tokens: list[int] = []  # completion token ids (EOG excluded)
        self.buf = bytearray()  # completion bytes, for stop strings
        self.offsets: list[int] = []  # byte offset where each token starts in buf
        self.n_kept = 0
        self.cut = -1  # byte length of the kept completion text
        self.finished = False
        self.kv_len = 0  # positions [0, kv_len) of this sequence are in the KV cache
        self.kv_valid = 0  # positions [0, kv_valid) hold prompt + completion tokens
        self.feed: list[int] = []  # tokens to decode next
        self.feed_at = 0
        self.out = -1  # batch index of this sequence's logits after the last decode
        self.to_force: list[int] = []  # budgets still to force, descending
        self.budget = -1
        self.ans_sampler = None
        self.ans_buf = bytearray()
        self.ans_offsets: list[int] = []
        self.ans_n = 0
        self.forced: dict[int, ForcedAnswer] = {}


_GGML_LOG_ERROR, _GGML_LOG_CONT = 4, 5  # ggml_log_level in this llama.cpp (DEBUG=1 ... ERROR=4)
_log_state = {"callback": None, "last": 0}


def _quiet_logs(llama_cpp, llama_logger, verbose: bool) -> None:
    """Show llama.cpp's errors only (everything if verbose).

    llama-cpp-python's own callback maps ggml levels with a stale table (it takes WARN=3 for
    ERROR and ERROR=4 for DEBUG), so with verbose=False it prints warnings and hides errors.
    The callback is process-wide in llama.cpp; the reference is kept here so ctypes does not
    garbage-collect it while C still calls it.
    """
    if verbose:
        llama_logger.set_verbose(True)
        llama_cpp.llama_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
        return
    if _log_state["callback"] is None:

        @llama_cpp.llama_log_callback
        def _errors_only(level, text, user_data):
            if level != _GGML_LOG_CONT:
                _log_state["last"] = level
            if _log_state["last"] == _GGML_LOG_ERROR:
                import sys

                sys.stderr.write(text.decode("utf-8", errors="replace"))

        _log_state["callback"] = _errors_only
    llama_cpp.llama_log_set(_log_state["callback"], ctypes.c_void_p(0))


def _find_stop(buf: bytearray, start: int, stops: tuple[bytes, ...]) -> int:
    """Earliest byte offset >= start where any stop string begins, or -1."""
    best = -1
    for s in stops:
        i = buf.find(s, start)
        if i >= 0 and (best < 0 or i < best):
            best = i
    return best


def _mix_seed(seed: int, index: int, budget: int) -> int:
    """A deterministic 32-bit seed for the forced answer of (sample, budget)."""
    x = ((seed + index) * 0x9E3779B1 + (budget + 1) * 0x85EBCA77 + 0x27D4EB2F) & _SEED_MASK
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & _SEED_MASK
    x ^= x >> 12
    return x if x != _LLAMA_DEFAULT_SEED else 0


def _sample_seed(seed: int) -> int:
    x = seed & _SEED_MASK
    return x if x != _LLAMA_DEFAULT_SEED else 0


class LlamaCppBackend(Backend):
    """A GGUF model loaded into llama.cpp, sampling many sequences per decode call."""

    name = "llamacpp"
    options_type = LlamaCppOptions  # what ModelConfig.options must fit (unknown keys fail)

    def __init__(self, model_id: str, config):
        super().__init__(model_id)
        self.config = config
        self.options = self.options_type.from_dict(getattr(config, "options", None))
        self.template = getattr(config, "template", "raw")
        self.model_path = resolve_model_path(config.path)
        #: completion token ids of the last one_pass/generate call, by (key, sample index);
        #: lets tests and tools rebuild exactly what conditioned a forced answer
        self.last_completion_tokens_: dict[tuple[str, int], list[int]] = {}
        self._model = self._ctx = self._batch = None
        self._samplers: dict[int, object] = {}  # live samplers by address, freed on close
        self._closed = False
        try:
            import llama_cpp  # lazily: the pipeline's other stages must not need it
            from llama_cpp import _logger as llama_logger
        except ImportError as e:
            raise RolloutError(
                f"the llamacpp backend needs llama-cpp-python ({e}); install the pipeline extra"
            ) from e
        self._ll = llama_cpp
        _quiet_logs(llama_cpp, llama_logger, self.options.verbose)
        try:
            self._load()
        except BaseException:
            self.close()  # free whatever was allocated before the failure
            raise

    def _load(self) -> None:
        ll, opts = self._ll, self.options
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        self._model = ll.llama_model_load_from_file(str(self.model_path).encode(), mparams)
        if not self._model:
            raise RolloutError(f"llama.cpp could not load the model file {self.model_path}")
        self._vocab = ll.llama_model_get_vocab(self._model)
        max_seq = int(ll.llama_max_parallel_sequences())
        if opts.n_parallel > max_seq:
            raise RolloutError(f"options.n_parallel={opts.n_parallel} exceeds llama.cpp's limit of {max_seq}")
        n_threads = int(opts.n_threads or os.cpu_count() or 1)
        # a decode call must be able to hold one token of every sequence
        self._n_batch = max(int(opts.n_batch), opts.n_parallel)
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = int(opts.n_ctx)
        cparams.n_batch = self._n_batch
        cparams.n_ubatch = self._n_batch
        cparams.n_seq_max = opts.n_parallel
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.kv_unified = bool(opts.kv_unified)
        # a full-size sliding-window cache (Gemma 3): truncating a sequence and decoding again
        # needs every earlier position, which a pruned SWA cache would have dropped
        cparams.swa_full = True
        cparams.no_perf = True
        self._ctx = ll.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise RolloutError(
                f"llama.cpp could not create a context (n_ctx={opts.n_ctx}, n_parallel={opts.n_parallel}); "
                f"lower options.n_ctx or options.n_parallel"
            )
        self._mem = ll.llama_get_memory(self._ctx)
        self._n_ctx = int(ll.llama_n_ctx(self._ctx))
        # cells one sequence may use: its own stream, or the whole shared cache
        self._n_ctx_seq = int(ll.llama_n_ctx_seq(self._ctx)) if not opts.kv_unified else self._n_ctx
        self._batch = ll.llama_batch_init(self._n_batch, 0, 1)
        b = self._batch
        # keep the array pointers: attribute access on a ctypes struct builds a new object
        self._b_token, self._b_pos, self._b_logits = b.token, b.pos, b.logits
        self._b_seq = [b.seq_id[i] for i in range(self._n_batch)]
        for i in range(self._n_batch):
            b.n_seq_id[i] = 1  # every token belongs to one sequence; prompts are shared by seq_cp
        self._pieces: dict[int, tuple[bytes, bool]] = {}
        self._piece_buf = ctypes.create_string_buffer(256)
        self._stops = tuple(s for s in stop_strings(self.template) if s)

    # ------------------------------------------------------------------ tokens

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = False) -> list[int]:
        """Token ids of ``text``. ``add_special`` adds BOS if the model wants one."""
        self._check_open()
        data = text.encode("utf-8")
        cap = len(data) + 8
        arr = (self._ll.llama_token * cap)()
        n = self._ll.llama_tokenize(self._vocab, data, len(data), arr, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            arr = (self._ll.llama_token * cap)()
            n = self._ll.llama_tokenize(self._vocab, data, len(data), arr, cap, add_special, parse_special)
        if n < 0:
            raise RolloutError(f"llama.cpp could not tokenize a text of {len(data)} bytes")
        return arr[:n]

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes when it is part of a completion (no BOS, no special parsing)."""
        return len(self.tokenize(text))

    def _piece(self, tok: int) -> tuple[bytes, bool]:
        """(bytes of ``tok``, is end-of-generation), cached: a vocab has few distinct hits."""
        got = self._pieces.get(tok)
        if got is None:
            ll = self._ll
            buf = self._piece_buf
            # special=True renders control tokens such as <|im_start|>, so the template's
            # stop strings can match them
            n = ll.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, True)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = ll.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, True)
            got = (buf.raw[:n], bool(ll.llama_vocab_is_eog(self._vocab, tok)))
            self._pieces[tok] = got
        return got

    # ------------------------------------------------------------------ samplers

    def _make_sampler(self, seed: int, temperature: float, top_p: float, top_k: int):
        ll = self._ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if temperature <= 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        else:
            # temperature first, then top-k/top-p, as vLLM and HF transformers do, so both
            # backends truncate the same distribution. It is also 5x faster here: top-p on the
            # untempered logits keeps far more of a 49k vocab and costs ~4 ms per call
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(float(temperature)))
            if top_k and top_k > 0:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(int(top_k)))
            if top_p < 1.0:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(float(top_p), 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
        # ctypes pointers are unhashable: key them by address
        self._samplers[ctypes.cast(chain, ctypes.c_void_p).value] = chain
        return chain

    def _free_sampler(self, chain) -> None:
        if chain is None:
            return
        if self._samplers.pop(ctypes.cast(chain, ctypes.c_void_p).value, None) is not None:
            self._ll.llama_sampler_free(chain)  # a chain owns and frees the samplers added to it

    # ------------------------------------------------------------------ public API

    def one_pass(self, requests: list[OnePassRequest], sampling: SamplingConfig) -> list[OnePassResult]:
        """Roll out every request at all its budgets at once; results are in request order."""
        self._check_open()
        jobs = []
        for r in requests:
            check_request(r)
            jobs.append(_Job(
                r.key, self.tokenize(r.prompt, add_special=True, parse_special=True), r.n,
                tuple(int(b) for b in r.budgets), int(r.seed), self.tokenize(r.force_suffix),
                self.tokenize(r.direct_prefix), int(r.answer_tokens), True,
            ))
        self._run(jobs, sampling)
        return [
            OnePassResult(key=j.key, samples=tuple(j.results), prompt_tokens=len(j.prompt)) for j in jobs
        ]

    def generate(
        self,
        prompt: str,
        n: int,
        max_tokens: int,
        seed: int,
        temperature: float,
        stop=(),
        *,
        top_p: float = 0.95,
        top_k: int = 0,
    ) -> list[tuple[str, int, bool]]:
        """Sample ``n`` completions of ``prompt``: [(text, n_tokens, finished)], sample i seeded seed + i.

        The same machinery and sampler seeding as ``one_pass``, without forcing, so a decision
        executed at runtime draws the same samples the labels were computed from.
        """
        self._check_open()
        check_generate_args(n, max_tokens)
        sampling = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k, stop=tuple(stop))
        job = _Job("generate", self.tokenize(prompt, add_special=True, parse_special=True), n,
                   (int(max_tokens),), int(seed), [], [], 0, False)
        self._run([job], sampling)
        return [(s.text, s.n_tokens, s.finished) for s in job.results]

    def close(self) -> None:
        """Free samplers, batch, context and model. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        ll = getattr(self, "_ll", None)
        if ll is None:
            return
        for chain in list(self._samplers.values()):
            self._free_sampler(chain)
        if self._batch is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            ll.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            ll.llama_model_free(self._model)
            self._model = None

    def __del__(self):  # pragma: no cover - best effort at interpreter shutdown
        try:
            self.close()
        except Exception:
            pass

    def _check_open(self) -> None:
        if self._closed or not self._ctx:
            raise RolloutError("the llamacpp backend is closed")

    # ------------------------------------------------------------------ the engine

    def _run(self, jobs: list[_Job], sampling: SamplingConfig) -> None:
        """Run every job to completion, filling ``job.results``."""
        ll, ctx, mem = self._ll, self._ctx, self._mem
        opts = self.options
        n_par = opts.n_parallel
        n_batch = self._n_batch
        stops = tuple(s.encode() for s in self._stops + tuple(sampling.stop) if s)
        max_stop = max((len(s) for s in stops), default=0)
        ans_stops = tuple(dict.fromkeys((b"\n",) + tuple(s.encode() for s in self._stops)))
        max_ans_stop = max(len(s) for s in ans_stops)
        temp, top_p, top_k = float(sampling.temperature), float(sampling.top_p), int(sampling.top_k)
        ftemp = float(sampling.force_temperature)
        self.last_completion_tokens_ = {}

        # capacity: what one sample sequence can need, checked before any work is done
        for j in jobs:
            P = len(j.prompt)
            if P == 0:
                raise ValueError(f"request {j.key!r}: the prompt is empty")
            need = P + j.budgets[-1]
            if j.force:
                for b in j.budgets:
                    need = max(need, P + b + len(j.direct if b == 0 else j.suffix) + j.answer_tokens)
            j.need_seq = need
            group = min(j.n, n_par)
            total = P + group * (need - P) if opts.kv_unified else need
            if opts.kv_unified and total > self._n_ctx:
                raise RolloutError(
                    f"request {j.key!r} needs {total} KV cells for {group} parallel samples (prompt {P} "
                    f"+ {group} x {need - P} for max_tokens {j.budgets[-1]}, suffix and answer) but the "
                    f"shared cache has n_ctx={self._n_ctx}; raise options.n_ctx or lower options.n_parallel"
                )
            if not opts.kv_unified and need > self._n_ctx_seq:
                raise RolloutError(
                    f"request {j.key!r} needs {need} KV cells per sequence (prompt {P} + max_tokens "
                    f"{j.budgets[-1]} + suffix + answer_tokens {j.answer_tokens}) but each of "
                    f"n_parallel={n_par} sequences has n_ctx/n_parallel={self._n_ctx_seq}; raise "
                    f"options.n_ctx to at least {need * n_par} (or lower options.n_parallel)"
                )

        # work queue: groups of up to n_parallel samples of one job, each decodes the prompt once
        pending: list[tuple[_Job, range]] = []
        for j in jobs:
            for lo in range(0, j.n, n_par):
                pending.append((j, range(lo, min(j.n, lo + n_par))))
        pending.reverse()  # pop() from the end keeps request order
        free = list(range(n_par - 1, -1, -1))  # free sequence ids, pop() gives the smallest
        live: list[_Seq] = []
        ll.llama_memory_clear(mem, False)  # metadata only: zeroing GBs of cells is wasted time

        tok_arr, pos_arr, logit_arr, seq_ptrs = self._b_token, self._b_pos, self._b_logits, self._b_seq
        batch = self._batch
        piece = self._piece
        pieces = self._pieces
        sample = ll.llama_sampler_sample

        def finish_sample(s: _Seq) -> None:
            j = s.job
            if s.cut < 0:
                s.cut = len(s.buf) if stops else -1
            if stops:
                text = bytes(s.buf[: s.cut]).decode("utf-8", errors="replace")
            else:
                text = b"".join(pieces[t][0] for t in s.tokens).decode("utf-8", errors="replace")
            j.results[s.index] = SampleResult(
                index=s.index, seed=j.seed + s.index, text=text, n_tokens=s.n_kept,
                finished=s.finished, forced=dict(sorted(s.forced.items())),
            )
            self.last_completion_tokens_[(j.key, s.index)] = s.tokens[: s.n_kept]
            self._free_sampler(s.sampler)
            s.sampler = None
            s.phase = _DONE
            # drop the whole sequence so its id (and, unified, its cells) can be reused
            ll.llama_memory_seq_rm(mem, s.seq, -1, -1)

        def end_generation(s: _Seq) -> None:
            """The completion is over: force answers at the budgets it did not finish within."""
            j = s.job
            if not s.finished:
                s.n_kept = len(s.tokens)
            self._free_sampler(s.sampler)
            s.sampler = None
            if j.force:
                s.to_force = [b for b in reversed(j.budgets) if not (s.finished and s.n_kept <= b)]
            next_force(s)

        def next_force(s: _Seq) -> None:
            if not s.to_force:
                finish_sample(s)
                return
            j = s.job
            b = s.to_force.pop(0)
            P = len(j.prompt)
            tail = j.direct if b == 0 else j.suffix
            keep = min(s.kv_valid, P + b)
            if keep == P + b and not tail:
                keep -= 1  # nothing to append: re-decode the last kept token to get its logits
            # truncate this sequence in place: only prompt + first b tokens (+ tail) condition
            # the forced answer; the prompt/completion cells before `keep` are reused as they are
            if not ll.llama_memory_seq_rm(mem, s.seq, keep, -1):
                raise RolloutError(f"llama.cpp could not truncate sequence {s.seq} at position {keep}")
            prefix = j.prompt + s.tokens[:b]
            s.feed = prefix[keep:] + tail
            s.feed_at = 0
            s.kv_len = keep
            s.kv_valid = P + b
            s.budget = b
            s.ans_sampler = self._make_sampler(_mix_seed(j.seed, s.index, b), ftemp, top_p, top_k)
            s.ans_buf = bytearray()
            s.ans_offsets = []
            s.ans_n = 0
            s.phase = _ANSWER

        def end_answer(s: _Seq, cut: int, n_tok: int) -> None:
            text = bytes(s.ans_buf[:cut]).decode("utf-8", errors="replace")
            s.forced[s.budget] = ForcedAnswer(text=text, n_tokens=n_tok)
            self._free_sampler(s.ans_sampler)
            s.ans_sampler = None
            next_force(s)

        def on_gen_token(s: _Seq, tok: int) -> None:
            p, eog = pieces.get(tok) or piece(tok)
            if eog:
                s.finished = True
                s.n_kept = len(s.tokens)
                end_generation(s)
                return
            s.tokens.append(tok)
            if stops:
                start = len(s.buf)
                s.offsets.append(start)
                s.buf += p
                at = _find_stop(s.buf, max(0, start - max_stop + 1), stops)
                if at >= 0:
                    s.cut = at
                    # tokens that contribute at least one byte before the stop string
                    s.n_kept = bisect.bisect_left(s.offsets, at)
                    s.finished = True
                    end_generation(s)
                    return
            if len(s.tokens) >= s.job.budgets[-1]:
                end_generation(s)
                return
            s.feed = [tok]
            s.feed_at = 0

        def on_answer_token(s: _Seq, tok: int) -> None:
            p, eog = pieces.get(tok) or piece(tok)
            if eog:
                end_answer(s, len(s.ans_buf), s.ans_n)
                return
            start = len(s.ans_buf)
            s.ans_offsets.append(start)
            s.ans_buf += p
            s.ans_n += 1
            at = _find_stop(s.ans_buf, max(0, start - max_ans_stop + 1), ans_stops)
            if at >= 0:
                end_answer(s, at, bisect.bisect_left(s.ans_offsets, at))
                return
            if s.ans_n >= s.job.answer_tokens:
                end_answer(s, len(s.ans_buf), s.ans_n)
                return
            s.feed = [tok]
            s.feed_at = 0

        def reserved() -> int:
            """KV cells promised to live samples (unified cache): shared prompts + own tails."""
            prompts = {id(s.group): len(s.job.prompt) for s in live}
            return sum(prompts.values()) + sum(s.job.need_seq - len(s.job.prompt) for s in live)

        try:
            while pending or live:
                # admit whole groups while sequence ids (and, unified, cells) are free
                while pending:
                    j, idx = pending[-1]
                    cells = len(j.prompt) + len(idx) * (j.need_seq - len(j.prompt))
                    if len(free) < len(idx) or (opts.kv_unified and reserved() + cells > self._n_ctx):
                        break
                    pending.pop()
                    group: list[_Seq] = []
                    for i in idx:
                        s = _Seq(j, i, free.pop(), group)
                        s.sampler = self._make_sampler(_sample_seed(j.seed + i), temp, top_p, top_k)
                        group.append(s)
                    lead = group[0]
                    lead.phase = _PROMPT
                    lead.feed = j.prompt
                    live.extend(group)

                # fill the batch: one-token feeds first so a long prompt never starves generation
                n = 0
                ready: list[_Seq] = []
                for s in sorted((s for s in live if s.feed), key=lambda s: len(s.feed) - s.feed_at > 1):
                    take = min(len(s.feed) - s.feed_at, n_batch - n)
                    if take <= 0:
                        break
                    feed, at, pos, sid = s.feed, s.feed_at, s.kv_len, s.seq
                    for k in range(take):
                        tok_arr[n] = feed[at + k]
                        pos_arr[n] = pos + k
                        seq_ptrs[n][0] = sid
                        logit_arr[n] = 0
                        n += 1
                    s.kv_len += take
                    s.feed_at += take
                    if s.feed_at == len(feed):
                        logit_arr[n - 1] = 1
                        s.out = n - 1
                        s.feed = []
                        ready.append(s)
                if n == 0:
                    raise RolloutError("internal: no sequence has input but work remains")  # pragma: no cover
                batch.n_tokens = n
                rc = ll.llama_decode(ctx, batch)
                if rc != 0:
                    raise RolloutError(
                        f"llama_decode failed with code {rc}"
                        + (" (no free KV slot: raise options.n_ctx)" if rc == 1 else "")
                    )

                for s in ready:
                    if s.phase == _PROMPT:
                        j = s.job
                        P = len(j.prompt)
                        for m in s.group:
                            if m is not s:
                                ll.llama_memory_seq_cp(mem, s.seq, m.seq, -1, -1)
                            m.kv_len = m.kv_valid = P
                            m.phase = _GEN
                        for m in s.group:
                            if j.budgets[-1] == 0:
                                end_generation(m)
                            else:
                                # every sample draws its first token from the prompt's logits
                                on_gen_token(m, sample(m.sampler, ctx, s.out))
                    elif s.phase == _GEN:
                        s.kv_valid = s.kv_len
                        on_gen_token(s, sample(s.sampler, ctx, s.out))
                    elif s.phase == _ANSWER:
                        on_answer_token(s, sample(s.ans_sampler, ctx, s.out))

                if any(s.phase == _DONE for s in live):
                    still = []
                    for s in live:
                        if s.phase == _DONE:
                            free.append(s.seq)
                        else:
                            still.append(s)
                    live = still
                    free.sort(reverse=True)
        finally:
            for s in live:
                self._free_sampler(s.sampler)
                self._free_sampler(s.ans_sampler)
            ll.llama_memory_clear(mem, False)  # metadata only: zeroing GBs of cells is wasted time
