"""Next-token choice: greedy at temperature 0, otherwise temperature, top-k and top-p with seeded generators.

Every row of a batch is sampled at once and nothing is read back: top-k and top-p are masks, and the draw is an
exponential race, argmax(p / E) with E ~ Exponential(1) drawn per token, which picks token i with probability p_i
(torch.multinomial would read its input back to validate it: two host syncs per draw on CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int | None = None


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | list[torch.Generator | None] | None = None) -> torch.Tensor:
    """logits: (B, vocab), or (vocab,) for one row -> the chosen ids, (B,) or (1,) long on the same device, with no
    host sync. `generator`: one for every row, or a list with each row's own (a sequence of a batch then draws what
    it draws alone: one small op per row)."""
    logits = logits.view(-1, logits.shape[-1])  # (B, vocab)
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # Shifted so each row's largest logit is 0 before dividing: a tiny temperature then gives -inf to the others
    # (greedy), never inf - inf = nan.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1): each row's k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first token always stays).
        drop_sorted = probs.cumsum(dim=-1) - probs >= params.top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    uniform = torch.empty_like(probs)
    if isinstance(generator, list):
        for row, g in zip(uniform, generator, strict=True):
            row.uniform_(generator=g)
    else:
        uniform.uniform_(generator=generator)
    # E = -log U in (0, inf] (U in [0, 1)): never 0, so a masked token (p = 0) scores 0 and never wins
    return (probs / uniform.log_().neg_()).argmax(dim=-1)
