"""Batches on the CPU: decode throughput and peak KV bytes at batch 1-16, and what a KV byte cap admits.

    python bench/bench_batch.py                          # -> bench/results/batch_cpu.md
    python bench/bench_batch.py --batches 1,4 --repeats 1 --new 32

Method (also written beside the results):
- Prompts: --prompt tokens of Pride and Prejudice each (from chapter 1, consecutive slices), no chat template;
  greedy, --new forced new tokens each (EOS ignored), float32.
- Throughput: for each batch size B, B prompts run together through `BatchRunner` (each prefilled alone, then
  decoded in one forward per step); decode tok/s counts every sequence's tokens out of decode steps over the
  decode time. Median over --repeats after one warm-up run; full and auto (budget 0.7) alternate.
- Weights layout (`load_model(batch=...)`, `cpu_layout`): each batch size runs the model as the command line
  loads it for that batch ("packed": prepacked for oneDNN, for one row at batch 1, for the largest batch otherwise;
  with one thread a batch-1 load keeps the "gemv" layout instead); the "x batch 1" column divides by that batch 1.
  --layout-ab adds batch 1 and batch 8 in the GEMV layout ((in, out) storage for MKL, loaded on one thread), so
  the layouts are seen side by side.
- Under a cap: --cap-prompts prompts with batch up to --cap-prompts and --kv-budget-mb set to what
  N full caches need, for each N in --cap-full (the runner's projection: a full cache of the final length); how
  many sequences each policy runs at once, its decode throughput and its peak KV bytes (the pool's blocks in use at
  their most, a prefill's whole prompt included).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine_lines, prompt_ids, write_report  # noqa: E402
from tinygen.batch import BatchRunner  # noqa: E402
from tinygen.projection import projected_bytes  # noqa: E402
from tinygen.fastgen.policy import FastGenConfig  # noqa: E402
from tinygen.loader import load_model  # noqa: E402
from tinygen.sampling import SamplingParams  # noqa: E402
from tinygen.tokenizer import Tokenizer  # noqa: E402

METHODS = {"full": FastGenConfig(policy="full"), "auto budget=0.7": FastGenConfig()}


def run(model, tok, cfg, prompts, batch, new, cap=None):
    runner = BatchRunner(model, tok, cfg, SamplingParams(), new, batch, cap, ignore_eos=True)
    return runner.run(list(enumerate(prompts)), lambda seq: None)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "weights" / "SmolLM2-135M-Instruct"))
    p.add_argument("--batches", default="1,4,8,16")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cap-prompts", type=int, default=16)
    p.add_argument("--cap-full", default="4,8", help="caps that hold this many full caches (comma-separated)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layout-ab", type=int, default=1, help="also run batch 1 and 8 in the GEMV layout (0: do not)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    batches = [int(x) for x in a.batches.split(",")]
    first = "packed" if a.threads > 1 else "gemv"  # the layout load_model(batch=1) picks (cpu_layout)
    model = load_model(a.model, batch=max(batches))
    rows = [(1, load_model(a.model, batch=1), first)] + [(B, model, "packed") for B in batches if B != 1]
    if a.layout_ab:
        torch.set_num_threads(1)  # a batch-1 load on one thread keeps the GEMV layout
        gemv = load_model(a.model, batch=1)
        torch.set_num_threads(a.threads)
        rows += [(B, gemv, "gemv") for B in (1, 8) if (B, "gemv") != (1, first)]
    tok = Tokenizer(a.model, model.cfg.eos_token_ids)
    n = max([B for B, *_ in rows] + [a.cap_prompts])
    book = prompt_ids(tok, a.prompt * n)
    prompts = [book[i * a.prompt : (i + 1) * a.prompt] for i in range(n)]

    table = []
    for B, weights, layout in rows:
        rates = {name: [] for name in METHODS}
        peaks = {}
        for i in range(a.repeats + 1):
            for name, cfg in METHODS.items():
                stats = run(weights, tok, cfg, prompts[:B], B, a.new)
                if i:  # the first round is warm-up
                    rates[name].append(stats.decode_tokens_per_second)
                peaks[name] = (stats.peak_kv_bytes, stats.peak_kv_bytes_full)
        for name in METHODS:
            table.append((B, layout, name, statistics.median(rates[name]), *peaks[name]))
            print(f"batch {B} {layout} {name}: {table[-1][3]:.1f} tok/s, peak KV {peaks[name][0] / 2**20:.2f} MiB",
                  flush=True)

    capped = []
    for n_full in [int(x) for x in a.cap_full.split(",")]:
        cap = n_full * max(projected_bytes(model, METHODS["full"], a.prompt, a.new))
        for name, cfg in METHODS.items():
            stats = run(model, tok, cfg, prompts[: a.cap_prompts], a.cap_prompts, a.new, cap)
            capped.append((n_full, cap, name, stats.max_running, stats.decode_tokens_per_second, stats.peak_kv_bytes))
            print(f"cap {cap / 2**20:.2f} MiB {name}: {stats.max_running} running, "
                  f"{stats.decode_tokens_per_second:.1f} tok/s", flush=True)

    base = {name: next(r for b, lay, m, r, *_ in table if m == name and b == 1 and lay == first) for name in METHODS}
    lines = ["# Batches on the CPU: throughput and KV bytes", "", *[f"- {x}" for x in machine_lines()],
             f"- settings: {a.prompt}-token prompts, {a.new} new tokens each, float32, greedy, EOS ignored, "
             f"{a.threads} threads; median of {a.repeats} after one warm-up", "",
             f"| batch | weights | method | decode tok/s (all sequences) | x batch 1 ({first}) | peak KV MiB | "
             "full caches would hold MiB |", "| ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for B, layout, name, rate, peak, full in table:
        lines.append(f"| {B} | {layout} | {name} | {rate:.1f} | {rate / base[name]:.2f} | {peak / 2**20:.2f} | "
                     f"{full / 2**20:.2f} |")
    lines += ["", f"Under a KV byte cap that holds N full caches of {a.prompt + a.new} tokens, {a.cap_prompts} prompts "
              "(one run each):", "",
              "| cap (N full caches) | cap MiB | method | sequences at once | decode tok/s | peak KV MiB |",
              "| ---: | ---: | --- | ---: | ---: | ---: |"]
    for n_full, cap, name, running, rate, peak in capped:
        lines.append(f"| {n_full} | {cap / 2**20:.2f} | {name} | {running} | {rate:.1f} | {peak / 2**20:.2f} |")
    write_report(Path(a.out) / "batch_cpu.md", lines, __doc__)


if __name__ == "__main__":
    main()
