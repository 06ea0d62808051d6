"""Many prompts at once: continuous batching, so that the memory a compressed cache saves becomes throughput.

Every running sequence owns one cache per layer, exactly as a batch-1 run would: its own FastGen profile, so every
(sequence, KV head) pair has its own policy. A decode step runs the current token of every running sequence through
one forward (`Llama.forward` with tokens (B, 1), each sequence at its own position): the weights are read once for
all B tokens, and each sequence's caches attend over what they keep: full caches one by one, FastGen stores in
pools, one per layer for every running sequence (fastgen/pool.py), rebuilt as sequences join and leave. A new
prompt is prefilled on its own and joins the batch when its projected KV bytes fit under the cap; a sequence that
finishes (EOS, its token limit, the context) leaves at once and its caches are freed, which makes room for the next
prompt.

The cap compares like with like: a projection is an upper bound on what a sequence's caches can hold at any time,
for the full cache and for FastGen alike (the full cache: its final length, the most its caches are sized for;
FastGen: what its budget keeps of the final length plus the row a step writes before it evicts, and a store's
positions, flags, scores and bitmaps). With the budget profile a head keeps its menu share of the length
(`kept_share`); the paper's profile and fixed policies that protect special/punctuation tokens project a full cache.
A pool pads its pairs to the longest, so there every running sequence counts as the largest projection (`fits`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .cache import full_kv_bytes, kept_fraction
from .fastgen.cache import make_caches
from .fastgen.pool import FastGenBatch
from .errors import TinygenError
from .fastgen.policy import FREQUENT, LOCAL, FastGenConfig, protected_kinds
from .generate import prefill
from .sampling import SamplingParams, sample


@dataclass
class Sequence:
    index: int
    prompt: list[int]
    projected: int  # KV bytes its caches may hold at most from its first decode step on
    projected_prefill: int  # ... and while it prefills
    caches: list = field(default_factory=list)
    on_tokens: Callable | None = None
    generator: torch.Generator | None = None
    out: list[int] = field(default_factory=list)
    token: int = -1  # the last sampled token, not yet fed to the model
    stop_reason: str = ""
    kept_fraction: float = 1.0  # at the end, as are the bytes its caches held then and each head's policy
    kv_bytes: int = 0
    policies: list | None = None

    @property
    def pos(self) -> int:
        """Tokens the caches have seen: the position the next fed token takes."""
        return self.caches[0].length


@dataclass
class BatchStats:
    batch: int = 0
    prompts: int = 0
    generated_tokens: int = 0
    decode_tokens: int = 0  # tokens out of decode steps (the first token of each answer comes out of its prefill)
    decode_seconds: float = 0.0
    prefill_seconds: float = 0.0
    peak_kv_bytes: int = 0  # the caches' storage, all running sequences together
    peak_kv_bytes_full: int = 0  # what full caches of the running sequences' lengths would hold at that moment
    max_running: int = 0
    seconds: float = 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


def projected_bytes(model, cfg: FastGenConfig, prompt_tokens: int, max_new_tokens: int) -> tuple[int, int]:
    """Upper bounds on one sequence's KV bytes: (from its first decode step on, during its prefill).

    They differ with the budget profile only: a layer holds the prompt's full K/V while it prefills, and below a
    head floor of 1 every layer holds it until the last layer's prefill ends (the model-wide planner). Only one
    sequence prefills at a time, so admission adds the second figure of the new sequence to the first figures of
    the running ones."""
    c, itemsize = model.cfg, model.embed.weight.dtype.itemsize
    final = min(c.max_seq_len, prompt_tokens + max_new_tokens)  # the caches' max_len: they never grow past it
    kv_row = 2 * c.head_dim * itemsize  # K and V of one token of one KV head
    per_layer = c.n_layers * c.n_kv_heads
    if cfg.policy == "full":
        steady = per_layer * final * kv_row
        return steady, steady
    kept = min(final, math.ceil(kept_share(cfg) * final) + 1)  # +1: local+frequent rounds two shares up
    rows = min(final, kept + 1)  # a store never holds more than its budget at max_len and the next token's row
    # per row: K, V, its position (int32), protected flag and score (float32); per head the bitmap and its freed row
    steady = per_layer * (rows * (kv_row + 4 + 1 + 4) + (final + 7) // 8 + 8)
    if cfg.model_wide:
        prefill_peak = per_layer * prompt_tokens * kv_row
    elif cfg.budgeted:  # the layers before hold at most their steady bytes, the prefilling one its prompt K/V
        prefill_peak = steady + c.n_kv_heads * prompt_tokens * kv_row
    else:
        prefill_peak = 0
    return steady, max(steady, prefill_peak)


def kept_share(cfg: FastGenConfig) -> float:
    """The most a sequence keeps, as a share of its length, known before profiling. The budget profile's heads take
    menu shares (steps of 0.05): at the default floor of 1 each takes the smallest one >= --kv-budget; below it
    the planner keeps the mean within the budget. Fixed local/frequent policies keep their ratios; anything that
    protects special/punctuation tokens (or the paper's profile) may keep everything."""
    from .fastgen.budget import SHARES

    menu_share = lambda b: min((s for s in SHARES if s >= b - 1e-9), default=1.0)  # noqa: E731  (smallest >= b)
    if cfg.budgeted and cfg.layer_budgets is not None:  # each layer's heads take the menu share at its budget
        return sum(map(menu_share, cfg.layer_budgets)) / len(cfg.layer_budgets)
    if cfg.budgeted:
        return min(1.0, max(cfg.kv_budget, menu_share(cfg.head_floor * cfg.kv_budget)))
    if cfg.fixed_policy is not None and not protected_kinds(cfg.fixed_policy):  # local and/or frequent
        return min(1.0, (cfg.local_ratio if cfg.fixed_policy & LOCAL else 0) +
                   (cfg.frequent_ratio if cfg.fixed_policy & FREQUENT else 0))
    return 1.0


class BatchRunner:
    """Runs prompts through continuous batching. `run(prompts, on_done)` calls on_done(sequence) as each finishes,
    in finishing order, and returns BatchStats."""

    def __init__(self, model, tok, cfg: FastGenConfig, sampling: SamplingParams, max_new_tokens: int, batch: int,
                 kv_cap_bytes: int | None = None, ignore_eos: bool = False, on_progress=None, check_every: int = 8,
                 pool: bool = True):
        self.model, self.tok, self.cfg, self.sampling = model, tok, cfg, sampling
        self.max_new_tokens, self.batch, self.cap, self.ignore_eos = max_new_tokens, batch, kv_cap_bytes, ignore_eos
        self.on_progress, self.check_every = on_progress, check_every
        assert batch >= 1, "a batch holds at least one sequence"
        self.device = model.embed.weight.device
        # FastGen's decode steps run on pools: per layer, the stores of every running sequence (fastgen/pool.py).
        # pool=False lets each sequence's stores step alone (to compare; admission then sums the projections).
        c = model.cfg
        self.pools = None if cfg.policy == "full" or not pool else [FastGenBatch(c.n_heads, c.n_kv_heads)
                                                                    for _ in range(c.n_layers)]

    def projected(self, prompt_tokens: int) -> tuple[int, int]:
        return projected_bytes(self.model, self.cfg, prompt_tokens, self.max_new_tokens)

    def _start(self, seq: Sequence, running: list[Sequence], stats: BatchStats) -> None:
        """Prefill one admitted prompt on its own and sample its first token. The KV bytes are sampled before the
        last layer's prefill too, when the budget profile holds every layer's prompt K/V."""
        limit = min(self.model.cfg.max_seq_len, len(seq.prompt) + self.max_new_tokens)
        seq.caches, seq.on_tokens = make_caches(self.model, self.tok, self.cfg, limit)
        if self.sampling.seed is not None:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(self.sampling.seed)
        if seq.on_tokens:
            seq.on_tokens(seq.prompt)
        last = self.model.cfg.n_layers - 2
        on_layer = lambda i: self._measure(running + [seq], stats) if i == last else None
        logits = prefill(self.model, seq.prompt, seq.caches, 0, on_layer)
        self._take(seq, int(sample(logits, self.sampling, seq.generator).item()))

    def _take(self, seq: Sequence, token: int) -> None:
        """A sampled token: the end, or one more token of the answer (as generate() decides)."""
        if token in self.tok.eos_ids and not self.ignore_eos:
            seq.stop_reason = "eos"
            return
        seq.out.append(token)
        seq.token = token
        if len(seq.out) >= self.max_new_tokens:
            seq.stop_reason = "length"
        elif seq.pos >= self.model.cfg.max_seq_len:
            seq.stop_reason = "context"

    def fits(self, running: list[Sequence], new: Sequence) -> bool:
        """Whether `new` may join under the cap: while it prefills beside the running sequences, and after.
        FastGen's pools pad every pair to the longest (pool.py), so there each sequence counts as the largest."""
        if self.cap is None:
            return True
        if self.pools is None:
            return sum(s.projected for s in running) + new.projected_prefill <= self.cap
        largest = max((s.projected for s in running), default=0)
        return (len(running) * largest + new.projected_prefill <= self.cap and
                (len(running) + 1) * max(largest, new.projected) <= self.cap)

    def _repool(self, running: list[Sequence]) -> None:
        """FastGen: rebuild every layer's pools for the running sequences (after some joined or left)."""
        for i, layer in enumerate(self.pools or []):
            layer.update([s.caches[i] for s in running])

    def _step(self, running: list[Sequence]) -> list[int]:
        """One decode step for every running sequence: (B, 1) tokens in one forward, one host sync for the ids."""
        for seq in running:
            if seq.on_tokens:
                seq.on_tokens([seq.token])
        tokens = torch.tensor([[s.token] for s in running], dtype=torch.long, device=self.device)  # (B, 1)
        caches = self.pools or [s.caches for s in running]  # FastGen: per layer, one pooled object for the batch
        logits = self.model(tokens, caches, [s.pos for s in running])[:, 0]  # (B, vocab)
        if self.sampling.temperature <= 0:
            return logits.argmax(dim=-1).tolist()  # reading the sampled tokens: the step's one host sync
        return torch.cat([sample(row, self.sampling, s.generator) for row, s in zip(logits, running)]).tolist()

    def _measure(self, running: list[Sequence], stats: BatchStats) -> None:
        c = self.model.cfg
        held = sum(cache.nbytes() for s in running for cache in s.caches)  # pooled stores count in their pools
        held += sum(layer.nbytes() for layer in self.pools or [])
        full = sum(full_kv_bytes(c.n_layers, c.n_kv_heads, c.head_dim, s.pos, self.model.embed.weight.dtype)
                   for s in running)
        stats.peak_kv_bytes = max(stats.peak_kv_bytes, held)
        stats.peak_kv_bytes_full = max(stats.peak_kv_bytes_full, full)

    @torch.inference_mode()
    def run(self, prompts: list[tuple[int, list[int]]], on_done: Callable[[Sequence], None]) -> BatchStats:
        stats = BatchStats(batch=self.batch, prompts=len(prompts))
        waiting = [Sequence(i, ids, *self.projected(len(ids))) for i, ids in prompts]
        waiting.reverse()  # pop() takes them in input order
        running: list[Sequence] = []
        t_start, steps = time.perf_counter(), 0

        def finish(seq):
            if self.pools is not None and seq.caches:
                for layer, cache in zip(self.pools, seq.caches):
                    layer.release(cache)  # its own rows back: the caches read as after a batch-1 run
            seq.kept_fraction = kept_fraction(seq.caches)
            seq.kv_bytes = sum(c.nbytes() for c in seq.caches)
            seq.policies = [c.head_names() for c in seq.caches] if seq.on_tokens else None
            seq.caches, seq.on_tokens = [], None  # frees its memory now
            stats.generated_tokens += len(seq.out)
            on_done(seq)

        while waiting or running:
            if not running and self.cap is not None and waiting[-1].projected_prefill > self.cap:
                raise TinygenError(f"prompt {waiting[-1].index} needs {waiting[-1].projected_prefill / 2**20:.2f} MiB "
                                   f"of KV cache, more than the cap of {self.cap / 2**20:.2f} MiB")
            # Admit in input order while there is a slot and the projected bytes fit under the cap.
            joined = False
            while waiting and len(running) < self.batch and self.fits(running, waiting[-1]):
                seq = waiting.pop()
                t0 = time.perf_counter()
                self._start(seq, running, stats)
                stats.prefill_seconds += time.perf_counter() - t0
                running.append(seq)
                stats.max_running = max(stats.max_running, len(running))
                self._measure(running, stats)
                if seq.stop_reason:
                    running.remove(seq)
                    finish(seq)
                else:
                    joined = True
            if not running:
                continue  # everything admitted so far finished at its prefill: admit more
            t0 = time.perf_counter()
            if joined:
                self._repool(running)
            ids = self._step(running)
            stats.decode_seconds += time.perf_counter() - t0
            stats.decode_tokens += len(running)
            steps += 1
            if steps % self.check_every == 0:
                self._measure(running, stats)
            left = False
            for seq, token in zip(list(running), ids):
                self._take(seq, token)
                if seq.stop_reason:
                    running.remove(seq)
                    finish(seq)
                    left = True
            if left:  # a finished sequence's rows leave the pools now, before the next prompt is admitted
                t0 = time.perf_counter()
                self._repool(running)
                stats.decode_seconds += time.perf_counter() - t0
            if self.on_progress:
                self.on_progress(stats, len(running), len(waiting))
        stats.seconds = time.perf_counter() - t_start
        return stats
