"""Many prompts at once: continuous batching over one paged KV pool, so that the memory a compressed cache saves
becomes throughput.

Every running sequence has its own rows in the pool (tinygen/kvpool.py): one per (layer, KV head), each with its own
block table, whatever its policy (full, or the one FastGen's profile gave that head). A decode step runs the current
token of every running sequence through one forward (`Llama.forward` with tokens (B, 1), each sequence at its own
position): the weights are read once for all B tokens, and each layer attends every row of every sequence in one
call (tinygen/paged.py). A sequence joining or leaving copies nothing: its rows take blocks from the free list and
give them back.

A new prompt is prefilled on its own, straight into its rows (FastGen's profile then keeps in each row what its
head's policy keeps and gives the other blocks back), and joins when its projected blocks (the most it holds,
prefilling or at its final length: `projected_bytes`) fit in the free list. Memory is the pool: `kv_cap_bytes`
(--kv-budget-mb) sizes it once; without a cap it holds `batch` full caches of the model's context. When a running
sequence needs a block and none is free, the most recently admitted sequence is preempted (vLLM's recompute
preemption): its blocks are freed and it waits at the front of the queue, to be prefilled again from its prompt, its
generated tokens fed again one decode step at a time (so a FastGen sequence gets the same profile and the same
evictions), and go on.

Figures (BatchStats), from the pool's host bookkeeping (nothing read from the device): kv_bytes, what the pool
allocated; peak_kv_bytes, the most its blocks in use ever held, a prefill's whole prompt included (kv_bytes_used);
peak_kv_bytes_kept, K+V of the tokens kept; peak_kv_bytes_full, what full caches of the running sequences' lengths
would hold; preemptions.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from .cache import full_kv_bytes, kept_fraction
from .errors import TinygenError
from .fastgen.cache import make_caches
from .fastgen.policy import FastGenConfig
from .generate import prefill
from .kvpool import KVPool, PoolFull
from .paged import PagedBatch
from .projection import BLOCK_SIZE, block_bytes, projected_bytes
from .sampling import SamplingParams, sample



@dataclass
class Sequence:
    index: int
    prompt: list[int]
    projected: int  # bytes of the blocks its rows may hold at most from its first decode step (at its final length)
    projected_prefill: int  # ... and while it prefills (a FastGen layer's rows hold the whole prompt until profiled)
    caches: list = field(default_factory=list)  # per layer: FullRows or FastGenCache (host state; rows in the pool)
    on_tokens: Callable | None = None
    generator: torch.Generator | None = None
    max_new_tokens: int = 0  # this sequence's own limit (a server's request may ask for its own)
    sampling: SamplingParams = field(default_factory=SamplingParams)  # ... and its own sampling
    out: list[int] = field(default_factory=list)
    token: int = -1  # the last sampled token, not yet fed to the model
    stop_reason: str = ""  # set when it finishes: eos, length, context, or the reason given to cancel()
    kept_fraction: float = 1.0  # at the end, as are the bytes its rows held then and each head's policy
    kv_bytes: int = 0
    policies: list | None = None
    slot: int = -1  # its batch slot while it runs (which rows of the pool are its)
    preemptions: int = 0
    cfg: FastGenConfig | None = None  # its own FastGen configuration (a server's request may choose its policy)

    @property
    def peak(self) -> int:
        """The most bytes of blocks its rows may hold at any time."""
        return max(self.projected, self.projected_prefill)

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
    kv_bytes: int = 0  # what the pool allocated (blocks, tables, bitmaps)
    peak_kv_bytes: int = 0  # the most the pool's blocks in use ever held, prefills included (kv_bytes_used)
    peak_kv_bytes_kept: int = 0  # the most K+V of the tokens kept took
    peak_kv_bytes_full: int = 0  # the most full caches of the running sequences' lengths would hold
    preemptions: int = 0
    max_running: int = 0
    seconds: float = 0.0

    @property
    def kv_bytes_used(self) -> int:
        return self.peak_kv_bytes

    @property
    def kv_bytes_kept(self) -> int:
        return self.peak_kv_bytes_kept

    @property
    def kv_bytes_full(self) -> int:
        return self.peak_kv_bytes_full

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


class BatchRunner:
    """Continuous batching. `run(prompts, on_done)` answers a list of prompts, calling on_done(sequence) as each
    finishes, in finishing order, and returns BatchStats. A loop that takes requests as they come (a server) drives
    the same machinery itself: `submit` queues a prompt, `step` admits what fits and decodes one token for every
    running sequence, `cancel` takes a sequence out (its blocks are freed at the next step).

    pool=False steps each running sequence as a batch of one through the same pool (a reference to compare with)."""

    def __init__(self, model, tok, cfg: FastGenConfig, sampling: SamplingParams, max_new_tokens: int, batch: int,
                 kv_cap_bytes: int | None = None, ignore_eos: bool = False, on_progress=None, pool: bool = True,
                 block_size: int = BLOCK_SIZE, step_fn=None, cuda_graphs: bool = False):
        """step_fn: the decode step function (step.decode by default; compiled.compiled_step's); cuda_graphs: replay
        the step as CUDA graphs (graphs.py; the batch gets a spare slot to pad a bucket with)."""
        from .graphs import GraphStep

        self.step_fn = GraphStep(model, spare=batch) if cuda_graphs else step_fn
        self.model, self.tok, self.cfg, self.sampling = model, tok, cfg, sampling
        self.max_new_tokens, self.batch, self.cap, self.ignore_eos = max_new_tokens, batch, kv_cap_bytes, ignore_eos
        self.on_progress, self.together = on_progress, pool
        assert batch >= 1, "a batch holds at least one sequence"
        self.device = model.embed.weight.device
        c = model.cfg
        per_block = block_bytes(model, block_size)
        rows_per_seq = c.n_layers * c.n_kv_heads
        # the pool, allocated once: the cap's worth of blocks, or `batch` full caches of the model's context
        n_blocks = (kv_cap_bytes // per_block if kv_cap_bytes is not None else
                    batch * rows_per_seq * math.ceil((c.max_seq_len + 1) / block_size))
        slots = batch + (1 if cuda_graphs else 0)  # the spare slot pads a graph's bucket: rows without blocks
        self.pool = KVPool(max(1, n_blocks), block_size, c.head_dim, slots * rows_per_seq, c.max_seq_len, self.device,
                           model.embed.weight.dtype)
        self.paged = PagedBatch(self.pool, c.n_layers, c.n_heads, c.n_kv_heads)
        self.pools = [self.pool]  # what holds the rows (a server's metrics sum their nbytes())
        self.slots = list(range(batch - 1, -1, -1))  # free batch slots, the next one last
        self.waiting: deque[Sequence] = deque()  # in arrival order (preempted sequences go back to the front)
        self.running: list[Sequence] = []  # in admission order: the last is the first to be preempted
        self.stats = BatchStats(batch=batch, kv_bytes=self.pool.nbytes())

    def sequence(self, index: int, prompt: list[int], max_new_tokens: int | None = None,
                 sampling: SamplingParams | None = None, cfg: FastGenConfig | None = None) -> Sequence:
        """A prompt as it waits, with its projected KV bytes. cfg: its own FastGen configuration (policy, budget),
        else the runner's: a batch may mix policies, every row attending in the same call."""
        n, new, cfg = len(prompt), max_new_tokens or self.max_new_tokens, cfg or self.cfg
        return Sequence(index, prompt, *projected_bytes(self.model, cfg, n, new), max_new_tokens=new,
                        sampling=sampling or self.sampling, cfg=cfg)

    def submit(self, index: int, prompt: list[int], max_new_tokens: int | None = None,
               sampling: SamplingParams | None = None, cfg: FastGenConfig | None = None) -> Sequence:
        """Queue a prompt; it joins the batch when there is a slot and its projected blocks fit in the free list.
        Check `too_large` first: a prompt that cannot fit even alone would stop the queue."""
        seq = self.sequence(index, prompt, max_new_tokens, sampling, cfg)
        self.waiting.append(seq)
        self.stats.prompts += 1
        return seq

    def too_large(self, seq: Sequence) -> bool:
        """Whether `seq` can never run in the pool, even alone."""
        return seq.peak > self.pool.n_blocks * self.pool.block_bytes()

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Take `seq` out (a client gone, a stop string): it leaves at the next step, and on_done is not called."""
        if not seq.stop_reason:
            seq.stop_reason = reason

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def fits(self, new: Sequence) -> bool:
        """Whether `new` may join: its projected blocks (the most it holds, prefilling or at its final length) fit
        in the free list now. Its prefill then cannot run the pool dry; the running sequences' growth is not
        reserved: if it does, the newest is preempted."""
        return new.peak <= len(self.pool.free) * self.pool.block_bytes()

    def _start(self, seq: Sequence) -> None:
        """Prefill one admitted prompt on its own into its rows and sample its first token; a preempted sequence
        is prefilled again and its generated tokens fed again, one decode step each, as they were the first time."""
        c = self.model.cfg
        seq.slot = self.slots.pop()
        limit = min(c.max_seq_len, len(seq.prompt) + seq.max_new_tokens)
        seq.caches, seq.on_tokens = make_caches(self.model, self.tok, seq.cfg, limit, self.paged, seq.slot)
        if seq.generator is None and seq.sampling.seed is not None:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(seq.sampling.seed)
        if seq.on_tokens:
            seq.on_tokens(seq.prompt)
        logits = prefill(self.model, seq.prompt, seq.caches, 0)  # into its rows (admission counted what it takes)
        if seq.out:  # preempted: its tokens but the last (not fed yet) go through again
            for token in seq.out[:-1]:
                self._reserve([seq])
                self._forward([seq], [token])
        else:
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

    def _reserve(self, seqs: list[Sequence]) -> list[Sequence]:
        """Blocks for the next step of `seqs` (in admission order); where none is free, the most recently admitted
        running sequence is preempted until they fit. Returns the sequences that stay."""
        for seq in list(seqs):
            while seq.slot >= 0:
                try:
                    self.paged.reserve(seq.caches)
                    break
                except PoolFull:
                    victim = self.running[-1] if self.running else None
                    if victim is None or victim is seq and len(self.running) == 1:  # too_large lets only that in
                        raise TinygenError("the KV pool ran out of blocks for a sequence running alone")
                    self._preempt(victim)
        return [s for s in seqs if s.slot >= 0]

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it again, first (recompute preemption)."""
        self._release(seq)
        if seq in self.running:
            self.running.remove(seq)
        seq.caches, seq.on_tokens = [], None
        seq.preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.pool.release(self.paged.slot_rows(seq.slot))
        self.slots.append(seq.slot)
        seq.slot = -1

    def _forward(self, seqs: list[Sequence], tokens: list[int]) -> torch.Tensor:
        """One decode step of `seqs` (blocks reserved) through the paged batch -> logits (B, vocab)."""
        for seq, token in zip(seqs, tokens):
            if seq.on_tokens:
                seq.on_tokens([token])
        self.paged.set_batch([(s.slot, s.caches) for s in seqs])
        return self.paged.step(self.model, tokens, [s.pos for s in seqs], self.step_fn)  # (B, vocab)

    def _step(self, running: list[Sequence]) -> list[int]:
        """One decode step for every running sequence: (B, 1) tokens in one forward, every row sampled at once
        (each sequence's noise from its own generator), one host sync for the ids."""
        if self.together:
            logits = self._forward(running, [s.token for s in running])
        else:
            logits = torch.cat([self._forward([s], [s.token]) for s in running])
        ids = torch.empty(len(running), dtype=torch.long, device=self.device)
        groups: dict[SamplingParams, list[int]] = {}  # rows that sample alike are sampled together
        for row, s in enumerate(running):
            groups.setdefault(s.sampling, []).append(row)
        for params, rows in groups.items():
            gens = [running[r].generator for r in rows] if params.seed is not None else None
            ids[rows] = sample(logits[rows], params, gens)
        return ids.tolist()  # reading the sampled tokens: the one host sync

    def _measure(self) -> None:
        c, dtype, stats = self.model.cfg, self.model.embed.weight.dtype, self.stats
        row = 2 * c.head_dim * dtype.itemsize
        full = sum(full_kv_bytes(c.n_layers, c.n_kv_heads, c.head_dim, s.pos, dtype) for s in self.running)
        kept = row * sum(cache.kept_tokens() for s in self.running for cache in s.caches)
        stats.peak_kv_bytes = self.pool.high * self.pool.block_bytes()  # the blocks' high-water mark
        stats.peak_kv_bytes_kept = max(stats.peak_kv_bytes_kept, kept)
        stats.peak_kv_bytes_full = max(stats.peak_kv_bytes_full, full)

    def _finish(self, seq: Sequence) -> None:
        if seq.caches:
            seq.kept_fraction = kept_fraction(seq.caches)
            seq.kv_bytes = self.paged.held_blocks(seq.slot) * self.pool.block_bytes()
            seq.policies = [c.head_names() for c in seq.caches] if seq.on_tokens else None
        if seq.slot >= 0:
            self._release(seq)
        seq.caches, seq.on_tokens = [], None  # its blocks are back on the free list
        self.stats.generated_tokens += len(seq.out)

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Drop cancelled sequences, admit waiting ones in arrival order while there is a slot and their projected
        blocks fit, and decode one token for every running sequence. Returns the sequences that finished (EOS,
        their limit, the context) in this call, each with its last token in `out`; the running ones have one more
        token each."""
        stats, running, finished = self.stats, self.running, []
        for seq in [s for s in running if s.stop_reason]:  # cancelled since the last step
            running.remove(seq)
            self._finish(seq)
        for seq in [s for s in self.waiting if s.stop_reason]:
            self.waiting.remove(seq)
        if not running and self.waiting and self.too_large(self.waiting[0]):
            seq = self.waiting[0]
            raise TinygenError(f"prompt {seq.index} needs {seq.peak / 2**20:.2f} MiB of KV cache, more "
                               f"than the pool's {self.pool.n_blocks * self.pool.block_bytes() / 2**20:.2f} MiB")
        while self.waiting and len(running) < self.batch and (not running or self.fits(self.waiting[0])):
            seq = self.waiting.popleft()
            t0 = time.perf_counter()
            self._start(seq)
            stats.prefill_seconds += time.perf_counter() - t0
            running.append(seq)
            stats.max_running = max(stats.max_running, len(running))
            self._measure()
            if seq.stop_reason:
                running.remove(seq)
                self._finish(seq)
                finished.append(seq)
        if not running:
            return finished  # everything admitted finished at its prefill
        t0 = time.perf_counter()
        self._reserve(list(running))
        ids = self._step(running)
        stats.decode_seconds += time.perf_counter() - t0
        stats.decode_tokens += len(running)
        self._measure()
        for seq, token in zip(list(running), ids):
            self._take(seq, token)
            if seq.stop_reason:
                running.remove(seq)
                self._finish(seq)
                finished.append(seq)
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
