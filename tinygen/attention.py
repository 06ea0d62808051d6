"""Attention kernels in plain PyTorch: a dense reference that returns probabilities, and the grouped decode step."""
from __future__ import annotations

import torch


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
    qg = q.view(n_kv_heads, -1, head_dim)  # (n_kv_heads, groups, head_dim)
    scores = (qg * scale) @ k.transpose(1, 2)  # (n_kv_heads, groups, L)
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.bmm(probs, v).view(q.shape)
