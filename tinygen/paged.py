"""Sequences' caches in the paged KV pool (tinygen/kvpool.py), and the decode step that attends every row of every
running sequence, full and FastGen alike, in one attention call per layer. A sequence on its own (a prompt, a chat)
is a batch of one (`lone_batch`): the same rows, the same step.

A sequence's cache of one layer is a `PagedCache`: the KVCache interface (cache.py) over its rows, one per KV head.
Its rows form groups (`stores`): the KV heads that keep the same number of tokens at every step (budgets depend only
on the length and the token kinds). The full cache (`FullRows`, cache.py) is one group that never evicts; FastGen's
(`FastGenCache`, fastgen/cache.py) has a `PolicyStore` per policy. A group's state on the host is its policy, kept
count and whether its last eviction left a freed slot (`hole`); everything per token lives in the pool.
A step's decisions (how many slots each row attends over, whether it evicts, its local window) are host arithmetic
on that state, sent to the device in one small table, so the step needs no host sync.

A step, for one layer (`PagedBatch.decode`):
1. write each row's new token into its slot `kept`, or the slot its last eviction freed;
2. attend: gather each row's slots [0, kept + 1) through its block table, padded to the longest row (compute is
   padded, memory is not), one masked matmul-softmax-matmul for the batch, and add the attention to the scores;
3. keep the new token (its bit) or evict one token per row: the unprotected token outside the local window with the
   lowest mean attention since it arrived (or, without `frequent`, the oldest). The next token reuses its slot.
"""
from __future__ import annotations

import torch

from .attention import attention_paths, compute_dtype
from .fastgen.policy import FREQUENT, LOCAL, window
from .kvpool import BLOCK_SIZE, KVPool, host_to_device


def write_rows(pool: KVPool, rows: list[int], k, v, pos, prot, score) -> None:
    """Fill rows' slots [0, n) and make their bitmaps exactly pos: k, v (heads, n, head_dim); pos, prot, score
    (heads, n). Rows get the blocks they need first."""
    heads, n = pos.shape
    pool.reserve(rows, n)
    idx = torch.tensor(rows, device=k.device)
    pool.write(idx, torch.arange(n, device=k.device).expand(heads, n), k, v, pos, prot, score)
    pool.mark(idx, pos, replace=True)


def keep_rank(pos, prot, score, win_start, length, frequent) -> torch.Tensor:
    """How much each slot deserves to stay: +inf for protected tokens and the local window (pos >= win_start), else
    the mean attention since arrival (cumulative score / the length - pos queries that saw it), or, without
    `frequent`, the position (newer stays). The decode step evicts its argmin; a chunk keeps its top (store.py).
    Ranking by the raw cumulative score (notes decision 6) would evict nearly every new token at once, since it
    competes with prompt tokens that summed a whole prompt's attention: see docs/fastgen.md. pos, prot, score
    (P, R); win_start, length, frequent: per row (P, 1) tensors, or numbers."""
    key = torch.where(torch.as_tensor(frequent, device=pos.device), score / (length - pos), pos.float())
    return key.masked_fill(prot | (pos >= win_start), float("inf"))


class PagedCache:
    """One layer of one sequence in the pool (KVCache). `attend` takes the prompt (`prefill`), a later chunk of
    several tokens (`extend`: a chat's next turn), or one decode step, which goes through the sequence's batch."""

    def __init__(self, paged: "PagedBatch", slot: int, layer: int, n_kv_heads: int):
        self.paged, self.pool, self.slot, self.layer = paged, paged.pool, slot, layer
        self.n_kv_heads = n_kv_heads
        self.length = 0
        self.stores: list = []  # row groups: FullRows itself, or FastGen's PolicyStores

    def rows(self, kv_heads=None) -> list[int]:
        """Pool row ids of KV heads (all by default)."""
        return [self.paged.row(self.slot, self.layer, h) for h in (range(self.n_kv_heads) if kv_heads is None
                                                                   else kv_heads)]

    def attend(self, q, k, v):
        T = k.shape[1]
        assert self.length + T <= self.pool.max_len, f"cache full: {self.length} + {T} > {self.pool.max_len}"
        if self.length == 0:
            return self.prefill(q, k, v)
        if T > 1:
            return self.extend(q, k, v)
        self.paged.reserve_layer(self)  # a sequence on its own: a batch of one
        return self.paged.decode(self.layer, q[None], k[None], v[None])[0]

    def kept_tokens(self) -> int:
        return sum(s.kept * len(s.kv_heads) for s in self.stores)

    def nbytes(self) -> int:
        """Bytes of the pool blocks its rows hold (a block: K, V, positions, flags and scores of its slots)."""
        return self.pool.held_blocks(self.rows()) * self.pool.block_bytes()


def lone_batch(model, max_len: int, first_len: int | None = None, cfg=None) -> "PagedBatch":
    """A pool and a batch of one for a sequence on its own, up to max_len tokens, with room for what `cfg`'s
    caches (default: the full cache) may hold at first_len tokens (default max_len), a prefill's whole prompt
    included (projection.py); it doubles when that runs out (a chat)."""
    from .fastgen.policy import FastGenConfig
    from .projection import block_bytes, projected_bytes

    c, w = model.cfg, model.embed.weight
    rows = c.n_layers * c.n_kv_heads
    first = min(max_len, first_len or max_len)
    n_blocks = max(projected_bytes(model, cfg or FastGenConfig("full"), first, 0)) // block_bytes(model)
    pool = KVPool(n_blocks, BLOCK_SIZE, c.head_dim, rows, max_len, w.device, w.dtype, growable=True)
    return PagedBatch(pool, c.n_layers, c.n_heads, c.n_kv_heads)


class PagedBatch:
    """The running sequences' rows in the pool, attending as one. `set_batch(members)` names them for the next step:
    (batch slot, per-layer caches) each, caches being PagedCaches; `layers()` are the per-layer objects the model
    takes in place of a list of caches (BatchKVCache). A batch slot's rows are fixed: (slot, layer, KV head)."""

    def __init__(self, pool: KVPool, n_layers: int, n_heads: int, n_kv_heads: int, kernel: bool | None = None):
        """kernel: attend through the Triton paged kernel (default: where attention_paths says so, on CUDA)."""
        self.pool, self.n_layers, self.n_heads, self.n_kv_heads = pool, n_layers, n_heads, n_kv_heads
        if kernel is None:
            kernel = attention_paths(pool.k.device)[1] == "triton"
        self.kernel = kernel
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

    def reserve_layer(self, cache: PagedCache) -> None:
        """Blocks for the next step of one sequence's layer: each row group's kept + 1 slots (raises PoolFull)."""
        for s in cache.stores:  # a group's rows hold the same blocks: its first row tells (no list built a step)
            if len(self.pool.blocks[self.row(cache.slot, cache.layer, s.kv_heads[0])]) * self.pool.block_size \
                    < s.kept + 1:
                self.pool.reserve(cache.rows(s.kv_heads), s.kept + 1)

    def reserve(self, caches: list) -> None:
        """Blocks for the next step of one sequence, every layer (raises PoolFull)."""
        for cache in caches:
            self.reserve_layer(cache)

    def held_blocks(self, slot: int) -> int:
        return self.pool.held_blocks(self.slot_rows(slot))

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
        qs = q.reshape(P, groups, head_dim)
        if self.kernel:  # CUDA: the Triton kernel reads the blocks in place (kernels/paged_attention.py)
            out, slots = self._attend_kernel(rows, qs, n_rows, R, scored)
        else:
            out, slots = self._attend_torch(rows, qs, n_rows, R, scored)
        beyond = torch.arange(slots.shape[1], device=q.device) >= n_rows[:, None]  # (P, R'): past each row

        # 3. Keep the new token (its bit) or, where the budget says so, evict one token per row.
        pool.bitmap[rows, new_pos // 8] |= ((1 << new_pos % 8) * keep).to(torch.uint8)
        if evicting:
            pos = pool.pos.view(-1)[slots]  # (P, R')
            key = keep_rank(pos, pool.prot.view(-1)[slots], pool.score.view(-1)[slots], win_start[:, None],
                            length[:, None], frequent.bool()[:, None])
            victim = key.masked_fill(beyond, float("inf")).argmin(dim=1)  # (P,) logical slots
            gone = pos.gather(1, victim[:, None])[:, 0].long().clamp(min=0)
            evicts = evicts.bool()
            pool.bitmap[rows, gone // 8] &= torch.where(evicts, ~(1 << gone % 8), -1).to(torch.uint8)
            pool.freed[rows] = torch.where(evicts, victim, pool.freed[rows])
        return out.view(B, n_heads, 1, head_dim)

    def _attend_torch(self, rows, q, n_rows, R: int, scored: bool):
        """The reference: gather the rows' slots (a copy, padded to the longest row), one masked
        matmul-softmax-matmul. q (P, groups, head_dim) -> out (P, groups, head_dim), slots (P, R')."""
        keys, values, slots = self.pool.gather(rows, R)  # (P, R', head_dim) each, (P, R'): R rounded up to a block
        dt = compute_dtype(keys)
        beyond = torch.arange(slots.shape[1], device=q.device) >= n_rows[:, None]  # (P, R')
        scores = (q.to(dt) * q.shape[-1] ** -0.5) @ keys.to(dt).transpose(1, 2)  # (P, groups, R')
        scores.masked_fill_(beyond[:, None], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1)
        out = (probs.to(dt) @ values.to(dt)).to(q.dtype)  # (P, groups, head_dim)
        if scored:  # padded slots get 0 (their probability): the null block's, or a row's own unused slots
            self.pool.score.view(-1).index_add_(0, slots.flatten(), probs.mean(dim=1).flatten())
        return out, slots

    def _attend_kernel(self, rows, q, n_rows, R: int, scored: bool):
        """The Triton paged decode kernel over the same slots, and its score update (exact probabilities again,
        from the kernel's log-sum-exp)."""
        from .kernels.paged_attention import paged_add_scores, paged_decode

        pool = self.pool
        tables, lengths = pool.tables[rows], n_rows.to(torch.int32)  # (P, max_blocks), (P,)
        out, lse = paged_decode(q, pool.k, pool.v, tables, lengths, R)
        if scored:
            paged_add_scores(q, pool.k, tables, lengths, lse, pool.score, R)
        return out, pool.slot_ids(rows, R)


class PagedLayer:
    """One layer of a PagedBatch: what Attention.forward calls `attend` on (BatchKVCache)."""

    def __init__(self, batch: PagedBatch, layer: int):
        self.batch, self.layer = batch, layer

    def __len__(self) -> int:
        return len(self.batch.members)

    def attend(self, q, k, v):
        return self.batch.decode(self.layer, q, k, v)
