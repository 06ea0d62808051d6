"""Where does `auto` lose fidelity? Layer by layer: swap one layer's FastGen cache for a full cache (the rest stay
compressed) and measure how much of the KL and agreement gap that one layer closes.

Caches are per layer, so the swap needs no change to the FastGen code. Later layers see a slightly different input
once a layer is repaired, so their profiling may differ a little from the all-compressed run: a repair's gain is
what that layer costs in context, not an exact decomposition (gains need not add up to the whole gap)."""
from __future__ import annotations

from collections import Counter

from ..generate import full_caches
from .methods import Method, build_caches, policy_names
from .metrics import mean, step_metrics
from .runner import Reference, teacher_forced


def _score(model, tok, ref: Reference, method: Method, full_layer: int | None):
    max_len = len(ref.prompt_ids) + len(ref.targets)
    caches, on_tokens = build_caches(model, tok, method, max_len)
    if full_layer is not None:
        caches[full_layer] = full_caches(model, max_len)[0]
    lp = teacher_forced(model, ref.prompt_ids, ref.targets, caches, on_tokens)
    m = step_metrics(ref.logprobs, lp, ref.targets)
    return mean(m["kl"]), mean(m["agree"]), caches


def layer_repair(model, tok, ref: Reference, method: Method) -> dict:
    """The all-compressed run's KL and agreement, and per layer the same with that layer's cache full."""
    kl, agree, caches = _score(model, tok, ref, method, None)
    policies = policy_names(caches)
    layers = []
    for layer in range(model.cfg.n_layers):
        lkl, lagree, _ = _score(model, tok, ref, method, layer)
        layers.append({"layer": layer, "policies": policies[layer], "kl": lkl, "agreement": lagree,
                       "kl_gain": kl - lkl, "agreement_gain": lagree - agree})
    return {"kl": kl, "agreement": agree, "layers": layers}


def repair_table(results: list[dict], top: int = 10) -> str:
    """Markdown: the layers whose repair helps most on average, with the policies their heads took."""
    n_layers = len(results[0]["layers"])
    rows = []
    for layer in range(n_layers):
        per = [r["layers"][layer] for r in results]
        mix = Counter(p for x in per for p in x["policies"])
        rows.append((mean([x["kl_gain"] for x in per]), mean([x["agreement_gain"] for x in per]), layer,
                     ", ".join(f"{p} {c / len(per):.1f}" for p, c in mix.most_common())))
    rows.sort(reverse=True)
    base_kl, base_agree = mean([r["kl"] for r in results]), mean([r["agreement"] for r in results])
    out = [f"All layers compressed: KL {base_kl:.4f}, agreement {base_agree:.3f} (mean over {len(results)} prompts).",
           "", "| layer | KL closed by a full cache there | of the gap | agreement gain | heads per policy (mean per "
           "prompt) |", "| --- | --- | --- | --- | --- |"]
    for gain, agree, layer, mix in rows[:top]:
        out.append(f"| {layer} | {gain:.4f} | {gain / base_kl:.0%} | {agree:+.3f} | {mix} |")
    return "\n".join(out) + "\n"
