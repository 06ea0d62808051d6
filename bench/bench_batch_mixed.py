"""Batches of prompts of mixed lengths on the CPU: the paged pool's peak KV, full against FastGen, and decode speed.

    python bench/bench_batch_mixed.py                    # -> bench/results/batch_cpu_mixed.md

Method (also written beside the results):
- Prompts: the first --prompts MT-Bench first turns (../shared/eval/mt_bench.jsonl) through the chat template, so
  their lengths differ; --new forced new tokens each (EOS ignored), greedy, float32, batch --batch, no cap.
- Methods: the full cache and `auto` (budget 0.7), every row of every running sequence in the paged pool
  (tinygen/kvpool.py, tinygen/paged.py: one attention call per layer for the batch).
- Decode tok/s counts every sequence's tokens out of decode steps over the decode time; peak KV is the most the
  pool's blocks in use ever held (K, V, positions, flags and scores of whole 16-token blocks; its high-water mark,
  a FastGen prefill's whole prompt included), and kept the K+V of the tokens the rows keep, measured after every
  prefill and step. Median over --repeats after one warm-up round;
  the methods alternate within each round.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import add_mt_bench_args, load_mt_bench, machine_lines, write_report  # noqa: E402
from tinygen.batch import BatchRunner  # noqa: E402
from tinygen.fastgen.policy import FastGenConfig  # noqa: E402
from tinygen.sampling import SamplingParams  # noqa: E402

METHODS = {"full": FastGenConfig(policy="full"), "auto budget=0.7": FastGenConfig()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_mt_bench_args(p, prompts=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = p.parse_args()
    model, tok, prompts = load_mt_bench(a, batch=a.batch)
    lengths = sorted(len(p) for p in prompts)

    rates, peaks = {name: [] for name in METHODS}, {}
    for i in range(a.repeats + 1):
        for name, cfg in METHODS.items():
            runner = BatchRunner(model, tok, cfg, SamplingParams(), a.new, a.batch, ignore_eos=True)
            stats = runner.run(list(enumerate(prompts)), lambda seq: None)
            if i:  # the first round is warm-up
                rates[name].append(stats.decode_tokens_per_second)
            peaks[name] = stats.peak_kv_bytes, stats.peak_kv_bytes_kept
    full_rate, (full_peak, _) = statistics.median(rates["full"]), peaks["full"]
    lines = ["# Batches of mixed-length prompts on the CPU: the paged pool, full against auto", "",
             *[f"- {x}" for x in machine_lines()],
             f"- settings: {len(prompts)} MT-Bench first turns ({lengths[0]}-{lengths[-1]} prompt tokens), batch "
             f"{a.batch}, {a.new} new tokens each, float32, greedy, EOS ignored, {a.threads} threads; median of "
             f"{a.repeats} after one warm-up", "",
             "| method | decode tok/s | x full | peak KV MiB (blocks used) | x full's | peak kept MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in METHODS:
        rate, (peak, kept) = statistics.median(rates[name]), peaks[name]
        lines.append(f"| {name} | {rate:.1f} | {rate / full_rate:.2f} | {peak / 2**20:.2f} | {peak / full_peak:.2f} | "
                     f"{kept / 2**20:.2f} |")
        print(f"{name}: {rate:.1f} tok/s, peak KV {peak / 2**20:.2f} MiB (x full {peak / full_peak:.2f}), kept "
              f"{kept / 2**20:.2f} MiB", flush=True)
    write_report(Path(a.out) / "batch_cpu_mixed.md", lines, __doc__)


if __name__ == "__main__":
    main()
