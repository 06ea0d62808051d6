"""What calibrate.py measures: a full cache that records every query row's attention (RecordingCache, record), and
what a kept set of prompt keys recovers of the generated rows' attention (kept_masks, actual_recovery)."""
from __future__ import annotations

import torch

from ..attention import dense_attention
from ..cache import storage_bytes


class RecordingCache:
    """A full cache for measuring (not for serving): K and V of every token in buffers of its own, sized for
    max_len, attended with the dense reference, which also keeps the group-averaged attention probabilities of
    every query row.

    prompt_attn: (n_kv_heads, L, L) float32, the prefill's rows; gen_rows: one (n_kv_heads, length) float32 per
    decode row (keys 0..its own position)."""

    def __init__(self, n_kv_heads: int, head_dim: int, max_len: int, device, dtype):
        self.k = torch.zeros(n_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.n_kv_heads, self.length = n_kv_heads, 0
        self.prompt_attn: torch.Tensor | None = None
        self.gen_rows: list[torch.Tensor] = []

    def attend(self, q, k, v):
        start, T = self.length, k.shape[1]
        end = self.length = start + T
        self.k[:, start:end], self.v[:, start:end] = k, v
        mask = torch.arange(end, device=q.device) <= start + torch.arange(T, device=q.device)[:, None]  # (T, end)
        out, probs = dense_attention(q, self.k[:, :end], self.v[:, :end], mask)
        group = probs.view(self.n_kv_heads, -1, T, end).mean(dim=1).cpu()  # (n_kv_heads, T, end): GQA group mean
        if start == 0:
            self.prompt_attn = group
        else:
            self.gen_rows += [group[:, t, : start + t + 1] for t in range(T)]
        return out

    def kept_tokens(self) -> int:
        return self.length * self.n_kv_heads

    def nbytes(self) -> int:
        return storage_bytes(self.k, self.v)

    def gen_attn(self) -> torch.Tensor:
        """(n_kv_heads, R, L + R) the generated rows, zero beyond each row's own position."""
        R = len(self.gen_rows)
        n = self.length
        out = torch.zeros(self.n_kv_heads, R, n)
        for r, row in enumerate(self.gen_rows):
            out[:, r, : row.shape[1]] = row
        return out


@torch.inference_mode()
def record(model, prompt_ids: list[int], max_new_tokens: int, eos_ids=frozenset()):
    """Greedy decoding through recording caches: (caches, generated tokens). Every generated token except an EOS is
    fed back, so up to max_new_tokens generated rows are recorded (the last token's row included)."""
    cfg, w = model.cfg, model.embed.weight
    caches = [RecordingCache(cfg.n_kv_heads, cfg.head_dim, len(prompt_ids) + max_new_tokens, w.device, w.dtype)
              for _ in range(cfg.n_layers)]
    logits = model(torch.tensor(prompt_ids, device=w.device), caches, 0, last_only=True)[0]
    out = []
    while len(out) < max_new_tokens:
        token = int(logits.argmax())
        out.append(token)
        if token in eos_ids:
            break
        logits = model(torch.tensor([token], device=w.device), caches, len(prompt_ids) + len(out) - 1)[0]
    return caches, out


def kept_masks(key: torch.Tensor, menu) -> torch.Tensor:
    """(heads, options, L) bool: what each option keeps of the prompt: its window (the last tokens), then its heavy
    hitters among the older tokens, best `key` first (ties: the earlier position), as option_recoveries counts."""
    heads, L = key.shape
    order = key.argsort(dim=1, descending=True, stable=True)  # (heads, L)
    out = torch.zeros(heads, len(menu), L, dtype=torch.bool)
    for i, o in enumerate(menu):
        kept = o.kept(L)
        if kept >= L:
            out[:, i] = True
            continue
        w = o.window(L)
        outside = order < L - w
        rank = outside.long().cumsum(dim=1)  # 1-based rank among the older tokens
        chosen = outside & (rank <= kept - w)
        mask = torch.zeros(heads, L, dtype=torch.bool)
        mask.scatter_(1, order, chosen)
        mask[:, L - w :] = True
        out[:, i] = mask
    return out


def actual_recovery(gen: torch.Tensor, L: int, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gen: (heads, R, N >= L) generated rows; keep: (heads, options, L) prompt keys kept.

    Returns (c, c'), each (heads, options): the mean over rows of the mass on kept prompt keys plus the mass on
    generated tokens (c), and of the kept prompt mass over the row's prompt mass (c')."""
    prompt = gen[:, :, :L].double()
    kept = torch.einsum("hrl,hol->hro", prompt, keep.double())  # (heads, R, options)
    pm = prompt.sum(-1, keepdim=True)  # (heads, R, 1)
    c = (kept + (1 - pm)).mean(1)
    cp = (kept / pm.clamp(min=1e-30)).mean(1)
    return c.float(), cp.float()
