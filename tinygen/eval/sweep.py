"""Running methods over a prompt set, the paper's sweep at equal memory, and the markdown table."""
from __future__ import annotations

import sys
import time
from collections import Counter

from ..fastgen.policy import FastGenConfig
from .methods import SINKS, Method, match_ratio, with_ratio
from .metrics import summarize
from .runner import evaluate, reference_run

THRESHOLDS = (0.90, 0.95, 0.98, 0.99)  # the paper profile's points
KV_BUDGETS = (0.55, 0.65, 0.70, 0.80)  # the budget profile's points
# The fixed policies compared at equal memory. `local` alone (0.40-0.48 agreement in the first sweep: it drops the
# first tokens) is left out to save time; pass fixed=FIXED from methods.py to run it too.
SWEEP_FIXED = ("frequent", "local+frequent", SINKS)


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def encode_prompts(tok, prompts: list[dict]) -> list[dict]:
    return [dict(p, ids=tok.encode_prompt(p["prompt"])) for p in prompts]


def run_methods(model, tok, prompts: list[dict], methods: list[Method], max_new_tokens: int, run_free: bool = False,
                stage: str = "", refs: dict | None = None) -> list[dict]:
    """Every method on every prompt (prompts already encoded): per-prompt records, progress on stderr. `refs`, if
    given, keeps each prompt's full-cache reference for a later pass (about 12 MB per prompt at 64 tokens)."""
    records, t0 = [], time.perf_counter()
    for n, p in enumerate(prompts, 1):
        ref = refs.get(p["id"]) if refs is not None else None
        if ref is None:
            ref = reference_run(model, p["ids"], max_new_tokens, tok.eos_ids)
            if refs is not None:
                refs[p["id"]] = ref
        p["targets"] = ref.targets
        line = []
        for m in methods:
            r = evaluate(model, tok, ref, m, run_free)
            r["id"] = p["id"]
            records.append(r)
            line.append(f"{m.label}: agree {r['agreement']:.3f} kept {r['kept_fraction']:.3f}")
        eta = (time.perf_counter() - t0) / n * (len(prompts) - n)
        log(f"[{stage}{n}/{len(prompts)}] prompt {p['id']} ({len(p['ids'])} tok, {len(ref.targets)} generated, "
            f"eta {eta:.0f} s) " + "; ".join(line))
    return records


def summaries(records: list[dict]) -> list[dict]:
    """One summary per method, in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["method"]["label"], []).append(r)
    out = []
    for label, rs in groups.items():
        s = {"method": rs[0]["method"], "summary": summarize(rs)}
        if rs[0]["policies"] and rs[0]["method"]["policy"] == "auto":
            counts = Counter(p for r in rs for layer in r["policies"] for p in layer)
            s["policy_counts_per_prompt"] = {k: v / len(rs) for k, v in counts.most_common()}
        out.append(s)
    return out


def sweep(model, tok, prompts: list[dict], max_new_tokens: int, thresholds=THRESHOLDS, kv_budgets=KV_BUDGETS,
          fixed=SWEEP_FIXED, local_ratio: float = 0.3, frequent_ratio: float = 0.3, run_free: bool = False,
          calibration=None, shapes: str = FastGenConfig.shapes):
    """auto (budget profile) at each kv_budget and the paper's auto at each threshold, then each fixed policy with its
    ratio matched to the budget profile's mean kept fraction at each point.

    Two passes over the prompts, sharing each prompt's full-cache reference: pass 1 runs auto and records each run's
    lengths; the matching needs nothing else, because a fixed policy without special/punct keeps a number of tokens
    that depends only on the ratio and the lengths.

    calibration (read_calibration): the budget profile then runs with its layer budgets (what the fixed policies are
    matched to) and, beside it, spread evenly."""
    refs: dict = {}
    budgets = [Method("auto", profile="budget", kv_budget=b, shapes=shapes,
                      layer_budgets=None if calibration is None else calibration.budgets(b)) for b in kv_budgets]
    evens = [] if calibration is None else [Method("auto", profile="budget", kv_budget=b, shapes=shapes)
                                             for b in kv_budgets]  # the same budgets spread evenly, for comparison
    papers = [Method("auto", t, local_ratio, frequent_ratio, profile="paper") for t in thresholds]
    records = run_methods(model, tok, prompts, budgets + evens + papers, max_new_tokens, run_free, "auto ", refs)
    lengths = {}
    for r in records:  # (prompt length, length at the end) of each prompt, the same for every threshold
        lengths[r["id"]] = (r["prompt_tokens"], r["length"])
    matching, fixed_methods = [], []
    for m in budgets:
        target = summarize([r for r in records if r["method"]["label"] == m.label])["kept_fraction"]["mean"]
        for policy in fixed:
            ratio = match_ratio(policy, list(lengths.values()), target)
            fixed_methods.append(with_ratio(policy, ratio, m.kv_budget))
            matching.append({"kv_budget": m.kv_budget, "policy": policy, "target_kept": target, "ratio": ratio})
    log("matched ratios: " + ", ".join(f"{x['policy']}@{x['kv_budget']:g}={x['ratio']:.4f}" for x in matching))
    records += run_methods(model, tok, prompts, fixed_methods, max_new_tokens, run_free, "fixed ", refs)
    return records, matching


def table(sums: list[dict]) -> str:
    """Markdown: one row per method, grouped by the auto threshold each fixed policy is matched to."""
    head = ("| group | method | kept fraction | top-1 agreement (mean / median) | KL nats (mean / median) | "
            "log-lik drop | first departure (median) | never departs | KV MiB (physical) |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")

    def group(m) -> str:
        """Budget-profile points with the fixed policies matched to them; then the paper profile's points."""
        if m.get("kv_budget") is not None or m.get("matched_to_budget") is not None:
            return f"budget={m.get('kv_budget', m.get('matched_to_budget')):g}"
        t = m.get("threshold", m.get("matched_to_threshold"))
        return "" if t is None else f"T={t:g}"

    def key(s):
        m = s["method"]
        return (group(m)[0:1] != "b", group(m) or "~", m["policy"] != "auto", m["label"])
    rows = []
    for s in sorted(sums, key=key):
        m, x = s["method"], s["summary"]
        rows.append(f"| {group(m)} | {m['label']} | {x['kept_fraction']['mean']:.3f} | "
                    f"{x['agreement']['mean']:.3f} / {x['agreement']['median']:.3f} | "
                    f"{x['kl']['mean']:.4f} / {x['kl']['median']:.4f} | {x['ll_drop']['mean']:.4f} | "
                    f"{x['first_departure']['median']:.0f} | {x['never_departs']:.2f} | "
                    f"{x['kv_bytes']['mean'] / 2**20:.2f} |")
    return head + "\n".join(rows) + "\n"
