"""Sequences that finish at different steps under a KV cap: what the memory FastGen saves buys in throughput.

    python bench/bench_batch_finish.py                   # prints one line per method (medians)

Method: the first --prompts MT-Bench first turns through the chat template, each with its own new-token limit drawn
from --min-new..--max-new (seeded; EOS ignored, so each runs to its limit), greedy, float32, batch --prompts (the cap
decides how many run), --kv-budget-mb set to what --cap-full full caches of the longest prompt plus --max-new need
(the runner's own projection). Sequences join as others finish. Reports decode tok/s (tokens out of decode steps
over decode time), end-to-end tok/s (every generated token over the whole run, prefills included), the most
sequences running at once and preemptions (where the runner reports them); median over --repeats after one warm-up.
It uses only the BatchRunner API that today's and older code share, so it runs on either to compare.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import add_mt_bench_args, load_mt_bench  # noqa: E402
from tinygen.batch import BatchRunner  # noqa: E402
from tinygen.projection import projected_bytes  # noqa: E402
from tinygen.fastgen.policy import FastGenConfig  # noqa: E402
from tinygen.sampling import SamplingParams  # noqa: E402

METHODS = {"full": FastGenConfig(policy="full"), "auto budget=0.7": FastGenConfig()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_mt_bench_args(p, prompts=32)
    p.add_argument("--min-new", type=int, default=16)
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument("--cap-full", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1)
    a = p.parse_args()
    model, tok, prompts = load_mt_bench(a, batch=a.cap_full)
    rng = random.Random(0)
    limits = [rng.randint(a.min_new, a.max_new) for _ in prompts]
    cap = a.cap_full * max(projected_bytes(model, METHODS["full"], max(map(len, prompts)), a.max_new))
    print(f"{len(prompts)} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens), new tokens "
          f"{min(limits)}-{max(limits)}, cap {cap / 2**20:.2f} MiB ({a.cap_full} full caches), {a.threads} threads",
          flush=True)
    rates = {name: ([], []) for name in METHODS}
    for i in range(a.repeats + 1):
        for name, cfg in METHODS.items():
            runner = BatchRunner(model, tok, cfg, SamplingParams(), a.max_new, len(prompts), cap, ignore_eos=True)
            for j, (ids, new) in enumerate(zip(prompts, limits)):
                runner.submit(j, ids, max_new_tokens=new)
            stats = runner.run([], lambda seq: None)
            if i:  # the first round is warm-up
                rates[name][0].append(stats.decode_tokens_per_second)
                rates[name][1].append(stats.generated_tokens / stats.seconds)
            print(f"  round {i} {name}: decode {stats.decode_tokens_per_second:.1f} tok/s, end-to-end "
                  f"{stats.generated_tokens / stats.seconds:.1f} tok/s, {stats.max_running} running at most, "
                  f"preemptions {getattr(stats, 'preemptions', 'n/a')}, peak KV {stats.peak_kv_bytes / 2**20:.2f} MiB",
                  flush=True)
    for name in METHODS:
        print(f"{name}: decode {statistics.median(rates[name][0]):.1f} tok/s, end-to-end "
              f"{statistics.median(rates[name][1]):.1f} tok/s (median of {a.repeats})", flush=True)


if __name__ == "__main__":
    main()
