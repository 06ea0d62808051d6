"""A batch's FastGen decode step: one layer's stores of every running sequence, pooled.

At batch 1 a layer's decode step is a few dozen small PyTorch ops per `PolicyStore` (write, attend, evict). Run per
sequence, a batch of B pays that B times per layer, which costs more than the smaller cache saves on a CPU. Here the
stores of every running sequence that rank tokens alike and keep the same share of their length live in one pool
(with the budget profile: one pool per layer): rows of (sequence, KV head) pairs, ordered by sequence and head and
padded to the longest pair, so one step of the same ops serves the whole batch.

A pair's rows are exactly its store's rows; the pool adds per-pair lengths. Attention masks each pair's rows beyond
its own `kept + 1`; the new token goes to each pair's own row (`kept`, or the row its last eviction freed); budgets,
evictions and bitmaps are per pair as at batch 1, each sequence's budget from its own length and token kinds (host
arithmetic, so the step needs no host sync). The stores keep their host state (kept, hole, kinds) and can get their
rows back (`FastGenBatch.release`: the caches then read as after a batch-1 run); a finished sequence just leaves
(`leave`), and its rows go with the next rebuild. Padding costs memory: a pool holds every pair at the longest pair's
capacity, and a rebuild holds the old rows and the new pools for a moment; batch.py's admission counts both.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from ..attention import compute_dtype
from ..cache import attention_paths, storage_bytes
from .policy import FREQUENT, FULL, LOCAL, window
from .store import PolicyStore, host_to_device, row_addresses

ROW_FIELDS = ("k", "v", "pos", "prot", "score")  # per-row tensors, (pairs, capacity, ...)
FILL = {"pos": -1}  # what padding rows hold (0 elsewhere)


class StorePool:
    def __init__(self, members: list[tuple[int, PolicyStore]], batch: int, n_heads: int, n_kv_heads: int,
                 kernel: bool = False):
        """members: (sequence index among the batch's `batch`, one of its stores), the store's rows either its own
        or in the pool it was in (when the batch changes, pools are rebuilt from both). Pairs are ordered by (sequence,
        KV head): a pool holding every head of every sequence reads q, k, v and writes its output with no gather.
        kernel: attend through the Triton ragged decode kernel (CUDA), reading each pair's rows in place."""
        self.batch_index = [b for b, _ in members]
        self.stores = [s for _, s in members]
        first = self.stores[0]
        self.groups, device = first.groups, first.kv_index.device
        pairs = sorted((b * n_kv_heads + h, m, i) for m, (b, s) in enumerate(members)
                       for i, h in enumerate(s.kv_heads))  # (pair's index into B*n_kv_heads, member, row)
        P = len(pairs)
        self.kv_index = torch.tensor([kv for kv, _, _ in pairs], device=device)  # (P,) into (B*n_kv_heads)
        self.q_index = (self.kv_index[:, None] * self.groups + torch.arange(self.groups, device=device)).flatten()
        self.in_order = [kv for kv, _, _ in pairs] == list(range(batch * n_kv_heads))  # every head of every sequence
        self.pair_member = torch.tensor([m for _, m, _ in pairs], device=device)  # (P,) which member a pair is
        where = {(m, i): p for p, (_, m, i) in enumerate(pairs)}
        # a member's pairs are consecutive (its heads ascend, and pairs go by sequence, then head): rows a:a+heads
        self.first = [where[m, 0] for m in range(len(self.stores))]
        assert all(where[m, i] == a + i for m, a in enumerate(self.first) for i in range(len(self.stores[m].kv_heads)))
        self.pair = torch.arange(P, device=device)
        self.most_rows = max(s.most_rows for s in self.stores)
        # Each member's rows are copied from where they are, its own tensors or the pool it was in (slices, so no
        # temporary), and stay there until `adopt`: building holds the old rows and the new pool, nothing more.
        sources = [(s.pool, s.pool_rows.start) if s.pool is not None else (s, 0) for s in self.stores]
        cap = max(own_capacity(s, src.k.shape[1]) for s, (src, _) in zip(self.stores, sources))
        width = max((s.max_len + 7) // 8 for s in self.stores)
        for name in ROW_FIELDS + ("bitmap", "free"):
            old = getattr(sources[0][0], name)
            if old is None:
                setattr(self, name, None)
                continue
            # Rows [0, kept + 1) hold data (the freed row is among them); the rest stay zero, so that masked rows
            # never feed attention a NaN from uninitialized memory.
            shape = (P,) if name == "free" else (P, width) if name == "bitmap" else (P, cap) + tuple(old.shape[2:])
            t = old.new_full(shape, FILL.get(name, 0))
            for s, a, (src, b) in zip(self.stores, self.first, sources):
                n = len(s.kv_heads)
                if name == "free":
                    t[a : a + n] = src.free[b : b + n]
                else:  # per-row fields: rows [0, kept + 1); the bitmap: the member's own bytes
                    w = (s.max_len + 7) // 8 if name == "bitmap" else s.kept + 1
                    t[a : a + n, :w] = getattr(src, name)[b : b + n, :w]
            setattr(self, name, t)
        self.kernel = kernel
        if kernel:  # each pair is one row of the kernel's tables, serving its query heads of the batch's q
            self.q_first = (self.kv_index * self.groups).to(torch.int32)
            self._tables()

    def _tables(self):
        """The kernel's address tables: each pair's first K, V (and score) row (after building and growing)."""
        device = self.pair.device
        self.k_rows = host_to_device(row_addresses(self.k), device)  # (P,) int64
        self.v_rows = host_to_device(row_addresses(self.v), device)
        self.score_rows = None if self.score is None else host_to_device(row_addresses(self.score, kv=False), device)

    def adopt(self):
        """The members' rows live here from now on: their own tensors, or their old pool, are let go."""
        for s, a in zip(self.stores, self.first):
            s.pool, s.pool_rows = self, slice(a, a + len(s.kv_heads))
            s.k = s.v = s.pos = s.prot = s.score = s.bitmap = s.free = None

    def slice_of(self, store: PolicyStore) -> dict:
        """A member's rows (views): its pairs, its bitmap width."""
        p = store.pool_rows
        rows = {name: None if getattr(self, name) is None else getattr(self, name)[p] for name in ROW_FIELDS}
        rows["bitmap"] = self.bitmap[p, : (store.max_len + 7) // 8]
        rows["free"] = self.free[p]
        return rows

    def own_bytes(self, store: PolicyStore) -> int:
        """What a member's stores would hold on their own (`FastGenBatch.release`), without copying anything."""
        cap, heads = own_capacity(store, self.k.shape[1]), len(store.kv_heads)
        per_row = sum(t[0, 0].nbytes for t in (self.k, self.v, self.pos, self.prot, self.score) if t is not None)
        return heads * (cap * per_row + (store.max_len + 7) // 8 + self.free.itemsize)

    def _grow(self, rows: int):
        """Room for `rows` rows plus one block, as a store grows, never past the longest member's need."""
        cap = max(rows, min(self.most_rows, rows - 1 + self.stores[0].block_rows(rows - 1)))
        n = self.k.shape[1]
        for name in ROW_FIELDS:
            t = getattr(self, name)
            if t is not None:
                new = t.new_full((t.shape[0], cap) + tuple(t.shape[2:]), FILL.get(name, 0))
                new[:, :n] = t
                setattr(self, name, new)
        if self.kernel:
            self._tables()

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], out: torch.Tensor):
        """One step for every pair: store each sequence's new token (position lengths[i]-1 of member i), attend,
        keep or evict per pair. q, out: (B*n_heads, 1, head_dim), k/v: (B*n_kv_heads, 1, head_dim), flattened over
        the batch; writes the rows of `out` of this pool's query heads."""
        stores, device = self.stores, self.kv_index.device
        rows = [s.kept + 1 for s in stores]  # each member's rows this step, the new token's included
        R = max(rows)
        if R > self.k.shape[1]:
            self._grow(R)
        targets = [min(r, s._budget(n)) for r, s, n in zip(rows, stores, lengths)]
        evict = [r - t for r, t in zip(rows, targets)]
        assert set(evict) <= {0, 1}, "more than one eviction in one step"
        # special/punct-only stores that do not keep the new token just leave its row to the next one
        keeps_new = [t == r or bool(s.policy & (FREQUENT | LOCAL)) for r, t, s in zip(rows, targets, stores)]
        # Per member, host-known: rows, the new position, its protected flag, whether it writes into a freed row,
        # the bitmap byte and bit it sets, whether it evicts, where its local window starts, the length.
        table = torch.tensor([[r, n - 1, bool(s.kinds.kinds[n - 1] & s.protect), s.hole, (n - 1) // 8,
                               (1 << (n - 1) % 8) if keep else 0, e, n - window(s.policy, n, s.cfg), n]
                              for r, s, n, keep, e in zip(rows, stores, lengths, keeps_new, evict)], dtype=torch.long)
        table = host_to_device(table, device)[self.pair_member]  # (P, 9): each pair's member's row
        n_rows, new_pos, protected, hole, byte, bit, evicts, win_start, length = table.unbind(1)

        if not self.in_order:  # this pool's pairs of the batch's k, v
            k, v = k[self.kv_index], v[self.kv_index]

        # 1. The new token into each pair's row: `kept`, or the row its last eviction freed.
        at = (self.pair, torch.where(hole.bool(), self.free, n_rows - 1))
        self.k[at], self.v[at] = k[:, 0], v[:, 0]
        self.pos[at] = new_pos.to(self.pos.dtype)
        self.prot[at] = protected.bool()
        if self.score is not None:
            self.score[at] = 0.0

        # 2. Attention over each pair's rows [0, kept + 1), the rest masked; the `frequent` scores.
        ragged = min(rows) < R
        beyond = torch.arange(R, device=device) >= n_rows[:, None] if ragged else None  # (P, R) past each pair's rows
        if self.kernel:
            self._attend_kernel(q, n_rows, out)
        else:
            self._attend(q, R, beyond, out)

        # 3. Keep the new token (its bit) or, where the budget says so, evict one row per pair.
        self.bitmap[self.pair, byte] |= bit.to(torch.uint8)
        if any(evict):
            pos, evicts = self.pos[:, :R], evicts.bool()
            must = self.prot[:, :R] | (pos >= win_start[:, None])
            if ragged:
                must |= beyond
            key = self.score[:, :R] / (length[:, None] - pos) if self.score is not None else pos.float()
            victim = key.masked_fill(must, float("inf")).argmin(dim=1)  # (P,)
            gone = pos[self.pair, victim].long().clamp(min=0)
            self.bitmap[self.pair, gone // 8] &= torch.where(evicts, ~(1 << gone % 8), -1).to(torch.uint8)
            self.free = torch.where(evicts, victim, self.free)
        for s, t, e, keep in zip(stores, targets, evict, keeps_new):
            s.kept = t
            if keep:
                s.hole = bool(e)

    def _attend(self, q: torch.Tensor, R: int, beyond: torch.Tensor | None, out: torch.Tensor):
        """PyTorch: one batched matmul-softmax-matmul over rows [0, R) of every pair, rows `beyond` (P, R) masked."""
        P, _, head_dim = self.k.shape
        dt = compute_dtype(self.k)
        qs = (q if self.in_order else q[self.q_index]).view(P, self.groups, head_dim).to(dt)
        scores = (qs * head_dim**-0.5) @ self.k[:, :R].to(dt).transpose(1, 2)  # (P, groups, R)
        if beyond is not None:
            scores.masked_fill_(beyond[:, None], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1)
        o = (probs.to(dt) @ self.v[:, :R].to(dt)).to(q.dtype).view(P * self.groups, 1, head_dim)
        if self.in_order:
            out.copy_(o)
        else:
            out.index_copy_(0, self.q_index, o)
        if self.score is not None:
            self.score[:, :R] += probs.mean(dim=1)

    def _attend_kernel(self, q: torch.Tensor, n_rows: torch.Tensor, out: torch.Tensor):
        """Triton: one launch attends every pair over its own rows in place (no padding read), one more adds the
        `frequent` scores; lengths come from the device table, so nothing is read back."""
        from ..kernels.decode_attention import ragged_decode_rows, ragged_group_probs_rows

        lengths = n_rows.to(torch.int32)
        args = (self.groups, self.k.shape[1], self.k.dtype, self.k.stride(1))
        _, lse = ragged_decode_rows(q[:, 0], self.k_rows, self.v_rows, lengths, self.q_first, *args, out=out[:, 0])
        if self.score is not None:
            ragged_group_probs_rows(q[:, 0], self.k_rows, lengths, self.q_first, *args, lse, self.score_rows)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v, self.pos, self.prot, self.score, self.bitmap, self.free) if t is not None]


def own_capacity(store: PolicyStore, cap: int) -> int:
    """The rows a store needs of `cap` it has (in a pool: the longest member's): what it holds, the next token's row
    and one growth block, as if it had grown on its own. A pool rebuilt after its longest member left shrinks."""
    return min(cap, max(store.kept + 1, min(store.most_rows, store.kept + store.block_rows(store.kept))))


def pool_key(store: PolicyStore) -> tuple:
    """Stores that may share a pool: ranked alike (with or without `frequent` scores) and keeping about the same
    share of their sequence's length, so that padding to the longest pair costs little. With the budget profile,
    a layer's `frequent` and `local+frequent` heads of one share pool together."""
    p, cfg = store.policy, store.cfg
    share = (cfg.local_ratio if p & LOCAL else 0.0) + (cfg.frequent_ratio if p & FREQUENT else 0.0)
    return bool(p & FULL), bool(p & FREQUENT), round(share, 6)


class FastGenBatch:
    """One layer's FastGen caches of the running sequences, attending as one: `attend(q, k, v)` with the batch as
    the leading dimension, every store in a pool (`pool_key`).

    `update(caches)` (the running sequences' caches of this layer, in batch order) rebuilds the pools when the
    batch changes; `leave(cache)` takes a finished sequence out, `release(cache)` gives a sequence's stores their own
    rows back.

    While `update` runs, the layer holds its old rows (the old pools and the stores' own rows) and the new ones (the
    new pools, or a lone sequence's own rows) at once, and nothing else: at its peak, the bytes before plus the bytes
    after (batch.py counts that moment and its admission bounds it)."""

    def __init__(self, n_heads: int, n_kv_heads: int):
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.caches: list = []
        self.pools: list[StorePool] = []

    def update(self, caches: list) -> None:
        if len(caches) == 1:  # one sequence steps through its own stores: a pool of one only costs ops
            self.release(caches[0])
        pools = []
        if len(caches) > 1:
            members = defaultdict(list)  # pool_key -> [(sequence, store)]
            for b, cache in enumerate(caches):
                assert cache.pending is None, "a sequence joins the batch after its prefill compressed its caches"
                for s in cache.stores:
                    members[pool_key(s)].append((b, s))
            kernel = attention_paths(caches[0].kinds.by_position.device)[1] == "triton"
            pools = [StorePool(m, len(caches), self.n_heads, self.n_kv_heads, kernel)
                     for _, m in sorted(members.items())]
            for pool in pools:  # only now do the old pools and the stores' own rows go
                pool.adopt()
        self.caches, self.pools = list(caches), pools

    def leave(self, cache) -> int:
        """A finished sequence leaves the batch without a copy (its rows stay in the pools until the next `update`);
        returns the bytes its stores hold, or would hold on their own (as after `release`)."""
        self.caches = [c for c in self.caches if c is not cache]
        held = 0
        for s in cache.stores:
            held += storage_bytes(*s.tensors()) if s.pool is None else s.pool.own_bytes(s)
            s.pool = None  # no reference back from a finished store keeps a pool alive
        return held

    def release(self, cache) -> None:
        """Copy a sequence's rows out of the pools into its own stores (trimmed to what they hold plus a block)."""
        for s in cache.stores:
            if s.pool is None:  # it ran alone
                continue
            rows = s.pool.slice_of(s)
            cap = own_capacity(s, rows["k"].shape[1])
            for name in ROW_FIELDS:
                setattr(s, name, None if rows[name] is None else rows[name][:, :cap].clone())
            s.bitmap, s.free = rows["bitmap"].clone(), rows["free"].clone()
            s.pool = None
        if cache.rows is not None:
            cache.rows.refresh()

    def __len__(self) -> int:
        return len(self.caches)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One decode step of the batch: q (B, n_heads, 1, head_dim), k/v (B, n_kv_heads, 1, head_dim)
        -> (B, n_heads, 1, head_dim)."""
        B, _, T, head_dim = q.shape
        assert T == 1 and B == len(self.caches), "pooled stores take one decode step of the batch they were built for"
        if not self.pools:
            return self.caches[0].attend(q[0], k[0], v[0])[None]
        for cache in self.caches:
            cache.length += 1
            assert cache.length <= cache.max_len, f"cache full: {cache.length} > {cache.max_len}"
            assert len(cache.kinds) >= cache.length, "feed new tokens to TokenKinds before the model sees them"
        qf, kf, vf = q.reshape(-1, 1, head_dim), k.reshape(-1, 1, head_dim), v.reshape(-1, 1, head_dim)
        out = torch.empty_like(qf)
        for pool in self.pools:  # each writes its query heads' rows
            pool.decode(qf, kf, vf, [self.caches[b].length for b in pool.batch_index], out)
        return out.view(q.shape)

    def nbytes(self) -> int:
        return storage_bytes(*(t for p in self.pools for t in p.tensors()))
