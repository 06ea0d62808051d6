"""The per-layer KV-cache interface, and the full (uncompressed) cache.

The caller owns one cache object per layer and passes the list to the model; the model keeps no cache state.
Attention lives in the cache because a compressed cache attends over a different set of keys per head:
the model hands each layer's cache the new rotated queries, keys and values and gets the attention output back.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .attention import causal_attention, grouped_decode_attention


class KVCache(Protocol):
    length: int  # tokens seen so far (prompt + generated), not necessarily tokens kept
    n_kv_heads: int

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append k, v for T new tokens and attend q to everything the cache keeps.

        q: (n_heads, T, head_dim); k, v: (n_kv_heads, T, head_dim), rotary already applied.
        T > 1 is a prefill (causal among the new tokens); T == 1 is one decode step.
        Returns (n_heads, T, head_dim).
        """

    def nbytes(self) -> int:
        """Bytes held by this cache's tensors (their storage, not the tokens they represent)."""

    def kept_tokens(self) -> int:
        """Tokens held, summed over the layer's KV heads (length x n_kv_heads for a full cache)."""


def storage_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the distinct storages behind the given tensors."""
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def full_kv_bytes(n_layers: int, n_kv_heads: int, head_dim: int, length: int, dtype: torch.dtype) -> int:
    """Bytes a full K+V cache of `length` tokens takes."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * n_layers * n_kv_heads * length * head_dim * itemsize


class FullCache:
    """Every token of every head: preallocated (n_kv_heads, max_len, head_dim) K and V, written by index."""

    def __init__(self, n_kv_heads: int, head_dim: int, max_len: int, device: torch.device, dtype: torch.dtype):
        self.k = torch.empty(n_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.max_len, self.n_kv_heads = max_len, n_kv_heads
        self.length = 0

    def attend(self, q, k, v):
        T, start = k.shape[1], self.length
        assert start + T <= self.max_len, f"cache full: {start} + {T} > {self.max_len}"
        self.k[:, start : start + T] = k
        self.v[:, start : start + T] = v
        self.length = end = start + T
        keys, values = self.k[:, :end], self.v[:, :end]
        scale = q.shape[-1] ** -0.5
        if T == 1:
            return grouped_decode_attention(q, keys, values, scale)
        return causal_attention(q, keys, values, start)

    def nbytes(self) -> int:
        return storage_bytes(self.k, self.v)

    def kept_tokens(self) -> int:
        return self.length * self.n_kv_heads


def kept_fraction(caches: list[KVCache]) -> float:
    """Tokens held over tokens a full cache would hold, across layers and KV heads."""
    return sum(c.kept_tokens() for c in caches) / sum(c.length * c.n_kv_heads for c in caches)
