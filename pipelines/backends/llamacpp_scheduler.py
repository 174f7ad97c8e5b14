"""The llama.cpp engine's continuous-batching scheduler: samples and their forced answers, one loop.

One ``llama_batch`` carries one token of every live sequence per ``llama_decode``; each group of a
query's samples decodes the prompt once and copies its KV to the other sample sequences
(``llama_memory_seq_cp``); when a sample ends, its answers are forced in place by truncating the
sample's own KV sequence (``llama_memory_seq_rm``), budgets in descending order, with the forced
answers of all live sequences sharing the decode calls. Python work per step is a few
microseconds per sequence; the decode and the samplers (C) are the cost, so the loop runs within
a few percent of a bare batched loop (bench/llamacpp_bare.py).

The rules are not decided here: which budgets a sample needs forced, the seeds, and how many KV
cells a sequence may need come from the ``OnePass`` (pipelines/backends/base.py); a finished
sample goes back to it as a ``Completion`` with its forced answers.
"""

from __future__ import annotations

import bisect

from pipelines.backends.base import Completion, ForcedAnswer, OnePass, RolloutError, seed32

# phases of a sequence
_WAIT, _PROMPT, _GEN, _ANSWER, _DONE = range(5)


class Job:
    """One request in token form."""

    __slots__ = ("request", "prompt", "n", "budgets", "suffix", "direct", "answer_tokens", "need_seq")

    def __init__(self, request: int, prompt: list[int], n: int, budgets: tuple[int, ...], suffix: list[int],
                 direct: list[int], answer_tokens: int, need_seq: int):
        self.request = request  # index into OnePass.requests
        self.prompt = prompt  # prompt token ids
        self.n = n
        self.budgets = budgets
        self.suffix = suffix  # force-suffix token ids
        self.direct = direct  # direct-prefix token ids (budget 0)
        self.answer_tokens = answer_tokens
        self.need_seq = need_seq  # KV cells one sample sequence needs at most


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


def _find_stop(buf: bytearray, start: int, stops: tuple[bytes, ...]) -> int:
    """Earliest byte offset >= start where any stop string begins, or -1."""
    best = -1
    for s in stops:
        i = buf.find(s, start)
        if i >= 0 and (best < 0 or i < best):
            best = i
    return best


class Scheduler:
    """Runs jobs on one llama.cpp context; the engine owns (and frees) the context, batch and samplers."""

    def __init__(self, ll, ctx, batch, *, n_batch: int, n_parallel: int, n_ctx: int, kv_unified: bool,
                 piece, pieces: dict, make_sampler, free_sampler):
        self.ll, self.ctx, self.batch = ll, ctx, batch
        self.mem = ll.llama_get_memory(ctx)
        self.n_batch, self.n_parallel, self.n_ctx, self.kv_unified = n_batch, n_parallel, n_ctx, kv_unified
        self.piece = piece  # token -> (bytes, is end-of-generation), cached in ``pieces``
        self.pieces = pieces
        self.make_sampler = make_sampler  # (seed, temperature, top_p, top_k) -> sampler chain
        self.free_sampler = free_sampler
        # keep the array pointers: attribute access on a ctypes struct builds a new object
        self.b_token, self.b_pos, self.b_logits = batch.token, batch.pos, batch.logits
        self.b_seq = [batch.seq_id[i] for i in range(n_batch)]
        for i in range(n_batch):
            batch.n_seq_id[i] = 1  # every token belongs to one sequence; prompts are shared by seq_cp

    def run(self, jobs: list[Job], run: OnePass) -> None:
        """Run every job to completion: ``run.put`` each sample with its forced answers."""
        ll, ctx, mem = self.ll, self.ctx, self.mem
        n_par = self.n_parallel
        n_batch = self.n_batch
        kv_unified = self.kv_unified
        sampling = run.sampling
        stops = tuple(s.encode() for s in run.stops)
        max_stop = max((len(s) for s in stops), default=0)
        ans_stops = tuple(s.encode() for s in run.answer_stops)
        max_ans_stop = max(len(s) for s in ans_stops)
        temp, top_p, top_k = float(sampling.temperature), float(sampling.top_p), int(sampling.top_k)
        ftemp = float(sampling.force_temperature)

        # work queue: groups of up to n_parallel samples of one job, each decodes the prompt once
        pending: list[tuple[Job, range]] = []
        for j in jobs:
            for lo in range(0, j.n, n_par):
                pending.append((j, range(lo, min(j.n, lo + n_par))))
        pending.reverse()  # pop() from the end keeps request order
        free = list(range(n_par - 1, -1, -1))  # free sequence ids, pop() gives the smallest
        live: list[_Seq] = []
        ll.llama_memory_clear(mem, False)  # metadata only: zeroing GBs of cells is wasted time

        tok_arr, pos_arr, logit_arr, seq_ptrs = self.b_token, self.b_pos, self.b_logits, self.b_seq
        batch = self.batch
        piece = self.piece
        pieces = self.pieces
        sample = ll.llama_sampler_sample
        make_sampler, free_sampler = self.make_sampler, self.free_sampler

        def finish_sample(s: _Seq) -> None:
            if s.cut < 0:
                s.cut = len(s.buf) if stops else -1
            if stops:
                text = bytes(s.buf[: s.cut]).decode("utf-8", errors="replace")
            else:
                text = b"".join(pieces[t][0] for t in s.tokens).decode("utf-8", errors="replace")
            run.put(s.job.request, s.index, Completion(text, s.tokens[: s.n_kept], s.finished, s.forced))
            free_sampler(s.sampler)
            s.sampler = None
            s.phase = _DONE
            # drop the whole sequence so its id (and, unified, its cells) can be reused
            ll.llama_memory_seq_rm(mem, s.seq, -1, -1)

        def end_generation(s: _Seq) -> None:
            """The completion is over: force answers at the budgets it did not finish within."""
            if not s.finished:
                s.n_kept = len(s.tokens)
            free_sampler(s.sampler)
            s.sampler = None
            s.to_force = run.budgets_to_force(s.job.request, s.finished, s.n_kept)[::-1]
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
            s.ans_sampler = make_sampler(run.force_seed(j.request, s.index, b), ftemp, top_p, top_k)
            s.ans_buf = bytearray()
            s.ans_offsets = []
            s.ans_n = 0
            s.phase = _ANSWER

        def end_answer(s: _Seq, cut: int, n_tok: int) -> None:
            text = bytes(s.ans_buf[:cut]).decode("utf-8", errors="replace")
            s.forced[s.budget] = ForcedAnswer(text=text, n_tokens=n_tok)
            free_sampler(s.ans_sampler)
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
                    if len(free) < len(idx) or (kv_unified and reserved() + cells > self.n_ctx):
                        break
                    pending.pop()
                    group: list[_Seq] = []
                    for i in idx:
                        s = _Seq(j, i, free.pop(), group)
                        s.sampler = make_sampler(seed32(run.sample_seed(j.request, i)), temp, top_p, top_k)
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
                free_sampler(s.sampler)
                free_sampler(s.ans_sampler)
            ll.llama_memory_clear(mem, False)  # metadata only: zeroing GBs of cells is wasted time
