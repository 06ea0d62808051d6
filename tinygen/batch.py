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
A pool pads its pairs to the longest, so there every running sequence counts as the largest projection, and a
rebuild of a layer's pools holds that layer's old and new rows at once, so each also counts the most one layer of the
largest holds (`fits`).

The peak reported (`peak_kv_bytes`) is measured after every prefill and every step, and at each rebuild's moment of
old and new rows together, from the sizes of the caches' tensors (host-known: nothing is read from the device).
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field, replace
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
    projected_layer: int = 0  # ... and in one layer, the most (a pool rebuild holds a layer twice)
    caches: list = field(default_factory=list)
    on_tokens: Callable | None = None
    generator: torch.Generator | None = None
    max_new_tokens: int = 0  # this sequence's own limit (a server's request may ask for its own)
    sampling: SamplingParams = field(default_factory=SamplingParams)  # ... and its own sampling
    out: list[int] = field(default_factory=list)
    token: int = -1  # the last sampled token, not yet fed to the model
    stop_reason: str = ""  # set when it finishes: eos, length, context, or the reason given to cancel()
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
    peak_kv_bytes: int = 0  # the caches' storage, all running sequences together, a pool rebuild's old and new rows too
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
    if cfg.policy == "full":
        steady = c.n_layers * c.n_kv_heads * final * kv_row
        return steady, steady
    steady = c.n_layers * layer_bytes(c, kv_row, kept_share(cfg), final)
    if cfg.model_wide:
        prefill_peak = c.n_layers * c.n_kv_heads * prompt_tokens * kv_row
    elif cfg.budgeted:  # the layers before hold at most their steady bytes, the prefilling one its prompt K/V
        prefill_peak = steady + c.n_kv_heads * prompt_tokens * kv_row
    else:
        prefill_peak = 0
    return steady, max(steady, prefill_peak)


def layer_bytes(c, kv_row: int, share: float, final: int) -> int:
    """The most one layer's FastGen stores hold when its heads keep `share` of a sequence's final length."""
    kept = min(final, math.ceil(share * final) + 1)  # +1: local+frequent rounds two shares up
    rows = min(final, kept + 1)  # a store never holds more than its budget at max_len and the next token's row
    # per row: K, V, its position (int32), protected flag and score (float32); per head the bitmap and its freed row
    return c.n_kv_heads * (rows * (kv_row + 4 + 1 + 4) + (final + 7) // 8 + 8)


def projected_layer_bytes(model, cfg: FastGenConfig, prompt_tokens: int, max_new_tokens: int) -> int:
    """An upper bound on what one layer of a sequence's FastGen caches holds from its first decode step on: layers
    with their own budgets at the largest one's menu share; the model-wide planner (head floor below 1) may give one
    layer everything."""
    c = model.cfg
    final = min(c.max_seq_len, prompt_tokens + max_new_tokens)
    share = kept_share(cfg)
    if cfg.budgeted and cfg.layer_budgets is not None:
        share = kept_share(replace(cfg, layer_budgets=(max(cfg.layer_budgets),)))
    elif cfg.model_wide:
        share = 1.0
    return layer_bytes(c, 2 * c.head_dim * model.embed.weight.dtype.itemsize, share, final)


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
    """Continuous batching. `run(prompts, on_done)` answers a list of prompts, calling on_done(sequence) as each
    finishes, in finishing order, and returns BatchStats. A loop that takes requests as they come (a server) drives
    the same machinery itself: `submit` queues a prompt, `step` admits what fits and decodes one token for every
    running sequence, `cancel` takes a sequence out (its caches are freed at the next step)."""

    def __init__(self, model, tok, cfg: FastGenConfig, sampling: SamplingParams, max_new_tokens: int, batch: int,
                 kv_cap_bytes: int | None = None, ignore_eos: bool = False, on_progress=None, pool: bool = True):
        self.model, self.tok, self.cfg, self.sampling = model, tok, cfg, sampling
        self.max_new_tokens, self.batch, self.cap, self.ignore_eos = max_new_tokens, batch, kv_cap_bytes, ignore_eos
        self.on_progress = on_progress
        assert batch >= 1, "a batch holds at least one sequence"
        self.device = model.embed.weight.device
        # FastGen's decode steps run on pools: per layer, the stores of every running sequence (fastgen/pool.py).
        # pool=False lets each sequence's stores step alone (to compare; admission then sums the projections).
        c = model.cfg
        self.pools = None if cfg.policy == "full" or not pool else [FastGenBatch(c.n_heads, c.n_kv_heads)
                                                                    for _ in range(c.n_layers)]
        self.waiting: deque[Sequence] = deque()  # in arrival order
        self.running: list[Sequence] = []
        self.stats = BatchStats(batch=batch)

    def sequence(self, index: int, prompt: list[int], max_new_tokens: int | None = None,
                 sampling: SamplingParams | None = None) -> Sequence:
        """A prompt as it waits, with its projected KV bytes (one layer's only matters to the pools)."""
        n, new = len(prompt), max_new_tokens or self.max_new_tokens
        layer = projected_layer_bytes(self.model, self.cfg, n, new) if self.pools else 0
        return Sequence(index, prompt, *projected_bytes(self.model, self.cfg, n, new), layer, max_new_tokens=new,
                        sampling=sampling or self.sampling)

    def submit(self, index: int, prompt: list[int], max_new_tokens: int | None = None,
               sampling: SamplingParams | None = None) -> Sequence:
        """Queue a prompt; it joins the batch when there is a slot and its projected bytes fit under the cap. Check
        `too_large` first: a prompt that cannot fit even alone would stop the queue."""
        seq = self.sequence(index, prompt, max_new_tokens, sampling)
        self.waiting.append(seq)
        self.stats.prompts += 1
        return seq

    def too_large(self, seq: Sequence) -> bool:
        """Whether `seq` can never run under the cap, even alone."""
        return self.cap is not None and seq.projected_prefill > self.cap

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Take `seq` out (a client gone, a stop string): it leaves at the next step, and on_done is not called."""
        if not seq.stop_reason:
            seq.stop_reason = reason

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def _start(self, seq: Sequence, running: list[Sequence], stats: BatchStats) -> None:
        """Prefill one admitted prompt on its own and sample its first token. The KV bytes are measured before the
        last layer's prefill too, when the budget profile holds every layer's prompt K/V."""
        limit = min(self.model.cfg.max_seq_len, len(seq.prompt) + seq.max_new_tokens)
        seq.caches, seq.on_tokens = make_caches(self.model, self.tok, self.cfg, limit)
        if seq.sampling.seed is not None:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(seq.sampling.seed)
        if seq.on_tokens:
            seq.on_tokens(seq.prompt)
        last = self.model.cfg.n_layers - 2
        on_layer = lambda i: self._measure(running + [seq], stats) if i == last else None
        logits = prefill(self.model, seq.prompt, seq.caches, 0, on_layer)
        self._take(seq, int(sample(logits, seq.sampling, seq.generator).item()))  # reading its first token

    def _take(self, seq: Sequence, token: int) -> None:
        """A sampled token: the end, or one more token of the answer (as generate() decides)."""
        if token in self.tok.eos_ids and not self.ignore_eos:
            seq.stop_reason = "eos"
            return
        seq.out.append(token)
        seq.token = token
        if len(seq.out) >= seq.max_new_tokens:
            seq.stop_reason = "length"
        elif seq.pos >= self.model.cfg.max_seq_len:
            seq.stop_reason = "context"

    def fits(self, running: list[Sequence], new: Sequence) -> bool:
        """Whether `new` may join under the cap: while it prefills beside the running sequences, and after.
        FastGen's pools pad every pair to the longest (pool.py), so there each sequence counts as the largest, and
        while a layer's pools are rebuilt (as sequences join or leave) that layer is held twice: each sequence also
        counts the largest one layer."""
        if self.cap is None:
            return True
        if self.pools is None:
            return sum(s.projected for s in running) + new.projected_prefill <= self.cap
        if not running:  # it runs alone through its own stores: no pool, no rebuild
            return new.projected_prefill <= self.cap
        largest = max(new.projected, *(s.projected for s in running))
        layer = max(new.projected_layer, *(s.projected_layer for s in running))
        return (len(running) * largest + new.projected_prefill <= self.cap and
                (len(running) + 1) * (largest + layer) <= self.cap)

    def _repool(self, running: list[Sequence], stats: BatchStats) -> None:
        """FastGen: rebuild every layer's pools for the running sequences (after some joined or left). Layer by
        layer, each holding its old and new rows at once for a moment (pool.py): that moment is measured."""
        held = self._held(running)
        for i, layer in enumerate(self.pools or []):
            before = layer.nbytes() + sum(s.caches[i].nbytes() for s in running)
            layer.update([s.caches[i] for s in running])
            after = layer.nbytes() + sum(s.caches[i].nbytes() for s in running)
            stats.peak_kv_bytes = max(stats.peak_kv_bytes, held + after)  # layer i's old rows are still there
            held += after - before

    def _step(self, running: list[Sequence]) -> list[int]:
        """One decode step for every running sequence: (B, 1) tokens in one forward, every row sampled at once
        (each sequence's noise from its own generator), one host sync for the ids."""
        for seq in running:
            if seq.on_tokens:
                seq.on_tokens([seq.token])
        tokens = torch.tensor([[s.token] for s in running], dtype=torch.long, device=self.device)  # (B, 1)
        caches = self.pools or [s.caches for s in running]  # FastGen: per layer, one pooled object for the batch
        logits = self.model(tokens, caches, [s.pos for s in running])[:, 0]  # (B, vocab)
        ids = torch.empty(len(running), dtype=torch.long, device=self.device)
        groups: dict[SamplingParams, list[int]] = {}  # rows that sample alike are sampled together
        for row, s in enumerate(running):
            groups.setdefault(s.sampling, []).append(row)
        for params, rows in groups.items():
            gens = [running[r].generator for r in rows] if params.seed is not None else None
            ids[rows] = sample(logits[rows], params, gens)
        return ids.tolist()  # reading the sampled tokens: the one host sync

    def _held(self, running: list[Sequence]) -> int:
        """The bytes of every running sequence's caches (pooled stores count in their pools): tensor sizes, known on
        the host."""
        held = sum(cache.nbytes() for s in running for cache in s.caches)
        return held + sum(layer.nbytes() for layer in self.pools or [])

    def _measure(self, running: list[Sequence], stats: BatchStats) -> None:
        c = self.model.cfg
        full = sum(full_kv_bytes(c.n_layers, c.n_kv_heads, c.head_dim, s.pos, self.model.embed.weight.dtype)
                   for s in running)
        stats.peak_kv_bytes = max(stats.peak_kv_bytes, self._held(running))
        stats.peak_kv_bytes_full = max(stats.peak_kv_bytes_full, full)

    def _finish(self, seq: Sequence) -> None:
        seq.kept_fraction = kept_fraction(seq.caches) if seq.caches else 1.0
        if self.pools is not None and seq.caches:  # its rows leave the pools at the next rebuild
            seq.kv_bytes = sum(layer.leave(cache) for layer, cache in zip(self.pools, seq.caches))
        else:
            seq.kv_bytes = sum(c.nbytes() for c in seq.caches)
        seq.policies = [c.head_names() for c in seq.caches] if seq.on_tokens else None
        seq.caches, seq.on_tokens = [], None  # frees its memory now (pooled rows: at the rebuild that follows)
        self.stats.generated_tokens += len(seq.out)

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Drop cancelled sequences, admit waiting ones in arrival order while there is a slot and their projected
        bytes fit, and decode one token for every running sequence. Returns the sequences that finished (EOS,
        their limit, the context) in this call, each with its last token in `out`; the running ones have one more
        token each."""
        stats, running, finished = self.stats, self.running, []
        left = False
        for seq in [s for s in running if s.stop_reason]:  # cancelled since the last step
            running.remove(seq)
            self._finish(seq)
            left = True
        for seq in [s for s in self.waiting if s.stop_reason]:
            self.waiting.remove(seq)
        if left:
            self._repool(running, stats)
        if not running and self.waiting and self.too_large(self.waiting[0]):
            seq = self.waiting[0]
            raise TinygenError(f"prompt {seq.index} needs {seq.projected_prefill / 2**20:.2f} MiB of KV cache, more "
                               f"than the cap of {self.cap / 2**20:.2f} MiB")
        joined = False
        while self.waiting and len(running) < self.batch and self.fits(running, self.waiting[0]):
            seq = self.waiting.popleft()
            t0 = time.perf_counter()
            self._start(seq, running, stats)
            stats.prefill_seconds += time.perf_counter() - t0
            running.append(seq)
            stats.max_running = max(stats.max_running, len(running))
            self._measure(running, stats)
            if seq.stop_reason:
                running.remove(seq)
                self._finish(seq)
                finished.append(seq)
            else:
                joined = True
        if not running:
            return finished  # everything admitted finished at its prefill
        t0 = time.perf_counter()
        if joined:
            self._repool(running, stats)
        ids = self._step(running)
        stats.decode_seconds += time.perf_counter() - t0
        stats.decode_tokens += len(running)
        self._measure(running, stats)
        left = False
        for seq, token in zip(list(running), ids):
            self._take(seq, token)
            if seq.stop_reason:
                running.remove(seq)
                self._finish(seq)
                finished.append(seq)
                left = True
        if left:  # a finished sequence's rows leave the pools now, before the next prompt is admitted
            t0 = time.perf_counter()
            self._repool(running, stats)
            stats.decode_seconds += time.perf_counter() - t0
        return finished

    def run(self, prompts: list[tuple[int, list[int]]], on_done: Callable[[Sequence], None]) -> BatchStats:
        t_start = time.perf_counter()
        for i, ids in prompts:
            self.submit(i, ids)
        while not self.idle:
            for seq in self.step():
                on_done(seq)
            if self.on_progress:
                self.on_progress(self.stats, len(self.running), len(self.waiting))
        self.stats.seconds = time.perf_counter() - t_start
        return self.stats
