"""Perplexity over non-overlapping windows, each scored on its own from an empty cache."""
from __future__ import annotations

import math
from typing import Callable

import torch

from .cache import KVCache
from .errors import TinygenError
from .model import Llama


@torch.inference_mode()
def window_nll(model: Llama, window: list[int], caches: list[KVCache]) -> tuple[float, int]:
    """Summed negative log-likelihood of window[1:] given what precedes each token, and how many were scored."""
    tokens = torch.tensor(window, dtype=torch.long, device=model.embed.weight.device)
    logits = model(tokens[:-1], caches, start_pos=0)  # (N-1, vocab)
    nll = torch.nn.functional.cross_entropy(logits, tokens[1:], reduction="sum")
    return float(nll), len(window) - 1


def perplexity(model: Llama, ids: list[int], ctx: int, make_caches: Callable[[int], list[KVCache]],
               score_window: Callable = window_nll) -> tuple[float, int]:
    """exp(mean NLL) over windows ids[0:ctx], ids[ctx:2ctx], ...; a final window shorter than 2 tokens is dropped."""
    if ctx < 2:
        raise TinygenError(f"--ctx must be at least 2, got {ctx}")
    if ctx > model.cfg.max_seq_len:
        raise TinygenError(f"--ctx {ctx} exceeds the model's context of {model.cfg.max_seq_len}")
    total, count = 0.0, 0
    for start in range(0, len(ids), ctx):
        window = ids[start : start + ctx]
        if len(window) < 2:
            break
        nll, n = score_window(model, window, make_caches(len(window)))
        total, count = total + nll, count + n
    if count == 0:
        raise TinygenError("the text is too short to score (needs at least 2 tokens)")
    return math.exp(total / count), count
