"""The report of the prediction study (bench/studies/predict.py): summaries over prompts (errors, correlations, per
layer, per option, the allocation study) and the markdown page."""
from __future__ import annotations

import math

import torch

SMALL = (0.05, 0.30)  # the "small share" range of the over-prediction summary (inclusive)
FOCUS = range(17, 25)  # layers 17-24: where the layer-repair diagnosis found the costliest heads


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    d = (x.norm() * y.norm()).item()
    return float((x * y).sum() / d) if d > 0 else float("nan")


def err(pred: torch.Tensor, act: torch.Tensor) -> dict:
    return {"mae": float((pred - act).abs().mean()), "bias": float((pred - act).mean()), "r": pearson(pred, act)}


def within_option_r(pred: torch.Tensor, act: torch.Tensor) -> float:
    """Mean over prompts and options of the correlation across heads: does the profile rank heads right?
    pred/act: (P, heads, options)."""
    vals = [pearson(pred[p, :, o], act[p, :, o]) for p in range(pred.shape[0]) for o in range(pred.shape[2])]
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def summarise(per_prompt: list[dict], menu, n_layers: int, n_kv: int) -> dict:
    """per_prompt: one dict per prompt with stacked (layers, heads, ...) tensors from analyse()."""
    from tinygen.fastgen.policy import CANDIDATES, policy_name
    from tinygen.fastgen.profile import choose_policies

    labels = [o.label for o in menu]
    nan = float("nan")
    focus = [l for l in FOCUS if l < n_layers]  # models with fewer layers: what there is of 17-24
    rest = [l for l in range(n_layers) if l not in focus]
    mean_or_nan = lambda t: float(t.mean()) if t.numel() else nan
    nf = [i for i, o in enumerate(menu) if o.label != "full"]
    stack = lambda k: torch.stack([p[k] for p in per_prompt])  # (P, layers, heads, ...)
    a, b, c, cp, ca, cb = (stack(k)[..., nf] for k in ("a", "b", "c", "cp", "c_rank_a", "c_best"))
    P = a.shape[0]
    flat = lambda t: t.reshape(P, n_layers * n_kv, -1)
    S = {"prompts": P, "options": len(nf)}
    S["overall"] = {f"{p}_vs_{q}": err(x, y) for p, x in (("a", a), ("b", b)) for q, y in (("c", c), ("cp", cp))}
    S["overall"]["a_within_option_r"] = within_option_r(flat(a), flat(c))
    S["overall"]["b_within_option_r"] = within_option_r(flat(b), flat(c))
    S["overall"]["mean_actual_rank_b"] = float(c.mean())
    S["overall"]["mean_actual_rank_a"] = float(ca.mean())
    S["overall"]["mean_actual_hindsight"] = float(cb.mean())
    share = torch.tensor([menu[i].local_ratio + menu[i].frequent_ratio for i in nf])
    small = (share >= SMALL[0] - 1e-9) & (share <= SMALL[1] + 1e-9)
    freq = torch.tensor([labels[i].startswith("f") for i in nf])
    S["by_layer"] = []
    for l in range(n_layers):
        row = {"layer": l, "a_vs_c": err(a[:, l], c[:, l]), "b_vs_c": err(b[:, l], c[:, l]),
               "b_vs_cp": err(b[:, l], cp[:, l]),
               "small_over_a": float((a[:, l][..., small] - c[:, l][..., small]).mean()),
               "small_over_b": float((b[:, l][..., small] - c[:, l][..., small]).mean()),
               "small_over_b_f": float((b[:, l][..., small & freq] - c[:, l][..., small & freq]).mean()),
               "small_over_b_h": float((b[:, l][..., small & ~freq] - c[:, l][..., small & ~freq]).mean()),
               "small_over_b_cp": float((b[:, l][..., small] - cp[:, l][..., small]).mean()),
               "small_frac_over_b": float((b[:, l][..., small] > c[:, l][..., small]).double().mean()),
               "small_over_b_head_max": float((b[:, l][..., small] - c[:, l][..., small]).mean((0, 2)).max()),
               "gen_share": float(stack("gen_share")[:, l].mean()),
               "gen_share_heads": [round(float(x), 4) for x in stack("gen_share")[:, l].mean(0)]}
        S["by_layer"].append(row)
    over = lambda key, layers: sum(S["by_layer"][l][key] for l in layers) / len(layers) if layers else nan
    S["small_over_focus"] = {k: {"17-24": over(k, focus), "other": over(k, rest)}
                             for k in ("small_over_a", "small_over_b", "small_over_b_f", "small_over_b_h",
                                       "small_over_b_cp")}
    S["gen_share"] = float(stack("gen_share").mean())
    # by share: bias of (b) over all layers, f and h
    S["by_option"] = [{"option": labels[i], "a": float(a[..., j].mean()), "b": float(b[..., j].mean()),
                       "c": float(c[..., j].mean()), "cp": float(cp[..., j].mean()),
                       "c_rank_a": float(ca[..., j].mean()), "c_best": float(cb[..., j].mean())} for j, i in enumerate(nf)]
    # paper candidates
    pp, pc, pcp = stack("paper_pred"), stack("paper_c"), stack("paper_cp")
    S["paper"] = []
    for j, cand in enumerate(CANDIDATES):
        S["paper"].append({"candidate": policy_name(cand), "predicted": float(pp[..., j].mean()),
                           "actual": float(pc[..., j].mean()), "actual_cp": float(pcp[..., j].mean()),
                           **{k: v for k, v in err(pp[..., j], pc[..., j]).items()},
                           "focus_bias": mean_or_nan(pp[:, focus, :, j] - pc[:, focus, :, j]),
                           "other_bias": mean_or_nan(pp[:, rest, :, j] - pc[:, rest, :, j])})
    # paper choice at T = 0.98: how often does the chosen candidate fall short during generation?
    short, short_focus, short_other, chosen = [], [], [], {}
    for p in range(P):
        for l in range(n_layers):
            picks = choose_policies(pp[p, l], 0.98)
            for h, pol in enumerate(picks):
                j = CANDIDATES.index(pol)
                miss = float(pc[p, l, h, j]) < 0.98 - 1e-6
                short.append(miss)
                (short_focus if l in focus else short_other).append(miss)
                chosen.setdefault(policy_name(pol), []).append(float(pc[p, l, h, j]))
    share_of = lambda x: sum(x) / len(x) if x else nan
    S["paper_T098"] = {"short": share_of(short), "short_17_24": share_of(short_focus), "short_other": share_of(short_other),
                       "by_choice": {k: {"heads": len(v), "mean_actual": sum(v) / len(v),
                                         "share_below_T": sum(x < 0.98 - 1e-6 for x in v) / len(v)}
                                     for k, v in chosen.items()}}
    # uniform f70 against the budget allocation
    alloc = [p["alloc"] for p in per_prompt]
    S["allocation"] = {}
    for name in alloc[0]:
        act = torch.stack([x[name]["actual"] for x in alloc])  # (P, heads)
        pred = torch.stack([x[name]["predicted"] for x in alloc])
        S["allocation"][name] = {
            "kept": sum(x[name]["kept"] for x in alloc) / P, "mean_actual": float(act.mean()),
            "mean_predicted": float(pred.mean()), "worst_head": float(act.min(1).values.mean()),
            "p05_head": float(act.quantile(0.05, dim=1).mean()),
            "focus_actual": mean_or_nan(act.view(P, n_layers, n_kv)[:, focus]),
            "by_layer": [round(float(x), 4) for x in act.view(P, n_layers, n_kv).mean((0, 2))],
            "kept_by_layer": [round(float(x), 4) for x in
                              torch.stack([x[name]["cost"] for x in alloc]).view(P, n_layers, n_kv).mean((0, 2))]}
        if name != "f70":
            f = torch.stack([x["f70"]["actual"] for x in alloc])
            S["allocation"][name]["heads_worse_than_f70_by_0.05"] = float(((act - f) < -0.05).double().mean())
            S["allocation"][name]["heads_better_than_f70_by_0.05"] = float(((act - f) > 0.05).double().mean())
            small_heads = torch.tensor([[float(lbl[1:]) <= 30 if lbl != "full" else False for lbl in x[name]["labels"]]
                                        for x in alloc])
            S["allocation"][name]["heads_at_share_le_0.30"] = float(small_heads.double().mean())
            if small_heads.any():
                S["allocation"][name]["small_heads_over"] = float((pred - act)[small_heads].mean())
    S["allocation"]["example_map"] = alloc[0]["budget"]["labels"]
    return S


def fmt(x, d=3):
    return f"{x:+.{d}f}" if isinstance(x, float) and x < 0 else f"{x:.{d}f}"


def markdown(S: dict, meta: dict) -> str:
    o = S["overall"]
    L = ["# eval_predict: do prompt-time profiles predict the generated tokens' attention?\n",
         f"`{meta['command']}`\n",
         f"Model {meta['model']} ({meta['dtype']}, {meta['device']}, {meta['threads']} thread(s)); {S['prompts']} "
         f"MT-Bench first turns through the chat template ({meta['prompt_tokens']} prompt tokens), greedy full-cache "
         f"decoding, {meta['generated_rows']} generated rows in all (up to {meta['max_new_tokens']} per prompt). "
         f"Machine: {meta['machine']['processor']}, {meta['machine']['platform']}. Wall time {meta['seconds']:.0f} s.\n",
         "Per KV head (30 layers x 3) and per budget-menu option except `full` (f/h at shares 0.05..0.95, "
         f"{S['options']} options): (a) predicted recovery from all prompt rows, (b) from the last {meta['observation']} prompt "
         "rows (the budget profile's observation window), (c) actual: mean over generated rows of the attention on "
         "the prompt keys the option keeps at the end of prefill (ranked as in (b)) plus the attention on generated "
         "tokens (kept, since they enter the cache), (c') kept prompt mass / the row's prompt mass (generated "
         "tokens excluded). Statistics pool prompts x heads x options.\n",
         "## Overall\n",
         "| prediction vs actual | MAE | bias (pred - actual) | Pearson r |", "| --- | ---: | ---: | ---: |"]
    for k, v in o.items():
        if isinstance(v, dict):
            name = k.replace("_vs_", " vs ").replace("cp", "c'")
            L.append(f"| {name} | {v['mae']:.4f} | {fmt(v['bias'], 4)} | "
                     f"{v['r']:.3f} |")
    L.append(f"\nWithin one option, across the 90 heads (mean over prompts and options of the correlation): (a) "
             f"r = {o['a_within_option_r']:.3f}, (b) r = {o['b_within_option_r']:.3f}. Mean actual recovery over "
             f"all heads x options with the keys ranked by (b): {o['mean_actual_rank_b']:.4f}; by (a): "
             f"{o['mean_actual_rank_a']:.4f}; by the generated rows' own attention (hindsight, the best set of that size): "
             f"{o['mean_actual_hindsight']:.4f}.\n")
    L += ["## Per layer\n",
          f"small = shares {SMALL[0]:.2f}-{SMALL[1]:.2f} (f and h); over = mean (predicted - actual) there; gen share = "
          "generated rows' attention on generated tokens.\n",
          "| layer | MAE a | r a | MAE b | r b | bias b | small over a | small over b (f / h) | small over b vs c' "
          "| share of small cells over-predicted (b) | worst head small over b | gen share |",
          "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in S["by_layer"]:
        L.append(f"| {r['layer']} | {r['a_vs_c']['mae']:.3f} | {r['a_vs_c']['r']:.3f} | {r['b_vs_c']['mae']:.3f} | "
                 f"{r['b_vs_c']['r']:.3f} | {fmt(r['b_vs_c']['bias'])} | {fmt(r['small_over_a'])} | "
                 f"{fmt(r['small_over_b'])} ({fmt(r['small_over_b_f'])} / {fmt(r['small_over_b_h'])}) | "
                 f"{fmt(r['small_over_b_cp'])} | {r['small_frac_over_b']:.3f} | {fmt(r['small_over_b_head_max'])} | {r['gen_share']:.3f} |")
    fo = S["small_over_focus"]
    L.append("\nSmall-share over-prediction, layers 17-24 vs the other layers: " + "; ".join(
        f"{k.replace('small_over_', '')}: {fmt(v['17-24'])} vs {fmt(v['other'])}" for k, v in fo.items())
        + f". Generated rows' attention on generated tokens, all layers: {S['gen_share']:.3f}.\n")
    L += ["## By option (means over prompts, layers, heads)\n", "| option | a | b | c | c' | c (keys ranked by a) | c (hindsight set) |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in S["by_option"]:
        L.append(f"| {r['option']} | {r['a']:.3f} | {r['b']:.3f} | {r['c']:.3f} | {r['cp']:.3f} | {r['c_rank_a']:.3f} | {r['c_best']:.3f} |")
    L += ["\n## Paper candidates (r_l = r_f = 0.3; predicted = profile.recoveries over all prompt rows)\n",
          "| candidate | predicted | actual c | actual c' | MAE | bias | r | bias 17-24 | bias other |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in S["paper"]:
        L.append(f"| {r['candidate']} | {r['predicted']:.3f} | {r['actual']:.3f} | {r['actual_cp']:.3f} | "
                 f"{r['mae']:.3f} | {fmt(r['bias'])} | {r['r']:.3f} | {fmt(r['focus_bias'])} | {fmt(r['other_bias'])} |")
    t = S["paper_T098"]
    L.append(f"\nAt T = 0.98 the chosen candidate's actual recovery falls below T for {t['short']:.3f} of heads "
             f"({t['short_17_24']:.3f} in layers 17-24, {t['short_other']:.3f} elsewhere). By choice: " + "; ".join(
                 f"{k}: {v['heads']} heads, actual {v['mean_actual']:.3f}, {v['share_below_T']:.2f} below T"
                 for k, v in t["by_choice"].items()) + ".\n")
    L += ["## Uniform f70 against the budget allocation (kv_budget 0.7, allocation on (b))\n",
          "Actual recovery per head (c); oracle = allocate() on the actual recoveries (hindsight bound; optimistic, since "
          "(c) credits every generated token as kept, which a share-of-length budget would not: the oracle makes cheap "
          "the heads whose generation attention goes to generated tokens). `their over-prediction` = mean (b) - (c) "
          "of the heads the allocation puts at share <= 0.30.\n",
          "| allocation | kept | mean predicted | mean actual | worst head | 5th pct head | layers 17-24 | "
          "heads < f70 - 0.05 | heads > f70 + 0.05 | heads at share <= 0.30 | their over-prediction |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for k, v in S["allocation"].items():
        if k == "example_map":
            continue
        L.append(f"| {k} | {v['kept']:.3f} | {v['mean_predicted']:.4f} | {v['mean_actual']:.4f} | "
                 f"{v['worst_head']:.3f} | {v['p05_head']:.3f} | {v['focus_actual']:.4f} | "
                 f"{v.get('heads_worse_than_f70_by_0.05', 0):.3f} | {v.get('heads_better_than_f70_by_0.05', 0):.3f} | "
                 f"{v.get('heads_at_share_le_0.30', 0):.3f} | {fmt(v.get('small_heads_over', float('nan')))} |")
    L.append("\nBy layer: mean actual recovery (and mean kept share) of f70 / budget / budget floor 0.5 / oracle:\n")
    A = S["allocation"]
    names = ("f70", "budget", "budget_floor0.5", "oracle")
    L.append("| layer | f70 | budget | floor 0.5 | oracle |\n| ---: | ---: | ---: | ---: | ---: |")
    for l in range(len(A["f70"]["by_layer"])):
        L.append(f"| {l} | " + " | ".join(f"{A[k]['by_layer'][l]:.3f} ({A[k]['kept_by_layer'][l]:.2f})"
                                           for k in names) + " |")
    return "\n".join(L) + "\n"
