"""FastGen against the full cache: decode speed, physical KV bytes and profiling cost at long contexts.

    python bench/bench_fastgen.py                       # 1k, 4k, 8k tokens -> bench/results/fastgen_<device>.md
    python bench/bench_fastgen.py --lengths 1024 --quick

Method (also written beside the results):
- Prompt: exactly L ids of Pride and Prejudice from chapter 1, no chat template; greedy, batch 1, forced new tokens.
- For each length and method, one prefill, then --segments x --segment-steps decode steps; the first segment is
  warm-up; decode tok/s is the median over the other segments. KV bytes are counted from the storage of the
  cache's tensors at the end (K, V, positions, scores, bitmaps), against a full cache of the same length.
- Profiling cost: prefill time with `auto` (block-wise attention that also collects the profile, policy choice,
  building the compressed stores) against prefill with the full cache (fused attention), alternating, median over
  --prefill-runs at the shortest length (one run each at the longer lengths).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import load_average, machine_lines, prompt_ids, timed, write_atomic  # noqa: E402
from tinygen.cache import full_kv_bytes  # noqa: E402
from tinygen.cache import kept_fraction  # noqa: E402
from tinygen.fastgen.cache import make_caches  # noqa: E402
from tinygen.fastgen.policy import FastGenConfig  # noqa: E402
from tinygen.generate import decode_step, prefill  # noqa: E402
from tinygen.loader import load_model  # noqa: E402
from tinygen.tokenizer import Tokenizer  # noqa: E402

METHODS = {"full": FastGenConfig(policy="full"), "auto T=0.98": FastGenConfig(threshold=0.98),
           "auto T=0.95": FastGenConfig(threshold=0.95), "local+frequent": FastGenConfig(policy="local+frequent")}


def run_method(model, tok, ids, cfg, segments, steps):
    max_len = len(ids) + segments * steps + 1
    caches, on_tokens = make_caches(model, tok, cfg, max_len)
    if on_tokens:
        on_tokens(ids)
    prefill_s, logits = timed(prefill, model, ids, caches)
    token, pos, rates = logits.argmax(-1, keepdim=True), len(ids), []
    for _ in range(segments):
        def segment():
            nonlocal token, pos
            for _ in range(steps):
                if on_tokens:
                    on_tokens([int(token)])  # reading the sampled token: the step's one host sync
                token = decode_step(model, token, caches, pos).argmax(-1, keepdim=True)
                pos += 1
        rates.append(steps / timed(segment)[0])
    cfg_model = model.cfg
    length = caches[0].length
    return {
        "prefill_s": prefill_s,
        "profile_s": sum(getattr(c, "profile_seconds", 0.0) for c in caches),
        "decode": statistics.median(rates[1:]),
        "kept": kept_fraction(caches),
        "kv_bytes": sum(c.nbytes() for c in caches),
        "kv_full": full_kv_bytes(cfg_model.n_layers, cfg_model.n_kv_heads, cfg_model.head_dim, length,
                                 model.embed.weight.dtype),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "weights" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--lengths", default="1024,4096,8000", help="prompt lengths in tokens (8000 + new tokens < 8192)")
    ap.add_argument("--segments", type=int, default=5)
    ap.add_argument("--segment-steps", type=int, default=16)
    ap.add_argument("--prefill-runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smoke check: 3 segments of 4 steps, 2 prefill runs")
    ap.add_argument("--out", default=None, help="markdown results file (default bench/results/fastgen_<device>.md)")
    a = ap.parse_args()
    if a.quick:
        a.segments, a.segment_steps, a.prefill_runs = 3, 4, 2
    lengths = [int(x) for x in a.lengths.split(",")]
    model = load_model(a.model, a.device, a.dtype)
    tok = Tokenizer(a.model, model.cfg.eos_token_ids)
    header = machine_lines() + [f"model {Path(a.model).name}, {a.dtype} on {a.device}; greedy, batch 1; decode: "
                                f"median of {a.segments - 1} segments of {a.segment_steps} steps (first segment "
                                f"excluded as warm-up); r_l = r_f = 0.3"]
    print("\n".join(header), flush=True)
    rows, prefill_rows = [], []
    for L in lengths:
        ids = prompt_ids(tok, L)
        results = {}
        for name, cfg in METHODS.items():
            results[name] = r = run_method(model, tok, ids, cfg, a.segments, a.segment_steps)
            print(f"L={L} {name}: decode {r['decode']:.2f} tok/s, kept {r['kept']:.3f}, KV {r['kv_bytes'] / 2**20:.1f}"
                  f" MiB of {r['kv_full'] / 2**20:.1f} MiB, prefill {r['prefill_s']:.2f} s", flush=True)
        for name, r in results.items():
            rows.append(f"| {L} | {name} | {r['decode']:.2f} | {r['decode'] / results['full']['decode']:.2f}x | "
                        f"{r['kept']:.3f} | {r['kv_bytes'] / 2**20:.1f} | {r['kv_bytes'] / r['kv_full']:.3f} |")
        # Profiling cost: prefill with auto vs the full cache, alternating.
        runs = a.prefill_runs if L == lengths[0] else 1
        full_t, auto_t, prof_t = [], [], []
        for _ in range(runs):
            for name, times in (("full", full_t), ("auto T=0.98", auto_t)):
                caches, on_tokens = make_caches(model, tok, METHODS[name], L + 1)
                if on_tokens:
                    on_tokens(ids)
                times.append(timed(prefill, model, ids, caches)[0])
                if on_tokens:
                    prof_t.append(sum(c.profile_seconds for c in caches))
        f, p = statistics.median(full_t), statistics.median(auto_t)
        prefill_rows.append(f"| {L} | {runs} | {f:.3f} | {p:.3f} | {100 * (p / f - 1):+.1f}% | "
                            f"{statistics.median(prof_t):.3f} |")
        print(prefill_rows[-1], flush=True)
    text = "\n".join([
        f"# FastGen vs full cache: {a.dtype} on {a.device}", "", *[f"- {h}" for h in header],
        f"- load average at end: {load_average()}", "",
        "| prompt tokens | method | decode tok/s | vs full | kept fraction | KV MiB (physical) | KV vs full |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |", *rows, "",
        "Prefill with profiling (`auto`, T = 0.98) against plain prefill with the full cache:", "",
        "| prompt tokens | runs (median) | full prefill s | auto prefill s | added | profile bookkeeping s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |", *prefill_rows, "",
        "`profile bookkeeping` is the time in the profile sums, policy choice and store building; `added` is the "
        "whole difference, which also includes block-wise attention (it returns probabilities) in place of the "
        "fused kernel.", ""])
    out = Path(a.out) if a.out else ROOT / "bench" / "results" / f"fastgen_{a.device}_{a.dtype}.md"
    write_atomic(out, text)
    print(text)


if __name__ == "__main__":
    main()
