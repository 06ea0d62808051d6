"""A policy store: the KV heads of one layer of one sequence that share one policy, as a row group in the KV pool.

Heads of one policy keep the same number of tokens at every step (budgets depend only on the length and the token
kinds), so the group's state on the host is one kept count, and whether its last eviction left a freed slot (`hole`).
Each head is a row of the pool (tinygen/kvpool.py): per slot its token's K, V, position, protected flag and float32
cumulative attention score; a bitmap (one bit per position) marks which tokens the head holds. A head's resident
slots are [0, kept), except after an eviction: then one slot below `kept + 1` (the row's `freed` slot) holds the
evicted token, which attention no longer reads once the next token overwrites it. Decode steps are the batch's
(tinygen/paged.py): write the new token into slot `kept` or the freed slot, attend, keep it or evict one per head.

What happens here is what is not a decode step, each a prefill of sorts, off the hot path:
- `compact`: keep chosen slots as slots [0, n) and give back the blocks past them (the end of profiling: a prompt
  written whole into the rows keeps what the head's policy keeps);
- `extend`: a chunk of several new tokens after the prompt (a chat's next turn) attends causally over the resident
  slots and its own earlier tokens, adds that attention to the scores, then each head evicts down to its budget at
  the new length by the ranking a decode step evicts by (`rank`).
"""
from __future__ import annotations

import torch

from ..attention import causal_attention
from ..paged import write_rows
from ..step import keep_rank
from .kinds import TokenKinds
from .policy import FREQUENT, FastGenConfig, kept_count, protected_kinds, window


class PolicyStore:
    def __init__(self, cache, policy: int, kv_heads: list[int], kinds: TokenKinds, cfg: FastGenConfig):
        """cache: the layer's PagedCache (its pool, its rows); kv_heads: the heads of this policy."""
        self.cache, self.pool = cache, cache.pool
        self.policy, self.kinds, self.cfg = policy, kinds, cfg
        self.protect = protected_kinds(policy)
        self.kv_heads = list(kv_heads)  # on the host: the batch's step places the rows without a device read
        self.rows = cache.rows(kv_heads)
        device = self.pool.k.device
        self.row_index = torch.tensor(self.rows, device=device)
        groups = cache.n_heads // cache.n_kv_heads
        self.kv_index = torch.tensor(kv_heads, device=device)
        self.q_index = (self.kv_index[:, None] * groups + torch.arange(groups, device=device)).flatten()
        self.all_heads = self.kv_heads == list(range(cache.n_kv_heads))  # then no gather of q, k, v
        self.kept, self.hole = 0, False
        self.pool.set_rows(self.rows, 0, False, policy, (cfg.local_ratio, cfg.frequent_ratio))

    def set_kept(self, kept: int) -> None:
        """Rows now holding exactly slots [0, kept) (no hole), on the host and the device (off the decode step)."""
        self.kept, self.hole = kept, False
        self.pool.set_rows(self.rows, kept)

    def _budget(self, length: int) -> int:
        """The most tokens each head keeps at `length` (kept_count with this sequence's token kinds)."""
        return kept_count(self.policy, length, lambda n: self.kinds.protected_before(self.protect, n), self.cfg)

    def rank(self, pos: torch.Tensor, prot: torch.Tensor, score: torch.Tensor, length: int) -> torch.Tensor:
        """(heads, n) how much each slot deserves to stay at `length`: paged.keep_rank with this policy's window
        (none without `local`) and ranking (mean attention with `frequent`, else the position)."""
        return keep_rank(pos, prot, score, length - window(self.policy, length, self.cfg), length,
                         bool(self.policy & FREQUENT))

    def _read(self, logical: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """K, V, position, protected flag and score of logical slots (heads, n) of the rows (copies)."""
        pool, at = self.pool, self.pool.slots(self.row_index, logical)
        hd = pool.head_dim
        return (pool.k.view(-1, hd)[at], pool.v.view(-1, hd)[at], pool.pos.view(-1)[at], pool.prot.view(-1)[at],
                pool.score.view(-1)[at])

    def compact(self, chosen: torch.Tensor, prot: torch.Tensor | None = None, score: torch.Tensor | None = None):
        """Keep logical slots `chosen` (heads, n), ascending, as slots [0, n), the bitmaps exactly their positions,
        and give back the blocks past them. prot, score (heads, n): set them instead of moving them."""
        k, v, pos, old_prot, old_score = self._read(chosen)
        n = chosen.shape[1]
        write_rows(self.pool, self.rows, k, v, pos, old_prot if prot is None else prot,
                   old_score if score is None else score)
        self.pool.shrink(self.rows, n)
        self.set_kept(n)

    def _close_hole(self):
        """Make slots [0, kept) exactly the resident ones: move slot `kept` into each row's freed slot."""
        if not self.hole:
            return
        pool, idx = self.pool, self.row_index
        src = pool.slots(idx, torch.full((len(self.rows), 1), self.kept, device=idx.device)).flatten()
        dst = pool.slots(idx, pool.freed[idx][:, None]).flatten()
        hd = pool.head_dim
        for t in (pool.k.view(-1, hd), pool.v.view(-1, hd), pool.pos.view(-1), pool.prot.view(-1),
                  pool.score.view(-1)):
            t[dst] = t[src]
        self.set_kept(self.kept)

    def extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int) -> torch.Tensor:
        """A chunk of T new tokens at positions length-T .. length-1: write them after the resident slots, attend
        each causally over the resident slots and the chunk's tokens up to itself, add that attention to the
        scores, then evict down to the budget at `length`.
        q: (n_heads, T, head_dim), k/v: (n_kv_heads, T, head_dim) -> (heads * groups, T, head_dim) for q_index."""
        T, pool, idx = k.shape[1], self.pool, self.row_index
        self._close_hole()
        kept, first = self.kept, length - T
        n = kept + T
        if not self.all_heads:
            q, k, v = q[self.q_index], k[self.kv_index], v[self.kv_index]
        heads = len(self.rows)
        pool.reserve(self.rows, n)
        pos = torch.arange(first, length, device=k.device).expand(heads, T)
        prot = ((self.kinds.by_position[first:length] & self.protect) != 0).expand(heads, T)
        pool.write(idx, torch.arange(kept, n, device=k.device).expand(heads, T), k, v, pos, prot)
        keys, values, slots = pool.gather(idx, n)  # (heads, n rounded up to a block, head_dim)
        slots = slots[:, :n]

        def add_scores(probs, row0):  # a block of chunk rows' attention: (heads, groups, B, keys)
            seen = probs.shape[-1]
            pool.score.view(-1).index_add_(0, slots[:, :seen].flatten(), probs.mean(dim=1).sum(dim=1).flatten())
        out = causal_attention(q, keys[:, :n], values[:, :n], kept, add_scores if self.policy & FREQUENT else None)
        target = min(n, self._budget(length))
        if target < n:
            _, _, p, pr, sc = self._read(torch.arange(n, device=k.device).expand(heads, n))
            chosen = self.rank(p, pr, sc, length).topk(target, dim=1).indices.sort(dim=1).values
            self.compact(chosen)
        else:
            pool.mark(idx, pos)
            self.set_kept(n)
        return out

    def resident_mask(self, length: int) -> torch.Tensor:
        """(heads, length) bool from the bitmaps (for tests and the dense reference)."""
        return self.pool.resident_mask(self.row_index, length)
