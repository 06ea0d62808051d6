"""Figures: fidelity against kept fraction per method, one prompt's policy map, and how stable head habits are.

matplotlib is imported here only, lazily, with the Agg backend (no display needed)."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from ..fastgen.policy import CANDIDATES, policy_name

AUTO_POLICIES = [policy_name(p) for p in CANDIDATES]  # cheapest first
COLOURS = ["#4c72b0", "#8172b2", "#55a868", "#dd8452", "#c44e52"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        _plt().close(fig)


def sweep_plot(sums: list[dict], path: Path, title: str = ""):
    """Top-1 agreement and KL against kept fraction, one line per method family (auto's budget profile, the paper's
    auto, each fixed policy)."""
    plt = _plt()
    lines: dict[str, list] = {}
    for s in sums:
        x, m = s["summary"], s["method"]
        name = f"auto ({m.get('profile', 'paper')})" if m["policy"] == "auto" else m["policy"]
        if m.get("layer_budgets"):
            name = "auto (budget, calibrated)"
        if m.get("shapes") == "profile":  # heads in the shape their prompt's profile picks
            name = name[:-1] + ", profile shapes)"
        lines.setdefault(name, []).append((x["kept_fraction"]["mean"], x["agreement"]["mean"], x["kl"]["mean"], m))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, pts in lines.items():
        pts.sort(key=lambda p: p[0])
        style = dict(marker="o", lw=2.5 if name.startswith("auto (budget") else 1.3,
                     label=name)
        a1.plot([p[0] for p in pts], [p[1] for p in pts], **style)
        a2.plot([p[0] for p in pts], [p[2] for p in pts], **style)
        if name == "auto (paper)":
            for p in pts:
                a1.annotate(f"T={p[3]['threshold']:g}", (p[0], p[1]), textcoords="offset points", xytext=(4, -10),
                            fontsize=7)
    a1.set(xlabel="kept fraction of the KV cache", ylabel="top-1 agreement with the full cache")
    a2.set(xlabel="kept fraction of the KV cache", ylabel="KL(full || compressed), nats", yscale="log")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a1.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def heatmap(policies: list[list[str]], path: Path, title: str = ""):
    """Layers (rows) by KV heads (columns), coloured by policy."""
    plt = _plt()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    grid = [[AUTO_POLICIES.index(p) for p in layer] for layer in policies]
    fig, ax = plt.subplots(figsize=(3.2, 7))
    ax.imshow(grid, cmap=ListedColormap(COLOURS), vmin=-0.5, vmax=len(COLOURS) - 0.5, aspect="auto")
    ax.set(xlabel="KV head", ylabel="layer", xticks=range(len(grid[0])))
    ax.legend(handles=[Patch(color=c, label=n) for c, n in zip(COLOURS, AUTO_POLICIES)], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.02, 1))
    ax.set_title(title, fontsize=8)
    _save(fig, path)


def stability(maps: list[list[list[str]]], path: Path, title: str = "") -> dict:
    """Over prompts: each head's share of prompts on its most common policy (left), and per layer how often each
    policy is taken (right). Returns the numbers drawn."""
    plt = _plt()
    n_layers, n_heads = len(maps[0]), len(maps[0][0])
    share = [[Counter(m[l][h] for m in maps).most_common(1)[0][1] / len(maps) for h in range(n_heads)]
             for l in range(n_layers)]
    mean_share = sum(map(sum, share)) / (n_layers * n_heads)
    per_layer = [[sum(m[l][h] == p for m in maps for h in range(n_heads)) / (len(maps) * n_heads)
                  for p in AUTO_POLICIES] for l in range(n_layers)]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 7), gridspec_kw={"width_ratios": [1, 2.2]})
    im = a1.imshow(share, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    a1.set(xlabel="KV head", ylabel="layer", xticks=range(n_heads),
           title=f"share of prompts on the head's\nmost common policy (mean {mean_share:.2f})")
    fig.colorbar(im, ax=a1, fraction=0.08, pad=0.12)
    left = [0.0] * n_layers
    for i, (p, c) in enumerate(zip(AUTO_POLICIES, COLOURS)):
        vals = [row[i] for row in per_layer]
        a2.barh(range(n_layers), vals, left=left, height=0.9, color=c, label=p)
        left = [a + b for a, b in zip(left, vals)]
    a2.set_ylim(n_layers - 0.5, -0.5)
    a2.set(xlabel="share of heads x prompts", ylabel="layer", title="policy taken, per layer", xlim=(0, 1))
    a2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=3)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
    return {"mean_share": mean_share, "share": share, "per_layer": per_layer, "policies": AUTO_POLICIES}
