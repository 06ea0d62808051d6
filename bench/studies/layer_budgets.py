"""A study: does moving the budget profile's memory between layers (FastGenConfig.layer_budgets) beat the uniform
split at the same kept fraction? It led to the calibration (docs/evaluation.md); not what `--policy auto` runs.

    python bench/studies/layer_budgets.py --start 0 --limit 20                 # MT-Bench first turns 1-20
    python bench/studies/layer_budgets.py --start 40 --limit 20 --out DIR      # held out: 41-60

Method (also written beside the results):
- The default model in float32 on the CPU. For each prompt (MT-Bench first turn through the chat template) the full
  cache decodes greedily up to --max-new-tokens; each schedule's caches are then teacher-forced along those tokens
  (tinygen.eval.runner), and each step scores top-1 agreement with the full cache's choice and KL(full || cache).
- Every schedule is the budget profile at a head floor of 1 (each head keeps its layer's budget, as local+frequent
  since that became the default; the results in bench/results were measured when the profile picked the shape).
  `uniform` is the default (every layer at --kv-budget). The others set layer budgets that average to about
  --kv-budget: `late` gives layers 16-24 0.80 and the rest 0.65 (mean 0.695: the layers where the
  layer-repair diagnosis and eval_predict found generated tokens leaning on the prompt), `early_low` gives layers
  0-9 0.60 and the rest 0.75, `pyramid` (PyramidKV's shape) 0.85 down to 0.55 in steps per 5 layers, `inverse`
  the reverse, `recovery` the shares an allocation by the generated rows' attention recovery (eval_predict.json's
  per-head `c`, averaged per layer, `allocate` at 0.70) gives. Schedules are written for the 30-layer default model.
  `--calibration FILE` adds `calibrated`: the layer budgets the file gives (tinygen.fastgen.budget.layer_budgets;
  with its curves weighted by the layers' measured output sensitivity when the file has one, and no layer below
  --floor x the budget, by default the file's layer_floor).
- Figures are means over prompts; "KL vs uniform" is the mean of per-prompt differences with its standard error.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import EVAL_DIR, machine_lines, write_report  # noqa: E402
from tinygen.cache import kept_fraction  # noqa: E402
from tinygen.eval.metrics import mean, step_metrics  # noqa: E402
from tinygen.eval.prompts import load_prompts  # noqa: E402
from tinygen.eval.runner import reference_run, teacher_forced  # noqa: E402
from tinygen.eval.sweep import encode_prompts  # noqa: E402
from tinygen.fastgen.cache import make_caches  # noqa: E402
from tinygen.fastgen.policy import FastGenConfig  # noqa: E402
from tinygen.loader import load_model  # noqa: E402
from tinygen.tokenizer import Tokenizer  # noqa: E402

N_LAYERS = 30
RECOVERY = (1.0, 0.7, 0.9, 0.75, 0.65, 0.8, 0.8, 0.7, 0.8, 0.7, 0.6, 0.7, 0.65, 0.45, 0.8, 0.85, 0.6, 0.8, 0.6, 0.6, 0.8,
            0.85, 0.7, 0.8, 0.7, 0.35, 0.45, 0.45, 0.7, 0.75)
SCHEDULES = {
    "uniform": None,
    "late": tuple(0.80 if 16 <= i <= 24 else 0.65 for i in range(N_LAYERS)),
    "early_low": tuple(0.60 if i < 10 else 0.75 for i in range(N_LAYERS)),
    "pyramid": tuple((0.85, 0.80, 0.75, 0.65, 0.60, 0.55)[i // 5] for i in range(N_LAYERS)),
    "inverse": tuple((0.55, 0.60, 0.65, 0.75, 0.80, 0.85)[i // 5] for i in range(N_LAYERS)),
    "recovery": RECOVERY,
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "weights" / "SmolLM2-135M-Instruct"))
    p.add_argument("--prompts", default=str(EVAL_DIR / "mt_bench.jsonl"))
    p.add_argument("--start", type=int, default=0, help="first prompt (0-based)")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--kv-budget", type=float, default=0.7)
    p.add_argument("--schedules", default="uniform,late,early_low,pyramid,inverse,recovery")
    p.add_argument("--calibration", help="also run the layer budgets this calibration file gives (weighted by its "
                   "layer_sensitivity when it has one): schedule `calibrated`")
    p.add_argument("--floor", type=float, default=None, help="with --calibration: no layer below floor x kv budget "
                   "(default: the file's layer_floor)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--tag", default="eval_layer_budgets", help="file name stem (then _FIRST_LAST.md)")
    a = p.parse_args()
    a.schedules = [s.strip() for s in a.schedules.split(",")] + (["calibrated"] if a.calibration else [])
    bad = [s for s in a.schedules if s not in SCHEDULES and s != "calibrated"]
    if bad or "uniform" not in a.schedules:
        p.error(f"--schedules: choose from {', '.join(SCHEDULES)}, uniform included")
    return a


def main():
    a = parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.model, dtype="float32")
    assert model.cfg.n_layers == N_LAYERS, "the schedules are written for the 30-layer default model"
    tok = Tokenizer(a.model, model.cfg.eos_token_ids)
    if a.calibration:
        from tinygen.fastgen.budget import read_calibration

        cal = read_calibration(a.calibration, N_LAYERS)
        cal = cal if a.floor is None else cal._replace(floor=a.floor)
        SCHEDULES["calibrated"] = cal.budgets(a.kv_budget)
        print("calibrated:", SCHEDULES["calibrated"], f"mean {sum(SCHEDULES['calibrated']) / N_LAYERS:.4f}")
    prompts = encode_prompts(tok, load_prompts(a.prompts, a.limit, a.start))
    rows = {s: [] for s in a.schedules}  # per prompt: (agreement, KL, kept fraction)
    for n, p in enumerate(prompts, 1):
        ref = reference_run(model, p["ids"], a.max_new_tokens, tok.eos_ids)
        for name in a.schedules:
            cfg = FastGenConfig(kv_budget=a.kv_budget, layer_budgets=SCHEDULES[name])
            caches, on_tokens = make_caches(model, tok, cfg, len(p["ids"]) + len(ref.targets))
            steps = step_metrics(ref.logprobs, teacher_forced(model, p["ids"], ref.targets, caches, on_tokens),
                                 ref.targets)
            rows[name].append((mean(steps["agree"]), mean(steps["kl"]), kept_fraction(caches)))
        print(f"[{n}/{len(prompts)}] " + " | ".join(f"{s} {rows[s][-1][0]:.3f} {rows[s][-1][1]:.4f}"
                                                    for s in a.schedules), flush=True)
    lines = [f"# Budgets per layer: MT-Bench first turns {a.start + 1}-{a.start + len(prompts)}, kv_budget "
             f"{a.kv_budget}", "", *(f"- {m}" for m in machine_lines()),
             f"- command: `python bench/studies/layer_budgets.py {' '.join(sys.argv[1:])}`", "",
             "| schedule | kept | top-1 agreement | KL (nats) | KL vs uniform (mean diff ± s.e.) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    base = rows["uniform"]
    for name in a.schedules:
        r = rows[name]
        agree, kl, kept = (statistics.mean(x[i] for x in r) for i in range(3))
        diffs = [x[1] - b[1] for x, b in zip(r, base)]
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        lines.append(f"| {name} | {kept:.3f} | {agree:.4f} | {kl:.4f} | {statistics.mean(diffs):+.4f} ± {se:.4f} |")
    print("\n".join(lines))
    write_report(Path(a.out) / f"{a.tag}_{a.start + 1}_{a.start + len(prompts)}.md", lines, __doc__)


if __name__ == "__main__":
    main()
