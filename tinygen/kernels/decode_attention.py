"""Triton decode attention over ragged K/V rows located by device tables (flash-decoding, grouped for GQA).

A *row* is one KV head's resident keys: `n` keys of `head_dim` values, key j at element `j * stride` from the row's
first key. Four device tables describe a launch:

    k_rows[r], v_rows[r]  int64 address of row r's first key / value, 16-byte aligned (rows may live in different
                          tensors: a FastGen layer's stores each keep their own (heads, capacity, head_dim) K and V)
    lengths[r]            int32 resident keys of row r (may change every step; read on the device)
    q_first[r]            int32 its first query head; the row serves query heads q_first[r] .. q_first[r] + group - 1

`row_pointers(buf, starts)` gives the addresses of rows packed in one buffer (the full cache: row h at h * max_len).

Stage 1 splits every row along its keys: program (r, s) loads each K/V tile once for the row's whole query group
(one tl.dot per tile, the group padded to 16 rows, tl.dot's minimum) and writes a partial softmax (normalised
output and log-sum-exp) for split s. The grid is fixed by `max_splits`, a host-side bound; each row's split length
is computed on the device from its length, and programs past the row's end exit at once, so no host max() over
lengths and no sync. Stage 2 merges the splits of each query head with log-sum-exp. All math in float32; K/V may be
float32, bfloat16 or float16.

`ragged_group_probs_rows` is the follow-up launch FastGen's `frequent` score needs: with the merged log-sum-exp it
recomputes p = exp(s - lse) per key and adds the mean over the query group to a float32 score row (`score_rows`,
addresses like `k_rows`).

The plain-PyTorch reference (rows packed in one buffer) is `tinygen.attention.ragged_decode_reference`.
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
def _row(table, row, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The pointer stored at table[row] (an int64 address). ALIGNED: the caller guarantees 16-byte alignment, which
    lets tile loads vectorize (and pipeline with cp.async) as they do from a pointer argument."""
    ptr = tl.load(table + row).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _split_bounds(length, split, MAX_SPLITS, BLOCK: tl.constexpr):
    """Keys [lo, hi) of split `split` of a row of `length` keys: MAX_SPLITS equal parts rounded up to BLOCK."""
    split_len = tl.cdiv(tl.cdiv(length, MAX_SPLITS), BLOCK) * BLOCK
    lo = split * split_len
    hi = tl.minimum(lo + split_len, length)
    return lo, hi, split_len


@triton.jit
def _load_q(Q, heads, mask_h, offs_d, mask_d, stride_q, KV: tl.constexpr, UPCAST: tl.constexpr):
    q = tl.load(Q + heads[:, None] * stride_q + offs_d[None, :], mask=mask_h[:, None] & mask_d[None, :], other=0.0)
    return q.to(tl.float32) if UPCAST else q.to(KV)


@triton.jit(do_not_specialize=["MAX_SPLITS"])  # the grid width varies with the capacity: one compile for all
def _stage1(Q, k_rows, v_rows, lengths, q_first, mid_o, mid_lse, scale, MAX_SPLITS,
            stride_q, stride_kv, stride_mo_h, stride_mo_s, stride_ml_h,
            KV: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    length = tl.load(lengths + row)
    lo, hi, _ = _split_bounds(length, split, MAX_SPLITS, BLOCK)
    if lo < hi:  # splits past this row's end do nothing
        K = _row(k_rows, row, KV, True)
        V = _row(v_rows, row, KV, True)
        heads = tl.load(q_first + row) + tl.arange(0, BLOCK_H)  # (BLOCK_H,) query heads, padded
        mask_h = tl.arange(0, BLOCK_H) < GROUP
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        q = _load_q(Q, heads, mask_h, offs_d, mask_d, stride_q, KV, UPCAST)

        m = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max of the scores
        l = tl.zeros([BLOCK_H], tl.float32)  # running sum of exp(score - m)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)  # running sum of exp(score - m) * v
        for n0 in range(lo, hi, BLOCK):
            offs_n = n0 + tl.arange(0, BLOCK)
            mask_n = offs_n < hi
            kt = tl.load(K + offs_n[None, :] * stride_kv + offs_d[:, None], mask=mask_n[None, :] & mask_d[:, None],
                         other=0.0)  # (BLOCK_D, BLOCK): K tile, transposed by indexing
            if UPCAST:
                kt = kt.to(tl.float32)
            s = tl.dot(q, kt, input_precision=PRECISION) * scale  # (BLOCK_H, BLOCK) float32
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))  # finite: every tile has at least one key
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            v = tl.load(V + offs_n[:, None] * stride_kv + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :],
                        other=0.0)  # (BLOCK, BLOCK_D)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l = l * alpha + tl.sum(p, 1)
            m = m_new
        tl.store(mid_o + heads[:, None] * stride_mo_h + split * stride_mo_s + offs_d[None, :], acc / l[:, None],
                 mask=mask_h[:, None] & mask_d[None, :])
        tl.store(mid_lse + heads * stride_ml_h + split, m + tl.log(l), mask=mask_h)


@triton.jit(do_not_specialize=["MAX_SPLITS"])
def _stage2(lengths, q_first, mid_o, mid_lse, Out, Lse, MAX_SPLITS,
            stride_mo_h, stride_mo_s, stride_ml_h, stride_o,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    head = tl.load(q_first + row) + tl.program_id(1)
    length = tl.load(lengths + row)
    _, _, split_len = _split_bounds(length, 0, MAX_SPLITS, BLOCK)
    n_splits = tl.cdiv(length, tl.maximum(split_len, 1))  # the splits stage 1 actually ran
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    m = float("-inf")
    l = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s in range(0, n_splits):
        lse_s = tl.load(mid_lse + head * stride_ml_h + s)
        o_s = tl.load(mid_o + head * stride_mo_h + s * stride_mo_s + offs_d, mask=mask_d, other=0.0)
        m_new = tl.maximum(m, lse_s)
        alpha = tl.exp(m - m_new)
        w = tl.exp(lse_s - m_new)
        acc = acc * alpha + w * o_s
        l = l * alpha + w
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)  # an empty row (length 0) gives zeros and lse = log(0) = -inf
    tl.store(Out + head * stride_o + offs_d, out.to(Out.dtype.element_ty), mask=mask_d)
    tl.store(Lse + head, m + tl.log(l))


@triton.jit
def _group_probs(Q, k_rows, lengths, q_first, Lse, score_rows, scale, stride_q, stride_kv,
                 KV: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    row = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK
    length = tl.load(lengths + row)
    if n0 < length:
        K = _row(k_rows, row, KV, True)
        Score = _row(score_rows, row, tl.float32, False)
        heads = tl.load(q_first + row) + tl.arange(0, BLOCK_H)
        mask_h = tl.arange(0, BLOCK_H) < GROUP
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        q = _load_q(Q, heads, mask_h, offs_d, mask_d, stride_q, KV, UPCAST)
        lse = tl.load(Lse + heads, mask=mask_h, other=0.0)
        offs_n = n0 + tl.arange(0, BLOCK)
        mask_n = offs_n < length
        kt = tl.load(K + offs_n[None, :] * stride_kv + offs_d[:, None], mask=mask_n[None, :] & mask_d[:, None],
                     other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale
        p = tl.where(mask_h[:, None], tl.exp(s - lse[:, None]), 0.0)  # padded query rows add nothing
        mean = tl.sum(p, 0) / GROUP  # (BLOCK,)
        old = tl.load(Score + offs_n, mask=mask_n, other=0.0)
        tl.store(Score + offs_n, old + mean, mask=mask_n)  # each key belongs to one program: no atomics


INTERPRETED = type(_stage1).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1 was set when this module loaded


def row_pointers(buf: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """int64 addresses of rows packed in `buf` (total_keys, head_dim) that begin at keys `starts` (a device op)."""
    return buf.data_ptr() + starts.to(torch.int64) * (buf.stride(0) * buf.element_size())


def aligned(buf: torch.Tensor) -> bool:
    """Whether every row of `buf` (rows along dim 0) starts 16-byte aligned, as the kernels' K/V rows must."""
    return buf.data_ptr() % 16 == 0 and buf.stride(0) * buf.element_size() % 16 == 0


def _check(q, lengths, q_first, group, stride_kv, row_tables):
    assert q.dim() == 2 and q.stride(1) == 1, f"q: (n_q_heads, head_dim), last dimension contiguous; got {q.shape}"
    assert stride_kv >= q.shape[1], f"keys {stride_kv} elements apart overlap rows of {q.shape[1]}"
    for name, t in (("lengths", lengths), ("q_first", q_first)):
        assert t.dtype == torch.int32 and t.dim() == 1 and t.shape == lengths.shape, f"{name}: int32 (n_rows,)"
        assert t.device == q.device, f"{name} must be on {q.device}"
    for t in row_tables:
        assert t.dtype == torch.int64 and t.shape == lengths.shape and t.device == q.device, \
            "row pointer tables: int64 (n_rows,) on q's device"
    assert group >= 1


def _meta(q, kv_dtype, group):
    head_dim = q.shape[1]
    # Triton's interpreter multiplies bfloat16 tiles as their raw uint16 bits (it has no numpy bfloat16): there the
    # dots of bfloat16 K/V run on float32 copies of the tiles. Compiled kernels dot in the stored dtype.
    upcast = INTERPRETED and kv_dtype == torch.bfloat16
    return dict(KV=TL_DTYPES[kv_dtype], GROUP=group, BLOCK_H=max(MIN_BLOCK_H, triton.next_power_of_2(group)),
                HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK=BLOCK_N, UPCAST=upcast,
                PRECISION="ieee" if kv_dtype == torch.float32 or upcast else "tf32")  # float32: no TF32 rounding


@functools.lru_cache(maxsize=None)
def _processors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def default_splits(n_rows: int, capacity: int, device: torch.device) -> int:
    """Grid width of stage 1: enough programs to fill the GPU (about 4 per SM), never more than the tiles of the
    longest possible row. From host-known sizes only."""
    return max(1, min(triton.cdiv(capacity, BLOCK_N), triton.cdiv(4 * _processors(device), n_rows)))


def ragged_decode_rows(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, lengths: torch.Tensor,
                       q_first: torch.Tensor, group: int, capacity: int, kv_dtype: torch.dtype, stride_kv: int,
                       scale: float | None = None, max_splits: int | None = None,
                       out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of attention for every row in one launch pair.

    q: (n_q_heads, head_dim); k_rows, v_rows: int64 (n_rows,) 16-byte aligned addresses of each row's first key /
    value, of `kv_dtype`, keys `stride_kv` elements apart; lengths, q_first: int32 (n_rows,); all on q's device.
    group: query heads per row; capacity: a host-side bound on any row's length (sizes the grid). The caller keeps
    the rows' tensors alive. Returns out (n_q_heads, head_dim) in q's dtype and lse (n_q_heads,) float32, written
    only for the query heads some row serves (pass `out` to write into an existing tensor).
    """
    _check(q, lengths, q_first, group, stride_kv, (k_rows, v_rows))
    n_rows, (n_q_heads, head_dim) = lengths.shape[0], q.shape
    scale = head_dim**-0.5 if scale is None else scale
    splits = max_splits or default_splits(n_rows, capacity, q.device)
    mid_o = torch.empty(n_q_heads, splits, head_dim, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(n_q_heads, splits, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(n_q_heads, dtype=torch.float32, device=q.device)
    if n_rows == 0:
        return out, lse
    meta = _meta(q, kv_dtype, group)
    _stage1[(n_rows, splits)](q, k_rows, v_rows, lengths, q_first, mid_o, mid_lse, scale, splits, q.stride(0),
                              stride_kv, mid_o.stride(0), mid_o.stride(1), mid_lse.stride(0), **meta)
    _stage2[(n_rows, group)](lengths, q_first, mid_o, mid_lse, out, lse, splits, mid_o.stride(0), mid_o.stride(1),
                             mid_lse.stride(0), out.stride(0), HEAD_DIM=head_dim, BLOCK_D=meta["BLOCK_D"],
                             BLOCK=BLOCK_N)
    return out, lse


def ragged_group_probs_rows(q: torch.Tensor, k_rows: torch.Tensor, lengths: torch.Tensor, q_first: torch.Tensor,
                            group: int, capacity: int, kv_dtype: torch.dtype, stride_kv: int, lse: torch.Tensor,
                            score_rows: torch.Tensor, scale: float | None = None):
    """score row r [j] += mean over row r's query group of the softmax probability of key j, for j < lengths[r].

    lse: (n_q_heads,) float32 from `ragged_decode_rows`; score_rows: int64 (n_rows,) addresses of float32 score
    rows (one score per key). Updated in place.
    """
    _check(q, lengths, q_first, group, stride_kv, (k_rows, score_rows))
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:1], "lse: float32 (n_q_heads,)"
    n_rows, head_dim = lengths.shape[0], q.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    if n_rows:
        _group_probs[(n_rows, triton.cdiv(capacity, BLOCK_N))](q, k_rows, lengths, q_first, lse, score_rows, scale,
                                                               q.stride(0), stride_kv, **_meta(q, kv_dtype, group))


def _check_buffers(q, k_buf, v_buf, starts, lengths):
    assert k_buf.dim() == 2 and v_buf.shape == k_buf.shape and k_buf.stride() == v_buf.stride(), \
        f"k/v: (total_rows, head_dim), same strides; got {tuple(k_buf.shape)}, {tuple(v_buf.shape)}"
    assert q.shape[1] == k_buf.shape[1], f"head_dim {q.shape[1]} != {k_buf.shape[1]}"
    assert k_buf.stride(1) == 1 and k_buf.dtype == v_buf.dtype, "K and V: last dimension contiguous, one dtype"
    assert aligned(k_buf) and aligned(v_buf), "K and V rows must start 16-byte aligned"
    assert starts.dtype == torch.int32 and starts.shape == lengths.shape, "starts: int32 (n_rows,)"


def ragged_decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, lengths: torch.Tensor,
                            starts: torch.Tensor, q_first: torch.Tensor, group: int, capacity: int,
                            scale: float | None = None, max_splits: int | None = None,
                            out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`ragged_decode_rows` for rows packed in one buffer each: k_buf, v_buf (total_rows, head_dim), row r at
    keys starts[r] .. starts[r] + lengths[r] - 1 (starts: int32 (n_rows,) on q's device)."""
    _check_buffers(q, k_buf, v_buf, starts, lengths)
    return ragged_decode_rows(q, row_pointers(k_buf, starts), row_pointers(v_buf, starts), lengths, q_first, group,
                              capacity, k_buf.dtype, k_buf.stride(0), scale, max_splits, out)


def ragged_group_probs(q: torch.Tensor, k_buf: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor,
                       q_first: torch.Tensor, group: int, capacity: int, lse: torch.Tensor, score: torch.Tensor,
                       scale: float | None = None) -> torch.Tensor:
    """`ragged_group_probs_rows` for rows packed in one buffer: score float32 (total_rows,), laid out like K's rows.
    Updated in place and returned."""
    _check_buffers(q, k_buf, k_buf, starts, lengths)
    assert score.dtype == torch.float32 and score.dim() == 1 and score.is_contiguous(), "score: float32 (total_rows,)"
    assert score.shape[0] == k_buf.shape[0] and score.device == q.device, "score: one per key of k_buf"
    ragged_group_probs_rows(q, row_pointers(k_buf, starts), lengths, q_first, group, capacity, k_buf.dtype,
                            k_buf.stride(0), lse, row_pointers(score[:, None], starts), scale)
    return score
