"""tinygen (float32, bfloat16, int8, int4) against HF transformers `LlamaForCausalLM.generate` (float32, bfloat16):
same weights and prompt, greedy, batch 1, every engine loaded at once and taking turns.

    python bench/bench_engine.py            # 5 runs each -> bench/results/engine_cpu.md
    python bench/bench_engine.py --quick    # smoke check: 2 runs, 32 new tokens
    python bench/bench_engine.py --profile  # also: where one decode step's time goes, per tinygen mode
    python bench/bench_engine.py --modes bfloat16,bfloat16+compile,int4,int4+compile   # +compile: compiled.py

Method (also written beside the results):
- Prompt: exactly --prompt-tokens ids of Pride and Prejudice from chapter 1, no chat template; --new-tokens forced
  new tokens (tinygen ignore_eos=True; HF min_new_tokens = max_new_tokens, do_sample=False).
- Every engine is loaded before the first run; each round runs every engine once, in turn (tinygen float32,
  bfloat16, int8, int4, HF float32, bfloat16, ...), so a change in background load hits all of them alike. One
  warm-up round is excluded; figures are medians over --runs rounds.
- tinygen: its own GenerationStats. Prefill = prompt tokens / (prefill forward + choosing the first token);
  decode = decode steps (new tokens - 1) / their time. The quantized modes keep activations, embedding, norms and
  KV cache in bfloat16 (the packed CPU kernels are many times slower with float32 activations).
- HF: prefill = prompt tokens / time of one forward on the prompt with use_cache=True and logits_to_keep=1 (what
  generate's first step runs, without generate's setup); decode = (new tokens - 1) / (time of generate(new tokens)
  - time of generate(1)), so generate's setup and its prefill cancel out.
- Share of bound = bytes of weights one decode step reads x decode tok/s / measured read bandwidth (median of
  big.sum() over a 1 GiB float32 tensor at the same thread count). Bytes read: every linear layer's stored weights
  (int8 codes, packed int4 and their scales in the quantized modes), the norms, the LM head (a tied head reads the
  whole embedding), and one embedding row. KV-cache reads are left out.
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
from tinygen.compiled import CompiledStep  # noqa: E402
from tinygen.generate import GenerationStats, decode_step, full_caches, generate, prefill  # noqa: E402
from tinygen.loader import DTYPES, load_model  # noqa: E402
from tinygen.quant import MODES, weight_bytes_per_token  # noqa: E402
from tinygen.tokenizer import Tokenizer  # noqa: E402

DEFAULT_MODEL = ROOT / "weights" / "SmolLM2-135M-Instruct"
QUANT_DTYPE = "bfloat16"  # the dtype of everything but the quantized weights in int8/int4 modes


def parse_args():
    p = argparse.ArgumentParser(description="tinygen vs HF transformers generate, CPU or GPU, batch 1, greedy")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="HF-layout Llama checkpoint directory")
    p.add_argument("--modes", default="float32,bfloat16,int8,int4",
                   help="tinygen: dtypes and/or quantized modes, comma-separated (default float32,bfloat16,int8,int4; "
                   "float32/int4 keeps the rest of a quantized model in float32 instead of bfloat16)")
    p.add_argument("--hf", default="float32,bfloat16", help="HF transformers dtypes (default float32,bfloat16; "
                   "'' for none)")
    p.add_argument("--runs", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    p.add_argument("--profile", action="store_true", help="also profile decode steps of each tinygen mode")
    p.add_argument("--quick", action="store_true", help="smoke check: 2 runs, 32 new tokens")
    p.add_argument("--out", help="markdown results file (default bench/results/engine_cpu.md, _quick.md for --quick)")
    a = p.parse_args()
    if a.quick:
        a.runs, a.new_tokens = 2, 32
    a.out = Path(a.out or ROOT / "bench" / "results" / ("engine_cpu_quick.md" if a.quick else "engine_cpu.md"))
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    a.hf = [d.strip() for d in a.hf.split(",") if d.strip()]
    ok = lambda m: m in DTYPES or m in MODES or (m.partition("/")[0] in DTYPES and m.partition("/")[2] in MODES)  # noqa: E731
    assert all(ok(m.removesuffix("+compile")) for m in a.modes), \
        f"--modes: choose from {', '.join([*DTYPES, *MODES])} or DTYPE/MODE, each optionally +compile"
    assert all(d in DTYPES for d in a.hf), f"--hf: choose from {', '.join(DTYPES)}"
    assert a.runs >= 1 and a.new_tokens >= 2 and a.prompt_tokens >= 1, "--runs >= 1, --new-tokens >= 2, --prompt-tokens >= 1"
    return a


class Tinygen:
    def __init__(self, model_dir, mode: str, ids: list[int], n_new: int):
        self.name, self.engine = f"tinygen {mode}", "tinygen"
        mode, _, extra = mode.partition("+")  # "+compile": decode through compiled.CompiledStep
        dtype, _, quantize = mode.rpartition("/") if "/" in mode else ("", "", mode)
        quantize = quantize if quantize in MODES else None
        self.mode, self.compiled = quantize or mode, extra == "compile"
        self.dtype = (dtype or QUANT_DTYPE) if quantize else mode
        self.model = load_model(model_dir, device="cpu", dtype=self.dtype, quantize=quantize, prepack=not self.compiled)
        self.decode, self.compile_seconds = decode_step, 0.0
        if self.compiled:
            step = CompiledStep(self.model)
            self.compile_seconds = step.warm_up()
            assert step.compiled, f"{self.name}: torch.compile failed"
            self.decode = step.decoder
        self.ids, self.n_new = ids, n_new
        self.weight_bytes = weight_bytes_per_token(self.model)

    def run(self) -> dict:
        caches = full_caches(self.model, len(self.ids) + self.n_new)
        stats = GenerationStats()
        out = list(generate(self.model, self.ids, caches, self.n_new, ignore_eos=True, stats=stats, decode=self.decode))
        assert len(out) == self.n_new and stats.decode_steps == self.n_new - 1, "tinygen did not generate every token"
        return dict(prefill=stats.prefill_seconds, decode_tps=stats.decode_tokens_per_second, tokens=out)

    def profile(self, steps: int = 16, rows: int = 10) -> str:
        """Self CPU time per op over `steps` decode steps after the prompt, as a markdown table."""
        from torch.profiler import ProfilerActivity, profile

        caches = full_caches(self.model, len(self.ids) + steps + 44)
        prefill(self.model, self.ids, caches)
        token, pos = torch.tensor([self.ids[-1]]), len(self.ids)
        for _ in range(3):
            self.decode(self.model, token, caches, pos)
            pos += 1
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps - 3):
                self.decode(self.model, token, caches, pos)
                pos += 1
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        n = steps - 3
        if self.compiled:  # the frozen graph's matrix products cannot be stubbed out: the step alone
            times = [timed(self.decode, self.model, token, caches, pos + i)[0] for i in range(20)]
            step = statistics.median(times) * 1e3
            rest = "(compiled: the generated C++ loops and the matrix products they call are the ops below)"
        else:
            step, floor = self.step_floor(caches, token, pos)
            rest = (f"and {floor:.2f} ms with every matrix product (layers and head, with the quantized kernels' "
                    "casts) replaced by a free stub: what the rest of the step (norms, rotary, attention, casts, "
                    "Python) costs")
        lines = [f"**{self.name}**: {total / n / 1e3:.2f} ms of op time per step, "
                 f"{sum(e.count for e in events) // n} op calls per step; unprofiled, a step takes {step:.2f} ms, "
                 + rest,
                 "",
                 "| op | calls per step | ms per step | share |", "| --- | ---: | ---: | ---: |"]
        for e in events[:rows]:
            lines.append(f"| `{e.key}` | {e.count / n:.0f} | {e.self_cpu_time_total / n / 1e3:.2f} | "
                         f"{e.self_cpu_time_total / total:.0%} |")
        return "\n".join(lines) + "\n"


    def step_floor(self, caches, token, pos: int, steps: int = 20) -> tuple[float, float]:
        """Median ms of a decode step as it is, then with every linear layer and the head returning a preallocated
        output at no cost (the caches keep growing: both see about the same lengths)."""
        def median_ms(pos):
            times = []
            for _ in range(steps):
                times.append(timed(decode_step, self.model, token, caches, pos)[0])
                pos += 1
            return statistics.median(times) * 1e3, pos

        step, pos = median_ms(pos)
        linears = [m for m in self.model.modules() if hasattr(m, "out_features")]
        for m in linears:
            out = {}
            m.forward = lambda x, m=m, out=out: out.setdefault(
                (x.shape, x.dtype), x.new_zeros(*x.shape[:-1], m.out_features))
        try:
            floor, _ = median_ms(pos)
        finally:
            for m in linears:
                del m.forward  # the class's forward again
        return step, floor


class HF:
    def __init__(self, model_dir, dtype: str, ids: list[int], n_new: int):
        from transformers import LlamaForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.name, self.engine, self.mode, self.dtype = f"HF {dtype}", "HF", dtype, dtype
        self.model = LlamaForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).eval()
        self.prompt, self.n_new = torch.tensor([ids]), n_new
        self.kwargs = dict(attention_mask=torch.ones_like(self.prompt), do_sample=False,
                           pad_token_id=self.model.config.pad_token_id)
        # A tied head reads the embedding once per step; parameters() lists a tied tensor once.
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

    @torch.inference_mode()
    def run(self) -> dict:
        n, hf = self.n_new, self.model
        t_prefill, _ = timed(hf, self.prompt, use_cache=True, logits_to_keep=1)
        t_one, _ = timed(hf.generate, self.prompt, max_new_tokens=1, min_new_tokens=1, **self.kwargs)
        t_all, out = timed(hf.generate, self.prompt, max_new_tokens=n, min_new_tokens=n, **self.kwargs)
        tokens = out[0, self.prompt.shape[1]:].tolist()
        assert len(tokens) == n, "HF did not generate every token"
        return dict(prefill=t_prefill, decode_tps=(n - 1) / (t_all - t_one), tokens=tokens)


def summary(runs: list[dict]) -> dict:
    tps = [r["decode_tps"] for r in runs]
    return dict(prefill=statistics.median(r["prefill"] for r in runs), decode_tps=statistics.median(tps),
                decode_min=min(tps), decode_max=max(tps), tokens=runs[0]["tokens"])


def first_difference(a: list[int], b: list[int]) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return f"all {len(a)} identical" if i is None else f"identical for {i} tokens, then differ"


def report(args, machine: list[str], engines: list, results: dict, bw_gbs: float, rss: int, profiles: list[str]) -> str:
    n_prompt, n_new = args.prompt_tokens, args.new_tokens
    lines = ["# tinygen vs HF transformers: CPU, batch 1, greedy", "",
             *(f"- {m}" for m in machine),
             f"- settings: {n_prompt}-token prompt (Pride and Prejudice, chapter 1, no chat template), {n_new} forced new "
             f"tokens, greedy, batch 1, full cache; {args.runs} timed rounds, every engine once per round in turn "
             f"(medians; one warm-up round excluded); model `{Path(args.model).name}`",
             f"- measured read bandwidth: {bw_gbs:.1f} GB/s (median of `big.sum()` over 1 GiB float32, "
             f"{torch.get_num_threads()} threads)", "",
             "| engine | weights | prefill ms | prefill tok/s | decode tok/s (median, min-max) | weight bytes read per token | "
             "bandwidth bound tok/s | share of bound |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for e in engines:
        s, bound = results[e.name], bw_gbs * GB / e.weight_bytes
        weights = f"{e.mode} (rest {e.dtype})" if e.mode in MODES else e.dtype
        weights += f", compiled ({e.compile_seconds:.0f} s)" if getattr(e, "compiled", False) else ""
        lines.append(f"| {e.engine} | {weights} | {s['prefill'] * 1e3:.0f} | {n_prompt / s['prefill']:.0f} | "
                     f"{s['decode_tps']:.1f} ({s['decode_min']:.1f}-{s['decode_max']:.1f}) | "
                     f"{e.weight_bytes / 1e6:.1f} MB | {bound:.0f} | {s['decode_tps'] / bound:.0%} |")
    lines += ["", "Decode ratios (side by side, same rounds) and the issue's goals:", "",
              "| ratio | decode | prefill | goal (decode) |", "| --- | ---: | ---: | --- |"]
    goals = [("tinygen bfloat16", "HF bfloat16", ">= 2.0x"), ("tinygen float32", "HF float32", ">= 1.5x"),
             ("tinygen int8", "HF float32", ">= 3x"), ("tinygen int8", "tinygen bfloat16", ">= 1.6x"),
             ("tinygen int4", "tinygen int8", ">= 1.3x"), ("tinygen int4", "HF bfloat16", ""),
             ("tinygen float32/int8", "HF float32", ">= 3x"), ("tinygen float32/int8", "tinygen bfloat16", ">= 1.6x"),
             ("tinygen float32/int4", "tinygen float32/int8", ">= 1.3x")]
    # the same goals for the compiled modes (tinygen peers compiled too, HF as it is), then compiled against eager
    goals += [(a + "+compile", b if b.startswith("HF") else b + "+compile", goal) for a, b, goal in goals if goal]
    goals += [(f"tinygen {m}+compile", f"tinygen {m}", "") for m in ("float32", "bfloat16", "int8", "int4")]
    for a, b, goal in goals:
        if a in results and b in results:
            ra, rb = results[a], results[b]
            lines.append(f"| {a} / {b} | **{ra['decode_tps'] / rb['decode_tps']:.2f}x** | "
                         f"{rb['prefill'] / ra['prefill']:.2f}x | {goal} |")
    lines.append("")
    pairs = [(f"tinygen {d}", f"HF {d}") for d in DTYPES] + [(f"tinygen {m}", "tinygen float32") for m in MODES]
    pairs += [(f"tinygen {m}+compile", f"tinygen {m}") for m in [*DTYPES, *MODES]]
    for a, b in pairs:
        if a in results and b in results:
            lines.append(f"- greedy tokens, {a} vs {b}: {first_difference(results[a]['tokens'], results[b]['tokens'])}")
    lines += [f"- process max RSS (every engine loaded, before the bandwidth buffer): {rss / 1e9:.2f} GB",
              f"- load average at end: {load_average()}", "",
              "Method: tinygen prefill and decode come from its GenerationStats (decode = new tokens - 1 steps); its "
              "int8/int4 modes keep activations, embedding, norms and KV cache in bfloat16. HF prefill is one forward "
              "on the prompt with use_cache=True, logits_to_keep=1 (generate's first step without its setup); HF "
              "decode is (new tokens - 1) / (time of generate(new tokens) - time of generate(1)). Share of bound = "
              "weight bytes one decode step reads (linear weights as stored, quantized ones with their scales; norms; "
              "the LM head, a tied one as the whole embedding; one embedding row) x decode tok/s / read bandwidth; "
              "KV-cache reads are left out. `+compile`: decoded through tinygen/compiled.py (torch.compile, Inductor, "
              "freezing; the model loaded with plain float matrices), compiled before the rounds (the seconds it took "
              "are in the weights column); its prefill is the eager model's."]
    if profiles:
        lines += ["", "## Where a decode step's time goes (torch profiler, self CPU time by op)", "", *profiles]
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    machine = machine_lines()
    print("\n".join(machine), flush=True)
    ids = prompt_ids(Tokenizer(args.model), args.prompt_tokens)
    engines = [Tinygen(args.model, m, ids, args.new_tokens) for m in args.modes]
    engines += [HF(args.model, d, ids, args.new_tokens) for d in args.hf]
    runs = {e.name: [] for e in engines}
    for i in range(args.runs + 1):  # round 0 is the warm-up
        for e in engines:
            r = e.run()
            if i:
                runs[e.name].append(r)
        if i:
            print(f"  round {i}/{args.runs}: " + " | ".join(
                f"{e.name} {runs[e.name][-1]['prefill'] * 1e3:.0f} ms, {runs[e.name][-1]['decode_tps']:.1f} tok/s"
                for e in engines), flush=True)
    results = {name: summary(r) for name, r in runs.items()}
    profiles = [e.profile() for e in engines if args.profile and isinstance(e, Tinygen)]
    rss = max_rss_bytes()
    for e in engines:
        e.model = None  # free every model before the bandwidth buffer
    gc.collect()
    bw = read_bandwidth_gbs()  # after the runs, so its 1 GiB buffer is not in the max RSS above
    text = report(args, machine, engines, results, bw, rss, profiles)
    print("\n" + text, end="")
    write_atomic(args.out, text)
    print(f"\nwritten to {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
