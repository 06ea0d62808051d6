"""python -m tinygen.eval: fidelity and memory of a compressed KV cache against the full cache, the sweep against
fixed policies at equal memory, long-context perplexity, and policy-map figures.

    python -m tinygen.eval --prompts ../shared/eval/mt_bench.jsonl --limit 12 --max-new-tokens 64 --sweep
    python -m tinygen.eval --long-context ../shared/eval/frankenstein.txt --ctx 4096 --windows 2
    python -m tinygen.eval --prompts ../shared/eval/mt_bench.jsonl --turns 2 --limit 40 --max-new-tokens 64
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from tinygen.cliutil import OneLineParser, read_text, run_main, write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT / "weights" / "SmolLM2-135M-Instruct"


def parse_args(argv):
    p = OneLineParser(prog="python -m tinygen.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", metavar="FILE", help="JSONL or JSON list; records with prompt, instruction or turns")
    p.add_argument("--long-context", metavar="FILE", help="UTF-8 text for long-context perplexity")
    p.add_argument("--limit", type=int, help="use N prompts (default: all)")
    p.add_argument("--start", type=int, default=0, metavar="K", help="skip the first K prompts (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="per prompt, or per turn with --turns")
    p.add_argument("--turns", type=int, default=1, help="N >= 2: conversations of the first N of each record's "
                   "'turns' (MT-Bench); the cache carries the conversation and each turn is scored (default 1)")
    p.add_argument("--fixed", default=None, metavar="P,P,...", help="with --turns and auto: fixed policies matched "
                   "to auto's kept fraction (default frequent,local+frequent; 'none' for none)")
    p.add_argument("--fresh", action="store_true", help="with --turns: also run the method from an empty cache "
                   "each turn (the whole history prefilled and profiled at once): what carrying the cache costs")
    p.add_argument("--sweep", action="store_true", help="auto's budget profile at kept 0.55/0.65/0.70/0.80, the fixed "
                   "policies (frequent, local+frequent, sinks) at each of its kept fractions, and the paper's "
                   "auto at T = 0.90/0.95/0.98/0.99")
    p.add_argument("--kv-budgets", default=None, metavar="F,F,...", help="with --sweep: the budget profile's points "
                   "(default 0.55,0.65,0.70,0.80)")
    p.add_argument("--thresholds", default=None, metavar="T,T,...", help="with --sweep: the paper profile's points "
                   "(default 0.90,0.95,0.98,0.99)")
    p.add_argument("--policy", default="auto", help="without --sweep: auto, a fixed policy (e.g. local+frequent) or "
                   "sinks (first 4 tokens + recent window of local-ratio x length)")
    p.add_argument("--profile", choices=("budget", "paper"), default=None, help="how auto chooses: budget (default) "
                   "or paper")
    p.add_argument("--kv-budget", type=float, default=None, metavar="F", help="auto, budget profile: kept fraction "
                   "in (0, 1] (default 0.7)")
    p.add_argument("--threshold", type=float, default=None, help="auto, paper profile: recovery threshold T in "
                   "(0, 1] (default 0.98; giving it selects --profile paper)")
    p.add_argument("--shapes", choices=("local+frequent", "profile"), default=None, help="auto, budget profile: "
                   "each head keeps its share as local+frequent (default) or in the shape its prompt's profile picks")
    p.add_argument("--calibration", metavar="FILE", default=None, help="auto, budget profile: spread the budget "
                   "across layers by this calibration (python -m tinygen.eval.calibrate); default: the model "
                   "directory's fastgen_calibration.json if there is one; 'none' spreads it evenly. With --sweep the "
                   "even spread runs beside it")
    p.add_argument("--local-ratio", type=float, default=0.3, help="r_l in [0, 1] (fixed policies, paper profile)")
    p.add_argument("--frequent-ratio", type=float, default=0.3, help="r_f in [0, 1] (fixed policies, paper profile)")
    p.add_argument("--free-run", action="store_true", help="also decode each compressed cache freely to find where "
                   "it departs (by default that index is read off the teacher-forced run, which is equivalent)")
    p.add_argument("--ctx", type=int, default=4096, help="long-context window in tokens (default 4096)")
    p.add_argument("--windows", type=int, default=1, help="long-context windows to score (default 1)")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (default)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice; on a shared "
                   "CPU, 1 can be many times faster)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="output directory (default bench/results)")
    p.add_argument("--tag", default=None, help="file name stem (default eval_sweep or eval_<policy>)")
    a = p.parse_args(argv)
    checks = [(a.prompts or a.long_context, "give --prompts FILE and/or --long-context FILE"),
              (a.limit is None or a.limit >= 1, "--limit must be at least 1"),
              (a.start >= 0, "--start must be >= 0"),
              (a.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
              (a.threshold is None or 0 < a.threshold <= 1, "--threshold must be in (0, 1]"),
              (a.kv_budget is None or 0 < a.kv_budget <= 1, "--kv-budget must be in (0, 1]"),
              (a.kv_budget is None or a.threshold is None, "give --kv-budget (budget profile) or --threshold (paper "
               "profile), not both"),
              (a.kv_budget is None or a.policy == "auto", "--kv-budget is for --policy auto"),
              (not (a.kv_budget is not None and a.profile == "paper"), "--kv-budget is for --profile budget; the "
               "paper's profile takes --threshold"),
              (not (a.threshold is not None and a.profile == "budget"), "--threshold is for --profile paper; the "
               "budget profile takes --kv-budget"),
              (a.shapes is None or (a.policy == "auto" and a.profile != "paper" and a.threshold is None),
               "--shapes is for --policy auto with the budget profile"),
              (0 <= a.local_ratio <= 1, "--local-ratio must be in [0, 1]"),
              (0 <= a.frequent_ratio <= 1, "--frequent-ratio must be in [0, 1]"),
              (a.ctx >= 2, "--ctx must be at least 2"),
              (a.windows >= 1, "--windows must be at least 1"),
              (a.threads >= 0, "--threads must be >= 0"),
              (not (a.sweep and a.policy not in ("auto",)), "--sweep runs every policy: leave out --policy"),
              (a.turns >= 1, "--turns must be at least 1"),
              (a.turns == 1 or a.prompts, "--turns needs --prompts FILE"),
              (a.turns == 1 or not (a.sweep or a.long_context or a.free_run),
               "--turns runs on its own: leave out --sweep, --long-context and --free-run"),
              (a.fixed is None or a.turns > 1, "--fixed goes with --turns"),
              (not a.fresh or a.turns > 1, "--fresh goes with --turns"),
              (a.fixed is None or a.policy == "auto", "--fixed is matched to auto: leave out --policy")]
    for ok, message in checks:
        if not ok:
            p.error(message)
    for name in ("kv_budgets", "thresholds"):
        text = getattr(a, name)
        if text is None:
            continue
        if not a.sweep:
            p.error(f"--{name.replace('_', '-')} goes with --sweep")
        try:
            values = tuple(float(x) for x in text.split(","))
        except ValueError:
            p.error(f"--{name.replace('_', '-')}: give numbers separated by commas, got {text!r}")
        if not all(0 < x <= 1 for x in values):
            p.error(f"--{name.replace('_', '-')}: each value must be in (0, 1], got {text!r}")
        setattr(a, name, values)
    sys.path.insert(0, str(ROOT))
    from tinygen.errors import TinygenError
    from tinygen.eval.methods import SINKS, check_policy
    from tinygen.fastgen.policy import PUNCT, SPECIAL, FastGenConfig, parse_policy

    if a.profile is None:
        a.profile = "paper" if a.threshold is not None else FastGenConfig.profile
    a.threshold = FastGenConfig.threshold if a.threshold is None else a.threshold
    a.kv_budget = FastGenConfig.kv_budget if a.kv_budget is None else a.kv_budget
    a.shapes = FastGenConfig.shapes if a.shapes is None else a.shapes

    if a.turns > 1:
        text = "frequent,local+frequent" if a.fixed is None and a.policy == "auto" else (a.fixed or "none")
        a.fixed = () if text == "none" else tuple(x.strip() for x in text.split(","))
    try:
        check_policy(a.policy)
        for name in a.fixed or ():
            check_policy(name)
            if name in ("auto", "full") or name != SINKS and parse_policy(name) & (SPECIAL | PUNCT):
                p.error(f"--fixed: {name!r} cannot be matched to a kept fraction (give frequent, local, "
                        f"local+frequent or sinks)")
    except TinygenError as e:
        p.error(str(e))
    if a.turns > 1 and SINKS in (a.policy, *(a.fixed or ())):
        p.error("sinks cannot take a later turn (its window cache decodes one token at a time): with --turns give "
                "frequent, local or local+frequent")
    if a.policy == "full" and not a.sweep and a.turns == 1:  # with --turns it checks the chunk path: 1.0 agreement
        p.error("--policy full is the reference itself: choose a compressed policy")
    return a


def run(a) -> int:
    import torch

    from tinygen.eval.longctx import long_context, long_context_md
    from tinygen.eval.methods import Method
    from tinygen.eval.plots import heatmap, stability, sweep_plot
    from tinygen.eval.prompts import load_prompts, machine, write_jsonl
    from tinygen.eval.sweep import encode_prompts, log, run_methods, summaries, sweep, table
    from tinygen.loader import load_model
    from tinygen.tokenizer import Tokenizer

    if a.turns > 1:  # bad input fails before the model loads
        from tinygen.eval.turns import load_conversations

        prompts, convs = None, load_conversations(a.prompts, a.turns, a.limit, a.start)
    else:
        prompts = load_prompts(a.prompts, a.limit, a.start) if a.prompts else None
    text = None
    if a.long_context:
        text = read_text(a.long_context)
    out = Path(a.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot create {out}: {e.strerror or e}", file=sys.stderr)
        return 1
    if a.threads:
        torch.set_num_threads(a.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    model = load_model(a.model, device=device, dtype=a.dtype)
    tok = Tokenizer(a.model, model.cfg.eos_token_ids)
    from tinygen.fastgen.budget import calibration_path, read_calibration

    method = Method(a.policy, a.threshold, a.local_ratio, a.frequent_ratio, profile=a.profile, kv_budget=a.kv_budget,
                    shapes=a.shapes)
    calibration = calibration_path(a.model, a.calibration)
    cal = read_calibration(calibration, model.cfg.n_layers) if calibration is not None else None
    if cal is not None and a.policy == "auto" and a.profile == "budget":
        method = dataclasses.replace(method, layer_budgets=cal.budgets(method.kv_budget))
    stem = a.tag or ("eval_sweep" if a.sweep else f"eval_{a.policy.replace('+', '_')}")
    meta = {"model": str(a.model), "dtype": a.dtype, "device": device, "machine": machine(),
            "prompts_file": a.prompts, "start": a.start, "limit": a.limit, "max_new_tokens": a.max_new_tokens,
            "free_run": a.free_run, "threads": torch.get_num_threads(),
            "calibration": str(calibration) if calibration is not None else None, "command": "python -m tinygen.eval " + " ".join(sys.argv[1:])}

    if a.turns > 1:
        from tinygen.eval.turns_report import turns_eval, write_turns_report

        log(f"{len(convs)} conversations of {a.turns} turns, up to {a.max_new_tokens} new tokens a turn, on {device} "
            f"({a.dtype})")
        records, matching = turns_eval(model, tok, convs, method, a.fixed, a.max_new_tokens, a.fresh)
        stem = a.tag or ("eval_two_turn" if a.turns == 2 else f"eval_{a.turns}_turns")
        print(write_turns_report(out, stem, dict(meta, turns=a.turns, method=method.to_json()), records, matching))
        return 0

    if prompts:
        prompts = encode_prompts(tok, prompts)
        log(f"{len(prompts)} prompts, {min(len(p['ids']) for p in prompts)}-{max(len(p['ids']) for p in prompts)} "
            f"tokens, up to {a.max_new_tokens} new tokens each, on {device} ({a.dtype})")
        if a.sweep:
            points = {k: v for k, v in (("kv_budgets", a.kv_budgets), ("thresholds", a.thresholds)) if v}
            records, matching = sweep(model, tok, prompts, a.max_new_tokens, local_ratio=a.local_ratio,
                                      frequent_ratio=a.frequent_ratio, run_free=a.free_run, calibration=cal,
                                      shapes=a.shapes, **points)
            meta["matching"] = matching
        else:
            records = run_methods(model, tok, prompts, [method], a.max_new_tokens, a.free_run)
        sums = summaries(records)
        write_jsonl(out / f"{stem}_prompts.jsonl", records)
        summary = dict(meta, methods=sums)
        autos = [r for r in records if r["method"]["policy"] == "auto" and r["method"]["profile"] == "paper"]
        if autos:  # the paper profile's policy maps (the budget profile's are in the records)
            t = min({r["method"]["threshold"] for r in autos}, key=lambda x: abs(x - 0.98))
            maps = [r for r in autos if r["method"]["threshold"] == t]
            figs = "eval" if stem == "eval_sweep" else stem  # eval_policy_heatmap.png beside eval_sweep.png
            heatmap(maps[0]["policies"], out / f"{figs}_policy_heatmap.png",
                    f"policy map, prompt {maps[0]['id']}, T={t:g}")
            st = stability([r["policies"] for r in maps], out / f"{figs}_policy_stability.png",
                           f"head habits over {len(maps)} prompts, T={t:g}")
            summary["stability"] = {"threshold": t, "mean_share": st["mean_share"], "share": st["share"]}
        md = f"# {stem}\n\n`{meta['command']}`\n\nmodel {a.model}, {a.dtype} on {device}; {len(prompts)} prompts, " \
             f"up to {a.max_new_tokens} new tokens; means over prompts of per-prompt means.\n\n" + table(sums)
        if a.sweep:
            sweep_plot(sums, out / f"{stem}.png", f"{len(prompts)} prompts x {a.max_new_tokens} tokens, {a.dtype}")
        write_json_atomic(out / f"{stem}_summary.json", summary)
        write_text_atomic(out / f"{stem}.md", md)
        print(table(sums))
    if text is not None:
        res = long_context(model, tok, text, a.ctx, a.windows, [method], log=log)
        write_json_atomic(out / f"{stem}_long_context.json", dict(meta, **res))
        write_text_atomic(out / f"{stem}_long_context.md", long_context_md(res))
        print(long_context_md(res))
    return 0


def main(argv=None) -> int:
    return run_main(run, parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
