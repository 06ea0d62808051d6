"""python -m tinygen.eval.predict: how well prompt-time profiles predict the attention of the generated tokens.

    python -m tinygen.eval.predict --prompts ../shared/eval/mt_bench.jsonl --limit 20 --max-new-tokens 64 --threads 1

For each prompt the full cache decodes greedily while a recording cache (RecordingCache, same interface as
tinygen.cache.FullCache, attention through tinygen.attention.dense_attention) keeps every layer's group-averaged
attention probabilities of every prompt row and every generated row. Then, per KV head and per option of the budget
menu (tinygen.fastgen.budget.MENU):
  (a) predicted recovery from all prompt rows (option_recoveries, obs = column sums of all rows, obs_start = 0);
  (b) predicted recovery from the observation window, the last 32 prompt rows (obs_start = L - 32);
  (c) actual recovery: mean over generated rows of the attention on the prompt keys the option keeps at the end of
      prefill (ranked as in (b), by rank_key) plus the attention on generated tokens (they enter the cache);
  (c') the same without the generated tokens: kept prompt mass / the row's whole prompt mass.
The paper's candidates (tinygen.fastgen.profile.recoveries, r_l = r_f = 0.3) get the same predicted-vs-actual
treatment, and the uniform f70 is compared with what the budget allocation (allocate at kv_budget 0.7) would give
each head. A measurement: nothing here changes how FastGen runs.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from tinygen.cliutil import OneLineParser, run_main, write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT / "weights" / "SmolLM2-135M-Instruct"
OBSERVATION = 32
SMALL = (0.05, 0.30)  # the "small share" range of the over-prediction summary (inclusive)
FOCUS = range(17, 25)  # layers 17-24: where the layer-repair diagnosis found the costliest heads
F70 = "f70"


# ---------------------------------------------------------------------------------------------------------------
# Recording


class RecordingCache:
    """A full cache that also keeps the group-averaged attention probabilities of every query row.

    prompt_attn: (n_kv_heads, L, L) float32, the prefill's rows; gen_rows: one (n_kv_heads, length) float32 per
    decode row (keys 0..its own position)."""

    def __init__(self, n_kv_heads: int, head_dim: int, max_len: int, device, dtype):
        self.k = torch.empty(n_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.max_len, self.n_kv_heads, self.length = max_len, n_kv_heads, 0
        self.prompt_attn: torch.Tensor | None = None
        self.gen_rows: list[torch.Tensor] = []

    def attend(self, q, k, v):
        from tinygen.attention import dense_attention

        T, start = k.shape[1], self.length
        assert start + T <= self.max_len, f"cache full: {start} + {T} > {self.max_len}"
        self.k[:, start : start + T] = k
        self.v[:, start : start + T] = v
        self.length = end = start + T
        mask = torch.arange(end, device=q.device) <= start + torch.arange(T, device=q.device)[:, None]  # (T, end)
        out, probs = dense_attention(q, self.k[:, :end], self.v[:, :end], mask)
        group = probs.view(self.n_kv_heads, -1, T, end).mean(dim=1).cpu()  # (n_kv_heads, T, end): GQA group mean
        if start == 0:
            self.prompt_attn = group
        else:
            self.gen_rows += [group[:, t, : start + t + 1] for t in range(T)]
        return out

    def nbytes(self) -> int:
        from tinygen.cache import storage_bytes

        return storage_bytes(self.k, self.v)

    def kept_tokens(self) -> int:
        return self.length * self.n_kv_heads

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


# ---------------------------------------------------------------------------------------------------------------
# Kept sets and recoveries


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


def paper_kept(colsum: torch.Tensor, kinds: torch.Tensor, cfg) -> torch.Tensor:
    """(heads, candidates, L) bool: the prompt keys each paper candidate keeps at the end of prefill, as the FastGen
    cache builds them: protected kinds, the window, then the heaviest hitters by mean attention (colsum / (L - j))
    among the rest."""
    from tinygen.fastgen.policy import CANDIDATES, FULL, frequent_budget, protected_kinds, window

    heads, L = colsum.shape
    mean = colsum / torch.arange(L, 0, -1)
    out = torch.zeros(heads, len(CANDIDATES), L, dtype=torch.bool)
    for c, policy in enumerate(CANDIDATES):
        if policy & FULL:
            out[:, c] = True
            continue
        base = (kinds & protected_kinds(policy)) != 0
        base = base | (torch.arange(L) >= L - window(policy, L, cfg))
        base = base.expand(heads, L).clone()
        budget = min(frequent_budget(policy, L, cfg), int((~base[0]).sum()))
        if budget:
            base.scatter_(1, mean.masked_fill(base, float("-inf")).topk(budget, dim=1).indices, True)
        out[:, c] = base
    return out


def analyse(prompt_attn: torch.Tensor, gen: torch.Tensor, kinds: torch.Tensor, paper_cfg, menu=None) -> dict:
    """One layer of one prompt: predicted and actual recoveries of every menu option and paper candidate."""
    from tinygen.fastgen.budget import MENU, option_recoveries, rank_key
    from tinygen.fastgen.policy import LOCAL, window
    from tinygen.fastgen.profile import ProfileStats, recoveries

    menu = MENU if menu is None else menu
    heads, L, _ = prompt_attn.shape
    obs_all = prompt_attn.sum(1)
    obs_start = max(0, L - OBSERVATION)
    obs_win = prompt_attn[:, obs_start:].sum(1)
    keep_b = kept_masks(rank_key(obs_win, obs_start), menu)
    keep_a = kept_masks(rank_key(obs_all, 0), menu)
    c, cp = actual_recovery(gen, L, keep_b)
    c_rank_a, _ = actual_recovery(gen, L, keep_a)
    c_best, _ = actual_recovery(gen, L, kept_masks(gen[:, :, :L].sum(1), menu))  # hindsight: the rows' own top keys
    stats = ProfileStats(heads, L, window(LOCAL, L, paper_cfg), torch.device("cpu"))
    stats.add(prompt_attn, 0)
    paper_pred = recoveries(stats, kinds, paper_cfg)
    paper_c, paper_cp = actual_recovery(gen, L, paper_kept(stats.colsum, kinds, paper_cfg))
    gen_share = (1 - gen[:, :, :L].sum(-1)).mean(1)  # (heads,) generated rows' mass on generated tokens
    return dict(a=option_recoveries(obs_all, 0, menu), b=option_recoveries(obs_win, obs_start, menu), c=c, cp=cp,
                c_rank_a=c_rank_a, c_best=c_best, paper_pred=paper_pred, paper_c=paper_c, paper_cp=paper_cp, gen_share=gen_share)


# ---------------------------------------------------------------------------------------------------------------
# Summaries


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


def allocation_study(rec_b: torch.Tensor, c: torch.Tensor, L: int, menu, target: float = 0.7) -> dict:
    """One prompt, all heads of the model: the actual recovery each head gets under uniform f70, the budget
    allocation at `target` (floor 0 and 0.5, ranking by the observation-window prediction) and an oracle allocation
    that knows the actual recoveries. rec_b, c: (heads, options)."""
    from tinygen.fastgen.budget import allocate

    labels = [o.label for o in menu]
    cost = torch.tensor([o.kept(L) / L for o in menu], dtype=torch.float64)
    f70 = labels.index(F70)
    picks = {"f70": [f70] * rec_b.shape[0],
             "budget": allocate(rec_b, cost, target, 0.0),
             "budget_floor0.5": allocate(rec_b, cost, target, 0.5),
             "oracle": allocate(c, cost, target, 0.0)}
    out = {}
    for name, choice in picks.items():
        idx = torch.tensor(choice)
        out[name] = {"actual": c.gather(1, idx[:, None])[:, 0], "predicted": rec_b.gather(1, idx[:, None])[:, 0],
                     "cost": cost[idx].float(),
                     "kept": float(cost[idx].mean()), "labels": [labels[i] for i in choice]}
    return out


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
    L = [f"# eval_predict: do prompt-time profiles predict the generated tokens' attention?\n",
         f"`{meta['command']}`\n",
         f"Model {meta['model']} ({meta['dtype']}, {meta['device']}, {meta['threads']} thread(s)); {S['prompts']} "
         f"MT-Bench first turns through the chat template ({meta['prompt_tokens']} prompt tokens), greedy full-cache "
         f"decoding, {meta['generated_rows']} generated rows in all (up to {meta['max_new_tokens']} per prompt). "
         f"Machine: {meta['machine']['processor']}, {meta['machine']['platform']}. Wall time {meta['seconds']:.0f} s.\n",
         "Per KV head (30 layers x 3) and per budget-menu option except `full` (f/h at shares 0.05..0.95, "
         f"{S['options']} options): (a) predicted recovery from all prompt rows, (b) from the last {OBSERVATION} prompt "
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


# ---------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv):
    p = OneLineParser(prog="python -m tinygen.eval.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", metavar="FILE", required=True, help="JSONL or JSON list (MT-Bench: first turns)")
    p.add_argument("--limit", type=int, help="use the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="output directory (default bench/results)")
    p.add_argument("--tag", default="eval_predict", help="file name stem (default eval_predict)")
    a = p.parse_args(argv)
    for ok, message in [(a.limit is None or a.limit >= 1, "--limit must be at least 1"),
                        (a.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
                        (a.threads >= 0, "--threads must be >= 0")]:
        if not ok:
            p.error(message)
    return a


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(a) -> int:
    from tinygen.eval.prompts import load_prompts, machine
    from tinygen.eval.sweep import encode_prompts
    from tinygen.fastgen.budget import MENU
    from tinygen.fastgen.kinds import vocab_kinds
    from tinygen.fastgen.policy import FastGenConfig
    from tinygen.loader import load_model
    from tinygen.tokenizer import Tokenizer

    prompts = load_prompts(a.prompts, a.limit)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model(a.model, device="cpu", dtype=a.dtype)
    tok = Tokenizer(a.model, model.cfg.eos_token_ids)
    prompts = encode_prompts(tok, prompts)
    vocab = torch.tensor(vocab_kinds(tok), dtype=torch.uint8)
    paper_cfg = FastGenConfig(profile="paper", local_ratio=0.3, frequent_ratio=0.3)
    cfg = model.cfg
    per_prompt, t0, rows = [], time.perf_counter(), 0
    for n, p in enumerate(prompts, 1):
        caches, gen_ids = record(model, p["ids"], a.max_new_tokens, tok.eos_ids)
        L = len(p["ids"])
        kinds = vocab[torch.tensor(p["ids"])]
        layers = [analyse(c.prompt_attn, c.gen_attn(), kinds, paper_cfg) for c in caches]
        if not caches[0].gen_rows:
            log(f"prompt {p['id']}: no generated rows (EOS first), skipped")
            continue
        res = {k: torch.stack([x[k] for x in layers]) for k in layers[0]}  # (layers, heads, ...)
        res["alloc"] = allocation_study(res["b"].reshape(-1, len(MENU)), res["c"].reshape(-1, len(MENU)), L, MENU)
        res["L"], res["R"] = L, len(caches[0].gen_rows)
        per_prompt.append(res)
        rows += res["R"]
        eta = (time.perf_counter() - t0) / n * (len(prompts) - n)
        log(f"[{n}/{len(prompts)}] prompt {p['id']}: {L} tok, {res['R']} generated rows, "
            f"f70 actual {float(res['alloc']['f70']['actual'].mean()):.4f}, budget "
            f"{float(res['alloc']['budget']['actual'].mean()):.4f} (eta {eta:.0f} s)")
        del caches
    if not per_prompt:
        log("no prompt produced a generated row")
        return 1
    S = summarise(per_prompt, MENU, cfg.n_layers, cfg.n_kv_heads)
    lens = [r["L"] for r in per_prompt]
    meta = {"model": str(a.model), "dtype": a.dtype, "device": "cpu", "threads": torch.get_num_threads(),
            "machine": machine(), "prompts_file": a.prompts, "limit": a.limit, "max_new_tokens": a.max_new_tokens,
            "observation": OBSERVATION, "prompt_tokens": f"{min(lens)}-{max(lens)}",
            "generated_rows": rows, "seconds": time.perf_counter() - t0,
            "command": "python -m tinygen.eval.predict " + " ".join(sys.argv[1:])}
    per_head = {k: torch.stack([r[k] for r in per_prompt]).mean(0).round(decimals=4).tolist()
                for k in ("a", "b", "c", "cp")}  # (layers, heads, options), means over prompts
    write_json_atomic(out / f"{a.tag}.json", dict(meta, summary=S, menu=[o.label for o in MENU], per_head=per_head,
                                                   prompts=[{"id": p["id"]} for p in prompts]))
    md = markdown(S, meta)
    write_text_atomic(out / f"{a.tag}.md", md)
    print(md)
    return 0


def main(argv=None) -> int:
    sys.path.insert(0, str(ROOT))
    return run_main(run, parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
