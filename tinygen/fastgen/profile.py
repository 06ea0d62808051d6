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

from .policy import CANDIDATES, FREQUENT, FULL, LOCAL, PUNCT, SPECIAL, FastGenConfig, frequent_budget, window


class ProfileStats:
    """Sums over the group-averaged prompt attention of each KV head, accumulated block by block."""

    def __init__(self, n_kv_heads: int, length: int, window: int, device: torch.device):
        self.length, self.window = length, window
        self.colsum = torch.zeros(n_kv_heads, length, device=device)  # attention each key receives
        self.band = torch.zeros(n_kv_heads, length, device=device)  # ... from rows whose local window holds it
        self.local = torch.zeros(n_kv_heads, device=device)  # attention inside each row's window, summed over rows
        self.seconds = 0.0  # time spent here (host time: on CUDA it counts launches, not kernels)

    def add(self, probs: torch.Tensor, row0: int):
        """probs: (n_kv_heads, B, C) float32 for query rows row0.. row0+B-1 over keys 0..C-1."""
        t0 = time.perf_counter()
        B, C = probs.shape[1:]
        rows = torch.arange(row0, row0 + B, device=probs.device)[:, None]
        cols = torch.arange(C, device=probs.device)[None, :]
        in_window = (rows - cols < self.window) & (cols <= rows)  # (B, C)
        banded = probs * in_window
        self.colsum[:, :C] += probs.sum(1)
        self.band[:, :C] += banded.sum(1)
        self.local += banded.sum((1, 2))
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


def profiled_attention(q, k, v, stats: ProfileStats | None, max_block_bytes: int = 64 << 20):
    """Causal prefill attention computed one block of query rows at a time, feeding `stats` as it goes.

    q: (n_heads, L, head_dim), k/v: (n_kv_heads, L, head_dim) -> (n_heads, L, head_dim).
    Never holds more than one block of attention probabilities.
    """
    n_heads, L, head_dim = q.shape
    n_kv_heads = k.shape[0]
    groups = n_heads // n_kv_heads
    block = max(16, max_block_bytes // (4 * n_heads * L))
    kf = k.float().transpose(1, 2)  # (n_kv_heads, head_dim, L)
    qg = q.view(n_kv_heads, groups, L, head_dim)
    out = torch.empty_like(q)
    for r0 in range(0, L, block):
        r1 = min(L, r0 + block)
        B = r1 - r0
        qb = qg[:, :, r0:r1].float().reshape(n_kv_heads, groups * B, head_dim) * head_dim**-0.5
        scores = (qb @ kf[:, :, :r1]).view(n_kv_heads, groups, B, r1)  # keys beyond r1 are all in the future
        causal = torch.ones(B, r1, dtype=torch.bool, device=q.device).tril(diagonal=r0)
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        ob = probs.to(v.dtype).view(n_kv_heads, groups * B, r1) @ v[:, :r1]  # (n_kv_heads, groups*B, head_dim)
        out[:, r0:r1] = ob.view(n_heads, B, head_dim)
        if stats is not None:
            stats.add(probs.mean(dim=1), r0)  # GQA: average the group's query heads
    return out


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


