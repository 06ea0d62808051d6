"""Per-step fidelity of a compressed cache against the full one, and summaries over steps and prompts."""
from __future__ import annotations

import statistics

import torch


def step_metrics(ref_logprobs: torch.Tensor, logprobs: torch.Tensor, targets: list[int]) -> dict[str, list]:
    """ref_logprobs, logprobs: (n, vocab) log-softmax of the full and the compressed cache's next-token distributions
    at the same n steps; targets: the reference tokens. Per step: top-1 agreement, KL(full || compressed) in nats,
    and the log-likelihood of the reference token under each."""
    ref, got = ref_logprobs.double(), logprobs.double()
    agree = (ref.argmax(-1) == got.argmax(-1)).tolist()
    # KL(p || q) = sum p (log p - log q); terms with p = 0 contribute nothing.
    p = ref.exp()
    kl = torch.where(p > 0, p * (ref - got), 0.0).sum(-1).clamp_min(0.0).tolist()
    idx = torch.tensor(targets, dtype=torch.long, device=ref.device)[:, None]
    return {"agree": [float(a) for a in agree], "kl": kl,
            "ll_full": ref.gather(1, idx)[:, 0].tolist(), "ll": got.gather(1, idx)[:, 0].tolist()}


def first_departure(reference: list[int], tokens: list[int]) -> int | None:
    """Index of the first token where `tokens` differs from `reference` (a length difference counts), or None."""
    for i, (a, b) in enumerate(zip(reference, tokens)):
        if a != b:
            return i
    return None if len(reference) == len(tokens) else min(len(reference), len(tokens))


def mean(xs) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def spread(xs) -> dict:
    xs = list(xs)
    return {"mean": mean(xs), "median": statistics.median(xs) if xs else float("nan")}


def summarize(records: list[dict]) -> dict:
    """Means and medians over prompts of the per-prompt means (each prompt weighs the same)."""
    deps = [r["first_departure"] for r in records]
    out = {"prompts": len(records), "steps": sum(r["steps"] for r in records)}
    for key in ("agreement", "kl", "ll_full", "ll", "kept_fraction", "kv_bytes", "kv_bytes_full"):
        out[key] = spread(r[key] for r in records)
    out["ll_drop"] = spread(r["ll_full"] - r["ll"] for r in records)
    out["never_departs"] = mean([d is None for d in deps])
    # a prompt that never departs counts as departing after its last step
    out["first_departure"] = spread(r["steps"] if d is None else d for r, d in zip(records, deps))
    return out
