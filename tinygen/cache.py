"""The per-layer KV-cache interface, and the full (uncompressed) cache.

The caller owns one cache object per layer and passes the list to the model; the model keeps no cache state.
Attention lives in the cache because a compressed cache attends over a different set of keys per head:
the model hands each layer's cache the new rotated queries, keys and values and gets the attention output back.

Every cache is a PagedCache (paged.py): its tokens live in a pool of fixed-size blocks that all the sequences of a
batch share, one row per (layer, KV head) with its own block table; a sequence on its own is a batch of one.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from .attention import attention_paths, causal_attention
from .fastgen.policy import FULL
from .paged import PagedCache


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


def sdpa_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention for T new tokens at positions start..start+T-1 through torch SDPA, GQA without repeating
    K/V. q: (n_heads, T, head_dim), k/v: (n_kv_heads, start+T, head_dim) -> (n_heads, T, head_dim)."""
    T, L = q.shape[1], k.shape[1]
    mask = None
    if start:  # queries see every earlier token and the new ones up to themselves (is_causal aligns top-left)
        mask = torch.arange(L, device=q.device) <= start + torch.arange(T, device=q.device)[:, None]  # (T, L)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=not start,
                                          enable_gqa=q.shape[0] != k.shape[0])[0]


class FullRows(PagedCache):
    """The full cache of one layer: every token of every KV head, in the sequence's rows of the pool (one row group
    that never evicts; tinygen/paged.py). The prompt's K/V go straight into the rows; a later chunk (a chat's next
    turn) is written after them and attends over the rows read back through the block tables; a decode step is the
    batch's (one attention call for every running row)."""

    policy, protect, hole, kinds, cfg = FULL, 0, False, None, None

    def __init__(self, paged, slot: int, layer: int, n_kv_heads: int):
        super().__init__(paged, slot, layer, n_kv_heads)
        self.kv_heads, self.stores, self.kept = list(range(n_kv_heads)), [self], 0
        self.pool.set_rows(self.rows(), 0, False, FULL, (0.0, 0.0))
        self.prefill_path = attention_paths(self.pool.k.device)[0]

    def _budget(self, length: int) -> int:
        return length

    def prefill(self, q, k, v):
        """The prompt, T tokens: causal attention over k, v themselves, which then fill the rows.
        q: (n_heads, T, head_dim), k/v: (n_kv_heads, T, head_dim) -> (n_heads, T, head_dim)."""
        self._write(k, v)
        return self._causal(q, k, v, 0)

    def extend(self, q, k, v):
        """T tokens after the `length` the rows hold: written after them, then attending over all of them."""
        start = self.length
        self._write(k, v)
        keys, values, _ = self.pool.gather(torch.tensor(self.rows(), device=k.device), self.length)
        return self._causal(q, keys[:, : self.length], values[:, : self.length], start)

    def _causal(self, q, k, v, start: int):
        if self.prefill_path == "sdpa":
            return sdpa_causal_attention(q, k, v, start)
        return causal_attention(q, k, v, start)

    def _write(self, k, v):
        """k, v (n_kv_heads, T, head_dim) into logical slots (= positions) length .. length + T - 1."""
        H, T = k.shape[:2]
        rows, start = self.rows(), self.length
        self.pool.reserve(rows, start + T)
        idx = torch.tensor(rows, device=k.device)
        pos = torch.arange(start, start + T, device=k.device).expand(H, T)
        self.pool.write(idx, pos, k, v, pos, torch.zeros(H, T, dtype=torch.bool, device=k.device))
        self.pool.mark(idx, pos)
        self.length = self.kept = start + T
        self.pool.set_rows(rows, self.kept)


def kept_fraction(caches: list[KVCache]) -> float:
    """Tokens held over tokens a full cache would hold, across layers and KV heads."""
    return sum(c.kept_tokens() for c in caches) / sum(c.length * c.n_kv_heads for c in caches)


def cache_figures(caches: list[KVCache], cfg, dtype: torch.dtype) -> dict:
    """What a sequence's caches hold, as the stats lines and files report it: kv_bytes, the pool blocks their rows
    hold; kv_bytes_kept, K+V of the tokens kept; kv_bytes_full, a full cache of the tokens seen; kept_fraction
    (1.0 before any token)."""
    seen = caches[0].length  # tokens the caches have seen (an answer's last token is not fed back)
    return {"kept_fraction": round(kept_fraction(caches), 6) if seen else 1.0,
            "kv_bytes": sum(c.nbytes() for c in caches),
            "kv_bytes_kept": kept_kv_bytes(caches, cfg.head_dim, dtype),
            "kv_bytes_full": full_kv_bytes(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, seen, dtype)}
