"""The per-layer KV-cache interface, and the full (uncompressed) cache.

The caller owns one cache object per layer and passes the list to the model; the model keeps no cache state.
Attention lives in the cache because a compressed cache attends over a different set of keys per head:
the model hands each layer's cache the new rotated queries, keys and values and gets the attention output back.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from .attention import causal_attention, compute_dtype, grouped_decode_attention
from .kernels import triton_available


class KVCache(Protocol):
    length: int  # tokens seen so far (prompt + generated), not necessarily tokens kept
    n_kv_heads: int

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append k, v for T new tokens and attend q to everything the cache keeps.

        q: (n_heads, T, head_dim); k, v: (n_kv_heads, T, head_dim), rotary already applied.
        T > 1 is a prefill (causal among the new tokens), or, once the cache holds tokens, a chunk after them (a
        chat's next turn); T == 1 is one decode step.
        Returns (n_heads, T, head_dim).
        """

    def nbytes(self) -> int:
        """Bytes held by this cache's tensors (their storage, not the tokens they represent)."""

    def kept_tokens(self) -> int:
        """Tokens held, summed over the layer's KV heads (length x n_kv_heads for a full cache)."""


class BatchKVCache(Protocol):
    """One layer's rows of a batch of sequences that attend as one (the paged decode step, tinygen/paged.py).
    The model takes one per layer in place of a list of per-sequence caches."""

    def __len__(self) -> int:
        """Sequences in the batch."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """KVCache.attend with the batch as the leading dimension: q (B, n_heads, T, head_dim), k, v
        (B, n_kv_heads, T, head_dim) -> (B, n_heads, T, head_dim)."""


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
    """Bytes a full K+V cache of `length` tokens takes: the "full" every report compares against."""
    return 2 * n_layers * n_kv_heads * length * head_dim * dtype.itemsize


def kept_kv_bytes(caches: list[KVCache], head_dim: int, dtype: torch.dtype) -> int:
    """K+V bytes of the tokens the caches keep (kept_tokens over all layers), without spare rows or a store's
    positions and scores: what the kept tokens take, to set beside the bytes allocated (nbytes) and full_kv_bytes."""
    return 2 * sum(c.kept_tokens() for c in caches) * head_dim * dtype.itemsize


def attention_paths(device: torch.device) -> tuple[str, str]:
    """(prefill, decode) attention paths for a cache on `device`: the one place where the device decides.

    CUDA: torch SDPA for prefill (flash / memory-efficient kernels) and, where triton is installed, the Triton
    ragged decode kernel (tinygen/kernels/decode_attention.py). CPU: block-wise float32 prefill and the batched
    PyTorch decode step (attention.py)."""
    if torch.device(device).type == "cuda":
        return "sdpa", "triton" if triton_available() else "torch"
    return "blocks", "torch"


def sdpa_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention for T new tokens at positions start..start+T-1 through torch SDPA, GQA without repeating
    K/V. q: (n_heads, T, head_dim), k/v: (n_kv_heads, start+T, head_dim) -> (n_heads, T, head_dim)."""
    T, L = q.shape[1], k.shape[1]
    mask = None
    if start:  # queries see every earlier token and the new ones up to themselves (is_causal aligns top-left)
        mask = torch.arange(L, device=q.device) <= start + torch.arange(T, device=q.device)[:, None]  # (T, L)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=not start,
                                          enable_gqa=q.shape[0] != k.shape[0])[0]


def sdpa_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query token per head through torch SDPA (its fused CPU kernel: one op where the grouped PyTorch path runs
    seven), GQA without repeating K/V. q: (n_heads, 1, head_dim), k/v: (n_kv_heads, L, head_dim) in q's dtype
    -> (n_heads, 1, head_dim). The reference is grouped_decode_attention (attention.py)."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None], enable_gqa=q.shape[0] != k.shape[0])[0]


class FullCache:
    """Every token of every head: K and V (n_kv_heads, capacity, head_dim), written by index, grown in blocks.

    The first append allocates its tokens plus one growth block; an append that does not fit reallocates to what is
    then written plus one block, never beyond max_len (the hard limit). A block is max(16, rows // 16) rows
    (PolicyStore.block_rows' rule with a floor of 16): the buffers hold at most one block beyond the length, a large
    max_len costs nothing until it is used, and growing (a copy of the whole cache) happens at most once per 1/16 of
    the length. Decode steps write into spare rows, never concatenate.

    For the Triton decode kernel the full cache is the ragged case with equal lengths: row h of the flattened
    (n_kv_heads * capacity, head_dim) buffers starts at h * capacity and serves query heads h * groups onwards."""

    def __init__(self, n_kv_heads: int, head_dim: int, max_len: int, device: torch.device, dtype: torch.dtype,
                 paths: tuple[str, str] | None = None):
        self.k = torch.empty(n_kv_heads, 0, head_dim, device=device, dtype=dtype)  # (n_kv_heads, capacity, head_dim)
        self.v = torch.empty_like(self.k)
        self.max_len, self.n_kv_heads = max_len, n_kv_heads
        self.length = 0
        self.prefill_path, self.decode_path = paths or attention_paths(self.k.device)
        # SDPA where the cache holds the dtype attention computes in (2x faster here at 200 keys: 22 vs 43 us a
        # layer, float32); a bfloat16 cache on the CPU casts, then runs the grouped matmuls (SDPA there: 117 us)
        self.sdpa_decode = self.decode_path == "torch" and dtype == compute_dtype(self.k)
        self._tables = None  # (lengths, starts, q_first) int32 on the device, made at the first kernel decode

    @staticmethod
    def block_rows(rows: int) -> int:
        """Rows of spare room a growth leaves beyond `rows` written: at least 16, and 1/16 of the cache."""
        return max(16, rows // 16)

    def _grow(self, rows: int):
        """Reallocate K and V for `rows` tokens plus one block (at most max_len), copying the tokens written."""
        n_kv_heads, _, head_dim = self.k.shape
        capacity = min(self.max_len, rows + self.block_rows(rows))
        k = self.k.new_empty(n_kv_heads, capacity, head_dim)
        v = torch.empty_like(k)
        k[:, : self.length], v[:, : self.length] = self.k[:, : self.length], self.v[:, : self.length]
        # spare rows zero, not garbage: a step that attends over the whole buffers masked (compiled.py) weighs them
        # by 0, and 0 * NaN is NaN
        k[:, self.length :].zero_()
        v[:, self.length :].zero_()
        self.k, self.v = k, v
        self._tables = None  # the kernel's row starts (h * capacity) moved

    def reserve(self, end: int) -> None:
        """Make room for tokens up to `end` (grow if the buffers are shorter)."""
        assert end <= self.max_len, f"cache full: {self.length} + {end - self.length} > {self.max_len}"
        if end > self.k.shape[1]:
            self._grow(end)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write T new tokens' k, v (n_kv_heads, T, head_dim) by index, growing first if they do not fit;
        returns every cached key and value so far (views of the buffers)."""
        T, start = k.shape[1], self.length
        end = start + T
        self.reserve(end)
        self.k[:, start:end] = k
        self.v[:, start:end] = v
        self.length = end
        return self.k[:, :end], self.v[:, :end]

    def attend(self, q, k, v):
        T, start = k.shape[1], self.length
        keys, values = self.append(k, v)
        end = self.length
        scale = q.shape[-1] ** -0.5
        if T == 1:
            if self.decode_path == "triton":
                return self._decode_triton(q, end)
            if self.sdpa_decode:  # q comes in the cache's dtype (the model's)
                return sdpa_decode_attention(q, keys, values)
            return grouped_decode_attention(q, keys, values, scale)
        if self.prefill_path == "sdpa":
            return sdpa_causal_attention(q, keys, values, start)
        return causal_attention(q, keys, values, start)

    def _decode_triton(self, q: torch.Tensor, end: int) -> torch.Tensor:
        from .kernels.decode_attention import ragged_decode_attention

        n_heads, _, head_dim = q.shape
        capacity, groups = self.k.shape[1], n_heads // self.n_kv_heads
        if self._tables is None:  # made at the first kernel decode and after each growth
            rows = torch.arange(self.n_kv_heads, dtype=torch.int32, device=q.device)
            self._tables = (torch.empty_like(rows), rows * capacity, rows * groups)
        lengths, starts, q_first = self._tables
        lengths.fill_(end)  # a device write, no sync
        out, _ = ragged_decode_attention(q[:, 0], self.k.view(-1, head_dim), self.v.view(-1, head_dim), lengths,
                                         starts, q_first, groups, capacity)
        return out.view(n_heads, 1, head_dim)

    def nbytes(self) -> int:
        return storage_bytes(self.k, self.v)

    def kept_tokens(self) -> int:
        return self.length * self.n_kv_heads


def kept_fraction(caches: list[KVCache]) -> float:
    """Tokens held over tokens a full cache would hold, across layers and KV heads."""
    return sum(c.kept_tokens() for c in caches) / sum(c.length * c.n_kv_heads for c in caches)
