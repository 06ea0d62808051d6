"""FastGen against the full cache: decode speed, physical KV bytes and profiling cost at long contexts.

    python bench/bench_fastgen.py                       # 1k, 4k, 8k tokens -> bench/results/fastgen_<device>.md
    python bench/bench_fastgen.py --lengths 1024 --quick

Method (also written beside the results):
- Prompt: exactly L ids of Pride and Prejudice from chapter 1, no chat template; greedy, batch 1, forced new tokens.
- For each length, one prefill per method, then --segments rounds in which every method decodes --segment-steps
  tokens in turn (so drifting background load hits all methods alike); the first round is warm-up; decode tok/s
  is the median over the other rounds. KV bytes are the pool blocks the caches' rows hold at the end (each block
  the K, V, positions, flags and scores of 16 slots), against a full cache of the same length.
- Methods: full, the budget profile at 0.7 with every layer at the same share, the same spread across layers by the
  model directory's calibration when it has one (`calibrated`, what cli.py's auto runs), the paper's profile at
  T = 0.98 and 0.95, and local+frequent.
- Profiling cost: prefill time with `auto` (the profile sums, policy choice, compacting each row to what it keeps)
  against prefill with the full cache (the same block-wise attention), alternating, median over
  1 + --prefill-runs at the shortest length (two at the longer lengths: the table's own prefill and one more).
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
from tinygen.fastgen.budget import calibration_path, with_calibration  # noqa: E402
from tinygen.fastgen.policy import FastGenConfig  # noqa: E402
from tinygen.generate import decode_step, prefill  # noqa: E402
from tinygen.loader import load_model  # noqa: E402
from tinygen.tokenizer import Tokenizer  # noqa: E402

METHODS = {"full": FastGenConfig(policy="full"), "auto budget=0.7": FastGenConfig(profile="budget", kv_budget=0.7),
           "auto T=0.98": FastGenConfig(profile="paper", threshold=0.98),
           "auto T=0.95": FastGenConfig(profile="paper", threshold=0.95),
           "local+frequent": FastGenConfig(policy="local+frequent")}
DEFAULT = "auto budget=0.7"  # the method whose profiling cost is measured


class Run:
    """One method at one length: its caches after a timed prefill, and a decode position to go on from."""

    def __init__(self, model, tok, ids, cfg, max_new):
        self.model = model
        self.caches, self.on_tokens = make_caches(model, tok, cfg, len(ids) + max_new + 1)
        if self.on_tokens:
            self.on_tokens(ids)
        self.prefill_s, logits = timed(prefill, model, ids, self.caches)
        self.token, self.pos, self.rates = logits.argmax(-1, keepdim=True), len(ids), []

    def segment(self, steps: int):
        def go():
            for _ in range(steps):
                if self.on_tokens:
                    self.on_tokens([int(self.token)])  # reading the sampled token: the step's one host sync
                self.token = decode_step(self.model, self.token, self.caches, self.pos).argmax(-1, keepdim=True)
                self.pos += 1
        self.rates.append(steps / timed(go)[0])

    def result(self) -> dict:
        c = self.model.cfg
        return {"prefill_s": self.prefill_s, "decode": statistics.median(self.rates[1:]),
                "profile_s": sum(getattr(x, "profile_seconds", 0.0) for x in self.caches),
                "kept": kept_fraction(self.caches), "kv_bytes": sum(x.nbytes() for x in self.caches),
                "kv_full": full_kv_bytes(c.n_layers, c.n_kv_heads, c.head_dim, self.caches[0].length,
                                         self.model.embed.weight.dtype)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "weights" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--lengths", default="1024,4096,8000", help="prompt lengths in tokens (8000 + new tokens < 8192)")
    ap.add_argument("--segments", type=int, default=5)
    ap.add_argument("--segment-steps", type=int, default=16)
    ap.add_argument("--prefill-runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--quick", action="store_true", help="smoke check: 3 segments of 4 steps, 2 prefill runs")
    ap.add_argument("--out", default=None, help="markdown results file (default bench/results/fastgen_<device>.md)")
    a = ap.parse_args()
    if a.quick:
        a.segments, a.segment_steps, a.prefill_runs = 3, 4, 2
    if a.threads:
        torch.set_num_threads(a.threads)
    lengths = [int(x) for x in a.lengths.split(",")]
    model = load_model(a.model, a.device, a.dtype)
    tok = Tokenizer(a.model, model.cfg.eos_token_ids)
    calibration = calibration_path(a.model, None)
    if calibration is not None:  # the default auto: the budget spread across layers by the model's calibration
        METHODS["auto budget=0.7 calibrated"] = with_calibration(METHODS["auto budget=0.7"], calibration,
                                                                 model.cfg.n_layers)
    header = machine_lines() + [f"model {Path(a.model).name}, {a.dtype} on {a.device}; greedy, batch 1; decode: "
                                f"median of {a.segments - 1} segments of {a.segment_steps} steps (first segment "
                                f"excluded as warm-up); r_l = r_f = 0.3"]
    print("\n".join(header), flush=True)
    rows, prefill_rows = [], []
    for L in lengths:
        ids = prompt_ids(tok, L)
        runs = {name: Run(model, tok, ids, cfg, a.segments * a.segment_steps) for name, cfg in METHODS.items()}
        for _ in range(a.segments):  # methods take turns, so a change in background load hits all of them alike
            for r in runs.values():
                r.segment(a.segment_steps)
        results = {name: r.result() for name, r in runs.items()}
        del runs
        for name, r in results.items():
            print(f"L={L} {name}: decode {r['decode']:.2f} tok/s, kept {r['kept']:.3f}, KV {r['kv_bytes'] / 2**20:.1f}"
                  f" MiB of {r['kv_full'] / 2**20:.1f} MiB, prefill {r['prefill_s']:.2f} s", flush=True)
        for name, r in results.items():
            rows.append(f"| {L} | {name} | {r['decode']:.2f} | {r['decode'] / results['full']['decode']:.2f}x | "
                        f"{r['kept']:.3f} | {r['kv_bytes'] / 2**20:.1f} | {r['kv_bytes'] / r['kv_full']:.3f} |")
        # Profiling cost: prefill with auto vs the full cache, alternating.
        n_runs = a.prefill_runs if L == lengths[0] else 1
        full_t, auto_t = [results["full"]["prefill_s"]], [results[DEFAULT]["prefill_s"]]
        prof_t = [results[DEFAULT]["profile_s"]]
        for _ in range(n_runs):
            for name, times in (("full", full_t), (DEFAULT, auto_t)):
                caches, on_tokens = make_caches(model, tok, METHODS[name], L + 1)
                if on_tokens:
                    on_tokens(ids)
                times.append(timed(prefill, model, ids, caches)[0])
                if on_tokens:
                    prof_t.append(sum(c.profile_seconds for c in caches))
        f, p = statistics.median(full_t), statistics.median(auto_t)
        prefill_rows.append(f"| {L} | {n_runs + 1} | {f:.3f} | {p:.3f} | {100 * (p / f - 1):+.1f}% | "
                            f"{statistics.median(prof_t):.3f} |")
        print(prefill_rows[-1], flush=True)
    text = "\n".join([
        f"# FastGen vs full cache: {a.dtype} on {a.device}", "", *[f"- {h}" for h in header],
        f"- load average at end: {load_average()}", "",
        "| prompt tokens | method | decode tok/s | vs full | kept fraction | KV MiB (physical) | KV vs full |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |", *rows, "",
        f"Prefill with profiling (`{DEFAULT}`, the default) against plain prefill with the full cache:", "",
        "| prompt tokens | runs (median) | full prefill s | auto prefill s | added | profile bookkeeping s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |", *prefill_rows, "",
        "Both prefills run the same block-wise attention; `added` is the whole difference, `profile bookkeeping` "
        "the host-timed part of it spent in the profile sums, the policy choice and building the stores.", ""])
    out = Path(a.out) if a.out else ROOT / "bench" / "results" / f"fastgen_{a.device}_{a.dtype}.md"
    write_atomic(out, text)
    print(text)


if __name__ == "__main__":
    main()
