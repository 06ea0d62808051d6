"""A StreamingLLM-style baseline cache: the first `sinks` tokens plus a recent window, in physically bounded storage.

Baseline only (the FastGen cache has no sinks, see notes/fastgen.md decision 7). The window is ceil(ratio * L) tokens
of the current length L, like FastGen's `local`, so budget matching can use one ratio knob for every fixed policy.
Storage is (n_kv_heads, sinks + ceil(ratio * max_len) + 1, head_dim): the window's evicted slot is reused by the next
token, so nothing grows or shifts during decode. Every head keeps the same tokens, so the slot bookkeeping is a
host-side deque (no device sync).
"""
from __future__ import annotations

import math
from collections import deque

import torch
import torch.nn.functional as F

from ..attention import grouped_decode_attention
from ..cache import storage_bytes


def sink_window_kept(length: int, sinks: int, ratio: float) -> int:
    """Tokens kept at `length`: the sinks plus a window of ceil(ratio * length) (at least the current token)."""
    return min(length, sinks + max(1, math.ceil(ratio * length)))


class SinkWindowCache:
    def __init__(self, n_kv_heads: int, head_dim: int, max_len: int, sinks: int, ratio: float,
                 device: torch.device, dtype: torch.dtype):
        assert sinks >= 0 and 0 <= ratio <= 1, "sinks >= 0 and ratio in [0, 1]"
        self.n_kv_heads, self.sinks, self.ratio, self.max_len = n_kv_heads, sinks, ratio, max_len
        cap = min(max_len, sink_window_kept(max_len, sinks, ratio) + 1)  # + the token that arrives before eviction
        self.k = torch.empty(n_kv_heads, cap, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.length = 0  # tokens seen
        self.used = 0  # slots [0, used) hold resident tokens (a freed slot is refilled at the next step)
        self.window: deque[int] = deque()  # slots of window tokens, oldest first
        self.free: int | None = None

    def attend(self, q, k, v):
        T = k.shape[1]
        if self.length == 0:
            return self._prefill(q, k, v)
        assert T == 1, "SinkWindowCache takes the prompt in one prefill, then one token per step"
        assert self.length < self.max_len, f"cache full: {self.length + 1} > {self.max_len}"
        self.length += 1
        slot = self.free if self.free is not None else self.used
        self.used = max(self.used, slot + 1)
        self.k[:, slot : slot + 1], self.v[:, slot : slot + 1] = k, v
        self.window.append(slot)
        out = grouped_decode_attention(q, self.k[:, : self.used], self.v[:, : self.used], q.shape[-1] ** -0.5)
        # Attend first, then evict: the window grows by ratio per token, so at most one token leaves per step.
        self.free = None
        if self.kept() > sink_window_kept(self.length, self.sinks, self.ratio):
            self.free = self.window.popleft()
        return out

    def _prefill(self, q, k, v):
        L = k.shape[1]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        keep = sink_window_kept(L, self.sinks, self.ratio)
        s = min(self.sinks, keep)
        w = keep - s  # the last w prompt tokens
        self.k[:, :s], self.v[:, :s] = k[:, :s], v[:, :s]
        self.k[:, s:keep], self.v[:, s:keep] = k[:, L - w :], v[:, L - w :]
        self.window.extend(range(s, keep))
        self.length, self.used, self.free = L, keep, None
        return out

    def kept(self) -> int:
        return self.used - (self.free is not None)

    def kept_tokens(self) -> int:
        """Tokens held, summed over KV heads."""
        return self.kept() * self.n_kv_heads

    def nbytes(self) -> int:
        return storage_bytes(self.k, self.v)


def sink_window_caches(model, max_len: int, sinks: int, ratio: float) -> list[SinkWindowCache]:
    """One sink+window cache per layer of `model`."""
    c, w = model.cfg, model.embed.weight
    return [SinkWindowCache(c.n_kv_heads, c.head_dim, max_len, sinks, ratio, w.device, w.dtype)
            for _ in range(c.n_layers)]
