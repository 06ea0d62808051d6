"""Attention in plain PyTorch: a dense reference that returns probabilities, a grouped decode step over contiguous
buffers (the eval's baselines), block-wise causal attention for prefills and chunks; and which path each device
takes (`attention_paths`). The paged decode step's attention is in step.py."""
from __future__ import annotations

import torch

from .kernels import triton_available


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype attention math runs in: float32 on the CPU, where bfloat16/float16 batched matmuls are several
    times slower than casting (measured here: 4-8x on an AVX2 EPYC); the stored dtype on GPUs."""
    return torch.float32 if t.device.type == "cpu" else t.dtype


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
    """Reference attention that also returns the probabilities (profiling and tests need them).

    q: (n_heads, T, head_dim), k/v: (n_kv_heads, L, head_dim), mask: (T, L) or (n_heads, T, L) bool, True = visible.
    Returns out (n_heads, T, head_dim) and probs (n_heads, T, L) in float32.
    """
    groups = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(groups, dim=0).float()
    v = v.repeat_interleave(groups, dim=0).float()
    scores = q.float() @ k.transpose(1, 2) * q.shape[-1] ** -0.5  # (n_heads, T, L)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ v).to(q.dtype), probs


def grouped_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per head against all keys, GQA without repeating K/V.

    q: (n_kv_heads * groups, 1, head_dim), k/v: (n_kv_heads, L, head_dim) -> (n_kv_heads * groups, 1, head_dim).
    """
    n_kv_heads, _, head_dim = k.shape
    dt = compute_dtype(k)
    qg = q.reshape(n_kv_heads, -1, head_dim).to(dt)  # (n_kv_heads, groups, head_dim)
    scores = (qg * scale) @ k.to(dt).transpose(1, 2)  # (n_kv_heads, groups, L)
    probs = torch.softmax(scores.float(), dim=-1).to(dt)
    return (probs @ v.to(dt)).to(q.dtype).view(q.shape)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int = 0, on_block=None,
                     max_block_bytes: int = 64 << 20, max_block_rows: int = 128) -> torch.Tensor:
    """Causal attention for T new tokens at positions start..start+T-1, one block of query rows at a time.

    q: (n_heads, T, head_dim), k/v: (n_kv_heads, start+T, head_dim) -> (n_heads, T, head_dim). GQA without
    repeating K/V; scores and softmax in float32. Never holds more than one block of probabilities; small blocks
    also skip most of the causal upper triangle (a block sees only keys up to its last row).
    on_block(probs, row0): called with each block's probabilities, (n_kv_heads, groups, B, keys) float32.
    """
    n_heads, T, head_dim = q.shape
    n_kv_heads, L, _ = k.shape
    groups = n_heads // n_kv_heads
    block = max(16, min(max_block_rows, max_block_bytes // (4 * n_heads * L)))
    kt = k.float().transpose(1, 2)  # (n_kv_heads, head_dim, L)
    dt = compute_dtype(v)
    vc = v.to(dt)
    qg = q.reshape(n_kv_heads, groups, T, head_dim)
    future = torch.ones(block, block, dtype=torch.bool, device=q.device).triu_(diagonal=1)
    out = torch.empty(n_heads, T, head_dim, dtype=q.dtype, device=q.device)
    for r0 in range(0, T, block):
        r1 = min(T, r0 + block)
        B, end = r1 - r0, start + r1  # keys beyond `end` are all in the future of this block
        qb = qg[:, :, r0:r1].float().reshape(n_kv_heads, groups * B, head_dim) * head_dim**-0.5
        scores = (qb @ kt[:, :, :end]).view(n_kv_heads, groups, B, end)
        scores[..., start + r0 : end].masked_fill_(future[:B, :B], float("-inf"))  # only the block's own keys
        probs = torch.softmax(scores, dim=-1)
        ob = probs.to(dt).view(n_kv_heads, groups * B, end) @ vc[:, :end]  # (n_kv_heads, groups*B, head_dim)
        out[:, r0:r1] = ob.view(n_heads, B, head_dim)
        if on_block is not None:
            on_block(probs, r0)
    return out


def attention_paths(device: torch.device) -> tuple[str, str]:
    """(prefill, decode) attention paths for a cache on `device`: the one place where the device decides.

    CUDA: torch SDPA for prefill (flash / memory-efficient kernels) and, where triton is installed, the Triton
    paged decode kernel (tinygen/kernels/paged_attention.py). CPU: block-wise float32 prefill and the batched
    PyTorch decode step through the block tables (paged.py)."""
    if torch.device(device).type == "cuda":
        return "sdpa", "triton" if triton_available() else "torch"
    return "blocks", "torch"
