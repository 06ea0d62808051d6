"""A batch's decode step through the paged KV pool (tinygen/kvpool.py): every row of every running sequence, full
and FastGen alike, in one attention call per layer.

Bookkeeping is per row group: the KV heads of one sequence in one layer that share a policy keep the same number of
tokens at every step (budgets depend only on the length and the token kinds). A FastGen group is its `PolicyStore`
(its host state: policy, ratios, kept, hole; its tensors are dropped once its rows are in the pool); a full cache is
one group, `FullRows`, that never evicts. A step's decisions (how many rows each attends over, whether it evicts, its
local window) are host arithmetic, sent to the device in one small table, so the step needs no host sync.

A step, for one layer (`PagedBatch.decode`), as a batch-1 `PolicyStore` step does for its heads:
1. write each row's new token into its slot `kept`, or the slot its last eviction freed;
2. attend: gather each row's slots [0, kept + 1) through its block table, padded to the longest row (compute is
   padded, memory is not), one masked matmul-softmax-matmul for the batch, and add the attention to the scores;
3. keep the new token (its bit) or evict one token per row: the unprotected token outside the local window with the
   lowest mean attention since it arrived (or, without `frequent`, the oldest).
"""
from __future__ import annotations

import torch

from .attention import causal_attention, compute_dtype
from .fastgen.policy import FREQUENT, FULL, LOCAL, window
from .fastgen.store import host_to_device
from .kvpool import KVPool


class FullRows:
    """One layer of a sequence's full cache in the pool: the KVCache its prefill runs through (the prompt's K/V go
    straight into the rows' blocks), and the one row group of its decode steps (every KV head, never evicting)."""

    policy, protect, hole, kinds, cfg = FULL, 0, False, None, None

    def __init__(self, pool: KVPool, rows: list[int]):
        self.pool, self.rows = pool, rows  # rows[h]: KV head h's row
        self.n_kv_heads = len(rows)
        self.kv_heads = list(range(self.n_kv_heads))
        self.stores = [self]
        self.length = self.kept = 0

    def _budget(self, length: int) -> int:
        return length

    def attend(self, q, k, v):
        """The prompt (T tokens at an empty cache): causal attention over k, v themselves, which then fill the rows.
        q: (n_heads, T, head_dim), k/v: (n_kv_heads, T, head_dim)."""
        T = k.shape[1]
        assert self.length == 0, "the batch's full rows take a prompt, then decode steps (PagedBatch)"
        out = causal_attention(q, k, v, 0)
        write_rows(self.pool, self.rows, k, v, torch.arange(T, device=k.device).expand(self.n_kv_heads, T),
                   torch.zeros(self.n_kv_heads, T, dtype=torch.bool, device=k.device), None)
        self.length = self.kept = T
        return out

    def kept_tokens(self) -> int:
        return self.kept * self.n_kv_heads

    def nbytes(self) -> int:
        """Bytes of tensors of its own: none (its rows are the pool's, counted there)."""
        return 0

    def head_names(self) -> list[str]:
        return ["full"] * self.n_kv_heads


def write_rows(pool: KVPool, rows: list[int], k, v, pos, prot, score) -> None:
    """Fill rows' slots [0, n) and their bitmaps: k, v (heads, n, head_dim); pos, prot, score (heads, n)."""
    heads, n = pos.shape
    pool.reserve(rows, n)
    idx = torch.tensor(rows, device=k.device)
    pool.write(idx, torch.arange(n, device=k.device).expand(heads, n), k, v, pos, prot, score)
    mask = torch.zeros(heads, pool.bitmap.shape[1] * 8, dtype=torch.uint8, device=k.device)
    mask.scatter_(1, pos.long(), 1)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=k.device)
    pool.bitmap[idx] = (mask.view(heads, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def adopt_stores(pool: KVPool, caches: list, rows_of) -> None:
    """Move a prefilled sequence's FastGen stores into the pool: each store's resident rows are written once into its
    rows' blocks, and its own tensors are let go (it keeps its host state). rows_of(layer, kv_head) -> row id."""
    for layer, cache in enumerate(caches):
        assert cache.pending is None, "a sequence joins the batch after its prefill compressed its caches"
        for s in cache.stores:
            assert not s.hole, "a store fresh from its prefill has no freed row"
            kept = s.kept
            write_rows(pool, [rows_of(layer, h) for h in s.kv_heads], s.k[:, :kept], s.v[:, :kept],
                       s.pos[:, :kept], s.prot[:, :kept], None if s.score is None else s.score[:, :kept])
            s.k = s.v = s.pos = s.prot = s.score = s.bitmap = s.free = None
        cache.rows = None  # the Triton tables of its own stores (CUDA), now stale


class PagedBatch:
    """The running sequences' rows in the pool, attending as one. `set_batch(members)` names them for the next step:
    (batch slot, per-layer caches) each, caches being FullRows or FastGenCaches; `layers()` are the per-layer objects
    the model takes in place of a list of caches (BatchKVCache)."""

    def __init__(self, pool: KVPool, n_layers: int, n_heads: int, n_kv_heads: int):
        self.pool, self.n_layers, self.n_heads, self.n_kv_heads = pool, n_layers, n_heads, n_kv_heads
        self.members: list = []
        self.base = None  # (B * n_kv_heads,) row ids of layer 0, in (sequence, KV head) order

    def row(self, slot: int, layer: int, kv_head: int) -> int:
        return (slot * self.n_layers + layer) * self.n_kv_heads + kv_head

    def slot_rows(self, slot: int) -> list[int]:
        """Every row of a batch slot (all layers, all KV heads)."""
        first = self.row(slot, 0, 0)
        return list(range(first, first + self.n_layers * self.n_kv_heads))

    def set_batch(self, members: list[tuple[int, list]]) -> None:
        self.members = members
        H = self.n_kv_heads
        base = [self.row(slot, 0, h) for slot, _ in members for h in range(H)]
        self.base = host_to_device(torch.tensor(base), self.pool.k.device)

    def layers(self) -> list["PagedLayer"]:
        return [PagedLayer(self, i) for i in range(self.n_layers)]

    def reserve(self, caches: list, slot: int) -> None:
        """Blocks for the next step of one sequence: each row group's kept + 1 slots (raises PoolFull)."""
        bs = self.pool.block_size
        for layer, cache in enumerate(caches):
            for s in cache.stores:
                rows = [self.row(slot, layer, h) for h in s.kv_heads]
                if len(self.pool.blocks[rows[0]]) * bs < s.kept + 1:
                    self.pool.reserve(rows, s.kept + 1)

    def held_blocks(self, slot: int) -> int:
        return sum(len(self.pool.blocks[r]) for r in self.slot_rows(slot))

    def _table(self, layer: int) -> tuple[torch.Tensor, int, bool]:
        """Host decisions of this step for each row of `layer`, in (sequence, KV head) order, and each group's host
        state moved on: (P, 9) table, the most rows any row attends over, whether any row evicts, whether any row
        ranks by score."""
        H = self.n_kv_heads
        table = [None] * (len(self.members) * H)
        most, evicting, scored = 0, False, False
        for b, (_, caches) in enumerate(self.members):
            c = caches[layer]
            c.length += 1
            n = c.length
            for s in c.stores:
                rows = s.kept + 1  # the new token's slot included
                target = min(rows, s._budget(n))
                evict = rows - target
                assert evict in (0, 1), f"policy {s.policy}: {evict} evictions in one step"
                # special/punct-only groups that do not keep the new token leave its slot to the next one
                keep = target == rows or bool(s.policy & (FREQUENT | LOCAL))
                protected = bool(s.kinds.kinds[n - 1] & s.protect) if s.protect else False
                entry = (rows, n - 1, protected, s.hole, keep, evict, n - window(s.policy, n, s.cfg), n,
                         bool(s.policy & FREQUENT))
                for h in s.kv_heads:
                    table[b * H + h] = entry
                most, evicting, scored = max(most, rows), evicting or bool(evict), scored or bool(s.policy & FREQUENT)
                s.kept = target
                if keep:
                    s.hole = bool(evict)
        return host_to_device(torch.tensor(table, dtype=torch.long), self.pool.k.device), most, evicting, scored

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One decode step of layer `layer` for every member: q (B, n_heads, 1, head_dim), k/v (B, n_kv_heads, 1,
        head_dim) -> (B, n_heads, 1, head_dim)."""
        pool = self.pool
        B, n_heads, T, head_dim = q.shape
        assert T == 1 and B == len(self.members), "the paged batch takes one decode step of its members"
        P, groups = B * self.n_kv_heads, n_heads // self.n_kv_heads
        rows = self.base + layer * self.n_kv_heads  # (P,)
        table, R, evicting, scored = self._table(layer)
        n_rows, new_pos, protected, hole, keep, evicts, win_start, length, frequent = table.unbind(1)

        # 1. The new token into each row's slot `kept`, or the slot its last eviction freed.
        at = torch.where(hole.bool(), pool.freed[rows], n_rows - 1)  # (P,) logical slots
        pool.write(rows, at[:, None], k.reshape(P, 1, head_dim), v.reshape(P, 1, head_dim), new_pos[:, None],
                   protected.bool()[:, None])

        # 2. Attention over each row's slots [0, kept + 1), the rest masked; the scores.
        keys, values, slots = pool.gather(rows, R)  # (P, R', head_dim) each, (P, R'): R rounded up to a block
        R = slots.shape[1]
        dt = compute_dtype(keys)
        beyond = torch.arange(R, device=q.device) >= n_rows[:, None]  # (P, R')
        qs = q.reshape(P, groups, head_dim).to(dt)
        scores = (qs * head_dim**-0.5) @ keys.to(dt).transpose(1, 2)  # (P, groups, R')
        scores.masked_fill_(beyond[:, None], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1)
        out = (probs.to(dt) @ values.to(dt)).to(q.dtype)  # (P, groups, head_dim)
        if scored:  # padded slots get 0 (their probability): the null block's, or a row's own unused slots
            pool.score.view(-1).index_add_(0, slots.flatten(), probs.mean(dim=1).flatten())

        # 3. Keep the new token (its bit) or, where the budget says so, evict one token per row.
        pool.bitmap[rows, new_pos // 8] |= ((1 << new_pos % 8) * keep).to(torch.uint8)
        if evicting:
            pos = pool.pos.view(-1)[slots]  # (P, R')
            must = pool.prot.view(-1)[slots] | (pos >= win_start[:, None]) | beyond
            mean = pool.score.view(-1)[slots] / (length[:, None] - pos)  # mean attention since arrival
            key = torch.where(frequent.bool()[:, None], mean, pos.float())
            victim = key.masked_fill(must, float("inf")).argmin(dim=1)  # (P,) logical slots
            gone = pos.gather(1, victim[:, None])[:, 0].long().clamp(min=0)
            evicts = evicts.bool()
            pool.bitmap[rows, gone // 8] &= torch.where(evicts, ~(1 << gone % 8), -1).to(torch.uint8)
            pool.freed[rows] = torch.where(evicts, victim, pool.freed[rows])
        return out.view(B, n_heads, 1, head_dim)


class PagedLayer:
    """One layer of a PagedBatch: what Attention.forward calls `attend` on (BatchKVCache)."""

    def __init__(self, batch: PagedBatch, layer: int):
        self.batch, self.layer = batch, layer

    def __len__(self) -> int:
        return len(self.batch.members)

    def attend(self, q, k, v):
        return self.batch.decode(self.layer, q, k, v)
