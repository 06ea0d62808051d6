"""The paged KV pool: one preallocated store of fixed-size blocks for every row of a batch, full and FastGen alike.

A row is one (sequence, layer, KV head). Its tokens live in slots: logical slot r of a row is slot r % block_size of
block tables[row, r // block_size]. Per slot the pool holds K and V (head_dim each), the token's position (int32),
its protected flag and its float32 cumulative attention score (FastGen's heavy-hitter ranking); per row a bitmap of
the positions it holds (one bit per position), and what a decode step decides from (tinygen/step.py): its policy and
ratios, its kept count, whether its last eviction left a freed slot (`hole`) and which (`freed`).

Storage (tensors, allocated once) is apart from bookkeeping (plain Python: the free list and each row's block list),
as in nano-vllm's block manager. Block 0 is never handed out: it is the "null block" that unused table entries point
at, so a gather over a padded table reads finite zeros. A block is zeroed when it is handed out, so slots a row has
not written yet are finite too (attention masks them, but 0 * NaN is NaN).

One pool serves every layer (a departure from "one pool per layer": layers keep different shares under the paper's
profile, and one free list lets them share the memory instead of splitting it evenly). A capped pool (a batch under
--kv-budget-mb) never grows: when it runs dry the batch preempts. A pool without a cap (a sequence on its own: one
prompt, a chat) grows instead, doubling its blocks: one copy of the blocks, at most log2(length / first size) times,
block ids and tables unchanged.
"""
from __future__ import annotations

import torch

BLOCK_SIZE = 16  # tokens of one KV head per block


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host-made tensor on `device` without a host sync: a copy from pageable memory waits for the GPU, one
    from pinned memory (torch's caching host allocator, which keeps a buffer until its copy is done) does not."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class PoolFull(Exception):
    """No free block: the batch must preempt a sequence (batch.py) before the step can go on."""


class KVPool:
    def __init__(self, n_blocks: int, block_size: int, head_dim: int, n_rows: int, max_len: int,
                 device: torch.device, dtype: torch.dtype, growable: bool = False):
        """n_blocks usable blocks (plus the null block); n_rows the most rows at once (batch x n_layers x
        n_kv_heads); max_len the longest sequence, which sizes each row's table and bitmap; growable: double the
        blocks when they run out, rather than raise PoolFull."""
        assert n_blocks >= 1 and block_size >= 1, "a pool holds at least one block"
        self.block_size, self.head_dim, self.max_len, self.growable = block_size, head_dim, max_len, growable
        total = n_blocks + 1  # block 0: the null block
        self.k = torch.empty(total, block_size, head_dim, device=device, dtype=dtype)  # (blocks, block_size, head_dim)
        self.v = torch.empty_like(self.k)
        self.pos = torch.empty(total, block_size, dtype=torch.int32, device=device)  # (blocks, block_size)
        self.prot = torch.empty(total, block_size, dtype=torch.bool, device=device)
        self.score = torch.empty(total, block_size, dtype=torch.float32, device=device)
        self._zero(0)
        max_blocks = -(-(max_len + 1) // block_size)  # a row never holds more than max_len tokens plus the new one
        self.tables = torch.zeros(n_rows, max_blocks, dtype=torch.int32, device=device)  # (n_rows, max_blocks)
        self.bitmap = torch.zeros(n_rows, (max_len + 7) // 8, dtype=torch.uint8, device=device)
        # each row's step state (step.py): its policy bits and (local, frequent) ratios, set when its group is made;
        # its kept count, whether its last eviction left a freed slot and which, moved on by every step on the device
        self.policy = torch.zeros(n_rows, dtype=torch.int32, device=device)
        self.ratio = torch.zeros(n_rows, 2, dtype=torch.float64, device=device)
        self.kept = torch.zeros(n_rows, dtype=torch.long, device=device)
        self.hole = torch.zeros(n_rows, dtype=torch.bool, device=device)
        self.freed = torch.zeros(n_rows, dtype=torch.long, device=device)
        self.free: list[int] = list(range(n_blocks, 0, -1))  # host: free block ids, the next one last
        self.blocks: list[list[int]] = [[] for _ in range(n_rows)]  # host: each row's blocks, in table order
        self.high = 0  # host: the most blocks ever in use at once (prefill transients included)

    @property
    def n_blocks(self) -> int:
        return self.k.shape[0] - 1

    def block_bytes(self) -> int:
        """Bytes of one block: K, V, position, protected flag and score of block_size slots."""
        return sum(t[0].nbytes for t in (self.k, self.v, self.pos, self.prot, self.score))

    def nbytes(self) -> int:
        """Everything the pool allocated: blocks (the null block too), tables, bitmaps, the rows' step state."""
        return sum(t.nbytes for t in (self.k, self.v, self.pos, self.prot, self.score, self.tables, self.bitmap,
                                      *self.row_state()))

    def row_state(self) -> tuple[torch.Tensor, ...]:
        """The per-row tensors a decode step reads and moves on: policy, ratio, kept, hole, freed."""
        return self.policy, self.ratio, self.kept, self.hole, self.freed

    def set_rows(self, rows: list[int], kept: int, hole: bool = False, policy: int | None = None,
                 ratios: tuple[float, float] | None = None) -> None:
        """A row group's state from the host, off the decode step (a prefill, a chunk, a compaction): its kept count
        and hole, and, when it is made, its policy and (local, frequent) ratios. Scalar fills: no host sync."""
        idx = torch.tensor(rows, device=self.kept.device)
        self.kept.index_fill_(0, idx, kept)
        self.hole.index_fill_(0, idx, hole)
        if policy is not None:
            self.policy.index_fill_(0, idx, policy)
            self.ratio[idx] = torch.tensor(ratios, dtype=torch.float64, device=idx.device)

    def used_blocks(self) -> int:
        return self.n_blocks - len(self.free)

    def grow(self) -> None:
        """Double the blocks (a pool without a cap): the new storage holds the old blocks at the same ids."""
        old = self.k.shape[0]
        for name in ("k", "v", "pos", "prot", "score"):
            t = getattr(self, name)
            with torch.inference_mode(False):  # a normal tensor, as the pool was made, even when a step grows it
                new = t.new_empty((2 * old - 1,) + tuple(t.shape[1:]))  # (compiled.py: one graph for both)
                new[:old] = t
            setattr(self, name, new)
        self.free[:0] = range(2 * old - 2, old - 1, -1)  # handed out after the blocks already free

    def _zero(self, b: int):
        self.k[b].zero_(), self.v[b].zero_(), self.score[b].zero_(), self.prot[b].zero_()
        self.pos[b].fill_(-1)

    def reserve(self, rows: list[int], slots: int) -> None:
        """Give each row blocks until it has `slots` slots. Raises PoolFull (having given what it could: the rows
        stay consistent, and their blocks go back with `release`) when the free list runs out."""
        need = -(-slots // self.block_size)
        assert need <= self.tables.shape[1], f"a row of {slots} slots is longer than max_len {self.max_len}"
        for row in rows:
            held = self.blocks[row]
            while len(held) < need:
                if not self.free and self.growable:
                    self.grow()
                if not self.free:
                    raise PoolFull
                b = self.free.pop()
                self._zero(b)
                self.tables[row, len(held)] = b  # a device write of a host number: no sync
                held.append(b)
        self.high = max(self.high, self.used_blocks())

    def release(self, rows: list[int]) -> None:
        """A sequence's rows end (it finished, or was preempted): their blocks go back to the free list."""
        for row in rows:
            self.free.extend(reversed(self.blocks[row]))
            self.blocks[row] = []
        if rows:
            idx = torch.tensor(rows, device=self.tables.device)
            self.tables[idx] = 0
            self.bitmap[idx] = 0
            for t in self.row_state():
                t[idx] = 0

    def shrink(self, rows: list[int], slots: int) -> None:
        """Rows that now keep `slots` slots give back the blocks past them (a chunk or a prefill compressed)."""
        need = -(-slots // self.block_size)
        for row in rows:
            held = self.blocks[row]
            if len(held) > need:
                self.free.extend(reversed(held[need:]))
                del held[need:]
                self.tables[row, need:] = 0

    def held_blocks(self, rows: list[int]) -> int:
        return sum(len(self.blocks[r]) for r in rows)

    def slots(self, rows: torch.Tensor, logical: torch.Tensor) -> torch.Tensor:
        """Flat slot ids (into k.view(-1, head_dim) etc.) of logical slots: rows (P,), logical (P, R) -> (P, R)."""
        bs = self.block_size
        return self.tables[rows[:, None], logical // bs].long() * bs + logical % bs

    def write(self, rows: torch.Tensor, logical: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
              prot: torch.Tensor, score: torch.Tensor | None = None) -> None:
        """Write tokens into logical slots: rows (P,), logical (P, R); k, v (P, R, head_dim); pos, prot, score
        (P, R)."""
        at = self.slots(rows, logical).flatten()
        self.k.view(-1, self.head_dim)[at] = k.reshape(-1, self.head_dim).to(self.k.dtype)
        self.v.view(-1, self.head_dim)[at] = v.reshape(-1, self.head_dim).to(self.v.dtype)
        self.pos.view(-1)[at] = pos.flatten().to(torch.int32)
        self.prot.view(-1)[at] = prot.flatten()
        self.score.view(-1)[at] = 0.0 if score is None else score.flatten().float()

    def _blocks(self, rows: torch.Tensor, n_slots: int) -> torch.Tensor:
        """(P, nb) block ids holding logical slots [0, n_slots) of each row (the null block past a row's own)."""
        return self.tables[rows, : -(-n_slots // self.block_size)].long()

    def _slot_ids(self, blocks: torch.Tensor) -> torch.Tensor:
        """(P, nb) block ids -> (P, nb * block_size) flat slot ids."""
        bs = self.block_size
        return (blocks[:, :, None] * bs + torch.arange(bs, device=blocks.device)).flatten(1)

    def gather(self, rows: torch.Tensor, n_slots: int) -> tuple[torch.Tensor, ...]:
        """K and V of the blocks holding logical slots [0, n_slots) of each row, read through the block tables (a
        copy, padded to whole blocks: R = n_slots rounded up to block_size), and the flat ids of those slots:
        rows (P,) -> k, v (P, R, head_dim), slots (P, R). Whole blocks are copied (index_select: a memcpy of
        block_size x head_dim each), several times faster than indexing slot by slot."""
        blocks = self._blocks(rows, n_slots)
        P, R, flat = blocks.shape[0], blocks.shape[1] * self.block_size, blocks.flatten()
        k = self.k.index_select(0, flat).view(P, R, self.head_dim)
        v = self.v.index_select(0, flat).view(P, R, self.head_dim)
        return k, v, self._slot_ids(blocks)

    def mark(self, rows: torch.Tensor, positions: torch.Tensor, replace: bool = False) -> None:
        """Set the bits of positions (P, n) in rows (P,), several per byte at once (a packed mask ORed in); replace:
        the rows hold exactly those positions (their other bits cleared)."""
        P = positions.shape[0]
        mask = torch.zeros(P, self.bitmap.shape[1] * 8, dtype=torch.uint8, device=positions.device)
        mask.scatter_(1, positions.long(), 1)
        weights = 1 << torch.arange(8, dtype=torch.uint8, device=positions.device)
        packed = (mask.view(P, -1, 8) * weights).sum(-1, dtype=torch.uint8)  # (P, bytes)
        self.bitmap[rows] = packed if replace else self.bitmap[rows] | packed

    def resident_mask(self, rows: torch.Tensor, length: int) -> torch.Tensor:
        """(P, length) bool from the rows' bitmaps (tests and the dense reference)."""
        b = self.bitmap[rows]
        bits = (b[:, :, None] >> torch.arange(8, device=b.device, dtype=torch.uint8)) & 1
        return bits.flatten(1)[:, :length].bool()

    def check(self) -> None:
        """Block ownership (tests): every block is free or held by exactly one row, the tables say what the rows
        hold, the null block is nobody's."""
        held = [b for row in self.blocks for b in row]
        assert len(held) == len(set(held)), "a block held by two rows"
        assert not set(held) & set(self.free), "a held block is on the free list"
        assert sorted(held + self.free) == list(range(1, self.n_blocks + 1)), "a block lost"
        for row, blocks in enumerate(self.blocks):
            t = self.tables[row].tolist()
            assert t[: len(blocks)] == blocks and not any(t[len(blocks):]), f"row {row}: table differs"
