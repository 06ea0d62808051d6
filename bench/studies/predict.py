"""A study: how well prompt-time profiles predict the attention of the generated tokens (bench/results/eval_predict.md,
made as `python -m tinygen.eval.predict` before it moved here; docs/evaluation.md says what it decided).

    python bench/studies/predict.py --prompts ../shared/eval/mt_bench.jsonl --limit 20 --max-new-tokens 64 --threads 1

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

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.studies.predict_report import markdown, summarise  # noqa: E402
from tinygen.cliutil import OneLineParser, run_main, write_json_atomic, write_text_atomic  # noqa: E402
from tinygen.eval.recording import actual_recovery, kept_masks, record  # noqa: E402

DEFAULT_MODEL = ROOT / "weights" / "SmolLM2-135M-Instruct"
OBSERVATION = 32  # the budget profile's observation window: the last 32 prompt rows
F70 = "f70"


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
# The budget allocation against f70 and hindsight


def allocation_study(rec_b: torch.Tensor, c: torch.Tensor, L: int, menu, target: float = 0.7) -> dict:
    """One prompt, all heads of the model: the actual recovery each head gets under uniform f70, the budget
    allocation at `target` (floor 0 and 0.5, ranking by the observation-window prediction) and an oracle allocation
    that knows the actual recoveries. rec_b, c: (heads, options)."""
    from tinygen.fastgen.allocate import allocate

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


# ---------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv):
    p = OneLineParser(prog="python bench/studies/predict.py", description=__doc__.split("\n\n")[0])
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
            "command": "python bench/studies/predict.py " + " ".join(sys.argv[1:])}
    per_head = {k: torch.stack([r[k] for r in per_prompt]).mean(0).round(decimals=4).tolist()
                for k in ("a", "b", "c", "cp")}  # (layers, heads, options), means over prompts
    write_json_atomic(out / f"{a.tag}.json", dict(meta, summary=S, menu=[o.label for o in MENU], per_head=per_head,
                                                   prompts=[{"id": p["id"]} for p in prompts]))
    md = markdown(S, meta)
    write_text_atomic(out / f"{a.tag}.md", md)
    print(md)
    return 0


def main(argv=None) -> int:
    return run_main(run, parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
