"""One prompt through the full cache (the reference) and through a compressed cache, teacher-forced and free."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import full_kv_bytes, kept_fraction
from ..generate import decode_step, full_caches, prefill
from .methods import Method, build_caches, policy_names
from .metrics import first_departure, mean, step_metrics


@dataclass
class Reference:
    """The full cache's greedy continuation of one prompt. targets: the generated tokens, plus the EOS that ended it
    (if one did), so a compressed cache is also scored on stopping; logprobs: (len(targets), vocab) float32, the full
    cache's next-token log-distribution before each target."""
    prompt_ids: list[int]
    targets: list[int]
    logprobs: torch.Tensor
    stop: str  # "eos" or "length"
    kv_bytes: int  # physical bytes of the full cache (preallocated to prompt + max_new_tokens)


@torch.inference_mode()
def reference_run(model, prompt_ids: list[int], max_new_tokens: int, eos_ids) -> Reference:
    """Greedy decoding with the full cache, keeping each step's log-distribution."""
    caches = full_caches(model, len(prompt_ids) + max_new_tokens)
    logits = prefill(model, prompt_ids, caches)
    targets, rows, stop = [], [], "length"
    device = model.embed.weight.device
    while True:
        rows.append(torch.log_softmax(logits.float(), -1))
        token = int(logits.argmax())
        targets.append(token)
        if token in eos_ids:
            stop = "eos"
            break
        if len(targets) >= max_new_tokens:
            break
        pos = len(prompt_ids) + len(targets) - 1
        logits = decode_step(model, torch.tensor([token], device=device), caches, pos)
    return Reference(prompt_ids, targets, torch.stack(rows), stop, sum(c.nbytes() for c in caches))


@torch.inference_mode()
def teacher_forced(model, prompt_ids: list[int], targets: list[int], caches, on_tokens=None) -> torch.Tensor:
    """Feed the prompt, then targets[:-1] one by one (whatever the cache would have chosen); returns the
    (len(targets), vocab) log-distributions predicting each target."""
    device = model.embed.weight.device
    if on_tokens:
        on_tokens(prompt_ids)
    logits = prefill(model, prompt_ids, caches)
    rows = [torch.log_softmax(logits.float(), -1)]
    for i, token in enumerate(targets[:-1]):
        if on_tokens:
            on_tokens([token])
        logits = decode_step(model, torch.tensor([token], device=device), caches, len(prompt_ids) + i)
        rows.append(torch.log_softmax(logits.float(), -1))
    return torch.stack(rows)


@torch.inference_mode()
def free_run(model, prompt_ids: list[int], caches, on_tokens, max_new_tokens: int, eos_ids) -> list[int]:
    """Greedy decoding with the compressed cache; the stopping EOS is kept, as in Reference.targets."""
    device = model.embed.weight.device
    if on_tokens:
        on_tokens(prompt_ids)
    logits = prefill(model, prompt_ids, caches)
    out = []
    while True:
        out.append(int(logits.argmax()))
        if out[-1] in eos_ids or len(out) >= max_new_tokens:
            return out
        if on_tokens:
            on_tokens(out[-1:])
        logits = decode_step(model, torch.tensor(out[-1:], device=device), caches, len(prompt_ids) + len(out) - 1)


def evaluate(model, tok, ref: Reference, method: Method, run_free: bool = False, max_new_tokens: int = 0) -> dict:
    """Per-prompt record of one method against the reference: step metrics, their means, first departure of the free
    run, and what the cache keeps at the end of the teacher-forced run."""
    prompt, targets = ref.prompt_ids, ref.targets
    max_len = len(prompt) + len(targets)
    caches, on_tokens = build_caches(model, tok, method, max_len)
    logprobs = teacher_forced(model, prompt, targets, caches, on_tokens)
    steps = step_metrics(ref.logprobs, logprobs, targets)
    # Until its first disagreement the free greedy run sees exactly the teacher-forced history, so (with the same
    # kernels on the same inputs) its first departure is the first step whose top-1 differs from the target.
    departure = next((i for i, a in enumerate(steps["agree"]) if not a), None)
    record = {
        "method": method.to_json(), "prompt_tokens": len(prompt), "steps": len(targets), "stop": ref.stop,
        "agreement": mean(steps["agree"]), "kl": mean(steps["kl"]), "ll_full": mean(steps["ll_full"]),
        "ll": mean(steps["ll"]), "first_departure": departure, "departure_from": "teacher_forced",
        "kept_fraction": kept_fraction(caches), "kv_bytes": sum(c.nbytes() for c in caches),
        "kv_bytes_full": ref.kv_bytes, "length": caches[0].length,
        "kv_bytes_full_kept": full_kv_bytes(model.cfg.n_layers, model.cfg.n_kv_heads, model.cfg.head_dim,
                                            caches[0].length, model.embed.weight.dtype),
        "policies": policy_names(caches),
        "per_step": {k: [round(x, 6) for x in v] for k, v in steps.items()},
    }
    if run_free:
        caches, on_tokens = build_caches(model, tok, method, max_len)
        tokens = free_run(model, prompt, caches, on_tokens, len(targets), tok.eos_ids)
        record["first_departure"] = first_departure(targets, tokens)
        record["departure_from"] = "free_run"
    return record
