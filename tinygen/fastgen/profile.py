"""Profiling at prefill: how much of each KV head's prompt attention each candidate policy recovers.

Recovery of a candidate = mean over the prompt's query rows of the attention probability the row puts on the
candidate's kept keys (no renormalisation). For GQA, a KV head's attention is the mean over its query heads.
For a fixed set of keys C the recovery is sum_{j in C} colsum_j / L, so one pass that accumulates column sums,
plus the mass inside each row's local window and the per-key share of it (`band`), gives every candidate exactly,
one block of query rows at a time.
"""
from __future__ import annotations

import time

import torch

from ..attention import causal_attention
from .policy import CANDIDATES, FREQUENT, LOCAL, PUNCT, SPECIAL, FastGenConfig, frequent_budget, window


class ProfileStats:
    """Sums over the group-averaged prompt attention of each KV head, accumulated block by block."""

    def __init__(self, n_kv_heads: int, length: int, window: int | None, device: torch.device, observation: int = 0):
        """window: the local window in tokens whose sums the paper's `+local` candidate needs (band, local); None
        keeps no window sums (the budget profile and fixed policies read only the column sums)."""
        self.length, self.window = length, window
        self.obs_start = length - min(observation, length)  # the observation window: rows obs_start..length-1
        self.colsum = torch.zeros(n_kv_heads, length, device=device)  # attention each key receives
        self.obs = torch.zeros(n_kv_heads, length, device=device)  # ... from the observation window's rows
        if window is not None:
            self.band = torch.zeros(n_kv_heads, length, device=device)  # ... from rows whose local window holds it
            self.local = torch.zeros(n_kv_heads, device=device)  # attention inside each row's window, summed over rows
        self.seconds = 0.0  # time spent here (host time: on CUDA it counts launches, not kernels)

    def mean_attention(self) -> torch.Tensor:
        """(n_kv_heads, L) each token's mean attention since it arrived: its column sum over the L - j prompt rows
        that saw it. The ranking decode steps evict `frequent` tokens by (scores / queries that saw them)."""
        return self.colsum / torch.arange(self.length, 0, -1, device=self.colsum.device)

    def add(self, probs: torch.Tensor, row0: int):
        """probs: (n_kv_heads, B, C) float32 for query rows row0.. row0+B-1 over keys 0..C-1 (rows sum to 1)."""
        t0 = time.perf_counter()
        B, C = probs.shape[1:]
        colsum = probs.sum(1)  # (n_kv_heads, C)
        self.colsum[:, :C] += colsum
        if self.window is not None:
            # Keys outside row i's window are j <= i - window: a lower triangle of the first columns, one tril away.
            width = max(0, row0 + B - self.window)
            outside = torch.tril(probs[:, :, :width], diagonal=row0 - self.window).sum(1)  # (n_kv_heads, width)
            self.band[:, :C] += colsum
            self.band[:, :width] -= outside
            self.local += B - outside.sum(1)  # each row's mass is 1; what is not outside is inside
        first = max(0, self.obs_start - row0)  # the block's first row inside the observation window
        if first < B:
            self.obs[:, :C] += probs[:, first:].sum(1)
        self.seconds += time.perf_counter() - t0


def recoveries(stats: ProfileStats, kinds: torch.Tensor, cfg: FastGenConfig) -> torch.Tensor:
    """(n_kv_heads, len(CANDIDATES)) recovery of each candidate. kinds: (L,) uint8 kind bits of the prompt."""
    L = stats.length
    special = (kinds & SPECIAL).bool()
    sp = (kinds & (SPECIAL | PUNCT)).bool()
    budget = frequent_budget(FREQUENT, L, cfg)
    # heavy hitters: the `budget` largest column sums among tokens not already kept by special/punct
    n_free = int((~sp).sum())
    masked = stats.colsum.masked_fill(sp, float("-inf"))
    top = masked.topk(min(budget, n_free), dim=1).indices
    spf = sp.expand_as(stats.colsum).clone().scatter_(1, top, True)  # (n_kv_heads, L)
    rec_s = (stats.colsum * special).sum(1)
    rec_sp = (stats.colsum * sp).sum(1)
    rec_spf = (stats.colsum * spf).sum(1)
    rec_spfl = rec_spf + stats.local - (stats.band * spf).sum(1)  # union with each row's window, overlap once
    full = torch.full_like(rec_s, float(L))
    return torch.stack([rec_s, rec_sp, rec_spf, rec_spfl, full], dim=1) / L


def choose_policies(rec: torch.Tensor, threshold: float) -> list[int]:
    """The first (cheapest) candidate per head whose recovery reaches the threshold."""
    ok = rec >= threshold - 1e-6  # float sums of probabilities: allow rounding
    ok[:, -1] = True
    first = ok.int().argmax(dim=1).tolist()
    return [CANDIDATES[i] for i in first]


def profiled_attention(q, k, v, stats: ProfileStats | None, **block_limits):
    """Causal prefill attention (tinygen.attention.causal_attention) that feeds `stats` with each block's
    group-averaged probabilities. q: (n_heads, L, head_dim), k/v: (n_kv_heads, L, head_dim)."""
    on_block = None if stats is None else (lambda probs, r0: stats.add(probs.mean(dim=1), r0))  # GQA: group mean
    return causal_attention(q, k, v, 0, on_block, **block_limits)


def recoveries_dense(attn: torch.Tensor, kinds: torch.Tensor, cfg: FastGenConfig) -> torch.Tensor:
    """Reference: recoveries straight from the definitions, on a whole (n_kv_heads, L, L) attention map."""
    n_kv_heads, L, _ = attn.shape
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    local = (i - j < window(LOCAL, L, cfg)) & (j <= i)  # (L, L)
    special = (kinds & SPECIAL).bool()
    sp = (kinds & (SPECIAL | PUNCT)).bool()
    out = torch.zeros(n_kv_heads, len(CANDIDATES))
    for h in range(n_kv_heads):
        colsum = attn[h].sum(0)
        order = sorted((j for j in range(L) if not sp[j]), key=lambda j: -float(colsum[j]))
        heavy = torch.zeros(L, dtype=torch.bool)
        heavy[order[: frequent_budget(FREQUENT, L, cfg)]] = True
        for c, keep in enumerate([special, sp, sp | heavy, None, None]):
            if c == 3:
                keep = (sp | heavy)[None, :] | local
            elif c == 4:
                keep = torch.ones(L, L, dtype=torch.bool)
            out[h, c] = (attn[h] * keep).sum() / L
    return out


