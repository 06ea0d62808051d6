"""A Llama decoder in plain PyTorch. Holds weights only: per-layer KV caches are owned and passed in by the caller."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import KVCache
from .config import ModelConfig
from .rope import apply_rope, rope_tables


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused kernel
        # Normalise in float32, as HF does, then scale in the model dtype.
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # q, k and v projections fused into one matrix: rows [q | k | v].
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache: KVCache):
        T, nq, nkv = x.shape[0], self.n_heads, self.n_kv_heads
        qkv = self.wqkv(x).view(T, nq + 2 * nkv, self.head_dim)  # rows: q heads, k heads, v heads
        qk = apply_rope(qkv[:, : nq + nkv], cos[:, None], sin[:, None])  # q and k rotated together
        q = qk[:, :nq].transpose(0, 1)  # (n_heads, T, head_dim)
        k = qk[:, nq:].transpose(0, 1)  # (n_kv_heads, T, head_dim)
        v = qkv[:, nq + nkv :].transpose(0, 1)  # (n_kv_heads, T, head_dim)
        out = cache.attend(q, k, v)  # (n_heads, T, head_dim)
        return self.wo(out.transpose(0, 1).reshape(T, nq * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # gate and up projections fused: rows [gate | up].
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x, cos, sin, cache):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.ffn(self.ffn_norm(x))


class Llama(nn.Module):
    """Llama decoder for one sequence (batch 1). `forward(tokens, caches, start_pos)` returns logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rope_cos: torch.Tensor | None = None  # (max_seq_len, head_dim), set by init_rope
        self.rope_sin: torch.Tensor | None = None

    def init_rope(self):
        """Build the rotary tables on the weights' device and dtype (call after the weights are in place)."""
        w = self.embed.weight
        cos, sin = rope_tables(self.cfg, w.device)
        self.rope_cos, self.rope_sin = cos.to(w.dtype), sin.to(w.dtype)

    def forward(self, tokens: torch.Tensor, caches: list[KVCache], start_pos: int, last_only: bool = False,
                on_layer=None):
        """tokens: (T,) ids at positions start_pos..start_pos+T-1 -> logits (T, vocab) float32 ((1, vocab) if last_only).
        on_layer(i), if given, is called after layer i (progress of a long prefill)."""
        T = tokens.shape[0]
        assert len(caches) == self.cfg.n_layers, "one cache per layer"
        assert start_pos + T <= self.cfg.max_seq_len, f"position {start_pos + T} beyond context {self.cfg.max_seq_len}"
        cos = self.rope_cos[start_pos : start_pos + T]
        sin = self.rope_sin[start_pos : start_pos + T]
        x = self.embed(tokens)  # (T, dim)
        for i, (layer, cache) in enumerate(zip(self.layers, caches)):
            x = layer(x, cos, sin, cache)
            if on_layer is not None:
                on_layer(i)
        if last_only:
            x = x[-1:]
        x = self.norm(x)
        if self.lm_head is None:  # tied to the embedding
            return (x @ self.embed.weight.t()).float()  # (T, vocab)
        return self.lm_head(x).float()  # an nn.Linear, or a quantized layer (tinygen/quant.py)
