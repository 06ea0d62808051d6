"""tinygen against HF transformers `LlamaForCausalLM.generate`: same weights, dtype and prompt; greedy, batch 1.

    python bench/bench_engine.py            # float32 and bfloat16, 5 runs each -> bench/results/engine_cpu.md
    python bench/bench_engine.py --quick    # smoke check: 2 runs, 32 new tokens

Method (also written beside the results):
- Prompt: exactly --prompt-tokens ids of Pride and Prejudice from chapter 1, no chat template; --new-tokens forced
  new tokens (tinygen ignore_eos=True; HF min_new_tokens = max_new_tokens, do_sample=False).
- Runs alternate tinygen, HF, tinygen, HF, ...; one warm-up of each is excluded; figures are medians over --runs.
- tinygen: its own GenerationStats. Prefill = prompt tokens / (prefill forward + choosing the first token);
  decode = decode steps (new tokens - 1) / their time.
- HF: prefill = prompt tokens / time of one forward on the prompt with use_cache=True and logits_to_keep=1 (what
  generate's first step runs, without generate's setup); decode = (new tokens - 1) / (time of generate(new tokens)
  - time of generate(1)), so generate's setup and its prefill cancel out.
- Share of bound = (bytes of all parameters, tied embedding once, read per token) x decode tok/s / measured read
  bandwidth (median of big.sum() over a 1 GiB float32 tensor at the same thread count). KV-cache reads are left out.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (GB, load_average, machine_lines, max_rss_bytes, prompt_ids, read_bandwidth_gbs,  # noqa: E402
                          timed, write_atomic)
from tinygen.cache import full_kv_bytes  # noqa: E402
from tinygen.generate import GenerationStats, full_caches, generate  # noqa: E402
from tinygen.loader import DTYPES, load_model  # noqa: E402
from tinygen.tokenizer import Tokenizer  # noqa: E402

DEFAULT_MODEL = ROOT / "weights" / "SmolLM2-135M-Instruct"


def parse_args():
    p = argparse.ArgumentParser(description="tinygen vs HF transformers generate, CPU or GPU, batch 1, greedy")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="HF-layout Llama checkpoint directory")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated (default float32,bfloat16)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per engine and dtype (default 5)")
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="smoke check: 2 runs, 32 new tokens")
    p.add_argument("--out", help="markdown results file (default bench/results/engine_cpu.md, _quick.md for --quick)")
    a = p.parse_args()
    if a.quick:
        a.runs, a.new_tokens = 2, 32
    a.out = Path(a.out or ROOT / "bench" / "results" / ("engine_cpu_quick.md" if a.quick else "engine_cpu.md"))
    a.dtypes = [d.strip() for d in a.dtypes.split(",")]
    assert all(d in DTYPES for d in a.dtypes), f"--dtypes: choose from {', '.join(DTYPES)}"
    assert a.runs >= 1 and a.new_tokens >= 2 and a.prompt_tokens >= 1, "--runs >= 1, --new-tokens >= 2, --prompt-tokens >= 1"
    return a


def bench_dtype(args, dtype: str, ids: list[int]) -> dict:
    """Load both engines in `dtype`, alternate their runs, and return the medians."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    n_new = args.new_tokens
    tg = load_model(args.model, device="cpu", dtype=dtype)
    hf = LlamaForCausalLM.from_pretrained(args.model, dtype=DTYPES[dtype]).eval()
    prompt = torch.tensor([ids])
    hf_kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=hf.config.pad_token_id)

    def run_tinygen():
        caches = full_caches(tg, len(ids) + n_new)
        stats = GenerationStats()
        out = list(generate(tg, ids, caches, n_new, ignore_eos=True, stats=stats))
        assert len(out) == n_new and stats.decode_steps == n_new - 1, "tinygen did not generate every token"
        return dict(prefill=stats.prefill_seconds, decode_tps=stats.decode_tokens_per_second, tokens=out,
                    kv_alloc=sum(c.nbytes() for c in caches))

    @torch.inference_mode()
    def run_hf():
        t_prefill, _ = timed(hf, prompt, use_cache=True, logits_to_keep=1)
        t_one, _ = timed(hf.generate, prompt, max_new_tokens=1, min_new_tokens=1, **hf_kwargs)
        t_all, out = timed(hf.generate, prompt, max_new_tokens=n_new, min_new_tokens=n_new, **hf_kwargs)
        tokens = out[0, len(ids):].tolist()
        assert len(tokens) == n_new, "HF did not generate every token"
        return dict(prefill=t_prefill, gen1=t_one, decode_tps=(n_new - 1) / (t_all - t_one), tokens=tokens)

    run_tinygen(), run_hf()  # warm-up, excluded
    tg_runs, hf_runs = [], []
    for i in range(args.runs):
        tg_runs.append(run_tinygen())
        hf_runs.append(run_hf())
        print(f"  {dtype} run {i + 1}/{args.runs}: tinygen prefill {tg_runs[-1]['prefill'] * 1e3:.0f} ms, "
              f"decode {tg_runs[-1]['decode_tps']:.1f} tok/s | HF prefill {hf_runs[-1]['prefill'] * 1e3:.0f} ms, "
              f"decode {hf_runs[-1]['decode_tps']:.1f} tok/s", flush=True)

    def summary(runs):
        tps = [r["decode_tps"] for r in runs]
        return dict(prefill=statistics.median(r["prefill"] for r in runs), decode_tps=statistics.median(tps),
                    decode_min=min(tps), decode_max=max(tps))

    cfg = tg.cfg
    result = dict(dtype=dtype, tinygen=summary(tg_runs), hf=summary(hf_runs),
                  hf_gen1=statistics.median(r["gen1"] for r in hf_runs),
                  weight_bytes=sum(p.numel() * p.element_size() for p in tg.parameters()),
                  kv_alloc=tg_runs[0]["kv_alloc"],
                  kv_kept=full_kv_bytes(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, len(ids) + n_new - 1, DTYPES[dtype]),
                  same_tokens=first_difference(tg_runs[0]["tokens"], hf_runs[0]["tokens"]))
    return result  # both models are freed here, before the next dtype loads


def first_difference(a: list[int], b: list[int]) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return f"all {len(a)} identical" if i is None else f"identical up to token {i}, then differ"


def report(args, machine: list[str], results: list[dict], bw_gbs: float, rss: int) -> str:
    n_prompt, n_new = args.prompt_tokens, args.new_tokens
    lines = ["# tinygen vs HF transformers: CPU, batch 1, greedy", "",
             *(f"- {m}" for m in machine),
             f"- settings: {n_prompt}-token prompt (Pride and Prejudice, chapter 1, no chat template), {n_new} forced new "
             f"tokens, greedy, batch 1, {args.runs} timed runs per engine and dtype (medians; one warm-up each excluded; "
             f"engines alternate), model `{Path(args.model).name}`",
             f"- measured read bandwidth: {bw_gbs:.1f} GB/s (median of `big.sum()` over 1 GiB float32, "
             f"{torch.get_num_threads()} threads)", "",
             "| dtype | engine | prefill ms | prefill tok/s | decode tok/s (median, min-max) | share of bandwidth bound |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        bound_tps = bw_gbs * GB / r["weight_bytes"]
        for name, label in (("tinygen", "tinygen"), ("hf", "HF generate")):
            s = r[name]
            lines.append(f"| {r['dtype']} | {label} | {s['prefill'] * 1e3:.0f} | {n_prompt / s['prefill']:.0f} | "
                         f"{s['decode_tps']:.1f} ({s['decode_min']:.1f}-{s['decode_max']:.1f}) | "
                         f"{s['decode_tps'] / bound_tps:.0%} |")
        t, h = r["tinygen"], r["hf"]
        lines.append(f"| {r['dtype']} | **tinygen / HF** | | **{h['prefill'] / t['prefill']:.2f}x** | "
                     f"**{t['decode_tps'] / h['decode_tps']:.2f}x** | |")
    lines.append("")
    for r in results:
        mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
        lines.append(f"- {r['dtype']}: weights read per token {mb(r['weight_bytes'])} -> bandwidth bound "
                     f"{bw_gbs * GB / r['weight_bytes']:.0f} tok/s; greedy tokens tinygen vs HF: {r['same_tokens']}; "
                     f"HF generate(1) median {r['hf_gen1'] * 1e3:.0f} ms; tinygen KV cache {mb(r['kv_alloc'])} "
                     f"allocated, {mb(r['kv_kept'])} kept at the end")
    lines += [f"- process max RSS (both engines of each dtype loaded, before the bandwidth buffer): {rss / 1e9:.2f} GB",
              f"- load average at end: {load_average()}", "",
              "Method: tinygen prefill and decode come from its GenerationStats (decode = new tokens - 1 steps). "
              "HF prefill is one forward on the prompt with use_cache=True, logits_to_keep=1 (generate's first step "
              "without its setup); HF decode is (new tokens - 1) / (time of generate(new tokens) - time of "
              "generate(1)). Share of bound = parameter bytes (tied embedding once) x decode tok/s / read bandwidth; "
              "KV-cache reads are left out."]
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    machine = machine_lines()
    print("\n".join(machine), flush=True)
    ids = prompt_ids(Tokenizer(args.model), args.prompt_tokens)
    results = []
    for dtype in args.dtypes:
        results.append(bench_dtype(args, dtype, ids))
        gc.collect()
    rss = max_rss_bytes()
    bw = read_bandwidth_gbs()  # after the runs, so its 1 GiB buffer is not in the max RSS above
    text = report(args, machine, results, bw, rss)
    print("\n" + text, end="")
    write_atomic(args.out, text)
    print(f"\nwritten to {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
