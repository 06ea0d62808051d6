"""The decode step eager against compiled (`--compile`) on the CPU, for the full cache and FastGen's `auto`, at one
long prompt and in a batch: the issue's CPU goals (compiled auto at 4k >= 1.05x compiled full; compiled batch 8 >=
1.3x eager batch 8).

    python bench/bench_compiled.py                 # -> bench/results/compiled_cpu.md
    python bench/bench_compiled.py --length 512 --new 16 --batch-new 8 --out /tmp/x.md   # a quick check

Method: the default weights (SmolLM2-135M-Instruct), float32, loaded unpacked for the compiler (prepack=False) and
packed by load_model for the eager rows, as `cli.py` loads them with and without --compile. Batch 1: a --length-token
prompt of Pride and Prejudice, greedy, --new forced tokens through `generate` (decode tok/s = decode steps / their
wall time), each row --repeats times, the median; the compiled rows' step is compiled and warmed up first on the
same policy (`CompiledStep.warm_up`), not timed. Batch: --batch MT-Bench first turns at once through BatchRunner,
--batch-new tokens each (ignore EOS, so all run to the end), decode tok/s = decode tokens / decode seconds from its
stats, after one untimed run of the same batch (compiling then). `auto` is the default budget profile (0.70).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import EVAL_DIR, machine_lines, prompt_ids, write_atomic  # noqa: E402
from tinygen.batch import BatchRunner  # noqa: E402
from tinygen.compiled import CompiledStep  # noqa: E402
from tinygen.eval.prompts import load_prompts  # noqa: E402
from tinygen.fastgen.cache import make_caches  # noqa: E402
from tinygen.fastgen.policy import FastGenConfig  # noqa: E402
from tinygen.generate import GenerationStats, generate  # noqa: E402
from tinygen.loader import load_model  # noqa: E402
from tinygen.sampling import SamplingParams  # noqa: E402
from tinygen.tokenizer import Tokenizer  # noqa: E402

POLICIES = {"full": FastGenConfig("full"), "auto": FastGenConfig()}


def one(model, tok, cfg, ids, new, decode=None) -> float:
    caches, on_tokens = make_caches(model, tok, cfg, len(ids) + new)
    stats = GenerationStats()
    kw = {"decode": decode} if decode else {}
    for _ in generate(model, ids, caches, new, ignore_eos=True, stats=stats, on_tokens=on_tokens, **kw):
        pass
    return stats.decode_tokens_per_second


def batch(model, tok, cfg, prompts, new, step_fn) -> float:
    runner = BatchRunner(model, tok, cfg, SamplingParams(), new, len(prompts), ignore_eos=True, step_fn=step_fn)
    return runner.run(list(enumerate(prompts)), lambda s: None).decode_tokens_per_second


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "weights" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batch-new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "compiled_cpu.md"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    header = machine_lines() + [f"float32, greedy; batch 1: {a.length}-token prompt, {a.new} new tokens, median of "
                                f"{a.repeats}; batch: {a.batch} MT-Bench first turns, {a.batch_new} new tokens each"]
    print("\n".join(header), flush=True)
    eager_model = load_model(a.model, batch=a.batch)
    plain = load_model(a.model, prepack=False)  # what --compile loads
    tok = Tokenizer(a.model, eager_model.cfg.eos_token_ids)
    ids = prompt_ids(tok, a.length)
    rows, rate = [], {}
    for name, cfg in POLICIES.items():
        step = CompiledStep(plain)
        t0 = time.perf_counter()
        step.warm_up(tok, cfg)
        compile_s = time.perf_counter() - t0
        for mode, model, decode in (("eager", eager_model, None), ("compiled", plain, step.decoder)):
            runs = [one(model, tok, cfg, ids, a.new, decode) for _ in range(a.repeats)]
            rate[name, mode, 1] = statistics.median(runs)
            rows.append(f"| {name} | {mode} | 1 x {a.length} | {rate[name, mode, 1]:.1f} | "
                        f"{' '.join(f'{r:.1f}' for r in runs)} | {compile_s if mode == 'compiled' else 0:.0f} |")
            print(rows[-1], flush=True)
    prompts = [tok.encode_prompt(r["prompt"]) for r in load_prompts(str(EVAL_DIR / "mt_bench.jsonl"), a.batch)]
    for name, cfg in POLICIES.items():
        step = CompiledStep(plain)
        for mode, model, fn in (("eager", eager_model, None), ("compiled", plain, step)):
            t0 = time.perf_counter()
            batch(model, tok, cfg, prompts, 4, fn)  # compiles the batch's graph (the compiled row)
            warm = time.perf_counter() - t0
            rate[name, mode, a.batch] = batch(model, tok, cfg, prompts, a.batch_new, fn)
            rows.append(f"| {name} | {mode} | {a.batch} MT-Bench | {rate[name, mode, a.batch]:.1f} | | "
                        f"{warm if mode == 'compiled' else 0:.0f} |")
            print(rows[-1], flush=True)
    goals = [f"- compiled auto / compiled full at {a.length} tokens: "
             f"{rate['auto', 'compiled', 1] / rate['full', 'compiled', 1]:.2f}x (goal >= 1.05x)",
             f"- eager auto / eager full at {a.length} tokens: "
             f"{rate['auto', 'eager', 1] / rate['full', 'eager', 1]:.2f}x"]
    for name in POLICIES:
        goals += [f"- {name}: compiled / eager, batch 1 at {a.length}: "
                  f"{rate[name, 'compiled', 1] / rate[name, 'eager', 1]:.2f}x; batch {a.batch}: "
                  f"{rate[name, 'compiled', a.batch] / rate[name, 'eager', a.batch]:.2f}x (goal >= 1.3x)"]
    text = "\n".join(["# The decode step, eager and compiled, on the CPU (bench/bench_compiled.py)", "",
                      *[f"- {h}" for h in header], "", __doc__.split("Method:", 1)[1].strip(), "",
                      "| policy | step | batch | decode tok/s | runs | compile / warm-up s |",
                      "| --- | --- | --- | --- | --- | --- |", *rows, "", *goals, ""])
    write_atomic(Path(a.out), text)
    print("\n".join(goals))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
