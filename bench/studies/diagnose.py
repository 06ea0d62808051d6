"""A study: where does `auto` lose fidelity? Per layer, how much of the KL and agreement gap a full cache in that one
layer closes while the others stay compressed (bench/results/eval_auto_diagnose.md, made as `python -m tinygen.eval
--diagnose` before it moved here). The calibration's sensitivity pass runs the same repair (layer_repair).

    python bench/studies/diagnose.py --prompts ../shared/eval/mt_bench.jsonl --limit 4 --max-new-tokens 48 \
        --threshold 0.98 --threads 1
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tinygen.cliutil import write_json_atomic, write_text_atomic  # noqa: E402
from tinygen.eval.calibrate import layer_repair  # noqa: E402
from tinygen.eval.metrics import mean  # noqa: E402


def repair_table(results: list[dict], top: int = 10) -> str:
    """Markdown: the layers whose repair helps most on average, with the policies their heads took."""
    rows = []
    for layer in range(len(results[0]["layers"])):
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


def main() -> int:
    import torch

    from tinygen.eval.methods import Method
    from tinygen.eval.prompts import load_prompts
    from tinygen.eval.runner import reference_run
    from tinygen.eval.sweep import encode_prompts
    from tinygen.loader import load_model
    from tinygen.tokenizer import Tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", required=True)
    p.add_argument("--limit", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threshold", type=float, default=0.98, help="the paper profile's T (the study's setting)")
    p.add_argument("--model", default=str(ROOT / "weights" / "SmolLM2-135M-Instruct"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.model)
    tok = Tokenizer(a.model, model.cfg.eos_token_ids)
    method = Method("auto", a.threshold, profile="paper")
    results = []
    for n, q in enumerate(encode_prompts(tok, load_prompts(a.prompts, a.limit)), 1):
        ref = reference_run(model, q["ids"], a.max_new_tokens, tok.eos_ids)
        results.append(dict(layer_repair(model, tok, ref, method), id=q["id"]))
        print(f"[{n}/{a.limit}] prompt {q['id']}: KL {results[-1]['kl']:.4f}", file=sys.stderr, flush=True)
    command = "python bench/studies/diagnose.py " + " ".join(sys.argv[1:])
    out = Path(a.out)
    write_json_atomic(out / "eval_auto_diagnose.json", {"command": command, "method": method.to_json(),
                                                         "max_new_tokens": a.max_new_tokens, "prompts": results})
    write_text_atomic(out / "eval_auto_diagnose.md", f"# eval_auto: layer repair\n\n`{command}`\n\n"
                      + repair_table(results))
    print(repair_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
