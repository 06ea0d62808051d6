"""Sequences' caches in the paged KV pool (tinygen/kvpool.py), and the batch that decodes them as one: every row of
every running sequence, full and FastGen alike, in one step function (tinygen/step.py). A sequence on its own (a
prompt, a chat) is a batch of one (`lone_batch`): the same rows, the same step.

A sequence's cache of one layer is a `PagedCache`: the KVCache interface (cache.py) over its rows, one per KV head.
Its rows form groups (`stores`): the KV heads that keep the same number of tokens at every step (budgets depend only
on the length and the token kinds). The full cache (`FullRows`, cache.py) is one group that never evicts; FastGen's
(`FastGenCache`, fastgen/cache.py) has a `PolicyStore` per policy. A prompt and a later chunk (a chat's next turn)
go through the cache's `attend`; a decode step through the batch's `step`, for every sequence at once.

A step's decisions (where each row's new token goes, whether it evicts, its budget) are made on the device by the
step itself, from each row's state in the pool. The host keeps a mirror of each group's kept count and hole
(arithmetic on the lengths and token kinds it knows, no device read): it reserves each row's blocks before the step
and bounds how many blocks the step reads.
"""
from __future__ import annotations

import torch

from . import step as steps
from .kvpool import BLOCK_SIZE, KVPool, host_to_device


def write_rows(pool: KVPool, rows: list[int], k, v, pos, prot, score) -> None:
    """Fill rows' slots [0, n) and make their bitmaps exactly pos: k, v (heads, n, head_dim); pos, prot, score
    (heads, n). Rows get the blocks they need first."""
    heads, n = pos.shape
    pool.reserve(rows, n)
    idx = torch.tensor(rows, device=k.device)
    pool.write(idx, torch.arange(n, device=k.device).expand(heads, n), k, v, pos, prot, score)
    pool.mark(idx, pos, replace=True)


class PagedCache:
    """One layer of one sequence in the pool (KVCache). `attend` takes the prompt (`prefill`) or tokens after it
    (`extend`: a chat's next turn, or a token fed through the model's forward); decode steps are the batch's."""

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
        return self.extend(q, k, v)

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
    """The running sequences' rows in the pool, decoding as one. `set_batch(members)` names them for the next step:
    (batch slot, per-layer caches) each, caches being PagedCaches. A batch slot's rows are fixed: (slot, layer, KV
    head); so are its token kinds' device rows (FastGen's: `bind`)."""

    def __init__(self, pool: KVPool, n_layers: int, n_heads: int, n_kv_heads: int, kernel: bool | None = None):
        """kernel: attend through the Triton paged kernel (default: where attention_paths says so, on CUDA)."""
        from .attention import attention_paths

        self.pool, self.n_layers, self.n_heads, self.n_kv_heads = pool, n_layers, n_heads, n_kv_heads
        if kernel is None:
            kernel = attention_paths(pool.k.device)[1] == "triton"
        self.kernel = kernel
        dev, n_slots = pool.k.device, pool.tables.shape[0] // (n_layers * n_kv_heads)
        self.by_position = torch.zeros(n_slots, pool.max_len, dtype=torch.uint8, device=dev)  # token kinds
        self.prefix = torch.zeros(n_slots, 4, pool.max_len + 1, dtype=torch.int32, device=dev)  # their counts
        self.vocab: torch.Tensor | None = None  # (vocab,) uint8 kind bits, from the first FastGen sequence's kinds
        self._no_kinds: torch.Tensor | None = None
        self.members: list = []
        self.slots: torch.Tensor | None = None  # (B,) the members' batch slots
        self.plan: steps.Plan | None = None  # the step begun (begin), for attend_layer
        self.block_range = torch.arange(pool.tables.shape[1], device=dev)  # a step reads the first nb: a view

    def row(self, slot: int, layer: int, kv_head: int) -> int:
        return (slot * self.n_layers + layer) * self.n_kv_heads + kv_head

    def slot_rows(self, slot: int) -> list[int]:
        """Every row of a batch slot (all layers, all KV heads)."""
        first = self.row(slot, 0, 0)
        return list(range(first, first + self.n_layers * self.n_kv_heads))

    def bind(self, slot: int, kinds) -> None:
        """A FastGen sequence's token kinds (fastgen/kinds.py) keep their device side in this slot's rows."""
        if kinds.batch is not self:
            n = min(kinds.by_position.shape[0], self.pool.max_len)
            kinds.bind(self.by_position[slot, :n], self.prefix[slot, :, : n + 1])
            kinds.batch = self
        if self.vocab is None:
            self.vocab = torch.tensor(kinds.vocab, dtype=torch.uint8, device=self.pool.k.device)

    def set_batch(self, members: list[tuple[int, list]]) -> None:
        self.members = members
        self.slots = host_to_device(torch.tensor([slot for slot, _ in members]), self.pool.k.device)

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

    def _advance(self) -> tuple[int, bool, bool]:
        """The host's mirror of the step: each group's kept count and hole moved on as the device moves them
        (step.plan), each cache's length. Returns the most slots any row attends over, and whether any row may
        evict (a policy other than full) and whether any ranks by attention (`frequent`): what the step computes."""
        from .fastgen.policy import FREQUENT, FULL, LOCAL

        most, evicting, scored = 0, False, False
        for _, caches in self.members:
            for c in caches:
                c.length += 1
                n = c.length
                for s in c.stores:
                    rows = s.kept + 1  # the new token's slot included
                    target = min(rows, s._budget(n))
                    assert rows - target in (0, 1), f"policy {s.policy}: {rows - target} evictions in one step"
                    if target == rows or s.policy & (FREQUENT | LOCAL):
                        s.hole = target < rows
                    s.kept = target
                    most = max(most, rows)
                    evicting, scored = evicting or s.policy != FULL, scored or bool(s.policy & FREQUENT)
        return most, evicting, scored

    def begin(self, tokens, positions: list[int]) -> tuple[steps.StepInputs, bool, bool]:
        """The host's half of a step: the mirror moved on, the step's inputs on the device (no device read)."""
        most, evicting, scored = self._advance()
        pool, dev = self.pool, self.pool.k.device
        nb = min(pool.tables.shape[1], max(2, -(-most // pool.block_size)))  # 2 at least: a size of 1 specialises
        if not isinstance(tokens, torch.Tensor):  # ids the host read (a batch's): (B,)
            tokens = host_to_device(torch.tensor(tokens), dev)
        elif torch.is_inference_mode_enabled() and not tokens.is_inference():  # as sampled ids are: a compiled
            tokens = tokens.clone()  # step's guards tell the two kinds of tensor apart
        x = steps.StepInputs(tokens, host_to_device(torch.tensor(positions), dev),
                             self.slots, self.block_range[:nb])
        return x, evicting, scored

    def state(self, vocab_size: int) -> tuple[steps.PoolState, steps.KindState]:
        """The tensors the step reads and moves on. Before any FastGen sequence binds its kinds, no id is of a
        protected kind (vocab_size zeros)."""
        p = self.pool
        vocab = self.vocab
        if vocab is None:
            if self._no_kinds is None or self._no_kinds.shape[0] < vocab_size:
                self._no_kinds = torch.zeros(vocab_size, dtype=torch.uint8, device=p.k.device)
            vocab = self._no_kinds
        return (steps.PoolState(p.k, p.v, p.pos, p.prot, p.score, p.tables, p.bitmap, *p.row_state()),
                steps.KindState(vocab, self.by_position, self.prefix))

    @torch.inference_mode()
    def step(self, model, tokens, positions: list[int], fn=None) -> torch.Tensor:
        """One decode step of every member (blocks reserved): tokens ((B,) on the device, or ids) at positions -> logits (B, vocab). fn: the
        step function, step.decode or it compiled (compiled.py)."""
        x, evicting, scored = self.begin(tokens, positions)
        return (fn or steps.decode)(model, *self.state(model.cfg.vocab_size), x, evicting, scored, self.kernel)

    def begin_layers(self, tokens: list[int], positions: list[int]) -> tuple[bool, bool]:
        """A step driven layer by layer (`attend_layer`) with q, k and v from elsewhere (tests of the cache)."""
        x, evicting, scored = self.begin(tokens, positions)
        pool, kinds = self.state(1 + max(tokens))
        self.plan = steps.plan(pool, kinds, x, self.n_layers, self.n_kv_heads)
        self.flags = evicting, scored
        return evicting, scored

    def attend_layer(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """step.attend for one layer of the begun step: q (B, n_heads, 1, head_dim), k/v (B, n_kv_heads, 1,
        head_dim) -> (B, n_heads, 1, head_dim)."""
        B, n_heads, _, head_dim = q.shape
        out = steps.attend(self.state(1)[0], self.plan, layer, q.reshape(-1, n_heads // self.n_kv_heads, head_dim),
                           k.reshape(-1, head_dim), v.reshape(-1, head_dim), *self.flags, self.kernel)
        return out.view(B, n_heads, 1, head_dim)
