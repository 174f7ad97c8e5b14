"""llama.cpp backend: one-pass rollouts on CPU through llama-cpp-python's low-level API.

Why the low-level API: the high-level ``create_completion`` has no ``n``, so parallel samples
would each re-decode the prompt and run one sequence per decode call. Here one ``llama_batch``
carries one token of every live sequence per ``llama_decode`` and answers are forced in place in
the sample's own KV sequence: the continuous-batching loop is in llamacpp_scheduler.py. This
module loads the model and context, tokenizes, builds samplers, and is the ``Backend`` whose
``sample`` step runs that loop. The loop forces every answer as its sample ends (the rules come
from the base class's ``OnePass``), so ``force`` is never asked for anything.

Not thread-safe: one backend, one caller at a time.

Determinism: sample i of a request uses its own sampler seeded ``seed + i``, forced answers use
samplers seeded ``mix_seed(seed, i, budget)``, and llama.cpp's CPU kernels compute every batch
row independently, so a request's samples do not depend on which other requests share a batch
(tested).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from pipelines.backends.base import Backend, ForcedAnswer, ForceJob, OnePass, RolloutError
from pipelines.backends.llamacpp_scheduler import Job, Scheduler
from router.model_files import resolve_model_path


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


class LlamaCppBackend(Backend):
    """A GGUF model loaded into llama.cpp, sampling many sequences per decode call."""

    name = "llamacpp"
    forces_in_place = True  # the scheduler forces each sample's answers as it ends (one_pass_stream)
    options_type = LlamaCppOptions  # what ModelConfig.options must fit (unknown keys fail)

    def __init__(self, model_id: str, config):
        super().__init__(model_id, config)  # options, template, stop strings
        self.model_path = resolve_model_path(config.path)
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
        self._n_ctx = int(ll.llama_n_ctx(self._ctx))
        # cells one sequence may use: its own stream, or the whole shared cache
        self._n_ctx_seq = int(ll.llama_n_ctx_seq(self._ctx)) if not opts.kv_unified else self._n_ctx
        self._batch = ll.llama_batch_init(self._n_batch, 0, 1)
        self._pieces: dict[int, tuple[bytes, bool]] = {}
        self._piece_buf = ctypes.create_string_buffer(256)

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

    # ------------------------------------------------------------------ the Backend steps

    def sample(self, run: OnePass) -> None:
        """Tokenize every request, check that its sequences fit, and run the scheduler, which
        forces each sample's answers in place as the sample ends."""
        opts = self.options
        n_par = opts.n_parallel
        forcing: dict[str, list[int]] = {}

        def ids_of(text: str) -> list[int]:
            if text not in forcing:
                forcing[text] = self.tokenize(text)
            return forcing[text]

        jobs = []
        for q, r in enumerate(run.requests):
            prompt = self.tokenize(r.prompt, add_special=True, parse_special=True)
            need = run.sequence_tokens(q, len(prompt), lambda t: len(ids_of(t)))
            if opts.kv_unified:  # a group of samples shares the prompt's cells in one cache
                run.check_capacity(q, len(prompt), need, self._n_ctx, room="the shared cache (n_ctx)",
                                   option="n_ctx (or lower options.n_parallel)", parallel=min(r.n, n_par))
            else:  # every sequence has its own stream of n_ctx / n_parallel cells
                run.check_capacity(q, len(prompt), need, self._n_ctx_seq,
                                   room=f"each of n_parallel={n_par} sequences (n_ctx/n_parallel)",
                                   option=f"n_ctx to at least {need * n_par} (or lower options.n_parallel)")
            run.prompt_tokens[q] = len(prompt)
            jobs.append(Job(q, prompt, r.n, tuple(int(b) for b in r.budgets), ids_of(r.force_suffix),
                            ids_of(r.direct_prefix), int(r.answer_tokens), need))
        # built per call, not kept: it holds bound methods, and a cycle would keep a dropped
        # backend's context (hundreds of MB) alive until the garbage collector runs
        Scheduler(
            self._ll, self._ctx, self._batch, n_batch=self._n_batch, n_parallel=n_par, n_ctx=self._n_ctx,
            kv_unified=bool(opts.kv_unified), piece=self._piece, pieces=self._pieces,
            make_sampler=self._make_sampler, free_sampler=self._free_sampler,
        ).run(jobs, run)

    def force(self, run: OnePass, jobs: list[ForceJob]) -> list[ForcedAnswer]:
        """Never needed: the scheduler forces every answer in place while it samples."""
        raise RolloutError(f"internal: the llama.cpp scheduler left {len(jobs)} forced answer(s) undone")

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

    def _check_open(self) -> None:
        if self._closed or not self._ctx:
            raise RolloutError("the llamacpp backend is closed")

