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

    def project(self, x, cos, sin, B: int = 1):
        """x: (B*T, dim) -> q (B, n_heads, T, head_dim), k and v (B, n_kv_heads, T, head_dim), q and k rotated."""
        nq, nkv = self.n_heads, self.n_kv_heads
        N = x.shape[0]
        qkv = self.wqkv(x).view(N, nq + 2 * nkv, self.head_dim)  # rows: q heads, k heads, v heads
        qk = apply_rope(qkv[:, : nq + nkv], cos[:, None], sin[:, None])  # q and k rotated together
        q = qk[:, :nq].view(B, N // B, nq, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = qk[:, nq:].view(B, N // B, nkv, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = qkv[:, nq + nkv :].view(B, N // B, nkv, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        return q, k, v

    def output(self, out):
        """out: (B, n_heads, T, head_dim) -> (B*T, dim)."""
        B, _, T, _ = out.shape
        return self.wo(out.transpose(1, 2).reshape(B * T, self.n_heads * self.head_dim))

    def forward(self, x, cos, sin, caches: list[KVCache]):
        """x: (B*T, dim) rows of B sequences with T tokens each; caches: this layer's cache of each sequence, each
        attending over what it keeps (its length, its policies)."""
        B = len(caches)
        q, k, v = self.project(x, cos, sin, B)
        outs = [cache.attend(q[b], k[b], v[b]) for b, cache in enumerate(caches)]  # each (n_heads, T, head_dim)
        out = outs[0][None] if B == 1 else torch.stack(outs)  # (B, n_heads, T, head_dim)
        return self.output(out)


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

    def forward(self, x, cos, sin, caches):
        x = x + self.attn(self.attn_norm(x), cos, sin, caches)
        return x + self.ffn(self.ffn_norm(x))


class Llama(nn.Module):
    """Llama decoder. `forward(tokens, caches, start_pos)` returns logits, for one sequence or a batch of them."""

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

    def forward(self, tokens: torch.Tensor, caches: list, start_pos, last_only: bool = False, on_layer=None):
        """One sequence: tokens (T,) at positions start_pos..start_pos+T-1, caches one per layer
        -> logits (T, vocab) float32 ((1, vocab) if last_only).
        A batch: tokens (B, T), caches[b] sequence b's per-layer list, start_pos[b] its first position (sequences at
        different positions) -> logits (B, T, vocab) ((B, 1, vocab) if last_only). Decode steps of caches in the
        paged pool go through the batch's step instead (tinygen/step.py).
        on_layer(i), if given, is called after layer i (progress of a long prefill)."""
        batched = tokens.dim() == 2
        if not batched:  # one sequence is a batch of one
            tokens, caches, start_pos = tokens[None], [caches], [start_pos]
        B, T = tokens.shape
        assert len(caches) == B and all(len(c) == self.cfg.n_layers for c in caches), "one cache per layer"
        assert max(start_pos) + T <= self.cfg.max_seq_len, f"position {max(start_pos) + T} beyond context {self.cfg.max_seq_len}"
        if B == 1:  # a view of the tables: no copy on the batch-1 decode step
            cos, sin = self.rope_cos[start_pos[0] : start_pos[0] + T], self.rope_sin[start_pos[0] : start_pos[0] + T]
        else:  # (B*T, head_dim), each sequence's positions
            cos = torch.cat([self.rope_cos[s : s + T] for s in start_pos])
            sin = torch.cat([self.rope_sin[s : s + T] for s in start_pos])
        x = self.embed(tokens.flatten())  # (B*T, dim): the linear layers see every sequence's rows at once
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, [c[i] for c in caches])
            if on_layer is not None:
                on_layer(i)
        x = x.view(B, T, -1)
        if last_only:
            x = x[:, -1:]
        logits = self.head(x)  # (B, T, vocab)
        return logits if batched else logits[0]

    def head(self, x):
        """Final norm and LM head: x (..., dim) -> logits (..., vocab) float32."""
        x = self.norm(x)
        if self.lm_head is None:  # tied to the embedding
            return (x @ self.embed.weight.t()).float()
        return self.lm_head(x).float()  # an nn.Linear, or a quantized layer (tinygen/quant.py)
