"""A study tool: per-prompt differences between one method and every other at the same memory, from a sweep's
per-prompt records (the paired figures of docs/evaluation.md).

    python bench/studies/paired.py bench/results/eval_sweep_prompts.jsonl bench/results/eval_sweep_065_080_prompts.jsonl
    python bench/studies/paired.py bench/results/eval_outside_prompts.jsonl --method "auto budget=0.8"

Means side by side hide how much of a gap is noise: each prompt is run by every method, so the difference per prompt
(this method minus the other) and its standard error say whether a gap holds across prompts. For each run of
--method (default: every calibrated `auto`, the default method) it prints, against every method whose mean kept
fraction is within --tolerance, the mean of the per-prompt KL and top-1 agreement differences ± their standard error.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tinygen.eval.turns_report import change  # noqa: E402


def load(paths: list[str]) -> dict[tuple[str, str], list[dict]]:
    """(file name, method label) -> that method's records in prompt order (a file's methods ran over the same
    prompts)."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                runs.setdefault((Path(path).name, r["method"]["label"]), []).append(r)
    return runs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="a sweep's *_prompts.jsonl")
    p.add_argument("--method", default="calibrated", help="compare the methods whose label contains this "
                   "(default: calibrated)")
    p.add_argument("--tolerance", type=float, default=0.01, help="same memory: mean kept fractions this close")
    a = p.parse_args()
    runs = load(a.files)
    kept = {k: sum(r["kept_fraction"] for r in rs) / len(rs) for k, rs in runs.items()}
    for (name, label), rs in runs.items():
        if a.method not in label:
            continue
        print(f"{name}: {label} (kept {kept[name, label]:.3f}, {len(rs)} prompts): this minus the other, "
              "mean ± standard error")
        for (other_name, other), os_ in runs.items():
            if other_name != name or other == label or abs(kept[name, other] - kept[name, label]) > a.tolerance:
                continue
            assert [r["prompt_tokens"] for r in os_] == [r["prompt_tokens"] for r in rs], "runs over other prompts"
            kl = change(x["kl"] - y["kl"] for x, y in zip(rs, os_))
            agree = change(x["agreement"] - y["agreement"] for x, y in zip(rs, os_))
            print(f"  vs {other:<28} (kept {kept[name, other]:.3f}): KL {kl['mean']:+.4f} ± {kl['sem']:.4f}, "
                  f"agreement {agree['mean']:+.4f} ± {agree['sem']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
