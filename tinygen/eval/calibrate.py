"""python -m tinygen.eval.calibrate: measure, once per model, how much each layer needs of the budget.

    python -m tinygen.eval.calibrate --model weights/SmolLM2-135M-Instruct          # -> MODEL/fastgen_calibration.json

(MT-Bench 61-80 by default, outside the prompts the evaluation reports on; 38 minutes for the default model on one
thread of this 2-core CPU, nearly all of it the sensitivity pass.)

Why: on the default model, moving memory between heads by the prompt's own profile lost to an even split, every way
it was tried (docs/evaluation.md): the prompt under-rates the layers whose generated tokens lean on the prompt. What
the prompt does not say, generation on other prompts does. For each calibration prompt the full cache decodes
greedily while recording caches (tinygen.eval.recording.RecordingCache) keep every layer's attention; for each layer,
KV head and budget-menu option (tinygen.fastgen.budget.MENU) the recovery is the mean over generated rows of the
attention on the prompt keys the option keeps at the end of prefill (ranked as the stores rank them: mean attention
since arrival over every prompt row) plus the attention on generated tokens (they enter the cache). The file holds
these recoveries averaged over prompts and a layer's heads: one curve per layer, and each layer's output sensitivity:
the KL to the full cache's next-token distribution that a full cache in that layer closes while every layer keeps
0.7 (recovery alone did not track the output's fidelity), measured with the default head shape (FastGenConfig.shapes,
written to the file). At run time (tinygen.fastgen.budget) the curves are weighed by the sensitivities, one price per
kept token spends --kv-budget across the layers by them, and each head keeps its layer's share in that shape.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from tinygen.cliutil import OneLineParser, run_main, write_json_atomic

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT / "weights" / "SmolLM2-135M-Instruct"


def layer_curves(prompt_attn: torch.Tensor, gen: torch.Tensor, menu) -> torch.Tensor:
    """One layer of one prompt: (heads, options) recovery of the generated rows' attention under each option.
    prompt_attn: (heads, L, L) the prefill's (group-averaged) attention; gen: (heads, R, N >= L) generated rows."""
    from tinygen.eval.recording import actual_recovery, kept_masks
    from tinygen.fastgen.budget import rank_key

    L = prompt_attn.shape[1]
    keep = kept_masks(rank_key(prompt_attn.sum(1), 0), menu)  # what each option's store keeps of the prompt
    return actual_recovery(gen, L, keep)[0]


def calibrate(model, prompt_ids: list[list[int]], max_new_tokens: int, eos_ids=frozenset(), menu=None, log=None):
    """(n_layers, len(menu)) recovery curves averaged over prompts and each layer's heads, and the generated rows."""
    from tinygen.eval.recording import record
    from tinygen.fastgen.budget import MENU

    menu = MENU if menu is None else menu
    total, used, rows = None, 0, 0
    for n, ids in enumerate(prompt_ids, 1):
        caches, _ = record(model, ids, max_new_tokens, eos_ids)
        if not caches[0].gen_rows:  # EOS first: nothing generated to measure
            continue
        curves = torch.stack([layer_curves(c.prompt_attn, c.gen_attn(), menu).double().mean(0) for c in caches])
        total = curves if total is None else total + curves
        used, rows = used + 1, rows + len(caches[0].gen_rows)
        if log:
            log(f"[{n}/{len(prompt_ids)}] {len(ids)} prompt tokens, {len(caches[0].gen_rows)} generated rows")
    if total is None:
        from tinygen.errors import TinygenError
        raise TinygenError("no calibration prompt generated a token (each ended with EOS at once)")
    return total / used, rows


def layer_repair(model, tok, ref, method) -> dict:
    """The all-compressed run's KL and agreement against the reference (tinygen.eval.runner.Reference), and per layer
    the same with that one layer's cache full. Later layers then see a slightly different input, so a layer's gain is
    what it costs in context, not an exact share of the gap."""
    from tinygen.eval.methods import build_caches, policy_names
    from tinygen.eval.metrics import mean, step_metrics
    from tinygen.eval.runner import teacher_forced
    from tinygen.generate import full_caches

    max_len = len(ref.prompt_ids) + len(ref.targets)

    def score(full_layer):
        caches, on_tokens = build_caches(model, tok, method, max_len)
        if full_layer is not None:
            caches[full_layer] = full_caches(model, max_len)[0]
        m = step_metrics(ref.logprobs, teacher_forced(model, ref.prompt_ids, ref.targets, caches, on_tokens),
                         ref.targets)
        return mean(m["kl"]), mean(m["agree"]), caches

    kl, agree, caches = score(None)
    policies = policy_names(caches)
    layers = []
    for layer in range(model.cfg.n_layers):
        lkl, lagree, _ = score(layer)
        layers.append({"layer": layer, "policies": policies[layer], "kl": lkl, "agreement": lagree,
                       "kl_gain": kl - lkl, "agreement_gain": lagree - agree})
    return {"kl": kl, "agreement": agree, "layers": layers}


def sensitivity(model, tok, prompt_ids: list[list[int]], max_new_tokens: int, kv_budget: float, log=None):
    """(n_layers,) the mean KL (nats) a full cache in each layer closes while every other layer keeps kv_budget
    evenly (layer_repair, teacher-forced along the full cache's greedy tokens)."""
    from tinygen.eval.methods import Method
    from tinygen.eval.runner import reference_run

    method = Method("auto", profile="budget", kv_budget=kv_budget)
    gains = []
    for n, ids in enumerate(prompt_ids, 1):
        res = layer_repair(model, tok, reference_run(model, ids, max_new_tokens, tok.eos_ids), method)
        gains.append([x["kl_gain"] for x in res["layers"]])
        if log:
            log(f"[sensitivity {n}/{len(prompt_ids)}] KL {res['kl']:.4f}")
    return torch.tensor(gains, dtype=torch.float64).mean(0)


def parse_args(argv):
    p = OneLineParser(prog="python -m tinygen.eval.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--prompts", metavar="FILE", default=str(ROOT.parent / "shared" / "eval" / "mt_bench.jsonl"),
                   help="JSONL or JSON list, through the chat template (default: MT-Bench first turns)")
    p.add_argument("--start", type=int, default=60, metavar="K", help="skip the first K prompts (default 60: MT-Bench "
                   "61-80, outside the development set 1-40 and the held-out 41-60)")
    p.add_argument("--limit", type=int, default=20, help="use N prompts (default 20)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sensitivity-prompts", type=int, default=None, metavar="N", help="measure each layer's output "
                   "sensitivity (the KL a full cache there closes: 31 runs a prompt) on the first N prompts (default: "
                   "all of them; 0 = recovery curves only, which did not beat the even split)")
    p.add_argument("--sensitivity-budget", type=float, default=0.7, help="the even budget of that measurement")
    p.add_argument("--layer-floor", type=float, default=0.75, help="no layer's budget below this share of the "
                   "target (default 0.75: the allocation measured; written to the file)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="output file (default MODEL/fastgen_calibration.json)")
    a = p.parse_args(argv)
    if a.sensitivity_prompts is None:
        a.sensitivity_prompts = a.limit
    for ok, message in [(a.limit >= 1, "--limit must be at least 1"),
                        (a.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
                        (a.threads >= 0, "--threads must be >= 0"),
                        (a.start >= 0, "--start must be >= 0"),
                        (0 <= a.layer_floor <= 1, "--layer-floor must be in [0, 1]"),
                        (0 < a.sensitivity_budget < 1, "--sensitivity-budget must be in (0, 1)"),
                        (0 <= a.sensitivity_prompts <= a.limit, "--sensitivity-prompts must be in [0, --limit]")]:
        if not ok:
            p.error(message)
    return a


def run(a) -> int:
    from tinygen.eval.prompts import load_prompts
    from tinygen.eval.sweep import encode_prompts
    from tinygen.fastgen.budget import CALIBRATION_FILE, MENU
    from tinygen.fastgen.policy import FastGenConfig
    from tinygen.loader import load_model
    from tinygen.tokenizer import Tokenizer

    records = load_prompts(a.prompts, a.limit, a.start)  # bad input fails before the model loads
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model(a.model, device="cpu", dtype="float32")
    tok = Tokenizer(a.model, model.cfg.eos_token_ids)
    prompts = encode_prompts(tok, records)
    t0 = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    curves, rows = calibrate(model, [p["ids"] for p in prompts], a.max_new_tokens, tok.eos_ids, MENU, log)
    extra = {}
    if a.sensitivity_prompts:
        gains = sensitivity(model, tok, [p["ids"] for p in prompts[: a.sensitivity_prompts]], a.max_new_tokens,
                            a.sensitivity_budget, log)
        extra = {"layer_sensitivity": gains.round(decimals=6).tolist(), "sensitivity_budget": a.sensitivity_budget,
                 "sensitivity_prompts": a.sensitivity_prompts, "sensitivity_shapes": FastGenConfig.shapes}
    out = Path(a.out) if a.out else Path(a.model) / CALIBRATION_FILE
    write_json_atomic(out, {**extra,
        "model": Path(a.model).name, "prompts": Path(a.prompts).name, "start": a.start, "limit": a.limit,
        "max_new_tokens": a.max_new_tokens, "generated_rows": rows, "seconds": round(time.perf_counter() - t0, 1),
        "command": "python -m tinygen.eval.calibrate " + " ".join(sys.argv[1:]),
        "layer_floor": a.layer_floor, "menu": [o.label for o in MENU],
        "layer_recovery": curves.round(decimals=6).tolist()})
    log(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    sys.path.insert(0, str(ROOT))
    return run_main(run, parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
