"""Perplexity over non-overlapping windows, each scored on its own from an empty cache."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import TinygenError
from .model import Llama


@torch.inference_mode()
def window_nll(model: Llama, window: list[int], caches, on_tokens=None, prefill_len: int | None = None):
    """Summed negative log-likelihood of window[1:] given what precedes each token, and how many were scored.

    With `prefill_len`, the first prefill_len tokens go through one prefill and the rest one decode step at a time,
    so a compressed cache is scored on what it keeps (its evictions happen during decode)."""
    tokens = torch.tensor(window, dtype=torch.long, device=model.embed.weight.device)
    n = len(window) - 1
    split = n if prefill_len is None else max(1, min(prefill_len, n))
    if on_tokens:
        on_tokens(window[:split])
    logits = [model(tokens[:split], caches, start_pos=0)]  # (split, vocab)
    for pos in range(split, n):
        if on_tokens:
            on_tokens(window[pos : pos + 1])
        logits.append(model(tokens[pos : pos + 1], caches, start_pos=pos))
    nll = F.cross_entropy(torch.cat(logits), tokens[1:], reduction="sum")
    return float(nll), n


def perplexity(model: Llama, ids: list[int], ctx: int, make_caches: Callable, prefill_fraction: float | None = None):
    """exp(mean NLL) over windows ids[0:ctx], ids[ctx:2ctx], ...; a final window shorter than 2 tokens is dropped.

    make_caches(n) -> (caches, on_tokens). prefill_fraction: score the window's tail token by token after a
    prefill of this share of it (None: the whole window in one forward)."""
    if ctx < 2:
        raise TinygenError(f"--ctx must be at least 2, got {ctx}")
    if ctx > model.cfg.max_seq_len:
        raise TinygenError(f"--ctx {ctx} exceeds the model's context of {model.cfg.max_seq_len}")
    total, count = 0.0, 0
    for start in range(0, len(ids), ctx):
        window = ids[start : start + ctx]
        if len(window) < 2:
            break
        caches, on_tokens = make_caches(len(window))
        split = None if prefill_fraction is None else int(len(window) * prefill_fraction)
        nll, n = window_nll(model, window, caches, on_tokens, split)
        total, count = total + nll, count + n
    if count == 0:
        raise TinygenError("the text is too short to score (needs at least 2 tokens)")
    return math.exp(total / count), count
