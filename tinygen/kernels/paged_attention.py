"""Triton decode attention over the paged KV pool (tinygen/kvpool.py): paged flash-decoding, grouped for GQA.

The pool keeps K and V in fixed-size blocks, `k_pool`, `v_pool` (n_blocks + 1, block_size, head_dim); a *row* (one
sequence's one KV head in one layer) owns some of them, listed in its block table: logical slot r of row p lives in
slot r % block_size of block tables[p, r // block_size]. A row's keys are therefore scattered over the pool, and the
torch path (`PagedBatch.decode`) first gathers them into a contiguous copy. This kernel reads them in place.

Table indirection. A tile of BLOCK_N consecutive logical slots n0 .. n0 + BLOCK_N - 1 loads, per slot, its block id
from the table (`tables[p, offs_n // block_size]`: neighbouring slots read the same entry, which the cache serves)
and addresses the key at block * stride_block + (offs_n % block_size) * stride_slot + d. So a tile may span several
pool blocks (BLOCK_N > block_size) or part of one (BLOCK_N < block_size); any block_size works. Along head_dim the
key is contiguous, which is what lets the loads vectorize.

Flash-decoding, two stages. One query token per head attends over up to thousands of keys: one program per row would
leave most of a GPU idle at small batches, so stage 1 splits every row along its slots (split-K): program (p, s)
runs an online softmax over split s of row p for the row's whole query group at once (each K/V tile is loaded once
and multiplied by all `groups` query heads in one tl.dot, the group padded to 16 rows, tl.dot's minimum) and writes
a partial result: the split's normalised output and its log-sum-exp. Stage 2 merges the splits of each query head:
out = sum_s exp(lse_s - lse) * o_s with lse = logsumexp_s(lse_s). The grid, (P, splits), comes from host ints only;
each row's split length is derived on the device from its length, and splits past the row's end exit at once. No
host read of lengths, so the launches can be captured in a CUDA graph and replayed as rows grow (`splits` is not a
specialised argument: changing it does not recompile). For a captured graph, fix `splits` and pass the tables'
capacity as max_slots: any lengths up to it then replay correctly.

`paged_add_scores` is the follow-up FastGen's `frequent` policies need: with the merged lse it recomputes each key's
probability p = exp(s - lse), averages it over the row's query group and adds it to the key's float32 score slot.

All math in float32; K/V may be float32, bfloat16 or float16. `paged_decode_reference` is the same in plain PyTorch.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK_N = 32  # keys per tile
MIN_BLOCK_H = 16  # tl.dot needs at least 16 rows: query groups are padded to this
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _keys(table, offs_n, mask_n, BLOCK_SIZE: tl.constexpr):
    """Pool block (int64) and slot within it of logical slots offs_n (BLOCK_N,), through one row's table."""
    blocks = tl.load(table + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)  # masked: the null block
    return blocks, offs_n % BLOCK_SIZE


@triton.jit
def _load_q(Q, row, stride_qp, stride_qg, KV: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """Row `row`'s query group, padded to (BLOCK_H, BLOCK_D), and the offsets and masks of both axes."""
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(Q + row * stride_qp + offs_h[:, None] * stride_qg + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)
    return q.to(tl.float32) if UPCAST else q.to(KV), offs_h, mask_h, offs_d, mask_d


@triton.jit
def _split_bounds(length, split, SPLITS, BLOCK: tl.constexpr):
    """Slots [lo, hi) of split `split` of a row of `length` slots: SPLITS equal parts rounded up to BLOCK."""
    split_len = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK) * BLOCK
    lo = split * split_len
    return lo, tl.minimum(lo + split_len, length), split_len


@triton.jit(do_not_specialize=["SPLITS"])  # the grid width varies with max_slots: one compile for all
def _stage1(Q, K, V, Tables, Lengths, mid_o, mid_lse, scale, SPLITS, stride_qp, stride_qg, stride_t, stride_kb,
            stride_ks, KV: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
            UPCAST: tl.constexpr):
    row, split = tl.program_id(0), tl.program_id(1)
    length = tl.load(Lengths + row)
    lo, hi, _ = _split_bounds(length, split, SPLITS, BLOCK)
    if lo < hi:  # splits past this row's end do nothing
        q, offs_h, mask_h, offs_d, mask_d = _load_q(Q, row, stride_qp, stride_qg, KV, GROUP, BLOCK_H, HEAD_DIM,
                                                    BLOCK_D, UPCAST)
        table = Tables + row * stride_t
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max of the scores
        l = tl.zeros([BLOCK_H], tl.float32)  # running sum of exp(score - m)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)  # running sum of exp(score - m) * v
        for n0 in range(lo, hi, BLOCK):
            offs_n = n0 + tl.arange(0, BLOCK)
            mask_n = offs_n < hi
            blocks, slot = _keys(table, offs_n, mask_n, BLOCK_SIZE)
            at = blocks * stride_kb + slot * stride_ks  # (BLOCK,) element offset of each key in the pool
            kt = tl.load(K + at[None, :] + offs_d[:, None], mask=mask_n[None, :] & mask_d[:, None],
                         other=0.0)  # (BLOCK_D, BLOCK): K tile, transposed by indexing
            kt = kt.to(tl.float32) if UPCAST else kt
            s = tl.dot(q, kt, input_precision=PRECISION) * scale  # (BLOCK_H, BLOCK) float32
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))  # finite: every tile has at least one key
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            v = tl.load(V + at[:, None] + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :],
                        other=0.0)  # (BLOCK, BLOCK_D)
            v = v.to(tl.float32) if UPCAST else v
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l = l * alpha + tl.sum(p, 1)
            m = m_new
        heads = row * GROUP + offs_h  # mid_o (P * GROUP, SPLITS, HEAD_DIM), mid_lse (P * GROUP, SPLITS)
        tl.store(mid_o + (heads[:, None] * SPLITS + split) * HEAD_DIM + offs_d[None, :], acc / l[:, None],
                 mask=mask_h[:, None] & mask_d[None, :])
        tl.store(mid_lse + heads * SPLITS + split, m + tl.log(l), mask=mask_h)


@triton.jit(do_not_specialize=["SPLITS"])
def _stage2(Lengths, mid_o, mid_lse, Out, Lse, SPLITS, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    head = row * GROUP + tl.program_id(1)
    length = tl.load(Lengths + row)
    _, _, split_len = _split_bounds(length, 0, SPLITS, BLOCK)
    n_splits = tl.cdiv(length, tl.maximum(split_len, 1))  # the splits stage 1 actually ran
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    m = float("-inf")
    l = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s in range(0, n_splits):
        lse_s = tl.load(mid_lse + head * SPLITS + s)
        o_s = tl.load(mid_o + (head * SPLITS + s) * HEAD_DIM + offs_d, mask=mask_d, other=0.0)
        m_new = tl.maximum(m, lse_s)
        alpha = tl.exp(m - m_new)
        w = tl.exp(lse_s - m_new)
        acc = acc * alpha + w * o_s
        l = l * alpha + w
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)  # an empty row (length 0) gives zeros and lse = log(0) = -inf
    tl.store(Out + head * HEAD_DIM + offs_d, out.to(Out.dtype.element_ty), mask=mask_d)
    tl.store(Lse + head, m + tl.log(l))


@triton.jit
def _add_scores(Q, K, Tables, Lengths, Lse, Score, scale, stride_qp, stride_qg, stride_t, stride_kb, stride_ks,
                stride_sb, KV: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
                UPCAST: tl.constexpr):
    row = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK
    length = tl.load(Lengths + row)
    if n0 < length:
        q, offs_h, mask_h, offs_d, mask_d = _load_q(Q, row, stride_qp, stride_qg, KV, GROUP, BLOCK_H, HEAD_DIM,
                                                    BLOCK_D, UPCAST)
        lse = tl.load(Lse + row * GROUP + offs_h, mask=mask_h, other=0.0)
        offs_n = n0 + tl.arange(0, BLOCK)
        mask_n = offs_n < length
        blocks, slot = _keys(Tables + row * stride_t, offs_n, mask_n, BLOCK_SIZE)
        kt = tl.load(K + (blocks * stride_kb + slot * stride_ks)[None, :] + offs_d[:, None],
                     mask=mask_n[None, :] & mask_d[:, None], other=0.0)
        kt = kt.to(tl.float32) if UPCAST else kt
        s = tl.dot(q, kt, input_precision=PRECISION) * scale  # (BLOCK_H, BLOCK)
        p = tl.where(mask_h[:, None], tl.exp(s - lse[:, None]), 0.0)  # padded query rows add nothing
        mean = tl.sum(p, 0) / GROUP  # (BLOCK,)
        # atomic: two rows of one launch may share a block (a shared prefix) and then add to the same slots
        tl.atomic_add(Score + blocks * stride_sb + slot, mean, mask=mask_n)


INTERPRETED = type(_stage1).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1 was set when this module loaded


@functools.lru_cache(maxsize=None)
def _processors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def default_splits(P: int, max_slots: int, device: torch.device) -> int:
    """Grid width of stage 1: enough programs to fill the GPU (about 4 per SM), never more than the tiles of the
    longest possible row. From host ints only."""
    return max(1, min(triton.cdiv(max_slots, BLOCK_N), triton.cdiv(4 * _processors(device), P)))


def _meta(q, k_pool, tables, lengths, max_slots):
    P, groups, head_dim = q.shape
    assert q.dim() == 3 and q.stride(2) == 1, f"q: (P, groups, head_dim), last dimension contiguous; got {q.shape}"
    assert k_pool.dim() == 3 and k_pool.shape[2] == head_dim and k_pool.stride(2) == 1, \
        f"pool: (n_blocks + 1, block_size, {head_dim}), last dimension contiguous; got {tuple(k_pool.shape)}"
    assert tables.dtype == torch.int32 and tables.dim() == 2 and tables.shape[0] == P and tables.stride(1) == 1, \
        f"tables: int32 (P, max_blocks); got {tables.dtype} {tuple(tables.shape)}"
    assert lengths.dtype == torch.int32 and lengths.shape == (P,), f"lengths: int32 ({P},)"
    assert max_slots <= tables.shape[1] * k_pool.shape[1], f"max_slots {max_slots} past the tables' blocks"
    assert all(t.device == q.device for t in (k_pool, tables, lengths)), f"every tensor on {q.device}"
    # Triton's interpreter multiplies bfloat16 tiles as their raw uint16 bits (it has no numpy bfloat16): there the
    # dots of bfloat16 K/V run on float32 copies of the tiles. Compiled kernels dot in the stored dtype.
    upcast = INTERPRETED and k_pool.dtype == torch.bfloat16
    return dict(KV=TL_DTYPES[k_pool.dtype], GROUP=groups, BLOCK_H=max(MIN_BLOCK_H, triton.next_power_of_2(groups)),
                HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=k_pool.shape[1],
                BLOCK=BLOCK_N, UPCAST=upcast,
                PRECISION="ieee" if k_pool.dtype == torch.float32 or upcast else "tf32")  # float32: no TF32


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                 lengths: torch.Tensor, max_slots: int, splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of attention for P rows in one launch pair.

    q: (P, groups, head_dim), one query token per query head, grouped by row; k_pool, v_pool: (n_blocks + 1,
    block_size, head_dim), same strides; tables: int32 (P, max_blocks), row p's blocks; lengths: int32 (P,), row p
    attends its logical slots [0, lengths[p]); max_slots: a host int >= every length (sizes the default grid).
    splits: stage 1's programs per row (default `default_splits`; any value >= 1 is correct for any lengths).
    Returns out (P, groups, head_dim) in q's dtype and lse (P, groups) float32 (an empty row: zeros and -inf).
    """
    meta = _meta(q, k_pool, tables, lengths, max_slots)
    assert v_pool.shape == k_pool.shape and v_pool.stride() == k_pool.stride() and v_pool.dtype == k_pool.dtype, \
        "K and V pools: one shape, strides and dtype"
    P, groups, head_dim = q.shape
    splits = splits or default_splits(P, max_slots, q.device)
    mid_o = torch.empty(P, groups, splits, head_dim, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(P, groups, splits, dtype=torch.float32, device=q.device)
    out = torch.empty(P, groups, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(P, groups, dtype=torch.float32, device=q.device)
    if P == 0:
        return out, lse
    _stage1[(P, splits)](q, k_pool, v_pool, tables, lengths, mid_o, mid_lse, head_dim**-0.5, splits, q.stride(0),
                         q.stride(1), tables.stride(0), k_pool.stride(0), k_pool.stride(1), **meta)
    _stage2[(P, groups)](lengths, mid_o, mid_lse, out, lse, splits, GROUP=groups, HEAD_DIM=head_dim,
                         BLOCK_D=meta["BLOCK_D"], BLOCK=BLOCK_N)
    return out, lse


def paged_add_scores(q: torch.Tensor, k_pool: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor,
                     lse: torch.Tensor, score_pool: torch.Tensor, max_slots: int) -> None:
    """score_pool's slot of logical slot r of row p += the mean over p's query group of the softmax probability of
    key r, for r < lengths[p]. lse: (P, groups) float32 from `paged_decode`; score_pool: float32 (n_blocks + 1,
    block_size), updated in place. max_slots (host int >= every length) sizes the grid: one program per tile."""
    meta = _meta(q, k_pool, tables, lengths, max_slots)
    P, groups, head_dim = q.shape
    assert lse.dtype == torch.float32 and lse.shape == (P, groups) and lse.is_contiguous(), "lse: float32 (P, groups)"
    assert score_pool.dtype == torch.float32 and score_pool.shape == k_pool.shape[:2] and score_pool.stride(1) == 1, \
        "score_pool: float32 (n_blocks + 1, block_size), like the pool's slots"
    if P and max_slots:
        _add_scores[(P, triton.cdiv(max_slots, BLOCK_N))](
            q, k_pool, tables, lengths, lse, score_pool, head_dim**-0.5, q.stride(0), q.stride(1), tables.stride(0),
            k_pool.stride(0), k_pool.stride(1), score_pool.stride(0), **meta)


def paged_decode_reference(q, k_pool, v_pool, tables, lengths, max_slots, score_pool=None):
    """`paged_decode` (and, given score_pool, `paged_add_scores`) in plain PyTorch: gather each row's blocks through
    its table, one masked softmax over slots [0, max_slots). Returns out (P, groups, head_dim), lse (P, groups)."""
    P, groups, head_dim = q.shape
    bs = k_pool.shape[1]
    nb = -(-max_slots // bs)
    blocks = tables[:, :nb].long()  # (P, nb)
    keys = k_pool[blocks].reshape(P, nb * bs, head_dim).float()  # (P, R, head_dim), R = nb * bs
    values = v_pool[blocks].reshape(P, nb * bs, head_dim).float()
    slots = (blocks[:, :, None] * bs + torch.arange(bs, device=q.device)).reshape(P, nb * bs)  # flat slot ids
    valid = torch.arange(nb * bs, device=q.device) < lengths[:, None].long()  # (P, R)
    scores = q.float() @ keys.transpose(1, 2) * head_dim**-0.5  # (P, groups, R)
    scores = scores.masked_fill(~valid[:, None], float("-inf"))
    lse = torch.logsumexp(scores, -1)  # (P, groups): -inf for an empty row
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # an empty row: all -inf, NaN -> 0
    out = (probs @ values).to(q.dtype)
    if score_pool is not None:
        score_pool.view(-1).index_add_(0, slots[valid], probs.mean(1)[valid])
    return out, lse
