"""The compressed K/V store of the KV heads of one layer that share one policy.

Heads of one policy keep the same number of tokens at every step (budgets depend only on the length and the token
kinds), so their rows live in one (heads, capacity, head_dim) tensor and attend in one batched call. Rows are packed:
row r of head h holds the token at position `pos[h, r]`; `bitmap[h]` marks (one bit per position) which tokens head
h holds. A head's resident rows are [0, kept), except after an eviction: then one row below `kept + 1` (the head's
`free` row) holds the evicted token, which attention no longer reads once the next token overwrites it. The next
token goes to row `kept`, or after an eviction to each head's freed row, so evictions reuse slots and a decode step
compacts nothing. Which token leaves differs per head and is found on the device;
how many leave is known on the host, so a decode step needs no device sync.

A step is `append` (write the new token), attention, `settle` (keep it or evict one per head). On the CPU a store
attends on its own (`attend`, batched PyTorch); on CUDA `LayerRows` attends every store of a layer in one kernel launch.

A chunk of several new tokens after the prompt (a chat's next turn) is `extend`: the chunk attends causally over the
resident rows and its own earlier tokens, adds that attention to the scores, then each head evicts down to its
budget at the new length by the ranking a decode step evicts by, and the store is compacted (a chunk is a prefill,
not the hot path).
"""
from __future__ import annotations

import torch

from ..attention import causal_attention, compute_dtype
from .kinds import TokenKinds
from .policy import FREQUENT, LOCAL, FastGenConfig, kept_count, protected_kinds, window


class PolicyStore:
    def __init__(self, policy: int, kv_heads: list[int], n_kv_heads: int, groups: int, k: torch.Tensor, v: torch.Tensor,
                 positions: torch.Tensor, scores: torch.Tensor | None, max_len: int, kinds: TokenKinds,
                 cfg: FastGenConfig):
        """k, v: (heads, kept, head_dim) resident rows; positions: (heads, kept) their token positions, ascending;
        scores: (heads, kept) float32 cumulative attention (policies with `frequent`)."""
        heads, kept, head_dim = k.shape
        device = k.device
        self.policy, self.kinds, self.cfg = policy, kinds, cfg
        self.protect = protected_kinds(policy)
        self.kv_heads = list(kv_heads)  # on the host too: a batch's paged step places its rows without a device read
        self.kv_index = torch.tensor(kv_heads, device=device)
        self.all_heads = kv_heads == list(range(n_kv_heads))  # then no gather of q, k, v and no scatter of out
        self.q_index = (self.kv_index[:, None] * groups + torch.arange(groups, device=device)).flatten()
        self.groups, self.kept, self.hole = groups, kept, False
        self.max_len = max_len
        # The most rows a step ever needs: the budget at max_len (budgets grow with the length) plus the row a new
        # token is written to before the step evicts. Unknown future protected tokens count as protected.
        most = kept_count(policy, max_len, lambda n: n if self.protect else 0, cfg) + 1
        self.most_rows = max(kept, min(max_len, most))
        cap = min(self.most_rows, kept + self.block_rows(kept))
        self.k = k.new_empty(heads, cap, head_dim)
        self.v = v.new_empty(heads, cap, head_dim)
        self.pos = torch.full((heads, cap), -1, dtype=torch.int32, device=device)
        self.k[:, :kept], self.v[:, :kept], self.pos[:, :kept] = k, v, positions
        self.prot = torch.zeros(heads, cap, dtype=torch.bool, device=device)  # rows holding protected tokens
        self.prot[:, :kept] = (kinds.by_position[positions.long()] & self.protect) != 0
        self.score = None
        if policy & FREQUENT:
            self.score = torch.zeros(heads, cap, dtype=torch.float32, device=device)
            self.score[:, :kept] = scores
        self.bitmap = torch.zeros(heads, (max_len + 7) // 8, dtype=torch.uint8, device=device)
        self._set_bits(positions.long())
        self.free = torch.zeros(heads, dtype=torch.long, device=device)  # each head's freed row, when self.hole

    def _set_bits(self, positions: torch.Tensor):
        """positions: (heads, n) -> set those bits, per head (packing a bool mask: several may share a byte)."""
        heads = positions.shape[0]
        mask = torch.zeros(heads, self.bitmap.shape[1] * 8, dtype=torch.uint8, device=positions.device)
        mask.scatter_(1, positions, 1)
        weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=positions.device)
        self.bitmap |= (mask.view(heads, -1, 8) * weights).sum(-1, dtype=torch.uint8)

    def block_rows(self, kept: int) -> int:
        """Rows a store grows by: at least cfg.growth_block, and 1/16 of what it holds, so that growing (the only
        whole-store copy) happens at most once per that many steps."""
        return max(self.cfg.growth_block, kept // 16)

    def _grow(self, rows: int):
        """Make room for `rows` rows, plus one block beyond what is then kept, but never more rows than the store
        can need (`most_rows`; a chunk may need more for a moment, before it evicts)."""
        self._reallocate(max(rows, min(self.most_rows, rows - 1 + self.block_rows(rows - 1))))

    def _reallocate(self, cap: int):
        """Move every per-row tensor to a capacity of `cap` rows, keeping the first min(cap, capacity) rows."""
        n = min(cap, self.k.shape[1])

        def moved(t, fill=0):
            new = torch.full((t.shape[0], cap) + tuple(t.shape[2:]), fill, dtype=t.dtype, device=t.device)
            new[:, :n] = t[:, :n]
            return new
        self.k, self.v, self.pos, self.prot = moved(self.k), moved(self.v), moved(self.pos, -1), moved(self.prot)
        if self.score is not None:
            self.score = moved(self.score)

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int) -> torch.Tensor:
        """One step in PyTorch: store the new token (position length-1), attend, evict at most one token per head.
        q: (n_heads, 1, head_dim), k/v: (n_kv_heads, 1, head_dim) -> (heads * groups, 1, head_dim) for q_index."""
        self.append(k, v, length)
        out = self.attend(q)
        self.settle(length)
        return out

    def append(self, k: torch.Tensor, v: torch.Tensor, length: int) -> bool:
        """Write the new token (position length-1) into row `kept`, or each head's freed row; grow first if full.
        k/v: (n_kv_heads, 1, head_dim). Returns whether the store grew (its tensors moved)."""
        grow = self.kept + 1 > self.k.shape[1]
        if grow:
            self._grow(self.kept + 1)
        heads, _, head_dim = self.k.shape
        new_pos = length - 1
        protected = bool(self.kinds.kinds[new_pos] & self.protect)  # host-side: no sync
        if not self.all_heads:
            k, v = k[self.kv_index], v[self.kv_index]
        if self.hole:  # each head writes into the row its last eviction freed
            self.k.scatter_(1, self.free[:, None, None].expand(heads, 1, head_dim), k)
            self.v.scatter_(1, self.free[:, None, None].expand(heads, 1, head_dim), v)
            self.pos.scatter_(1, self.free[:, None], new_pos)
            self.prot.scatter_(1, self.free[:, None], protected)
            if self.score is not None:
                self.score.scatter_(1, self.free[:, None], 0.0)
        else:
            r = self.kept
            self.k[:, r : r + 1], self.v[:, r : r + 1] = k, v
            self.pos[:, r], self.prot[:, r] = new_pos, protected
            if self.score is not None:
                self.score[:, r] = 0.0
        return grow

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """Attention over rows [0, kept + 1) (after `append`), all heads of the policy in one batched call, and the
        `frequent` score update. q: (n_heads, 1, head_dim) -> (heads * groups, 1, head_dim)."""
        rows = self.kept + 1
        heads, _, head_dim = self.k.shape
        if not self.all_heads:
            q = q[self.q_index]
        dt = compute_dtype(self.k)
        qs = q.reshape(heads, self.groups, head_dim).to(dt)
        scores = (qs * head_dim**-0.5) @ self.k[:, :rows].to(dt).transpose(1, 2)  # (heads, groups, rows)
        probs = torch.softmax(scores.float(), dim=-1)
        out = (probs.to(dt) @ self.v[:, :rows].to(dt)).to(q.dtype).view(heads * self.groups, 1, head_dim)
        if self.score is not None:
            self.score[:, :rows] += probs.mean(dim=1)  # cumulative attention, averaged over the query group
        return out

    def settle(self, length: int):
        """After attention: keep the new token or evict one per head, as the budget at `length` says."""
        rows, new_pos = self.kept + 1, length - 1
        # Budgets grow with the length, but an evicted token never comes back: keep at most what is resident.
        target = min(rows, self._budget(length))
        assert rows - target in (0, 1), f"policy {self.policy}: {rows - target} evictions in one step"
        if rows == target:
            self.bitmap[:, new_pos // 8] |= 1 << (new_pos % 8)
            self.hole = False
        elif not self.policy & (FREQUENT | LOCAL):
            pass  # special/punct only: the new token was the one not kept; its row is reused next step
        else:
            self.bitmap[:, new_pos // 8] |= 1 << (new_pos % 8)
            self._evict(rows, length)
        self.kept = target

    def _budget(self, length: int) -> int:
        """The most tokens each head keeps at `length` (kept_count with this sequence's token kinds)."""
        return kept_count(self.policy, length, lambda n: self.kinds.protected_before(self.protect, n), self.cfg)

    def _rank(self, rows: int, length: int) -> torch.Tensor:
        """(heads, rows) how much each resident row deserves to stay: +inf for protected tokens and the local
        window, else the mean attention since arrival (cumulative score / the length - pos queries that saw it),
        or, without `frequent`, the position (newer stays). Decode steps and chunks evict by this one ranking."""
        pos = self.pos[:, :rows]
        must = self.prot[:, :rows]
        if self.policy & LOCAL:
            must = must | (pos >= length - window(self.policy, length, self.cfg))
        key = self.score[:, :rows] / (length - pos) if self.score is not None else pos.float()
        return key.masked_fill(must, float("inf"))

    def _evict(self, rows: int, length: int):
        """Free one row per head: the unprotected token outside the local window with the lowest mean attention
        since it arrived (cumulative score / the length - pos queries that saw it), or, without `frequent`, the
        oldest such token. Ranking by the raw cumulative score (notes decision 6) evicts nearly every new token at
        once, since it competes with prompt tokens that summed a whole prompt's attention: see docs/fastgen.md."""
        victim = self._rank(rows, length).argmin(dim=1)  # (heads,)
        gone = self.pos[:, :rows].gather(1, victim[:, None]).long()
        byte, bit = gone // 8, (gone % 8).to(torch.uint8)
        self.bitmap.scatter_(1, byte, self.bitmap.gather(1, byte) & ~(torch.ones_like(bit) << bit))
        self.free, self.hole = victim, True

    def extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int) -> torch.Tensor:
        """A chunk of T new tokens at positions length-T .. length-1: write them after the resident rows, attend
        each causally over the resident rows and the chunk's tokens up to itself, add that attention to the scores,
        then evict down to the budget at `length`.
        q: (n_heads, T, head_dim), k/v: (n_kv_heads, T, head_dim) -> (heads * groups, T, head_dim) for q_index."""
        T = k.shape[1]
        self._close_hole()
        kept, first = self.kept, length - T
        if kept + T > self.k.shape[1]:
            self._grow(kept + T)
        if not self.all_heads:
            q, k, v = q[self.q_index], k[self.kv_index], v[self.kv_index]
        rows = kept + T
        self.k[:, kept:rows], self.v[:, kept:rows] = k, v
        self.pos[:, kept:rows] = torch.arange(first, length, dtype=torch.int32, device=k.device)
        self.prot[:, kept:rows] = (self.kinds.by_position[first:length] & self.protect) != 0
        if self.score is not None:
            self.score[:, kept:rows] = 0.0
        on_block = self._add_scores if self.score is not None else None
        out = causal_attention(q, self.k[:, :rows], self.v[:, :rows], kept, on_block)
        self._keep_best(rows, length)
        return out

    def _add_scores(self, probs: torch.Tensor, row0: int):
        """A block of chunk rows' attention, (heads, groups, B, keys): add each key's, group-averaged, to its score."""
        self.score[:, : probs.shape[-1]] += probs.mean(dim=1).sum(dim=1)

    def _close_hole(self):
        """Make rows [0, kept) exactly the resident ones: move the last row into each head's freed row."""
        if not self.hole:
            return
        last, heads = self.kept, self.k.shape[0]
        for t in self.row_tensors():
            idx = self.free.view(heads, *([1] * (t.dim() - 1))).expand(heads, 1, *t.shape[2:])
            t.scatter_(1, idx, t[:, last : last + 1].clone())
        self.hole = False

    def _keep_best(self, rows: int, length: int):
        """Keep, per head, min(rows, budget at `length`) of resident rows [0, rows): protected tokens and the local
        window, then the highest mean attention since arrival (or, without `frequent`, the newest); compact them
        into rows [0, kept) and rebuild the bitmaps."""
        target = min(rows, self._budget(length))
        if target < rows:
            chosen = self._rank(rows, length).topk(target, dim=1).indices.sort(dim=1).values
            for t in self.row_tensors():
                idx = chosen.view(*chosen.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
                t[:, :target] = t.gather(1, idx)
            self.bitmap.zero_()
            if self.k.shape[1] > target + self.block_rows(target):  # give back what the chunk's rows took
                self._reallocate(max(target, min(self.most_rows, target + self.block_rows(target))))
        self._set_bits(self.pos[:, :target].long())
        self.kept = target

    def resident_mask(self, length: int) -> torch.Tensor:
        """(heads, length) bool from the bitmaps (for tests and the dense reference)."""
        bitmap = self.bitmap
        bits = (bitmap[:, :, None] >> torch.arange(8, device=bitmap.device, dtype=torch.uint8)) & 1
        return bits.flatten(1)[:, :length].bool()

    def row_tensors(self):
        """The per-row tensors, (heads, capacity, ...): K, V, positions, protected flags, and scores with `frequent`."""
        return [t for t in (self.k, self.v, self.pos, self.prot, self.score) if t is not None]

    def tensors(self):
        """Every tensor the store owns (none once a batch's paged pool holds its rows: tinygen/paged.py)."""
        return [t for t in self.row_tensors() + [self.bitmap, self.free] if t is not None]


def row_addresses(t: torch.Tensor, kv: bool = True) -> torch.Tensor:
    """(rows,) int64 addresses of each row's first element of t: (rows, capacity, ...) on the host, for the Triton
    kernels' tables, which read rows in place (K/V rows, `kv`, must start 16-byte aligned)."""
    from ..kernels.decode_attention import aligned

    assert not kv or aligned(t), "the kernel reads K/V rows that start 16-byte aligned"
    return t.data_ptr() + torch.arange(t.shape[0], dtype=torch.int64) * (t.stride(0) * t.element_size())


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host-made tensor on `device` without a host sync: a copy from pageable memory waits for the GPU, one
    from pinned memory (torch's caching host allocator, which keeps a buffer until its copy is done) does not."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class LayerRows:
    """Every KV head's rows of one layer's stores as device tables for the Triton ragged decode kernel
    (tinygen/kernels/decode_attention.py): one launch attends all stores of the layer, reading their rows in place,
    and one more adds the `frequent` heads' scores.

    One entry per KV head, stores with `frequent` first (their heads are then a prefix of every table): the
    addresses of its first K, V (and score) row, its first query head, and its length. Addresses change only when
    a store grows, which the host knows (`refresh`); lengths (kept + 1 per store, host-known) go to the device in
    one non-blocking copy per step. Nothing is read back, so no host sync.
    """

    def __init__(self, stores: list[PolicyStore], groups: int):
        self.stores = sorted(stores, key=lambda s: s.score is None)  # stable: `frequent` stores first
        self.groups = groups
        self.n_frequent = sum(s.kv_index.numel() for s in self.stores if s.score is not None)
        kv_heads = torch.cat([s.kv_index for s in self.stores])
        self.q_first = (kv_heads * groups).to(torch.int32)  # (n_kv_heads,) row i serves query heads from here
        self.lengths = torch.zeros_like(self.q_first)  # (n_kv_heads,) rows each head attends over this step
        self.refresh()

    def refresh(self):
        """Rebuild the address tables from the stores' current tensors (at build, and after a store grows)."""
        device = self.q_first.device
        assert all(s.k.is_contiguous() and s.v.is_contiguous() for s in self.stores), "contiguous store rows"
        table = lambda name: host_to_device(torch.cat([row_addresses(getattr(s, name), name != "score")
                                                       for s in self.stores if getattr(s, name) is not None]), device)
        self.k_rows, self.v_rows = table("k"), table("v")  # (n_kv_heads,) int64
        self.score_rows = table("score") if self.n_frequent else None  # (n_frequent,): `frequent` stores come first
        self.capacity = max(s.k.shape[1] for s in self.stores)  # bounds every length: sizes the grid

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """Attention of every query head over its KV head's rows [0, kept + 1), after the stores' `append`, and the
        `frequent` scores. q: (n_heads, 1, head_dim) -> (n_heads, 1, head_dim)."""
        from ..kernels.decode_attention import ragged_decode_rows, ragged_group_probs_rows

        lengths = [s.kept + 1 for s in self.stores for _ in range(s.kv_index.numel())]
        self.lengths.copy_(host_to_device(torch.tensor(lengths, dtype=torch.int32), self.lengths.device),
                           non_blocking=True)
        k = self.stores[0].k
        args = (self.groups, self.capacity, k.dtype, k.stride(1))
        out, lse = ragged_decode_rows(q[:, 0], self.k_rows, self.v_rows, self.lengths, self.q_first, *args)
        if self.n_frequent:
            f = slice(0, self.n_frequent)
            ragged_group_probs_rows(q[:, 0], self.k_rows[f], self.lengths[f], self.q_first[f], *args, lse,
                                    self.score_rows)
        return out[:, None]
